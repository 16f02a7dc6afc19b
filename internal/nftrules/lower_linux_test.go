package nftrules

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/filter"
	"github.com/netdivert/divert/internal/netnstest"
)

// --- IR construction helpers ---

func C(f filter.Field, op filter.Op, v uint64) filter.Cond {
	return filter.Cond{Field: f, Op: op, Value: filter.Value{Lo: v}}
}

func CI(f filter.Field, idx int32, op filter.Op, v uint64) filter.Cond {
	return filter.Cond{Field: f, Index: idx, Op: op, Value: filter.Value{Lo: v}}
}

func CV(f filter.Field, op filter.Op, v filter.Value) filter.Cond {
	return filter.Cond{Field: f, Op: op, Value: v}
}

func addrV(s string) filter.Value {
	a := netip.MustParseAddr(s)
	if a.Is4() {
		b := a.As4()
		return filter.Value{Lo: 0xFFFF<<32 | uint64(b[0])<<24 | uint64(b[1])<<16 | uint64(b[2])<<8 | uint64(b[3])}
	}
	b := a.As16()
	v := be(b[:])
	return filter.Value{Hi: v.hi, Lo: v.lo}
}

func T(c ...filter.Cond) filter.Term { return filter.Term{Conds: c} }

func L(t ...filter.Term) *filter.Lowered { return &filter.Lowered{Terms: t, Exact: true} }

// --- the kernel test bed ---

var (
	local4  = netip.MustParseAddr("10.77.0.1")
	remote4 = netip.MustParseAddr("10.77.0.2")
	local6  = netip.MustParseAddr("fd00:77::1")
	remote6 = netip.MustParseAddr("fd00:77::2")
)

// bed is one namespace whose lo holds local4/32 and local6/128 (no route to
// the remote addresses, so no reply comes back to be counted); raw
// packets sent to those addresses loop through lo and pass prerouting with
// iif lo, where counters before (priority -70000) and after (priority
// +70000) the rules under test tell whether the rules dropped them.
type bed struct {
	hook      Hook // where the probe chains count (prerouting for newBed)
	ns        *netnstest.NS
	fd4, fd6  int
	probe     *nftables.Table
	pre, post *nftables.Chain
}

func newBed(t *testing.T) *bed { return newBedAt(t, HookPrerouting) }

// newBedAt is newBed with the probe chains at hook: for prerouting and
// input they count the packets that come in by lo, for output the ones
// that leave by it.
func newBedAt(t *testing.T, hook Hook) *bed {
	t.Helper()
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nftl")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := ns.Run(ctx, "sh", "-c", "ip addr add 10.77.0.1/32 dev lo && ip -6 addr add fd00:77::1/128 dev lo nodad"); err != nil {
		t.Fatal(err)
	}
	b := &bed{hook: hook, ns: ns, fd4: -1, fd6: -1}
	t.Cleanup(func() {
		if b.fd4 >= 0 {
			unix.Close(b.fd4)
		}
		if b.fd6 >= 0 {
			unix.Close(b.fd6)
		}
	})
	err := ns.Do(func() error {
		var err error
		if b.fd4, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW); err != nil {
			return err
		}
		if b.fd6, err = unix.Socket(unix.AF_INET6, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW); err != nil {
			return err
		}
		c, err := nftables.New()
		if err != nil {
			return err
		}
		b.probe = c.AddTable(&nftables.Table{Name: "probe", Family: nftables.TableFamilyINet})
		hooknum := map[Hook]*nftables.ChainHook{HookPrerouting: nftables.ChainHookPrerouting,
			HookInput: nftables.ChainHookInput, HookOutput: nftables.ChainHookOutput}[hook]
		dev := expr.MetaKeyIIF
		if hook.Outbound() {
			dev = expr.MetaKeyOIF
		}
		mk := func(name string, prio int32) (*nftables.Chain, *nftables.Rule) {
			ch := c.AddChain(&nftables.Chain{Name: name, Table: b.probe, Type: nftables.ChainTypeFilter,
				Hooknum: hooknum, Priority: nftables.ChainPriorityRef(nftables.ChainPriority(prio))})
			r := c.AddRule(&nftables.Rule{Table: b.probe, Chain: ch, Exprs: []expr.Any{
				meta(dev), cmp(expr.CmpOpEq, nativeU32(1)), &expr.Counter{}}})
			return ch, r
		}
		b.pre, _ = mk("pre", -70000)
		b.post, _ = mk("post", 70000)
		return c.Flush()
	})
	if err != nil {
		t.Fatal(err)
	}
	b.warmUp(t)
	return b
}

