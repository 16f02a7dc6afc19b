// Package nftrules installs the Linux kernel half of a divert handle: an
// nftables table owned by the handle's netlink socket, with one base chain
// per netfilter hook whose rules select the handle's packets (compiled from
// the filter IR) and hand them to an NFQUEUE queue or drop them.
//
// The table carries NFT_TABLE_F_OWNER, so it disappears when the socket is
// closed, also when the process dies; other programs cannot change it. No
// nft or iptables binary is needed: everything goes over netlink through
// github.com/google/nftables.
//
// # Chain priority
//
// WinDivert priorities run from -30000 to 30000 and higher priorities see a
// packet first. netfilter runs base chains of one hook in ascending numeric
// priority, so a handle of WinDivert priority P gets the nft priority
// ChainPriority(hook, P):
//
//   - input, output, forward: -P (P = 0 is the filter priority 0; handles
//     above 100 at output see addresses before DNAT (-100); above 200 before
//     conntrack (-200)).
//   - prerouting: -30401 - P, always below -400, so the chain runs before
//     conntrack defragmentation and sees IP fragments as on the wire.
//   - postrouting: 30101 - P, always above 100 (source NAT), so the chain sees
//     final addresses.
//
// The mapping is one to one, so two handles of different priorities never
// share an nft priority (whose relative order netfilter leaves undefined).
//
// # Marks
//
// Packets the library injects carry the socket mark Mark(Q) of the injecting
// handle: MarkMagic with Q + 30000 (0..60000) spread over bits 0-13 and
// 20-21, so that it grows with Q and leaves bits 14-19 clear, which other
// tools give a meaning to (kube-proxy's defaults: 0x4000 masquerades a
// packet, 0x8000 drops it; Calico's and Tailscale's bits from 0x10000 up).
// Every chain of a handle of priority P
// first accepts (skips) packets whose mark lies in [MarkMagic, Mark(P)], i.e.
// packets injected by a handle of priority Q <= P; only handles of lower
// priority than the injector see them, as in WinDivert ("a handle ignores
// injected packets whose injector priority is <= its own"). Accepting ends
// only this chain: the packet continues at later chains.
package nftrules

import (
	"errors"
	"fmt"

	"github.com/netdivert/divert/filter"
)

// Hook is a netfilter hook where a base chain is attached.
type Hook uint8

// Hooks.
const (
	HookPrerouting Hook = iota
	HookInput
	HookForward
	HookOutput
	HookPostrouting
)

var hookNames = [...]string{"prerouting", "input", "forward", "output", "postrouting"}

// String returns the nft name of the hook.
func (h Hook) String() string {
	if int(h) < len(hookNames) {
		return hookNames[h]
	}
	return fmt.Sprintf("Hook(%d)", uint8(h))
}

// Outbound reports whether packets at h leave the host (output,
// postrouting), and Inbound whether they arrive (prerouting, input).
// Forwarded packets are neither.
func (h Hook) Outbound() bool { return h == HookOutput || h == HookPostrouting }

// Inbound reports whether packets at h arrive at the host (prerouting,
// input).
func (h Hook) Inbound() bool { return h == HookPrerouting || h == HookInput }

// Action is what a rule does with a selected packet.
type Action uint8

// Actions.
const (
	// ActionQueue hands the packet to NFQUEUE.
	ActionQueue Action = iota
	// ActionDrop drops it in the kernel.
	ActionDrop
)

// Priority limits (WinDivert's).
const (
	PriorityHighest = 30000
	PriorityLowest  = -30000
)

// MarkMagic is the top byte of every mark the library puts on packets it
// injects; the injecting handle's priority + 30000 is in bits 0-13 (its
// low 14 bits) and 20-21 (its top 2). It is also Mark(PriorityLowest).
const MarkMagic uint32 = 0xD1 << 24

// markFree are the mark bits Mark leaves clear: kube-proxy's masquerade
// (0x4000) and drop (0x8000) bits, and the ones Calico (0x10000 accept,
// 0x20000 pass, scratch bits above) and Tailscale (0xff0000 mask: 0x40000,
// 0x80000) use.
const markFree uint32 = 0x000FC000

// Mark is the socket mark of packets injected by a handle of the given
// priority (clamped to -30000..30000). It grows with the priority, so that
// the marks of priorities up to P are the range [MarkMagic, Mark(P)].
func Mark(priority int16) uint32 {
	v := uint32(int32(clampPriority(priority)) + 30000) // 0..60000 < 1<<16
	return MarkMagic | (v>>14)<<20 | v&(1<<14-1)
}

