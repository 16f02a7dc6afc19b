//go:build freebsd || linux

package divert

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/netdivert/divert/internal/bsdaddr"
)

func ipv6Packet(dst string) []byte {
	p := make([]byte, 40)
	p[0] = 6 << 4
	d := netip.MustParseAddr(dst).As16()
	copy(p[24:], d[:])
	return p
}

// TestDivertInbound: an inbound packet on an interface without an IPv4
// address comes with a zero sin_addr, like an outbound one, but with its
// interface's name, like a forwarded one. The handle's own rules, the
// interface's IPv4 address (which an inbound packet would carry) and the
// packet's destination (the host's own, or link-scoped, is never
// forwarded) tell them apart.
func TestDivertInbound(t *testing.T) {
	sa := func(addr [4]byte, name string) *bsdaddr.Sockaddr { return testSockaddr(t, addr, name) }
	ifV4 := func(name []byte) (bool, bool) {
		switch string(name) {
		case "em0":
			return true, true
		case "gif0":
			return false, true
		}
		return false, false // unknown
	}
	host := netip.MustParseAddr("2001:db8::1")
	local := func(a netip.Addr) bool { return a == host }
	v4To := func(a ...byte) []byte {
		p := make([]byte, 20)
		p[0] = 0x45
		copy(p[16:], a)
		return p
	}
	v4 := v4To(192, 0, 2, 7)
	for _, tc := range []struct {
		name     string
		sa       *bsdaddr.Sockaddr
		pkt      []byte
		ownNamed bool
		want     bool
	}{
		{"sin_addr set", sa([4]byte{10, 0, 0, 1}, "em0"), ipv6Packet("2001:db8::99"), false, true},
		{"made by the host", sa([4]byte{}, ""), ipv6Packet("2001:db8::1"), false, false},
		{"own rules, named", sa([4]byte{}, "gif0"), ipv6Packet("2001:db8::99"), true, true},
		{"forwarded from an IPv4 interface", sa([4]byte{}, "em0"), ipv6Packet("2001:db8::1"), false, false},
		{"IPv6-only, to the host", sa([4]byte{}, "gif0"), ipv6Packet("2001:db8::1"), false, true},
		{"IPv6-only, link-local", sa([4]byte{}, "gif0"), ipv6Packet("fe80::1"), false, true},
		{"IPv6-only, all-nodes", sa([4]byte{}, "gif0"), ipv6Packet("ff02::1"), false, true},
		{"IPv6-only, forwarded", sa([4]byte{}, "gif0"), ipv6Packet("2001:db8::99"), false, false},
		{"IPv6-only, site multicast forwarded", sa([4]byte{}, "gif0"), ipv6Packet("ff05::2"), false, false},
		{"unknown interface, to the host", sa([4]byte{}, "bridge1"), ipv6Packet("2001:db8::1"), false, true},
		{"IPv4 to elsewhere", sa([4]byte{}, "gif0"), v4, false, false},
		{"IPv4 limited broadcast", sa([4]byte{}, "gif0"), v4To(255, 255, 255, 255), false, true},
		{"IPv4 link-local", sa([4]byte{}, "gif0"), v4To(169, 254, 1, 2), false, true},
		{"IPv4 all-hosts", sa([4]byte{}, "gif0"), v4To(224, 0, 0, 1), false, true},
		{"no packet", sa([4]byte{}, "gif0"), nil, false, false},
	} {
		if got := divertInbound(tc.sa, tc.pkt, tc.ownNamed, ifV4, local); got != tc.want {
			t.Errorf("%s: divertInbound = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestRecvOutboundNotes: an OpenPort handle notes the rule each packet came
// from by the direction the packet is reported in, so that a packet that
// came in on an interface without an IPv4 address (sin_addr zero, like an
// outbound one) sets the inbound resume point, not the outbound one: a new
// inbound packet resumes after the administrator's inbound rule, and a new
// outbound one is not sent past the outbound rule's successors.
func TestRecvOutboundNotes(t *testing.T) {
	sa := func(addr [4]byte, name string) *bsdaddr.Sockaddr { return testSockaddr(t, addr, name) }
	ifV4 := func(name []byte) (bool, bool) { return false, true } // gif0: IPv6 only
	host := netip.MustParseAddr("2001:db8::1")
	local := func(a netip.Addr) bool { return a == host }
	var seen resumePoints
	// "200 divert 8668 out": a packet the host made.
	if !recvOutbound(sa([4]byte{}, ""), ipv6Packet("2001:db8::99"), 200, false, ifV4, local, &seen) {
		t.Fatal("a packet the host made taken for inbound")
	}
	// "100 divert 8668 in": a packet to the host on gif0.
	if recvOutbound(sa([4]byte{}, "gif0"), ipv6Packet("2001:db8::1"), 100, false, ifV4, local, &seen) {
		t.Fatal("a packet to the host on an IPv6-only interface taken for outbound")
	}
	if in, out := seen.resume(false), seen.resume(true); in != 100 || out != 200 {
		t.Fatalf("resume points: inbound %d, outbound %d; want 100 (the in rule), 200 (the out rule)", in, out)
	}
	// An Open handle notes nothing.
	if recvOutbound(sa([4]byte{}, "gif0"), ipv6Packet("2001:db8::1"), 300, true, ifV4, local, nil) {
		t.Fatal("own rules: a named packet taken for outbound")
	}
}

// testSockaddr is a divert sockaddr for port 100 with addr and the
// interface name (cut to what sin_zero holds).
func testSockaddr(t *testing.T, addr [4]byte, name string) *bsdaddr.Sockaddr {
	t.Helper()
	var s bsdaddr.Sockaddr
	if err := s.Set(binary.NativeEndian, 100, addr, []byte(name)); err != nil {
		t.Fatal(err)
	}
	return &s
}
