package bsdaddr

import (
	"encoding/binary"
	"errors"
	"testing"
)

// received builds the bytes the kernel's divert_packet() writes: host-order
// rule, interface address, strlcpy'd name.
func received(order binary.ByteOrder, rule uint16, addr [4]byte, name string) Sockaddr {
	var s Sockaddr
	s[0], s[1] = 16, 2
	order.PutUint16(s[2:], rule)
	copy(s[4:], addr[:])
	n := copy(s[8:15], name) // strlcpy: at most 7 bytes and a NUL
	s[8+n] = 0
	return s
}

func lookupTable(m map[string]uint32) func([]byte) (uint32, bool) {
	return func(b []byte) (uint32, bool) {
		idx, ok := m[string(b)]
		return idx, ok
	}
}

func TestParse(t *testing.T) {
	ifs := lookupTable(map[string]uint32{"vtnet0": 1, "lo0": 2, "epair0a": 7})
	for _, tc := range []struct {
		name  string
		order binary.ByteOrder
		sa    Sockaddr
		want  Received
	}{
		{"outbound", binary.LittleEndian, received(binary.LittleEndian, 100, [4]byte{}, ""), Received{Outbound: true, Rule: 100}},
		{"inbound", binary.LittleEndian, received(binary.LittleEndian, 31000, [4]byte{10, 0, 0, 1}, "vtnet0"), Received{IfIdx: 1, Rule: 31000}},
		{"inbound big endian", binary.BigEndian, received(binary.BigEndian, 31000, [4]byte{10, 0, 0, 1}, "epair0a"), Received{IfIdx: 7, Rule: 31000}},
		{"forwarded outbound keeps rcvif", binary.LittleEndian, received(binary.LittleEndian, 65534, [4]byte{}, "lo0"), Received{Outbound: true, IfIdx: 2, Rule: 65534}},
		{"unknown interface", binary.LittleEndian, received(binary.LittleEndian, 5, [4]byte{192, 0, 2, 1}, "em9"), Received{Rule: 5}},
		{"truncated long name", binary.LittleEndian, received(binary.LittleEndian, 5, [4]byte{192, 0, 2, 1}, "bridge10"), Received{Rule: 5}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(&tc.sa, tc.order, ifs)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Fatalf("Parse = %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestRuleByteOrder(t *testing.T) {
	// The rule number is host order: 100 on a little-endian host is the
	// bytes 0x64 0x00 (x/sys's Recvfrom would report 25600).
	s := received(binary.LittleEndian, 100, [4]byte{}, "")
	if s[2] != 0x64 || s[3] != 0 {
		t.Fatalf("port bytes %x", s[2:4])
	}
	if got := s.Rule(binary.LittleEndian); got != 100 {
		t.Fatalf("Rule = %d", got)
	}
	if got := s.Rule(binary.BigEndian); got != 25600 {
		t.Fatalf("Rule(BE) = %d", got)
	}
}

func TestParseBad(t *testing.T) {
	for _, s := range []Sockaddr{{}, {16, 28}, {8, 2}} {
		if _, err := Parse(&s, binary.LittleEndian, nil); !errors.Is(err, ErrBadSockaddr) {
			t.Errorf("Parse(%x) err = %v", s[:2], err)
		}
	}
	// An unterminated name is not a name.
	s := received(binary.LittleEndian, 1, [4]byte{1, 2, 3, 4}, "")
	copy(s[8:], "abcdefgh")
	if n := s.Name(); n != nil {
		t.Fatalf("Name = %q", n)
	}
}

func TestTarget(t *testing.T) {
	le := binary.LittleEndian
	ifaces := func(idx uint32) (Iface, error) {
		switch idx {
		case 1:
			return Iface{Name: []byte("vtnet0"), Addr: [4]byte{10, 0, 0, 1}}, nil
		case 3:
			return Iface{Name: []byte("gif0")}, nil // IPv6-only tunnel
		case 4:
			return Iface{Name: []byte("bridge10"), Addr: [4]byte{10, 9, 0, 1}}, nil
		case 5:
			return Iface{Name: []byte("bridge11")}, nil
		}
		return Iface{}, errors.New("no such interface")
	}
	in := received(le, 31000, [4]byte{10, 0, 0, 1}, "vtnet0")
	out := received(le, 29000, [4]byte{}, "")
	for _, tc := range []struct {
		name     string
		outbound bool
		ifIdx    uint32
		rule     uint16
		recv     *Sockaddr
		recvIf   uint32
		want     Sockaddr
		wantErr  bool
	}{
		{name: "reinject inbound unchanged", ifIdx: 1, rule: 1, recv: &in, recvIf: 1, want: in},
		{name: "reinject outbound unchanged", outbound: true, rule: 1, recv: &out, want: out},
		{name: "outbound turned inbound keeps rule", ifIdx: 1, recv: &out, want: received(le, 29000, [4]byte{10, 0, 0, 1}, "vtnet0")},
		{name: "inbound turned outbound keeps rule", outbound: true, recv: &in, recvIf: 1, want: received(le, 31000, [4]byte{}, "")},
		{name: "inbound moved to another interface", ifIdx: 3, recv: &in, recvIf: 1, want: received(le, 31000, placeholder, "gif0")},
		// A rule given (an OpenPort handle's, learnt per direction) is
		// where an answer resumes, not the received packet's rule.
		{name: "inbound turned outbound resumes after the rule given", outbound: true, rule: 300, recv: &in, recvIf: 1, want: received(le, 300, [4]byte{}, "")},
		{name: "outbound turned inbound resumes after the rule given", ifIdx: 1, rule: 100, recv: &out, want: received(le, 100, [4]byte{10, 0, 0, 1}, "vtnet0")},
		{name: "new outbound without a rule runs the whole ruleset", outbound: true, want: received(le, 0, [4]byte{}, "")},
		{name: "new outbound resumes after own rule", outbound: true, rule: 30500, want: received(le, 30500, [4]byte{}, "")},
		{name: "new inbound", ifIdx: 1, rule: 30500, want: received(le, 30500, [4]byte{10, 0, 0, 1}, "vtnet0")},
		{name: "new inbound ipv6-only interface", ifIdx: 3, rule: 7, want: received(le, 7, placeholder, "gif0")},
		{name: "new inbound long name uses address", ifIdx: 4, rule: 7, want: received(le, 7, [4]byte{10, 9, 0, 1}, "")},
		{name: "new inbound long name no address", ifIdx: 5, rule: 7, wantErr: true},
		{name: "new inbound no interface", ifIdx: 0, wantErr: true},
		{name: "new inbound unknown interface", ifIdx: 99, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got Sockaddr
			err := Target(&got, le, tc.outbound, tc.ifIdx, tc.rule, tc.recv, tc.recvIf, ifaces)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("Target = %x, want error", got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Fatalf("Target = %x, want %x", got, tc.want)
			}
			// What we send must parse back to the direction asked for.
			r, err := Parse(&got, le, nil)
			if err != nil || r.Outbound != tc.outbound {
				t.Fatalf("round trip: %+v %v", r, err)
			}
		})
	}
}

func TestSetLongName(t *testing.T) {
	var s Sockaddr
	if err := s.Set(binary.LittleEndian, 1, [4]byte{1, 1, 1, 1}, []byte("12345678")); err == nil {
		t.Fatal("8-byte name accepted")
	}
	if err := s.Set(binary.LittleEndian, 1, [4]byte{1, 1, 1, 1}, []byte("1234567")); err != nil {
		t.Fatal(err)
	}
	if string(s.Name()) != "1234567" || s[15] != 0 {
		t.Fatalf("name bytes %q", s[8:])
	}
}

func TestParseAllocs(t *testing.T) {
	s := received(binary.LittleEndian, 1, [4]byte{10, 0, 0, 1}, "vtnet0")
	m := map[string]uint32{"vtnet0": 1}
	lookup := func(b []byte) (uint32, bool) { i, ok := m[string(b)]; return i, ok }
	var sink Received
	n := testing.AllocsPerRun(100, func() { sink, _ = Parse(&s, binary.LittleEndian, lookup) })
	if n != 0 || sink.IfIdx != 1 {
		t.Fatalf("Parse allocates %v times (IfIdx %d)", n, sink.IfIdx)
	}
}

func FuzzParse(f *testing.F) {
	f.Add(make([]byte, 16))
	in := received(binary.LittleEndian, 31000, [4]byte{10, 0, 0, 1}, "vtnet0")
	f.Add(in[:])
	out := received(binary.LittleEndian, 1, [4]byte{}, "lo0")
	f.Add(out[:])
	f.Fuzz(func(t *testing.T, b []byte) {
		var s Sockaddr
		copy(s[:], b)
		r, err := Parse(&s, binary.LittleEndian, func(n []byte) (uint32, bool) { return uint32(len(n)) + 1, len(n) > 0 })
		if err != nil {
			if s.Valid() {
				t.Fatalf("valid sockaddr rejected: %v", err)
			}
			return
		}
		if r.Outbound != (s[4]|s[5]|s[6]|s[7] == 0) {
			t.Fatal("direction not from sin_addr")
		}
		if len(s.Name()) >= NameLen {
			t.Fatal("name overruns sin_zero")
		}
		// Sending back with the same direction and interface reproduces the
		// received bytes exactly.
		var back Sockaddr
		if err := Target(&back, binary.LittleEndian, r.Outbound, r.IfIdx, 0, &s, r.IfIdx, nil); err != nil {
			t.Fatal(err)
		}
		if back != s {
			t.Fatalf("round trip %x != %x", back, s)
		}
	})
}

// TestInboundWithoutIPv4: the kernel leaves sin_addr zero for a packet
// received on an interface without an IPv4 address. Sent back inbound on
// the interface it came from, it keeps its rule and name and gets a
// non-zero address, so that the kernel delivers it in instead of sending it
// out; MarkInbound does the same for a packet written straight back.
func TestInboundWithoutIPv4(t *testing.T) {
	o := binary.LittleEndian
	sa := received(o, 31000, [4]byte{}, "vtnet1")
	var dst Sockaddr
	if err := Target(&dst, o, false, 3, 31000, &sa, 3, nil); err != nil {
		t.Fatal(err)
	}
	if dst.Outbound() || dst.Rule(o) != 31000 || string(dst.Name()) != "vtnet1" {
		t.Fatalf("target outbound %v, rule %d, name %q: want inbound, 31000, vtnet1", dst.Outbound(), dst.Rule(o), dst.Name())
	}
	// Sent back outbound as received: unchanged.
	if err := Target(&dst, o, true, 3, 31000, &sa, 3, nil); err != nil || dst != sa {
		t.Fatalf("outbound: %v, %x", err, dst)
	}
	w := sa
	w.MarkInbound()
	if w.Outbound() || w.Rule(o) != 31000 || string(w.Name()) != "vtnet1" {
		t.Fatalf("MarkInbound: %x", w)
	}
	in := received(o, 31000, [4]byte{10, 0, 0, 1}, "em0")
	w = in
	w.MarkInbound()
	if w != in {
		t.Fatalf("MarkInbound changed an address that was set: %x", w)
	}
}

// TestMatches: the kernel keeps 7 bytes of the interface name, so a
// 7-byte name stands for itself or any name it starts; a shorter one is
// whole.
func TestMatches(t *testing.T) {
	for _, tc := range []struct {
		name, ifName string
		want         bool
	}{
		{"em0", "em0", true},
		{"em0", "em01", false},
		{"bridge1", "bridge1", true},
		{"bridge1", "bridge10", true},
		{"bridge1", "bridge", false},
		{"bridge1", "bridge2", false},
		{"", "", false},
	} {
		if got := Matches([]byte(tc.name), tc.ifName); got != tc.want {
			t.Errorf("Matches(%q, %q) = %v, want %v", tc.name, tc.ifName, got, tc.want)
		}
	}
}

// TestResolveRecv: a name cut to 7 bytes may stand for several interfaces;
// sin_addr (the first IPv4 address of the receiving interface, zero when it
// has none) tells them apart. Written back, the kernel's ifunit takes the
// name exactly ("bridge1"), so a packet of "bridge10" must lose the name and
// go by its address, or, when the address cannot pick it, not be written
// back at all.
func TestResolveRecv(t *testing.T) {
	a1, a10, a11 := [4]byte{10, 1, 0, 1}, [4]byte{10, 10, 0, 1}, [4]byte{10, 11, 0, 1}
	shared := [4]byte{10, 99, 0, 1}
	u := func(a [4]byte) CandidateAddr { return CandidateAddr{Addr: a, Unique: true} }
	bridge1 := Candidate{Name: "bridge1", Index: 1, Addrs: []CandidateAddr{u(a1)}}
	bridge10 := Candidate{Name: "bridge10", Index: 10, Addrs: []CandidateAddr{u(a10)}}
	bridge11 := Candidate{Name: "bridge11", Index: 11, Addrs: []CandidateAddr{u(a11), {Addr: shared}}}
	bridge12 := Candidate{Name: "bridge12", Index: 12}       // IPv6 only
	bridge13 := Candidate{Name: "bridge13", Index: 13}       // IPv6 only
	bridge1v6 := Candidate{Name: "bridge1", Index: 1}        // IPv6 only
	epair := Candidate{Name: "epair0a", Index: 5}            // 7 bytes, whole
	em0 := Candidate{Name: "em0", Index: 2, Loopback: false} // short: whole
	for _, tc := range []struct {
		name    string
		ifName  string
		addr    [4]byte
		inbound bool
		cands   []Candidate
		want    int
		fix     NameFix
	}{
		{"short name", "em0", [4]byte{}, true, []Candidate{em0}, 0, NameKeep},
		{"7 bytes, one interface", "epair0a", [4]byte{}, true, []Candidate{epair}, 0, NameKeep},
		{"unknown", "em1", [4]byte{}, true, nil, -1, NameKeep},
		// bridge1 and bridge10 both exist: the address tells.
		{"bridge10 inbound", "bridge1", a10, true, []Candidate{bridge1, bridge10}, 1, NameClear},
		{"bridge1 inbound", "bridge1", a1, true, []Candidate{bridge1, bridge10}, 0, NameKeep},
		// Only longer names: ifunit finds none, the kernel takes sin_addr.
		{"bridge10, no bridge1", "bridge1", a10, true, []Candidate{bridge10, bridge11}, 0, NameKeep},
		{"bridge1x unknown address, no bridge1", "bridge1", [4]byte{1, 2, 3, 4}, true, []Candidate{bridge10, bridge11}, -1, NameKeep},
		// One interface the cut name stands for: the kernel goes by
		// sin_addr, that interface's own address.
		{"only bridge10", "bridge1", a10, true, []Candidate{bridge10}, 0, NameKeep},
		// ifunit finds no "bridge1" and sin_addr cannot pick the
		// interface: zero (an IPv6-only interface; the placeholder is
		// no interface's address) or another interface's too.
		{"only bridge12, no IPv4 address", "bridge1", [4]byte{}, true, []Candidate{bridge12}, 0, NameRefuse},
		{"only bridge11, shared address", "bridge1", shared, true, []Candidate{bridge11}, 0, NameRefuse},
		{"bridge11 shared address beside bridge10", "bridge1", shared, true, []Candidate{bridge10, bridge11}, 1, NameRefuse},
		{"IPv6-only bridge12 beside bridge10", "bridge1", [4]byte{}, true, []Candidate{bridge10, bridge12}, 1, NameRefuse},
		{"two IPv6-only, no bridge1", "bridge1", [4]byte{}, true, []Candidate{bridge12, bridge13}, -1, NameRefuse},
		{"outbound, only bridge12", "bridge1", [4]byte{}, false, []Candidate{bridge12}, 0, NameKeep},
		// The address is another interface's too: ifa_ifwithaddr may pick
		// that one.
		{"shared address", "bridge1", shared, true, []Candidate{bridge1, bridge11}, 1, NameRefuse},
		// No IPv4 address: nothing but the name can pick the interface.
		{"IPv6-only bridge12 beside bridge1", "bridge1", [4]byte{}, true, []Candidate{bridge1, bridge12}, 1, NameRefuse},
		{"IPv6-only bridge1 beside bridge10", "bridge1", [4]byte{}, true, []Candidate{bridge1v6, bridge10}, 0, NameKeep},
		{"two IPv6-only", "bridge1", [4]byte{}, true, []Candidate{bridge1v6, bridge12, bridge13}, -1, NameRefuse},
		{"address on none of them", "bridge1", [4]byte{1, 2, 3, 4}, true, []Candidate{bridge1, bridge10}, -1, NameRefuse},
		// Outbound (a forwarded packet): no address to tell by; no
		// receiving interface rather than maybe a wrong one.
		{"outbound, bridge1 and bridge10", "bridge1", [4]byte{}, false, []Candidate{bridge1, bridge10}, -1, NameClear},
		{"outbound, only bridge10", "bridge1", [4]byte{}, false, []Candidate{bridge10}, 0, NameKeep},
		{"outbound, only bridge1", "bridge1", [4]byte{}, false, []Candidate{bridge1}, 0, NameKeep},
	} {
		i, fix := ResolveRecv([]byte(tc.ifName), tc.addr, tc.inbound, tc.cands)
		if i != tc.want || fix != tc.fix {
			t.Errorf("%s: ResolveRecv(%q, %v, inbound %v) = %d, %d; want %d, %d", tc.name, tc.ifName, tc.addr, tc.inbound, i, fix, tc.want, tc.fix)
		}
	}
}

// TestClearName: a cleared name leaves the rest of the sockaddr and is no
// name at all; written back inbound, the kernel then goes by the address.
func TestClearName(t *testing.T) {
	o := binary.LittleEndian
	s := received(o, 100, [4]byte{10, 10, 0, 1}, "bridge10")
	s.ClearName()
	if len(s.Name()) != 0 || s.Rule(o) != 100 || s.Addr() != [4]byte{10, 10, 0, 1} || s.Outbound() || !s.Valid() {
		t.Fatalf("ClearName: %x", s)
	}
}