func clampPriority(p int16) int16 {
	switch {
	case p > PriorityHighest:
		return PriorityHighest
	case p < PriorityLowest:
		return PriorityLowest
	}
	return p
}

// ChainPriority is the nft base-chain priority of a handle of WinDivert
// priority p at hook h (see the package documentation).
func ChainPriority(h Hook, p int16) int32 {
	q := int32(clampPriority(p))
	switch h {
	case HookPrerouting:
		return -30401 - q
	case HookPostrouting:
		return 30101 - q
	default:
		return -q
	}
}

// Config describes the rules of one handle.
type Config struct {
	Hooks       []Hook          // base chains to create, one per hook
	IPv4, IPv6  bool            // families the rules may match (neither: nothing matches)
	Priority    int16           // WinDivert priority (-30000..30000), higher = earlier chain
	Lowered     *filter.Lowered // nil = every packet; otherwise the rules select the Terms
	Action      Action          // queue or drop
	QueueNum    uint16          // first queue
	QueueCount  uint16          // ≥1; >1 = fanout over QueueNum..QueueNum+QueueCount-1 (by CPU, or by flow with FlowBalance)
	FlowBalance bool            // with QueueCount > 1: pick the queue by the kernel's flow hash (addresses, and the IPv4 protocol) instead of by CPU
	Bypass      bool            // accept instead of drop when no program listens on the queue
	KeepNDP     bool            // never select ICMPv6 types 133-137 (router/neighbour discovery, redirect)
	Fragments   FragSelect      // FragAny (default), or only / never IP fragments
	Dest        DestSelect      // DestAny (default), or only packets to / not to a local address
	// QueueFragments, with FragNone and ActionQueue: the fragments FragNone
	// keeps from the filter's rules are queued by a chain of their own
	// instead, whatever the filter: every IPv6 fragment, and every IPv4
	// fragment at hooks other than input (the kernel reassembles IPv4
	// before it). It skips only the handles' injections (the marks) and
	// the packets Dest leaves out. The table then does what a FragNone
	// table and a FragOnly table without a filter at the same hooks would
	// do together, and a packet crosses one table instead of two.
	QueueFragments bool
	// UnclearQueue, with ActionDrop: the IPv6 packets whose headers the
	// kernel walks otherwise than WinDivert (see v6Unclear) are queued to
	// QueueNum, before the drop rules see them, for user space to judge.
	UnclearQueue bool
}

func (c *Config) validate() error {
	if len(c.Hooks) == 0 {
		return errors.New("nftrules: no hooks")
	}
	seen := 0
	for _, h := range c.Hooks {
		if h > HookPostrouting {
			return fmt.Errorf("nftrules: unknown hook %d", h)
		}
		if seen&(1<<h) != 0 {
			return fmt.Errorf("nftrules: hook %v given twice", h)
		}
		seen |= 1 << h
	}
	if c.Priority < PriorityLowest || c.Priority > PriorityHighest {
		return fmt.Errorf("nftrules: priority %d outside %d..%d", c.Priority, PriorityLowest, PriorityHighest)
	}
	if c.Fragments > FragNone {
		return fmt.Errorf("nftrules: unknown fragment selection %d", c.Fragments)
	}
	if c.QueueFragments && (c.Fragments != FragNone || c.Action != ActionQueue) {
		return errors.New("nftrules: QueueFragments needs FragNone and ActionQueue")
	}
	if c.Dest > DestRemote {
		return fmt.Errorf("nftrules: unknown destination selection %d", c.Dest)
	}
	switch c.Action {
	case ActionQueue:
		if c.QueueCount == 0 {
			return errors.New("nftrules: QueueCount must be at least 1")
		}
		if int(c.QueueNum)+int(c.QueueCount)-1 > 0xFFFF {
			return fmt.Errorf("nftrules: queues %d..%d exceed 65535", c.QueueNum, int(c.QueueNum)+int(c.QueueCount)-1)
		}
	case ActionDrop:
		if c.UnclearQueue && c.QueueCount != 1 {
			return errors.New("nftrules: UnclearQueue needs one queue (QueueCount 1)")
		}
	default:
		return fmt.Errorf("nftrules: unknown action %d", c.Action)
	}
	return nil
}

// ErrUnsupported is wrapped by errors that mean the kernel lacks what the
// rules need (nf_tables, NFQUEUE, table ownership).
var ErrUnsupported = errors.New("nftrules: not supported by this kernel")