// warmUp sends an IPv4 and an IPv6 datagram, again every 50 ms, until the
// bed counts each, with no rules installed. In a namespace this new, about
// one bed in 60 lost its first IPv6 packet before prerouting (cause not
// found), and a test took that for a verdict.
func (b *bed) warmUp(t *testing.T) {
	t.Helper()
	pkts := [][]byte{
		ipv4(v4opts{proto: 17, ttl: 64, id: 1, src: remote4, dst: local4}, udp(9, 9, nil)),
		ipv6(v6opts{next: 17, hop: 64, src: remote6, dst: local6}, udp(9, 9, nil)),
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, p := range pkts {
		for counted := false; !counted; {
			pre0, _, err := b.counters()
			if err != nil {
				t.Fatal(err)
			}
			if err := b.send(p); err != nil {
				t.Fatalf("warm-up: send % x: %v", p, err)
			}
			for until := time.Now().Add(50 * time.Millisecond); !counted && time.Now().Before(until); {
				time.Sleep(time.Millisecond)
				pre, _, err := b.counters()
				if err != nil {
					t.Fatal(err)
				}
				counted = pre > pre0
			}
			if !counted && time.Now().After(deadline) {
				t.Fatalf("warm-up: % x never reached %s", p, b.hook)
			}
		}
	}
	// A late copy of a resent packet must not move the counters under the
	// test: wait until they stay still.
	for last := uint64(0); ; {
		time.Sleep(20 * time.Millisecond)
		pre, _, err := b.counters()
		if err != nil {
			t.Fatal(err)
		}
		if pre == last {
			return
		}
		last = pre
	}
}

// send sends p by the bed's raw socket for its IP version, to its
// destination address.
func (b *bed) send(p []byte) error { return unix.Sendto(b.fdFor(p), p, 0, dest(p)) }

// fdFor is the bed's raw socket for p's IP version.
func (b *bed) fdFor(p []byte) int {
	if p[0]>>4 == 4 {
		return b.fd4
	}
	return b.fd6
}

// dest is p's destination address as a raw socket's sendto takes it.
func dest(p []byte) unix.Sockaddr {
	if p[0]>>4 == 4 {
		return &unix.SockaddrInet4{Addr: [4]byte(p[16:20])}
	}
	return &unix.SockaddrInet6{Addr: [16]byte(p[24:40])}
}

func nativeU32(v uint32) []byte {
	// host byte order, as meta iif stores it
	return binary.NativeEndian.AppendUint32(nil, v)
}

// counters reads the packets counted before and after the rules.
func (b *bed) counters() (pre, post uint64, err error) {
	err = b.ns.Do(func() error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		get := func(ch *nftables.Chain) (uint64, error) {
			rules, err := c.GetRules(b.probe, ch)
			if err != nil {
				return 0, err
			}
			for _, r := range rules {
				for _, e := range r.Exprs {
					if ctr, ok := e.(*expr.Counter); ok {
						return ctr.Packets, nil
					}
				}
			}
			return 0, fmt.Errorf("no counter in %s", ch.Name)
		}
		if pre, err = get(b.pre); err != nil {
			return err
		}
		post, err = get(b.post)
		return err
	})
	return pre, post, err
}

// passes sends pkt and reports whether it got past the rules.
func (b *bed) passes(t *testing.T, pkt []byte) bool {
	t.Helper()
	pre0, post0, err := b.counters()
	if err != nil {
		t.Fatal(err)
	}
	if err := b.send(pkt); err != nil {
		t.Fatalf("send % x: %v", pkt, err)
	}
	deadline := time.Now().Add(2 * time.Second)
	var arrived time.Time
	for {
		pre, post, err := b.counters()
		if err != nil {
			t.Fatal(err)
		}
		if pre > pre0+1 || post > post0+1 {
			t.Fatalf("counters moved by more than one packet: pre %d→%d post %d→%d", pre0, pre, post0, post)
		}
		now := time.Now()
		switch {
		case post == post0+1:
			return true
		case pre == pre0+1 && arrived.IsZero():
			arrived = now
		case pre == pre0+1 && now.Sub(arrived) > 20*time.Millisecond:
			// Arrived before the rules and never after them: dropped.
			return false
		case now.After(deadline):
			t.Fatalf("packet never reached prerouting: % x", pkt)
		}
		time.Sleep(time.Millisecond)
	}
}

