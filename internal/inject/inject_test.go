//go:build linux

package inject

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/netdivert/divert/internal/netnstest"
	"github.com/netdivert/divert/internal/nftrules"
)

func sum(b []byte, s uint32) uint32 {
	for len(b) >= 2 {
		s += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) > 0 {
		s += uint32(b[0]) << 8
	}
	return s
}

func fold(s uint32) uint16 {
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return ^uint16(s)
}

// build makes an IPv4 or IPv6 packet from src to dst with protocol proto and
// the L4 bytes l4, whose checksum at csumOff is filled (pseudo-header
// included for UDP and ICMPv6).
func build(src, dst netip.Addr, proto byte, l4 []byte, csumOff int) []byte {
	var pseudo uint32
	if src.Is4() {
		s, d := src.As4(), dst.As4()
		pseudo = sum(s[:], sum(d[:], uint32(proto)+uint32(len(l4))))
	} else {
		s, d := src.As16(), dst.As16()
		pseudo = sum(s[:], sum(d[:], uint32(proto)+uint32(len(l4))))
	}
	if proto == 1 { // ICMPv4 has no pseudo-header
		pseudo = 0
	}
	binary.BigEndian.PutUint16(l4[csumOff:], 0)
	c := fold(sum(l4, pseudo))
	if proto == 17 && c == 0 {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(l4[csumOff:], c)
	if src.Is4() {
		p := make([]byte, 20+len(l4))
		p[0], p[8], p[9] = 0x45, 64, proto
		binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
		binary.BigEndian.PutUint16(p[4:], 0x2222)
		s, d := src.As4(), dst.As4()
		copy(p[12:], s[:])
		copy(p[16:], d[:])
		binary.BigEndian.PutUint16(p[10:], fold(sum(p[:20], 0)))
		copy(p[20:], l4)
		return p
	}
	p := make([]byte, 40+len(l4))
	p[0], p[6], p[7] = 0x60, proto, 64
	binary.BigEndian.PutUint16(p[4:], uint16(len(l4)))
	s, d := src.As16(), dst.As16()
	copy(p[8:], s[:])
	copy(p[24:], d[:])
	copy(p[40:], l4)
	return p
}

func echo(v6 bool, id, seq uint16) []byte {
	b := make([]byte, 8+8)
	b[0] = 8
	if v6 {
		b[0] = 128
	}
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	copy(b[8:], "injected")
	return b
}

func udp(sport, dport uint16, payload string) []byte {
	b := make([]byte, 8+len(payload))
	binary.BigEndian.PutUint16(b, sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	binary.BigEndian.PutUint16(b[4:], uint16(len(b)))
	copy(b[8:], payload)
	return b
}

func newIn(t *testing.T, ns *netnstest.NS, mark uint32) *Injector {
	t.Helper()
	var i *Injector
	if err := ns.Do(func() (err error) { i, err = New(mark); return }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { i.Close() })
	return i
}

// TestOutboundEcho injects ICMP echo requests outbound from A and expects
// B's replies to reach A.
func TestOutboundEcho(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "inj", 0)
	inj := newIn(t, l.A.NS, nftrules.Mark(0))
	for _, tc := range []struct {
		name     string
		src, dst netip.Addr
		network  string
	}{
		{"v4", l.A.V4, l.B.V4, "ip4:icmp"},
		{"v6", l.A.V6, l.B.V6, "ip6:ipv6-icmp"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var c net.PacketConn
			if err := l.A.NS.Do(func() (err error) { c, err = net.ListenPacket(tc.network, ""); return }); err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			v6 := tc.src.Is6()
			proto := byte(1)
			if v6 {
				proto = 58
			}
			const id = 0x5151
			buf := make([]byte, 1500)
			for seq := uint16(1); seq <= 3; seq++ {
				pkt := build(tc.src, tc.dst, proto, echo(v6, id, seq), 2)
				if err := inj.Outbound(pkt); err != nil {
					t.Fatal(err)
				}
				c.SetReadDeadline(time.Now().Add(2 * time.Second))
				for {
					n, _, err := c.ReadFrom(buf)
					if err != nil {
						t.Fatalf("seq %d: no echo reply: %v", seq, err)
					}
					m := buf[:n]
					if n >= 8 && (m[0] == 0 || m[0] == 129) && binary.BigEndian.Uint16(m[4:]) == id && binary.BigEndian.Uint16(m[6:]) == seq {
						break
					}
				}
			}
		})
	}
}

