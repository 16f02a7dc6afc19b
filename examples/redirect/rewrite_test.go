package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/netdivert/divert"
)

// craft builds an IPv4 or IPv6 (by the addresses' family) TCP or UDP
// packet from src to dst with payload, its checksums computed in full.
func craft(t *testing.T, proto uint8, src, dst netip.AddrPort, payload []byte) []byte {
	t.Helper()
	var l4 []byte
	l4 = binary.BigEndian.AppendUint16(l4, src.Port())
	l4 = binary.BigEndian.AppendUint16(l4, dst.Port())
	if proto == protoTCP {
		l4 = binary.BigEndian.AppendUint32(l4, 0x01020304) // seq
		l4 = binary.BigEndian.AppendUint32(l4, 0xa0b0c0d0) // ack
		l4 = append(l4, 5<<4, 0x18)                        // data offset 5, PSH|ACK
		l4 = binary.BigEndian.AppendUint16(l4, 502)        // window
		l4 = append(l4, 0, 0, 0, 0)                        // checksum, urgent pointer
	} else {
		l4 = binary.BigEndian.AppendUint16(l4, uint16(8+len(payload)))
		l4 = append(l4, 0, 0) // checksum
	}
	l4 = append(l4, payload...)
	var b []byte
	if src.Addr().Is4() {
		b = []byte{0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0}
		binary.BigEndian.PutUint16(b[2:], uint16(20+len(l4)))
		s, d := src.Addr().As4(), dst.Addr().As4()
		b = append(append(b, s[:]...), d[:]...)
	} else {
		b = []byte{0x60, 0x01, 0x23, 0x45, 0, 0, proto, 64}
		binary.BigEndian.PutUint16(b[4:], uint16(len(l4)))
		s, d := src.Addr().As16(), dst.Addr().As16()
		b = append(append(b, s[:]...), d[:]...)
	}
	b = append(b, l4...)
	if err := divert.CalcChecksums(b, nil, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// transportOff is the offset of b's TCP or UDP header (no options or
// extension headers in crafted packets).
func transportOff(b []byte) int {
	if b[0]>>4 == 4 {
		return 20
	}
	return 40
}

// withPort returns a copy of b with the port at off (0 source, 2
// destination) set to port and every checksum recomputed in full: what the
// rewrite must give.
func withPort(t *testing.T, b []byte, off int, port uint16) []byte {
	t.Helper()
	w := bytes.Clone(b)
	binary.BigEndian.PutUint16(w[transportOff(w)+off:], port)
	if err := divert.CalcChecksums(w, nil, 0); err != nil {
		t.Fatal(err)
	}
	return w
}

// verified is the Address of a packet whose checksums the backend reported
// finished.
func verified(out bool) divert.Address {
	return divert.Address{Layer: divert.LayerNetwork, Outbound: out, IPChecksum: true, TCPChecksum: true, UDPChecksum: true}
}

var (
	server4 = netip.MustParseAddr("10.201.9.2")
	client4 = netip.MustParseAddr("10.201.9.1")
	server6 = netip.MustParseAddr("fd00:c9:9::2")
	client6 = netip.MustParseAddr("fd00:c9:9::1")
)

// payloads of odd and even lengths, one that is empty, and one whose words
// push the sums through 0xFFFF.
var payloads = [][]byte{nil, []byte("hello 1"), []byte("echo: hello 12"), bytes.Repeat([]byte{0xff}, 33)}

// TestRewrite rewrites crafted packets of both families and protocols, in
// both directions and over several ports and payloads, and compares each
// with the same port change followed by a full recomputation of the
// checksums (CalcChecksums on a copy): the incremental update must give the
// same bytes.
func TestRewrite(t *testing.T) {
	ports := [][2]uint16{{8080, 9090}, {53, 5353}, {1, 65535}, {65535, 1}, {0x00ff, 0xff00}}
	for _, proto := range []uint8{protoTCP, protoUDP} {
		for _, fam := range [][2]netip.Addr{{client4, server4}, {client6, server6}} {
			for _, pp := range ports {
				for _, pl := range payloads {
					r := redirect{proto: proto, from: pp[0], to: pp[1]}
					cport := uint16(40000 + len(pl))
					name := fmt.Sprintf("%s/%v/%d-%d/%d", r.protoName(), fam[1], pp[0], pp[1], len(pl))

					// Inbound, client to port from: destination port becomes to.
					in := craft(t, proto, netip.AddrPortFrom(fam[0], cport), netip.AddrPortFrom(fam[1], r.from), pl)
					want := withPort(t, in, 2, r.to)
					a := verified(false)
					res := r.rewrite(in, &a)
					if res.kind != rewroteIn || res.recomputed || res.err != nil || !bytes.Equal(in, want) {
						t.Errorf("%s inbound: kind %d recomputed %v err %v\n got  %x\n want %x", name, res.kind, res.recomputed, res.err, in, want)
					}
					if res.pkt.DstPort() != r.to || res.oldPort != r.from {
						t.Errorf("%s inbound: parsed port %d, old %d", name, res.pkt.DstPort(), res.oldPort)
					}

					// Outbound, the server's reply from port to: source port becomes from.
					out := craft(t, proto, netip.AddrPortFrom(fam[1], r.to), netip.AddrPortFrom(fam[0], cport), pl)
					want = withPort(t, out, 0, r.from)
					a = verified(true)
					res = r.rewrite(out, &a)
					if res.kind != rewroteOut || res.recomputed || res.err != nil || !bytes.Equal(out, want) {
						t.Errorf("%s outbound: kind %d recomputed %v err %v\n got  %x\n want %x", name, res.kind, res.recomputed, res.err, out, want)
					}
				}
			}
		}
	}
}

// TestRewriteOffloaded gives rewrite packets whose Address says a checksum
// is unfinished, their checksum field holding something else than the
// checksum (as a checksum-offloaded packet holds the pseudo-header sum):
// rewrite recomputes them all and sets the bits.
func TestRewriteOffloaded(t *testing.T) {
	r := redirect{proto: protoTCP, from: 8080, to: 9090}
	for _, proto := range []uint8{protoTCP, protoUDP} {
		r.proto = proto
		for _, fam := range [][2]netip.Addr{{client4, server4}, {client6, server6}} {
			b := craft(t, proto, netip.AddrPortFrom(fam[0], 40001), netip.AddrPortFrom(fam[1], r.from), []byte("hello"))
			want := withPort(t, b, 2, r.to)
			sum := transportOff(b) + 16
			if proto == protoUDP {
				sum = transportOff(b) + 6
			}
			binary.BigEndian.PutUint16(b[sum:], 0x1234) // not the checksum
			a := divert.Address{Layer: divert.LayerNetwork, IPChecksum: true}
			res := r.rewrite(b, &a)
			if res.kind != rewroteIn || !res.recomputed || res.err != nil || !bytes.Equal(b, want) {
				t.Errorf("%s %v: kind %d recomputed %v err %v\n got  %x\n want %x", r.protoName(), fam[1], res.kind, res.recomputed, res.err, b, want)
			}
			if !a.TCPChecksum && proto == protoTCP || !a.UDPChecksum && proto == protoUDP {
				t.Errorf("%s %v: CalcChecksums did not set the Address's bit: %+v", r.protoName(), fam[1], a)
			}
		}
	}
	// IPv4 with only IPChecksum clear (the IPv4 header checksum unknown):
	// recomputed too, as the setters' documentation says.
	b := craft(t, protoTCP, netip.AddrPortFrom(client4, 40001), netip.AddrPortFrom(server4, 8080), nil)
	want := withPort(t, b, 2, 9090)
	b[10], b[11] = 0, 0
	a := divert.Address{TCPChecksum: true, UDPChecksum: true}
	r.proto = protoTCP
	if res := r.rewrite(b, &a); !res.recomputed || !bytes.Equal(b, want) {
		t.Errorf("IPChecksum clear: recomputed %v\n got  %x\n want %x", res.recomputed, b, want)
	}
}

// TestRewriteUDPNoChecksum: an IPv4 UDP datagram without a checksum (0)
// keeps none; a full recomputation would add one, so compare by hand.
func TestRewriteUDPNoChecksum(t *testing.T) {
	r := redirect{proto: protoUDP, from: 5353, to: 53}
	b := craft(t, protoUDP, netip.AddrPortFrom(client4, 40001), netip.AddrPortFrom(server4, 5353), []byte("q"))
	b[26], b[27] = 0, 0
	a := verified(false)
	if res := r.rewrite(b, &a); res.kind != rewroteIn || res.pkt.DstPort() != 53 || b[26] != 0 || b[27] != 0 {
		t.Fatalf("kind %d port %d checksum %x", res.kind, res.pkt.DstPort(), b[26:28])
	}
}

// TestRewriteUnchanged gives rewrite the packets it must leave byte for
// byte as they are, and checks how it classifies them.
func TestRewriteUnchanged(t *testing.T) {
	r := redirect{proto: protoTCP, from: 8080, to: 9090}
	c, s := netip.AddrPortFrom(client4, 40001), netip.AddrPortFrom(server4, 8080)
	tcpIn := craft(t, protoTCP, c, s, []byte("x"))
	frag := bytes.Clone(tcpIn)
	frag[6], frag[7] = 0x00, 0x10 // fragment offset 16 (128 bytes): a non-first fragment
	divert.CalcChecksums(frag, nil, 0)
	truncated := craft(t, protoTCP, c, s, bytes.Repeat([]byte("y"), 100))[:60]
	icmp := []byte{0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 10, 201, 9, 1, 10, 201, 9, 2, 8, 0, 0, 0, 0, 1, 0, 1}
	divert.CalcChecksums(icmp, nil, 0)
	for _, tc := range []struct {
		name string
		b    []byte
		a    divert.Address
		want kind
		why  string
	}{
		{"garbage", make([]byte, 40), verified(false), malformed, "not an IPv4 or IPv6 packet"},
		{"short", []byte{0x45, 0, 0, 20}, verified(false), malformed, ""},
		{"truncated", truncated, verified(false), malformed, "truncated"},
		{"udp to a tcp redirect", craft(t, protoUDP, c, s, nil), verified(false), unexpected, "not a tcp packet"},
		{"icmp", icmp, verified(false), unexpected, "protocol 1"},
		{"non-first fragment", frag, verified(false), unexpected, "fragment"},
		{"outbound to port from", tcpIn, verified(true), unexpected, "not one the redirection rewrites"},
		{"inbound to port to (a direct client)", craft(t, protoTCP, c, netip.AddrPortFrom(server4, 9090), nil), verified(false), unexpected, "not one"},
		{"inbound from port to", craft(t, protoTCP, netip.AddrPortFrom(client4, 9090), netip.AddrPortFrom(server4, 7), nil), verified(false), unexpected, "not one"},
		{"loopback", tcpIn, divert.Address{Outbound: true, Loopback: true}, unexpected, "loopback"},
	} {
		b := bytes.Clone(tc.b)
		res := r.rewrite(b, &tc.a)
		if res.kind != tc.want || !bytes.Equal(b, tc.b) || res.err == nil || !strings.Contains(res.err.Error(), tc.why) {
			t.Errorf("%s: kind %d (want %d), err %v (want %q), changed %v", tc.name, res.kind, tc.want, res.err, tc.why, !bytes.Equal(b, tc.b))
		}
	}
}

// TestFilterSelects checks that the handle's filter takes exactly the
// packets rewrite rewrites: evaluated (divert.EvalFilter, the filter
// language's own evaluator) on the crafted packets in every direction, on
// the network and on loopback.
func TestFilterSelects(t *testing.T) {
	for _, proto := range []uint8{protoTCP, protoUDP} {
		r := redirect{proto: proto, from: 8080, to: 9090}
		f := r.filter("")
		for _, fam := range [][2]netip.Addr{{client4, server4}, {client6, server6}} {
			for _, ports := range [][2]uint16{{40001, 8080}, {9090, 40001}, {40001, 9090}, {8080, 40001}, {8080, 9090}, {9090, 8080}} {
				for _, p := range []uint8{protoTCP, protoUDP} {
					for _, out := range []bool{false, true} {
						for _, lo := range []bool{false, true} {
							b := craft(t, p, netip.AddrPortFrom(fam[0], ports[0]), netip.AddrPortFrom(fam[1], ports[1]), nil)
							a := verified(out)
							a.Loopback, a.IPv6 = lo, fam[0].Is6()
							match, err := divert.EvalFilter(f, b, &a)
							if err != nil {
								t.Fatal(err)
							}
							res := r.rewrite(bytes.Clone(b), &a)
							rewrites := res.kind == rewroteIn || res.kind == rewroteOut
							if match != rewrites {
								t.Errorf("%s, proto %d %d -> %d outbound %v loopback %v: filter %v, rewrite %v (%v)", f, p, ports[0], ports[1], out, lo, match, rewrites, res.err)
							}
						}
					}
				}
			}
		}
	}
	r := redirect{proto: protoUDP, from: 5353, to: 53}
	want := "(ip.SrcAddr == 10.0.0.5 or ip.DstAddr == 10.0.0.5) and not loopback and ((inbound and udp.DstPort == 5353) or (outbound and udp.SrcPort == 53))"
	if got := r.filter("ip.SrcAddr == 10.0.0.5 or ip.DstAddr == 10.0.0.5"); got != want {
		t.Errorf("filter with -filter:\n got  %s\n want %s", got, want)
	}
}

// TestRelayPipe runs the batch loop over a memory-backed handle
// (divert.NewPipe, no privileges): the rewritten packets and the unchanged
// ones come back on the path, nothing is dropped, the counts are right and
// -count ends the loop.
func TestRelayPipe(t *testing.T) {
	c, err := parseFlags([]string{"-proto", "udp", "-from", "5353", "-to", "53", "-count", "5"})
	if err != nil {
		t.Fatal(err)
	}
	// The pipe's filter takes what the handle's would and the packets of
	// protocol 200 too, which a real handle's filter would not pass: the
	// loop must still send such a packet back unchanged.
	h, pipe, err := divert.NewPipe(c.redirect.filter("")+" or ip.Protocol == 200", divert.LayerNetwork, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	st := newStats(c)
	var out strings.Builder
	done := make(chan error, 1)
	go func() { done <- relay(context.Background(), h, c, &out, st) }()

	cl, sv := netip.AddrPortFrom(client6, 40001), netip.AddrPortFrom(server6, 5353)
	query := craft(t, protoUDP, cl, sv, []byte("hello 1"))
	reply := craft(t, protoUDP, netip.AddrPortFrom(server6, 53), cl, []byte("echo: hello 1"))
	offloaded := craft(t, protoUDP, netip.AddrPortFrom(client4, 40002), netip.AddrPortFrom(server4, 5353), []byte("hello 2"))
	offloadedWant := withPort(t, offloaded, 2, 53)
	offloaded[26], offloaded[27] = 0xab, 0xcd // an unfinished checksum
	odd := []byte{0x45, 0, 0, 24, 0, 0, 0, 0, 64, 200, 0, 0, 10, 201, 9, 1, 10, 201, 9, 2, 1, 2, 3, 4}
	divert.CalcChecksums(odd, nil, 0)
	passed := craft(t, protoUDP, cl, netip.AddrPortFrom(server6, 53), nil) // a direct client of port 53: not taken
	type step struct {
		b    []byte
		a    divert.Address
		want []byte
	}
	steps := []step{
		{query, verified(false), withPort(t, query, 2, 53)},
		{reply, verified(true), withPort(t, reply, 0, 5353)},
		{offloaded, divert.Address{IPChecksum: true}, offloadedWant},
		{passed, verified(false), passed},
		{odd, verified(false), odd},
		{reply, verified(true), withPort(t, reply, 0, 5353)},
	}
	for i, s := range steps {
		if _, err := pipe.Deliver(s.b, s.a); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		got, _, ok := pipe.Next(5 * time.Second)
		if !ok || !bytes.Equal(got, s.want) {
			t.Fatalf("step %d: came back %v\n got  %x\n want %x", i, ok, got, s.want)
		}
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("-count 5 did not end the loop")
	}
	s := st.snapshot()
	if s.Packets != 5 || s.Inbound != 2 || s.Outbound != 2 || s.Incremental != 3 || s.Recomputed != 1 || s.Unexpected != 1 || s.Malformed != 0 || s.SendFailed != 0 {
		t.Errorf("summary %+v", s)
	}
	if ps := pipe.Stats(); ps.Dropped != 0 {
		t.Errorf("pipe dropped %d packets", ps.Dropped)
	}
	text := out.String()
	for _, want := range []string{
		"#1 IN  if=0 UDP [fd00:c9:9::1]:40001 -> [fd00:c9:9::2]:5353 len=55: dst port 5353 -> 53, checksum updated\n",
		"#2 OUT if=0 UDP [fd00:c9:9::2]:53 -> [fd00:c9:9::1]:40001 len=61: src port 53 -> 5353, checksum updated\n",
		"#3 IN  if=0 UDP 10.201.9.1:40002 -> 10.201.9.2:5353 len=35: dst port 5353 -> 53, checksums recomputed (offloaded)\n",
		"#4 IN  if=0 proto-200 10.201.9.1 -> 10.201.9.2 len=24 unexpected, reinjected unchanged: not a udp packet (protocol 200)\n",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("output lacks %q:\n%s", want, text)
		}
	}
	var sum strings.Builder
	printSummary(&sum, &s)
	if !strings.Contains(sum.String(), "3 updated incrementally, 1 recomputed (offloaded)") {
		t.Errorf("summary:\n%s", sum.String())
	}
}

// TestRelayStops: a cancelled context ends the loop (Ctrl-C, -duration).
func TestRelayStops(t *testing.T) {
	c, err := parseFlags([]string{"-from", "1", "-to", "2", "-quiet"})
	if err != nil {
		t.Fatal(err)
	}
	h, _, err := divert.NewPipe(c.redirect.filter(""), divert.LayerNetwork, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- relay(ctx, h, c, io.Discard, newStats(c)) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the loop did not stop")
	}
}

func TestFlags(t *testing.T) {
	for _, bad := range [][]string{
		{}, {"-from", "80"}, {"-to", "80"}, {"-from", "80", "-to", "80"}, {"-from", "0", "-to", "80"},
		{"-from", "70000", "-to", "80"}, {"-from", "80", "-to", "81", "-proto", "icmp"},
		{"-from", "80", "-to", "81", "-priority", "30001"}, {"-from", "80", "-to", "81", "x"},
		{"-demo", "-count", "3"},
	} {
		if _, err := parseFlags(bad); err == nil {
			t.Errorf("parseFlags(%q) accepted", bad)
		}
	}
	c, err := parseFlags([]string{"-proto", "udp", "-from", "5353", "-to", "53", "-priority", "-5", "-count", "3", "-filter", "ip"})
	if err != nil || c.redirect != (redirect{protoUDP, 5353, 53}) || c.priority != -5 || c.count != 3 || c.filter != "ip" {
		t.Fatalf("%+v %v", c, err)
	}
	c, err = parseFlags([]string{"-demo"})
	if err != nil || c.redirect != (redirect{protoTCP, demoFrom, demoTo}) {
		t.Fatalf("-demo: %+v %v", c, err)
	}
}