type namedPkt struct {
	name string
	b    []byte
}

func testPackets() []namedPkt {
	v4 := func(o v4opts, p []byte) []byte {
		if !o.src.IsValid() {
			o.src, o.dst = remote4, local4
		}
		if o.ttl == 0 {
			o.ttl = 64
		}
		if o.id == 0 {
			o.id = 0x1234
		}
		return ipv4(o, p)
	}
	v6 := func(o v6opts, p []byte) []byte {
		if !o.src.IsValid() {
			o.src, o.dst = remote6, local6
		}
		if o.hop == 0 {
			o.hop = 64
		}
		return ipv6(o, p)
	}
	return []namedPkt{
		{"v4 tcp syn :80", v4(v4opts{tos: 0x10, flags: 0x4000, proto: 6}, tcp(40000, 80, 0x02, 5, nil))},
		{"v4 tcp ack|psh :443 ttl 33 opts", v4(v4opts{proto: 6, ttl: 33, ihlOpt: 1, id: 0x4321}, tcp(40001, 443, 0x18, 6, []byte("0123456789")))},
		{"v4 udp :53", v4(v4opts{proto: 17}, udp(5353, 53, []byte("abcd")))},
		{"v4 icmp echo", v4(v4opts{proto: 1}, icmpEcho(8, 7, 1))},
		{"v4 udp first frag", v4(v4opts{proto: 17, flags: 0x2000}, udp(5353, 53, make([]byte, 24)))},
		{"v4 udp later frag", v4(v4opts{proto: 17, flags: 2}, make([]byte, 16))},
		{"v4 tcp doff 4", v4(v4opts{proto: 6}, tcp(1, 80, 0x02, 4, nil))},
		{"v4 tcp truncated", v4(v4opts{proto: 6}, tcp(1, 80, 0x02, 5, nil)[:12])},
		{"v4 gre", v4(v4opts{proto: 47}, make([]byte, 12))},
		{"v4 tcp later frag", v4(v4opts{proto: 6, flags: 0x2003}, make([]byte, 24))},
		{"v6 tcp ack :443", v6(v6opts{tc: 0x28, flow: 0x12345, next: 6, hop: 33}, tcp(40000, 443, 0x10, 5, nil))},
		{"v6 udp :53", v6(v6opts{next: 17}, udp(5353, 53, []byte("abcd")))},
		{"v6 icmpv6 echo", v6(v6opts{next: 58}, icmpEcho(128, 7, 1))},
		{"v6 hbh tcp :80", v6(v6opts{hbh: true, next: 6}, tcp(40000, 80, 0x02, 5, nil))},
		{"v6 udp first frag", v6(v6opts{frag: true, more: true, next: 17}, udp(5353, 53, make([]byte, 24)))},
		{"v6 udp later frag", v6(v6opts{frag: true, fragO: 4, next: 17}, make([]byte, 16))},
		// Headers that a rule's fast loads read but that are not there:
		// the presence load, the last of its rule, must refuse them.
		{"v4 udp later frag posing as :9999", v4(v4opts{proto: 17, flags: 3}, udp(5353, 9999, make([]byte, 8)))},
		{"v4 udp cut to 6 bytes, :9999", v4(v4opts{proto: 17}, udp(5353, 9999, nil)[:6])},
		{"v4 tcp later frag posing as syn :80", v4(v4opts{proto: 6, flags: 0x2005}, tcp(1, 80, 0x02, 5, nil))},
		// A non-first IPv6 fragment has no transport offset: the kernel
		// reads "transport" bytes from the fixed header, whose flow label
		// (bytes 2-3) is set to look like port 9999.
		{"v6 udp later frag posing as :9999", v6(v6opts{frag: true, fragO: 2, next: 17, flow: 9999}, udp(5353, 9999, make([]byte, 8)))},
		{"v6 tcp cut to 16 bytes, syn :80", v6(v6opts{next: 6}, tcp(1, 80, 0x02, 5, nil)[:16])},
	}
}

const (
	eq = filter.OpEq
	ne = filter.OpNe
	lt = filter.OpLt
	le = filter.OpLe
	gt = filter.OpGt
	ge = filter.OpGe
)