// TestInboundUDP injects UDP datagrams "from A" inbound in B and expects
// B's socket to receive them with A's address as source.
func TestInboundUDP(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "inj", 0)
	inj := newIn(t, l.B.NS, nftrules.Mark(0))
	for _, tc := range []struct {
		name     string
		src, dst netip.Addr
	}{
		{"v4", l.A.V4, l.B.V4},
		{"v6", l.A.V6, l.B.V6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := l.B.NS.ListenUDP(netip.AddrPortFrom(tc.dst, 0).String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			port := uint16(c.LocalAddr().(*net.UDPAddr).Port)
			pkt := build(tc.src, tc.dst, 17, udp(4242, port, "inbound hello"), 6)
			if err := inj.Inbound(pkt, uint32(l.B.IfIdx)); err != nil {
				t.Fatal(err)
			}
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			buf := make([]byte, 100)
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				t.Fatalf("datagram not delivered: %v", err)
			}
			if string(buf[:n]) != "inbound hello" || from.Addr().Unmap() != tc.src || from.Port() != 4242 {
				t.Fatalf("got %q from %v", buf[:n], from)
			}
		})
	}
}

// TestMarkSkipped: a drop-everything handle of priority 100 at input and
// output lets through packets injected with the mark of a handle of
// priority <= 100 and drops those of a higher-priority injector and
// unmarked ones.
func TestMarkSkipped(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "inm", 0)
	var rs *nftrules.Ruleset
	err := l.B.NS.Do(func() (err error) {
		rs, err = nftrules.Install(nftrules.Config{
			Hooks: []nftrules.Hook{nftrules.HookInput, nftrules.HookOutput},
			IPv4:  true, IPv6: true, Priority: 100, Action: nftrules.ActionDrop,
		})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rs.Close() })
	c, err := l.B.NS.ListenUDP(netip.AddrPortFrom(l.B.V4, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	port := uint16(c.LocalAddr().(*net.UDPAddr).Port)
	for _, tc := range []struct {
		name      string
		mark      uint32
		delivered bool
	}{
		{"equal priority", nftrules.Mark(100), true},
		{"lower priority", nftrules.Mark(-30000), true},
		{"higher priority", nftrules.Mark(101), false},
		{"unmarked", 0, false},
		{"foreign mark", 0x1234, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			inj := newIn(t, l.B.NS, tc.mark)
			pkt := build(l.A.V4, l.B.V4, 17, udp(4242, port, tc.name), 6)
			err := inj.Inbound(pkt, 0)
			if err != nil && (!errors.Is(err, ErrRefused) || errors.Is(err, os.ErrPermission)) {
				t.Fatal(err) // a drop at output shows as ErrRefused, not as a missing privilege
			}
			c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			buf := make([]byte, 100)
			n, err := c.Read(buf)
			got := err == nil && string(buf[:n]) == tc.name
			if got != tc.delivered {
				t.Fatalf("delivered = %v (%v), want %v", got, err, tc.delivered)
			}
		})
	}
}

func TestErrors(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "ine")
	inj := newIn(t, ns, 0)
	for _, p := range [][]byte{{0x45, 0}, {0x60, 0, 0}, {0x10, 1, 2, 3}, make([]byte, 40)} {
		if err := inj.Outbound(p); err == nil {
			t.Errorf("Outbound(% x) succeeded", p)
		}
	}
	if err := inj.Outbound(nil); err == nil {
		t.Error("Outbound(nil) succeeded")
	}
	if err := inj.Close(); err != nil {
		t.Fatal(err)
	}
	if err := inj.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	pkt := build(netip.MustParseAddr("10.1.1.1"), netip.MustParseAddr("10.1.1.2"), 17, udp(1, 2, "x"), 6)
	if err := inj.Outbound(pkt); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("after Close: %v, want net.ErrClosed", err)
	}
	if _, err := inj.RouteMTU(pkt, 0); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("RouteMTU after Close: %v, want net.ErrClosed", err)
	}
}

