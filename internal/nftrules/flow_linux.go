package nftrules

import (
	"runtime"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
)

// Flow tracking: a table whose rules only label connections.
//
// Conntrack runs in a network namespace only while something there
// registers it; a rule with a ct expression does, for as long as its table
// lives (nft_ct_init takes nf_ct_netns_get for the table's family, inet
// meaning both). The table InstallFlowTrack makes has base chains at input
// and output, policy accept, and rules that set conntrack label bits on the
// first packet of every connection the host sends or receives, and nothing
// else: no verdict, so traffic goes on as before (but for what running
// conntrack does by itself; see the divert package's README).
//
// The labels tell a flow with a local endpoint from a forwarded one, which
// crosses neither hook: conntrack reports both alike. They are set before
// the connection is confirmed (at postrouting for output, at the end of
// input), so conntrack's NEW event carries them (CTA_LABELS, with
// IPCT_LABEL among the event's causes). A loopback connection's first
// packet crosses output, is confirmed at lo's postrouting, and reaches
// input already confirmed: the input rule leaves lo's packets alone, and
// the output rule marks them LabelLoop as well.

// Conntrack label bits set by InstallFlowTrack's rules, in byte
// LabelByte of the 16-byte label (CTA_LABELS, and the register ct label set
// loads, have the same layout, whatever the host's byte order). They are
// the labels' last bits (127, 126, 125 on a little-endian host), far from
// the low bits that connlabel.conf names usually take.
const (
	LabelByte = 15
	// LabelOut marks a connection whose first packet the host sent.
	LabelOut byte = 0x80
	// LabelIn marks a connection whose first packet the host received
	// from another host.
	LabelIn byte = 0x40
	// LabelLoop marks a connection whose first packet went out through lo:
	// both ends are the host's.
	LabelLoop byte = 0x20
)

// FlowPriority is the WinDivert priority of InstallFlowTrack's base
// chains: nft priority 0 at input and output, after conntrack (-200)
// has taken the packet, before it confirms the connection.
const FlowPriority = 0

// InstallFlowTrack creates an owned table (family inet, named as Install
// names its tables, removed by Close or with the process) whose rules set
// the conntrack labels LabelOut, LabelIn and LabelLoop on new connections,
// and with that makes conntrack run in the calling thread's network
// namespace for the table's life. As Install, it takes over a parked
// table of the same base chains instead of registering hooks, and its
// Close parks the table while another user of the namespace in the
// process is open. Its errors are Install's.
func InstallFlowTrack() (*Ruleset, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cfg := Config{Hooks: []Hook{HookInput, HookOutput}, Priority: FlowPriority}
	r := &Ruleset{family: nftables.TableFamilyINet, bases: cfg.bases()}
	return r.install(func(reused bool) (bool, error) { return true, r.programFlow(reused) })
}

func (r *Ruleset) programFlow(reused bool) error {
	t := &nftables.Table{Name: r.table, Family: r.family}
	lo := binaryutil.NativeEndian.PutUint32(loIfIndex)
	in := r.baseChain(t, HookInput, FlowPriority, reused)
	out := r.baseChain(t, HookOutput, FlowPriority, reused)
	// input: what another host began (lo's packets were labelled at
	// output, and are confirmed already).
	r.conn.AddRule(&nftables.Rule{Table: t, Chain: in, Exprs: concat(
		[]expr.Any{&expr.Meta{Key: expr.MetaKeyIIF, Register: 1}, &expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: lo}},
		ctNew(), setLabel(LabelIn))})
	// output: what the host began; through lo, to itself.
	r.conn.AddRule(&nftables.Rule{Table: t, Chain: out, Exprs: concat(ctNew(), setLabel(LabelOut))})
	r.conn.AddRule(&nftables.Rule{Table: t, Chain: out, Exprs: concat(
		[]expr.Any{&expr.Meta{Key: expr.MetaKeyOIF, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: lo}},
		ctNew(), setLabel(LabelLoop))})
	if err := r.conn.flush(); err != nil {
		return mapTableErr("add chains and rules to "+r.table, r.table, r.conn.sock, err)
	}
	return nil
}

// loIfIndex is lo's interface index, 1 in every network namespace
// (LOOPBACK_IFINDEX).
const loIfIndex = 1

// ctNew matches a packet whose connection is new (ct state new).
func ctNew() []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitNEW), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

// setLabel sets bits of byte LabelByte of the connection's labels (ct
// label set): the kernel ORs them into the labels already set.
func setLabel(bits byte) []expr.Any {
	v := make([]byte, 16)
	v[LabelByte] = bits
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: v},
		&expr.Ct{Register: 1, Key: expr.CtKeyLABELS, SourceRegister: true},
	}
}