func lowerCases() []struct {
	name string
	l    *filter.Lowered
} {
	type lc = struct {
		name string
		l    *filter.Lowered
	}
	return []lc{
		{"nil (everything)", nil},
		{"no terms (nothing)", L()},
		{"true", L(T())},
		{"tcp", L(T(C(filter.FieldTCP, eq, 1)))},
		{"not tcp", L(T(C(filter.FieldTCP, eq, 0)))},
		{"udp", L(T(C(filter.FieldUDP, ne, 0)))},
		{"not udp", L(T(C(filter.FieldUDP, lt, 1)))},
		{"icmp or icmpv6", L(T(C(filter.FieldICMP, eq, 1)), T(C(filter.FieldICMPv6, eq, 1)))},
		{"not icmp and not icmpv6", L(T(C(filter.FieldICMP, eq, 0), C(filter.FieldICMPv6, eq, 0)))},
		{"ip", L(T(C(filter.FieldIP, eq, 1)))},
		{"not ipv6", L(T(C(filter.FieldIPv6, eq, 0)))},
		{"fragment", L(T(C(filter.FieldFragment, eq, 1)))},
		{"not fragment", L(T(C(filter.FieldFragment, eq, 0)))},
		{"udp.DstPort == 53", L(T(C(filter.FieldUDPDstPort, eq, 53)))},
		{"tcp.DstPort != 80", L(T(C(filter.FieldTCPDstPort, ne, 80)))},
		{"tcp.DstPort in [80,444)", L(T(C(filter.FieldTCPDstPort, ge, 80), C(filter.FieldTCPDstPort, lt, 444)))},
		{"tcp.DstPort > 80 or udp.SrcPort <= 5353", L(T(C(filter.FieldTCPDstPort, gt, 80)), T(C(filter.FieldUDPSrcPort, le, 5353)))},
		{"tcp.DstPort > -5 (neg)", L(T(CV(filter.FieldTCPDstPort, gt, filter.Value{Lo: 5, Neg: true})))},
		{"tcp.DstPort == -0 (neg)", L(T(CV(filter.FieldTCPDstPort, eq, filter.Value{Neg: true})))},
		{"tcp.DstPort < 70000 (out of range)", L(T(C(filter.FieldTCPDstPort, lt, 70000)))},
		{"tcp.Syn", L(T(C(filter.FieldTCPSyn, eq, 1)))},
		{"tcp.Ack == 0", L(T(C(filter.FieldTCPAck, eq, 0)))},
		{"tcp.Psh >= 1 and tcp.Fin == 0", L(T(C(filter.FieldTCPPsh, ge, 1), C(filter.FieldTCPFin, eq, 0)))},
		{"tcp.HdrLength > 5", L(T(C(filter.FieldTCPHdrLength, gt, 5)))},
		{"tcp.SeqNum == 0x01020304 and tcp.AckNum", L(T(C(filter.FieldTCPSeqNum, eq, 0x01020304), C(filter.FieldTCPAckNum, eq, 0x0a0b0c0d)))},
		{"tcp.Window == 64240", L(T(C(filter.FieldTCPWindow, eq, 64240)))},
		{"ip.SrcAddr == 10.77.0.2", L(T(CV(filter.FieldIPSrcAddr, eq, addrV("10.77.0.2"))))},
		{"ip.DstAddr in 10.77.0.0/24", L(T(CV(filter.FieldIPDstAddr, ge, addrV("10.77.0.0")), CV(filter.FieldIPDstAddr, le, addrV("10.77.0.255"))))},
		{"ip.DstAddr > 10.77.0.1", L(T(CV(filter.FieldIPDstAddr, gt, addrV("10.77.0.1"))))},
		{"ip.SrcAddr == ::1 (v6 value)", L(T(CV(filter.FieldIPSrcAddr, ne, addrV("::1"))))},
		{"ipv6.SrcAddr == fd00:77::2", L(T(CV(filter.FieldIPv6SrcAddr, eq, addrV("fd00:77::2"))))},
		{"ipv6.DstAddr < fd00:77::2", L(T(CV(filter.FieldIPv6DstAddr, lt, addrV("fd00:77::2"))))},
		{"localAddr == 10.77.0.1 or fd00:77::1", L(T(CV(filter.FieldLocalAddr, eq, addrV("10.77.0.1"))), T(CV(filter.FieldLocalAddr, eq, addrV("fd00:77::1"))))},
		{"remoteAddr >= ::ffff:10.77.0.2", L(T(CV(filter.FieldRemoteAddr, ge, addrV("10.77.0.2"))))},
		{"remotePort == 40000", L(T(C(filter.FieldRemotePort, eq, 40000)))},
		{"localPort == 0", L(T(C(filter.FieldLocalPort, eq, 0)))},
		{"remotePort == 8 (icmp type)", L(T(C(filter.FieldRemotePort, eq, 8)))},
		{"localPort != 53", L(T(C(filter.FieldLocalPort, ne, 53)))},
		{"ip.TTL < 64", L(T(C(filter.FieldIPTTL, lt, 64)))},
		{"ipv6.HopLimit == 33", L(T(C(filter.FieldIPv6HopLimit, eq, 33)))},
		{"ip.TOS == 0x10", L(T(C(filter.FieldIPTOS, eq, 0x10)))},
		{"ipv6.TrafficClass == 0x28", L(T(C(filter.FieldIPv6TrafficClass, eq, 0x28)))},
		{"ipv6.FlowLabel == 0x12345", L(T(C(filter.FieldIPv6FlowLabel, eq, 0x12345)))},
		{"ip.Id == 0x4321", L(T(C(filter.FieldIPId, eq, 0x4321)))},
		{"ip.DF", L(T(C(filter.FieldIPDF, eq, 1)))},
		{"ip.MF == 1 or ip.FragOff > 0", L(T(C(filter.FieldIPMF, eq, 1)), T(C(filter.FieldIPFragOff, gt, 0)))},
		{"ip.HdrLength == 6", L(T(C(filter.FieldIPHdrLength, eq, 6)))},
		{"ip.Length <= 40", L(T(C(filter.FieldIPLength, le, 40)))},
		{"ipv6.Length > 20", L(T(C(filter.FieldIPv6Length, gt, 20)))},
		{"udp.Length == 12", L(T(C(filter.FieldUDPLength, eq, 12)))},
		{"icmp.Type == 8 and icmp.Code == 0", L(T(C(filter.FieldICMPType, eq, 8), C(filter.FieldICMPCode, eq, 0)))},
		{"icmpv6.Type == 128 and icmpv6.Body", L(T(C(filter.FieldICMPv6Type, eq, 128), C(filter.FieldICMPv6Body, eq, 0x00070001)))},
		{"ip.Protocol == 17", L(T(C(filter.FieldIPProtocol, eq, 17)))},
		{"ipv6.NextHdr == 0", L(T(C(filter.FieldIPv6NextHdr, eq, 0)))},
		{"protocol == 6", L(T(C(filter.FieldProtocol, eq, 6)))},
		{"packet[9] == 6", L(T(CI(filter.FieldPacket, 9, eq, 6)))},
		{"packet16[6] == 0x4000", L(T(CI(filter.FieldPacket16, 6, eq, 0x4000)))},
		{"packet32[12] == 10.77.0.2", L(T(CI(filter.FieldPacket32, 12, eq, 0x0a4d0002)))},
		{"packet[60] != 0 (bounds)", L(T(CI(filter.FieldPacket, 60, ne, 0)))},
		{"udp.Payload[0] == 'a'", L(T(CI(filter.FieldUDPPayload, 0, eq, 'a')))},
		{"udp.Payload32[0] == 'abcd'", L(T(CI(filter.FieldUDPPayload32, 0, eq, 0x61626364)))},
		{"length == 48", L(T(C(filter.FieldLength, eq, 48)))},
		{"ifIdx == 1", L(T(C(filter.FieldIfIdx, eq, 1)))},
		{"ifIdx != 1", L(T(C(filter.FieldIfIdx, ne, 1)))},
		{"loopback", L(T(C(filter.FieldLoopback, eq, 1)))},
		{"outbound", L(T(C(filter.FieldOutbound, eq, 1)))},
		{"inbound and udp", L(T(C(filter.FieldInbound, eq, 1), C(filter.FieldUDP, eq, 1)))},
		{"zero == 0 and event == 0", L(T(C(filter.FieldZero, eq, 0), C(filter.FieldEvent, eq, 0)))},
		{"false", L(T(C(filter.FieldFalse, eq, 1)))},
		{"random8 == 3 and tcp (inexact)", L(T(C(filter.FieldRandom8, eq, 3), C(filter.FieldTCP, eq, 1)))},
		{"packet[-1] == 0 (inexact)", L(T(CI(filter.FieldPacket, -1, eq, 0)))},
		{"inexact input", &filter.Lowered{Terms: []filter.Term{T(C(filter.FieldUDP, eq, 1))}}},
	}
}