func TestSendAllocs(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "ina")
	inj := newIn(t, ns, 0)
	// To a local address in an isolated namespace: goes nowhere else.
	pkt := build(netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("127.0.0.1"), 17, udp(1, 9, "x"), 6)
	for name, send := range map[string]func([]byte) error{
		"Outbound": inj.Outbound,
		"Inbound":  func(p []byte) error { return inj.Inbound(p, 0) }, // with its route lookup
	} {
		allocs := testing.AllocsPerRun(100, func() {
			if err := send(pkt); err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Fatalf("%s: %v allocations per send", name, allocs)
		}
	}
}

// TestInboundNotLocal: an Inbound packet whose destination is not one of
// B's addresses (A's, a broadcast, a multicast group, an unroutable one) is
// refused with ErrNotLocal, and nothing leaves B: A's socket on the
// destination receives nothing. B's own addresses, and 127.0.0.1 and ::1,
// are local.
func TestInboundNotLocal(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "inl", 0)
	inj := newIn(t, l.B.NS, 0)
	c, err := l.A.NS.ListenUDP(netip.AddrPortFrom(l.A.V4, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	port := uint16(c.LocalAddr().(*net.UDPAddr).Port)
	bcast := l.B.V4.As4()
	bcast[3] = 255
	for _, dst := range []netip.Addr{l.A.V4, l.A.V6, netip.AddrFrom4(bcast), netip.MustParseAddr("224.0.0.1"), netip.MustParseAddr("ff02::1"), netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")} {
		src := l.B.V4
		if dst.Is6() {
			src = l.B.V6
		}
		err := inj.Inbound(build(src, dst, 17, udp(4242, port, "must not leave"), 6), uint32(l.B.IfIdx))
		if !errors.Is(err, ErrNotLocal) {
			t.Errorf("Inbound to %v: %v, want ErrNotLocal", dst, err)
		}
	}
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, from, err := c.ReadFromUDPAddrPort(make([]byte, 100)); err == nil {
		t.Fatalf("A received %d bytes from %v", n, from)
	}
	for _, dst := range []netip.Addr{l.B.V4, l.B.V6, netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()} {
		src := l.A.V4
		if dst.Is6() {
			src = l.A.V6
		}
		if err := inj.Inbound(build(src, dst, 17, udp(4242, 9, "local"), 6), 0); err != nil {
			t.Errorf("Inbound to %v: %v", dst, err)
		}
	}
}

// TestInboundLocalByMark: the route lookup of Inbound carries the
// injector's mark, as the send does, so an address that is local only for
// marked packets (a policy rule "fwmark M lookup T" whose table T makes it
// local) is local for an injector with mark M, and not for one without.
func TestInboundLocalByMark(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "ink", 0)
	dst := netip.MustParseAddr("10.250.0.9")
	for _, argv := range [][]string{
		{"ip", "route", "add", "local", dst.String(), "dev", "lo", "table", "177"},
		{"ip", "rule", "add", "fwmark", "0x77", "lookup", "177", "priority", "10"},
	} {
		if out, err := l.B.NS.Run(context.Background(), argv...); err != nil {
			t.Fatalf("%v: %v: %s", argv, err, out)
		}
	}
	pkt := build(l.A.V4, dst, 17, udp(4242, 9, "local by mark"), 6)
	if err := newIn(t, l.B.NS, 0x77).Inbound(pkt, 0); err != nil {
		t.Errorf("Inbound with mark 0x77: %v", err)
	}
	if err := newIn(t, l.B.NS, 0).Inbound(pkt, 0); !errors.Is(err, ErrNotLocal) {
		t.Errorf("Inbound without a mark: %v, want ErrNotLocal", err)
	}
}

func BenchmarkOutbound(b *testing.B) { benchSend(b, false) }

