package filter

import (
	"sync"
	"testing"
)

func seedFilters(f *testing.F, withPacket bool) {
	extra := []string{
		"tcp.DstPort == 443 and ip.DstAddr >= 10.0.0.0 and ip.DstAddr <= 10.255.255.255",
		"(ip? tcp: (udp? icmp: ip))", "packet32[-1] == 5 or tcp.Payload16[2b] > 7",
		"not tcp.DstPort == -0", "ipv6.SrcAddr == ::ffff:1.2.3.4", "timestamp < -5",
		"random8 < 10 or random32 > 0x7fffffff", "@WinDiv_WY_YXWWLXX_1dWW2mAX", "packet16[1 b] == 5",
		"localAddr == 10.0.0.1 and remotePort == 80", "event == PACKET", "(tcp? false: udp)",
	}
	pkts := [][]byte{pktEcho, pktTCPv4, pktUDPv4, pktTCPv6, pktICMPv6}
	rows := loadOracle(f)
	for i, r := range rows {
		if withPacket {
			f.Add(r.Filter, mustHex(r.PacketHex), i%2 == 0)
		} else {
			f.Add(r.Filter, byte(0))
		}
	}
	for i, s := range extra {
		if withPacket {
			f.Add(s, pkts[i%len(pkts)], i%2 == 1)
		} else {
			f.Add(s, byte(i%5))
		}
	}
}

// FuzzCompile: Compile never panics; a compiled filter's String compiles to
// the same String and the same results, and so does its Object.
func FuzzCompile(f *testing.F) {
	seedFilters(f, false)
	pkts := corpusPackets()
	f.Fuzz(func(t *testing.T, text string, layer byte) {
		l := Layer(layer % 5)
		flt, err := Compile(text, l)
		if err != nil {
			if _, ok := err.(*Error); !ok {
				t.Fatalf("error of type %T", err)
			}
			return
		}
		s := flt.String()
		g, err := Compile(s, l)
		if err != nil {
			t.Fatalf("%q: String %q does not compile: %v", text, s, err)
		}
		if g.String() != s {
			t.Fatalf("%q: String %q recompiles to %q", text, s, g.String())
		}
		o, err := Compile(flt.Object(), l)
		if err != nil {
			t.Fatalf("%q: Object %q does not compile: %v", text, flt.Object(), err)
		}
		_ = flt.Analyze()
		for _, p := range pkts[:12] {
			for _, m := range []*Meta{{Layer: l}, {Layer: l, Outbound: true, Timestamp: 77, Loopback: true}} {
				want := flt.Match(p, m)
				if g.Match(p, m) != want || o.Match(p, m) != want {
					t.Fatalf("%q: String %q or Object disagrees on %x", text, s, p)
				}
			}
		}
	})
}

// FuzzMatch: matching any bytes never panics, and Match agrees with Eval.
func FuzzMatch(f *testing.F) {
	filters := []*Filter{}
	for _, r := range loadOracle(f) {
		filters = append(filters, MustCompile(r.Filter, LayerNetwork))
	}
	filters = append(filters,
		MustCompile("random8 < 100 and tcp.Payload32[-1] != 7 and udp.Payload[3] == 1", LayerNetwork),
		MustCompile("localAddr == fd00::1 or remotePort == 80 or packet32[-4b] == 0", LayerNetwork),
		MustCompile("ipv6.FlowLabel == 5 or icmpv6.Body == 9 or icmp.Body == 9 or fragment", LayerNetworkForward))
	for _, p := range corpusPackets() {
		f.Add(p, uint16(0), true)
	}
	f.Add([]byte{0x60}, uint16(3), false)
	f.Add([]byte{0x45, 0, 0, 20, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, uint16(7), false)
	f.Fuzz(func(t *testing.T, pkt []byte, which uint16, out bool) {
		flt := filters[int(which)%len(filters)]
		m := &Meta{Layer: flt.Layer(), Outbound: out, IPv6: len(pkt) > 0 && pkt[0]>>4 == 6}
		got := flt.Match(pkt, m)
		ev, err := flt.Eval(pkt, m)
		if err == nil && ev != got {
			t.Fatalf("Match %v, Eval %v", got, ev)
		}
		if err != nil && got {
			t.Fatalf("Match accepted what Eval rejects: %v", err)
		}
	})
}

// FuzzLower: the lowered form over-approximates the filter, and is
// equivalent when Exact.
func FuzzLower(f *testing.F) {
	seedFilters(f, true)
	f.Fuzz(func(t *testing.T, text string, pkt []byte, out bool) {
		flt, err := Compile(text, LayerNetwork)
		if err != nil {
			return
		}
		l := flt.Lower()
		if len(l.Terms) > maxTerms {
			t.Fatalf("%q: %d terms", text, len(l.Terms))
		}
		an := flt.Analyze()
		for _, m := range []*Meta{{Outbound: out}, {Outbound: !out, Timestamp: 3, Loopback: true, IfIdx: 2}} {
			fm, lm := flt.Match(pkt, m), l.Match(pkt, m)
			if fm {
				checkAnalysis(t, text, &an, pkt, m)
			}
			if fm && !lm {
				t.Fatalf("%q matches %x, no Term does: %+v", text, pkt, l)
			}
			if l.Exact && fm != lm {
				t.Fatalf("%q: exact Lowered %v, filter %v on %x", text, lm, fm, pkt)
			}
			r := l.Restrict(func(c Cond) bool { return c.Field != FieldRandom8 && c.Field != FieldPacket })
			if fm && !r.Match(pkt, m) {
				t.Fatalf("%q: Restrict lost a match", text)
			}
		}
	})
}

// transportFilters are "tcp", "udp", "icmp" and "icmpv6" (made on first
// use: the field table is built by an init function, after package
// variables).
var transportFilters = sync.OnceValue(func() [4]*Filter {
	return [4]*Filter{MustCompile("tcp", LayerNetwork), MustCompile("udp", LayerNetwork),
		MustCompile("icmp", LayerNetwork), MustCompile("icmpv6", LayerNetwork)}
})

// checkAnalysis fails t unless an, the Analysis of filter text, allows a
// packet the filter matched: the backends hook and install rules only for
// the directions, families and protocols it says are possible, so a "not
// possible" that matches is a packet no rule takes.
func checkAnalysis(t *testing.T, text string, an *Analysis, pkt []byte, m *Meta) {
	t.Helper()
	bad := func(what string) {
		t.Fatalf("%q matches %x (outbound %v) but Analyze says no %s: %+v", text, pkt, m.Outbound, what, *an)
	}
	switch {
	case an.None:
		bad("packet at all")
	case m.Outbound && !an.Outbound:
		bad("outbound")
	case !m.Outbound && !an.Inbound:
		bad("inbound")
	case pkt[0]>>4 == 4 && !an.IPv4:
		bad("IPv4")
	case pkt[0]>>4 == 6 && !an.IPv6:
		bad("IPv6")
	case an.Events&(1<<EventPacket) == 0:
		bad("packet event")
	}
	// The first transport filter that matches names the packet's class.
	tf := transportFilters()
	for _, c := range []struct {
		f       *Filter
		allowed bool
		name    string
	}{{tf[0], an.TCP, "TCP"}, {tf[1], an.UDP, "UDP"}, {tf[2], an.ICMP, "ICMP"}, {tf[3], an.ICMPv6, "ICMPv6"}, {nil, an.Other, "other protocol"}} {
		if c.f == nil || c.f.Match(pkt, m) {
			if !c.allowed {
				bad(c.name)
			}
			return
		}
	}
}