// TestLoweringAgainstKernel checks, for every (Lowered, packet) pair, that
// the kernel's decision (the packet dropped by the lowered rules or not)
// equals the IR's evaluation, and that Exact is reported correctly.
func TestLoweringAgainstKernel(t *testing.T) {
	b := newBed(t)
	pkts := testPackets()
	e := env{hook: HookPrerouting, ifIdx: 1, lo: true}
	for _, tc := range lowerCases() {
		t.Run(tc.name, func(t *testing.T) {
			var r *Ruleset
			err := b.ns.Do(func() error {
				var err error
				r, err = Install(Config{Hooks: []Hook{HookPrerouting}, IPv4: true, IPv6: true, Lowered: tc.l, Action: ActionDrop})
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			wantExact := tc.l == nil || tc.l.Exact
			if tc.l != nil {
				for _, term := range tc.l.Terms {
					for _, c := range term.Conds {
						if _, _, known := value(&pinfo{pkt: make([]byte, 64), v4: true}, e, c); !known {
							wantExact = false
						}
					}
				}
			}
			if r.Exact() != wantExact {
				t.Errorf("Exact() = %v, want %v", r.Exact(), wantExact)
			}
			for _, p := range pkts {
				want := evalLowered(tc.l, p.b, e)
				got := !b.passes(t, p.b)
				if got != want {
					t.Errorf("%s: kernel matched=%v, IR says %v", p.name, got, want)
				}
			}
		})
	}
}

// TestFilterEndToEnd compiles real filter text with package filter, lowers
// it, installs it at prerouting and compares the kernel's decision with
// (*filter.Filter).Match: equal when the Ruleset is exact, and never a
// packet the filter matches but the kernel misses otherwise.
func TestFilterEndToEnd(t *testing.T) {
	b := newBed(t)
	pkts := testPackets()
	for _, text := range []string{
		"true",
		"false",
		"tcp",
		"not tcp",
		"tcp.DstPort == 80 or udp.DstPort == 53",
		"tcp.DstPort != 80",
		"inbound and (icmp or icmpv6)",
		"ip.DstAddr >= 10.77.0.0 and ip.DstAddr <= 10.77.0.255 and tcp.Syn",
		"ipv6.SrcAddr == fd00:77::2 and not udp",
		"localPort == 53 or remotePort == 8",
		"tcp.DstPort == 70000",
		"fragment or ip.TTL < 40",
		"packet[9] == 17 and udp.PayloadLength > 0",
		"loopback and ifIdx == 1 and length > 40",
		"random8 < 128 and tcp",
		"ipv6.HopLimit == 33 or ip.Id == 0x4321",
		// Comparisons true for every value: false when the packet is too
		// short for the word (found by TestDiffRandomFilters).
		"packet32[32b] >= -186",
		"packet32[44b] <= 0xFFFFFFFF or icmp",
		// Presence tested last (TestLowerPresenceLast): fragments and cut
		// headers that pass the other tests must still be refused.
		"udp.DstPort == 9999",
		"tcp.DstPort == 80 and tcp.Syn",
		"localPort == 9999 or localPort == 80",
		// IPv6 address equality, compared a word at a time.
		"ipv6.DstAddr == fd00:77::1 and ipv6.SrcAddr == fd00:77::2",
		"ipv6.SrcAddr == fd00:77::1 or ipv6.DstAddr == fd00:77:0:1::1 or ipv6.DstAddr == fd00:77::1:0:1 or ipv6.DstAddr == fd01:77::1",
		"localAddr == fd00:77::1 and remoteAddr != fd00:77::2",
		"ipv6.DstAddr >= fd00:77:: and ipv6.DstAddr < fd00:77::2",
	} {
		t.Run(text, func(t *testing.T) {
			f, err := filter.Compile(text, filter.LayerNetwork)
			if err != nil {
				t.Fatal(err)
			}
			lw := f.Lower()
			var r *Ruleset
			if err := b.ns.Do(func() (err error) {
				r, err = Install(Config{Hooks: []Hook{HookPrerouting}, IPv4: true, IPv6: true, Lowered: lw, Action: ActionDrop})
				return err
			}); err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			t.Logf("exact=%v (IR exact=%v, %d terms)", r.Exact(), lw.Exact, len(lw.Terms))
			for _, p := range pkts {
				m := &filter.Meta{Layer: filter.LayerNetwork, Loopback: true, IfIdx: 1, IPv6: p.b[0]>>4 == 6}
				want := f.Match(p.b, m)
				got := !b.passes(t, p.b)
				switch {
				case want && !got:
					t.Errorf("%s: the filter matches but the kernel rules miss it", p.name)
				case r.Exact() && got != want:
					t.Errorf("%s: exact rules matched=%v, filter %v", p.name, got, want)
				}
			}
		})
	}
}

// TestLowerIfIdxByHook checks which interface ifIdx tests at each hook:
// the one a packet came in by, except where it leaves by one (output,
// postrouting) and at forward, where the backend, like WinDivert's forward
// layer, reports the interface the packet leaves by.
func TestLowerIfIdxByHook(t *testing.T) {
	for _, tc := range []struct {
		hook Hook
		want expr.MetaKey
	}{
		{HookPrerouting, expr.MetaKeyIIF},
		{HookInput, expr.MetaKeyIIF},
		{HookForward, expr.MetaKeyOIF},
		{HookOutput, expr.MetaKeyOIF},
		{HookPostrouting, expr.MetaKeyOIF},
	} {
		l := lowerer{hook: tc.hook}
		d, ok := l.cond(C(filter.FieldIfIdx, eq, 5))
		if !ok || len(d) != 1 {
			t.Fatalf("hook %v: ok %v, %d conjunctions", tc.hook, ok, len(d))
		}
		var keys []expr.MetaKey
		for _, e := range d[0].exprs {
			if m, ok := e.(*expr.Meta); ok {
				keys = append(keys, m.Key)
			}
		}
		if len(keys) != 1 || keys[0] != tc.want {
			t.Errorf("hook %v: ifIdx loads meta keys %v, want [%v]", tc.hook, keys, tc.want)
		}
	}
}

// TestLowerPresenceLast checks that each rule tests a header's presence
// (the 3-byte load the kernel evaluates on its slow path) only after its
// other tests, once per header: a packet of the protocol that the filter
// does not match, the bulk under a narrow filter, must leave the base chain
// at its first failing compare. TestFilterEndToEnd and the differential
// test check that the rules still select what the filter does.
func TestLowerPresenceLast(t *testing.T) {
	for _, text := range []string{
		"udp.DstPort == 9999",
		"udp.DstPort == 9999 and udp.SrcPort != 53",
		"tcp.DstPort == 443 and tcp.Syn and not tcp.Ack",
		"localPort == 53 or remotePort == 53",
		"icmp.Type == 8 or icmpv6.Type == 128",
		"tcp.DstPort == 80 or udp.SrcPort == 80",
		"udp.Length > 8 and udp.Payload[0] == 0x16",
	} {
		f, err := filter.Compile(text, filter.LayerNetwork)
		if err != nil {
			t.Fatalf("%s: %v", text, err)
		}
		for _, h := range []Hook{HookPrerouting, HookInput, HookOutput} {
			l := lowerer{hook: h}
			d := l.lower(f.Lower())
			if len(d) == 0 {
				t.Fatalf("%s at %v: no rules", text, h)
			}
			for i, c := range d {
				first := slices.IndexFunc(c.exprs, func(e expr.Any) bool { return presenceLoads[e] })
				if first < 0 {
					t.Errorf("%s at %v, rule %d: no presence load in %v", text, h, i, c.exprs)
					continue
				}
				tail := c.exprs[first:]
				for _, e := range tail {
					if !presenceLoads[e] {
						t.Errorf("%s at %v, rule %d: %T after a presence load", text, h, i, e)
					}
				}
				for j, e := range tail {
					if slices.Contains(tail[:j], e) {
						t.Errorf("%s at %v, rule %d: a presence load twice", text, h, i)
					}
				}
			}
		}
	}
	// The narrow filter's rule: protocol, port, and only then presence.
	f, err := filter.Compile("udp.DstPort == 9999", filter.LayerNetwork)
	if err != nil {
		t.Fatal(err)
	}
	l := lowerer{hook: HookInput}
	d := l.lower(f.Lower())
	want := []string{"meta", "cmp", "payload 2@2", "cmp", "payload 3@5"}
	var got []string
	for _, e := range d[0].exprs {
		switch e := e.(type) {
		case *expr.Meta:
			got = append(got, "meta")
		case *expr.Cmp:
			got = append(got, "cmp")
		case *expr.Payload:
			got = append(got, fmt.Sprintf("payload %d@%d", e.Len, e.Offset))
		default:
			got = append(got, fmt.Sprintf("%T", e))
		}
	}
	if !slices.Equal(got, want) {
		t.Errorf("udp.DstPort == 9999: rule %v, want %v", got, want)
	}
}

// TestLowerAddr16Words checks that an IPv6 address equality loads four
// aligned 32-bit words (the kernel's fast path) and that the orderings
// keep one 16-byte load.
func TestLowerAddr16Words(t *testing.T) {
	loads := func(text string) (got []string) {
		t.Helper()
		f, err := filter.Compile(text, filter.LayerNetwork)
		if err != nil {
			t.Fatal(err)
		}
		l := lowerer{hook: HookInput}
		d := l.lower(f.Lower())
		if len(d) != 1 {
			t.Fatalf("%s: %d rules", text, len(d))
		}
		for _, e := range d[0].exprs {
			if p, ok := e.(*expr.Payload); ok {
				got = append(got, fmt.Sprintf("%d@%d", p.Len, p.Offset))
			}
		}
		return got
	}
	for _, tc := range []struct {
		text string
		want []string
	}{
		{"ipv6.DstAddr == fd00:77::1", []string{"4@24", "4@28", "4@32", "4@36"}},
		{"ipv6.SrcAddr == fd00:77::2", []string{"4@8", "4@12", "4@16", "4@20"}},
		{"ipv6.DstAddr != fd00:77::1", []string{"16@24"}},
		{"ipv6.SrcAddr > fd00:77::1", []string{"16@8"}},
	} {
		if got := loads(tc.text); !slices.Equal(got, tc.want) {
			t.Errorf("%s: loads %v, want %v", tc.text, got, tc.want)
		}
	}
}

// v6Ext builds an IPv6 packet from remote6 to local6 with the extension
// headers ext (next, the first's type) before payload.
func v6Ext(next byte, ext, payload []byte) []byte {
	p := make([]byte, 40+len(ext)+len(payload))
	binary.BigEndian.PutUint32(p, 6<<28)
	binary.BigEndian.PutUint16(p[4:], uint16(len(ext)+len(payload)))
	p[6], p[7] = next, 64
	s, d := remote6.As16(), local6.As16()
	copy(p[8:], s[:])
	copy(p[24:], d[:])
	copy(p[40:], ext)
	copy(p[40+len(ext):], payload)
	return p
}

// TestLowerV6Unclear: IPv6 packets whose extension headers the kernel
// walks otherwise than WinDivert (a Mobility header before UDP, a second
// Fragment header before TCP) are selected by a queueing rule set whenever
// the filter matches them in user space, where the backend checks them.
// A queue without a reader drops what it selects, which the bed sees.
func TestLowerV6Unclear(t *testing.T) {
	b := newBed(t)
	frag := func(next byte, more bool) []byte {
		f := []byte{next, 0, 0, 0, 0x11, 0x22, 0x33, 0x44}
		if more {
			f[3] = 1
		}
		return f
	}
	pkts := []struct {
		name string
		b    []byte
	}{
		{"mobility, udp :53", v6Ext(unix.IPPROTO_MH, []byte{17, 0, 0, 0, 0, 0, 0, 0}, udp(5353, 53, []byte("abcd")))},
		{"fragment, fragment, tcp :80", v6Ext(44, append(frag(44, true), frag(6, false)...), tcp(40000, 80, 0x02, 5, nil))},
		{"mobility, fragment, udp :53", v6Ext(unix.IPPROTO_MH, append([]byte{44, 0, 0, 0, 0, 0, 0, 0}, frag(17, true)...), udp(5353, 53, make([]byte, 16)))},
	}
	for _, text := range []string{
		"udp", "udp.DstPort == 53", "protocol == 17", "localPort == 53",
		"not tcp", "protocol == 44", "tcp.DstPort != 80 or not tcp", "fragment",
	} {
		f, err := filter.Compile(text, filter.LayerNetwork)
		if err != nil {
			t.Fatal(err)
		}
		r := install(t, b.ns, Config{Hooks: []Hook{HookPrerouting}, IPv4: true, IPv6: true, Lowered: f.Lower(),
			Action: ActionQueue, QueueNum: 4711, QueueCount: 1})
		for _, p := range pkts {
			m := &filter.Meta{Layer: filter.LayerNetwork, Loopback: true, IfIdx: 1, IPv6: true}
			if f.Match(p.b, m) && b.passes(t, p.b) {
				t.Errorf("%q matches %s, but the kernel rules do not select it", text, p.name)
			}
		}
		r.Close()
	}
}