// BenchmarkInbound is BenchmarkOutbound's send with Inbound's route lookup
// before it (see checkLocal).
func BenchmarkInbound(b *testing.B) { benchSend(b, true) }

func benchSend(b *testing.B, inbound bool) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	ns, err := netnstest.New("inb")
	if err != nil {
		b.Fatal(err)
	}
	defer ns.Close()
	var inj *Injector
	if err := ns.Do(func() (err error) { inj, err = New(0); return }); err != nil {
		b.Fatal(err)
	}
	defer inj.Close()
	pkt := build(netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("127.0.0.1"), 17, udp(1, 9, "benchmark payload"), 6)
	send := inj.Outbound
	if inbound {
		send = func(p []byte) error { return inj.Inbound(p, 0) }
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := send(pkt); err != nil {
			b.Fatal(err)
		}
	}
}

// TestOutboundBroadcast injects a datagram to the link's broadcast address:
// the kernel refuses it (EACCES) unless the raw socket has SO_BROADCAST,
// and WinDivert injects such packets (DHCP, say).
func TestOutboundBroadcast(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "ibc", 0)
	inj := newIn(t, l.A.NS, nftrules.Mark(0))
	var c net.PacketConn
	if err := l.B.NS.Do(func() (err error) { c, err = net.ListenPacket("udp4", ":7311"); return }); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	bc := l.A.V4.As4()
	bc[3] = 255 // the /24's broadcast address
	pkt := build(l.A.V4, netip.AddrFrom4(bc), 17, udp(4242, 7311, "to all"), 6)
	if err := inj.Outbound(pkt); err != nil {
		t.Fatalf("Outbound to %v: %v", netip.AddrFrom4(bc), err)
	}
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 100)
	n, _, err := c.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "to all" {
		t.Fatalf("the broadcast: %q, %v", buf[:n], err)
	}
}

// TestOutboundZone injects to ff02::1 (link-local multicast) from a router
// with two links: OutboundOn's ifIdx picks the link; without a zone the
// kernel would take whichever link's route comes first.
func TestOutboundZone(t *testing.T) {
	netnstest.RequireRoot(t)
	r, err := netnstest.NewRouted("izn", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	inj := newIn(t, r.Router(), nftrules.Mark(0))
	left, right := listenIn(t, r.LeftHost(), "udp6", ":7312"), listenIn(t, r.RightHost(), "udp6", ":7312")
	all := netip.MustParseAddr("ff02::1")
	for _, tc := range []struct {
		name  string
		ifIdx int
		src   netip.Addr
		want  net.PacketConn
		other net.PacketConn
	}{
		{"right", r.Right.A.IfIdx, r.Right.A.V6, right, left},
		{"left", r.Left.B.IfIdx, r.Left.B.V6, left, right},
	} {
		pkt := build(tc.src, all, 17, udp(4242, 7312, tc.name), 6)
		if err := inj.OutboundOn(pkt, uint32(tc.ifIdx)); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if s := readString(tc.want); s != tc.name {
			t.Errorf("%s: the link's host got %q", tc.name, s)
		}
		if s := readString(tc.other); s != "" {
			t.Errorf("%s: the other link's host got %q", tc.name, s)
		}
	}
}

// TestOutboundLinkScopeV4 injects from a router with two links to the
// limited broadcast 255.255.255.255 and to the all-hosts group 224.0.0.1,
// which no route leads to: OutboundOn's ifIdx picks the link they leave
// through (the router has no default route, so without it the kernel
// refuses them, ENETUNREACH), and only that link's host gets them.
func TestOutboundLinkScopeV4(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "ilb", 0)
	inj := newIn(t, r.Router(), nftrules.Mark(0))
	left, right := listenIn(t, r.LeftHost(), "udp4", ":7313"), listenIn(t, r.RightHost(), "udp4", ":7313")
	for _, dst := range []netip.Addr{netip.MustParseAddr("255.255.255.255"), netip.MustParseAddr("224.0.0.1")} {
		for _, tc := range []struct {
			name  string
			ifIdx int
			src   netip.Addr
			want  net.PacketConn
			other net.PacketConn
		}{
			{"right", r.Right.A.IfIdx, r.Right.A.V4, right, left},
			{"left", r.Left.B.IfIdx, r.Left.B.V4, left, right},
		} {
			msg := tc.name + " " + dst.String()
			pkt := build(tc.src, dst, 17, udp(4242, 7313, msg), 6)
			if err := inj.OutboundOn(pkt, uint32(tc.ifIdx)); err != nil {
				t.Fatalf("%s: %v", msg, err)
			}
			if s := readString(tc.want); s != msg {
				t.Errorf("%s: the link's host got %q", msg, s)
			}
			if s := readString(tc.other); s != "" {
				t.Errorf("%s: the other link's host got %q", msg, s)
			}
		}
	}
	pkt := build(r.Right.A.V4, netip.MustParseAddr("255.255.255.255"), 17, udp(4242, 7313, "allocs"), 6)
	if allocs := testing.AllocsPerRun(10, func() {
		if err := inj.OutboundOn(pkt, uint32(r.Right.A.IfIdx)); err != nil {
			t.Fatal(err)
		}
	}); allocs != 0 {
		t.Errorf("%v allocations per send with IP_PKTINFO", allocs)
	}
}

// TestRouteMTUZone: a router has a link of MTU 1500 and one of MTU 1280,
// with the same link-local address fe80::99 behind both. RouteMTU takes the
// interface OutboundOn would send on (the zone of a link-local destination,
// the link of a limited broadcast): each link's MTU; and a destination
// without a zone afterwards still gets its own route's MTU.
func TestRouteMTUZone(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "imz", 0)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, argv := range [][]string{
		{"ip", "link", "set", r.Right.A.If, "mtu", "1280"},
	} {
		if out, err := r.Router().Run(ctx, argv...); err != nil {
			t.Fatalf("%v: %v: %s", argv, err, out)
		}
	}
	inj := newIn(t, r.Router(), nftrules.Mark(0))
	ll := netip.MustParseAddr("fe80::99")
	bc := netip.MustParseAddr("255.255.255.255")
	for _, tc := range []struct {
		name  string
		src   netip.Addr
		dst   netip.Addr
		ifIdx int
		want  int
	}{
		{"link-local right", netip.MustParseAddr("fe80::1"), ll, r.Right.A.IfIdx, 1280},
		{"link-local left", netip.MustParseAddr("fe80::1"), ll, r.Left.B.IfIdx, 1500},
		{"link-local right again", netip.MustParseAddr("fe80::1"), ll, r.Right.A.IfIdx, 1280},
		{"global right", r.Right.A.V6, r.Right.B.V6, r.Left.B.IfIdx, 1280}, // no zone: ifIdx is not used
		{"global left", r.Left.B.V6, r.Left.A.V6, 0, 1500},
		{"broadcast right", r.Right.A.V4, bc, r.Right.A.IfIdx, 1280},
		{"broadcast left", r.Left.B.V4, bc, r.Left.B.IfIdx, 1500},
		{"v4 right", r.Right.A.V4, r.Right.B.V4, r.Left.B.IfIdx, 1280},
		{"v4 left", r.Left.B.V4, r.Left.A.V4, 0, 1500},
	} {
		mtu, err := inj.RouteMTU(build(tc.src, tc.dst, 17, udp(1, 9, "x"), 6), uint32(tc.ifIdx))
		if err != nil || mtu != tc.want {
			t.Errorf("%s: RouteMTU = %d, %v; want %d", tc.name, mtu, err, tc.want)
		}
	}
}

// listenIn opens a packet socket in ns, closed when the test ends.
func listenIn(t *testing.T, ns *netnstest.NS, network, addr string) net.PacketConn {
	t.Helper()
	var c net.PacketConn
	if err := ns.Do(func() (err error) { c, err = net.ListenPacket(network, addr); return }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// readString returns the next datagram c receives within 300 ms as a
// string, "" if none comes.
func readString(c net.PacketConn) string {
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	buf := make([]byte, 100)
	n, _, err := c.ReadFrom(buf)
	if err != nil {
		return ""
	}
	return string(buf[:n])
}
