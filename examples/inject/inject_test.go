//go:build linux

package main

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/netdivert/divert/examples/internal/extest"
	"github.com/netdivert/divert/internal/netnstest"
)

func TestMain(m *testing.M) { extest.Main(m) }

// rawListen opens a raw IP socket of network ("ip4:icmp", "ip6:ipv6-icmp",
// "ip4:tcp") inside ns.
func rawListen(t *testing.T, ns *netnstest.NS, network string) net.PacketConn {
	t.Helper()
	var c net.PacketConn
	if err := ns.Do(func() (err error) { c, err = net.ListenPacket(network, ""); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// await reads from c until match accepts a packet or wait passes.
func await(t *testing.T, c net.PacketConn, wait time.Duration, match func(b []byte, from netip.Addr) bool) bool {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 65536)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return false
		}
		a, _ := netip.ParseAddr(from.(*net.IPAddr).IP.String())
		if match(buf[:n], a.Unmap()) {
			return true
		}
	}
}

func TestInjectOutbound(t *testing.T) {
	netnstest.RequireRoot(t)
	bin := extest.Build(t)
	l := netnstest.Pair(t, "dvinj", 0)

	t.Run("icmp4-echo-reply", func(t *testing.T) {
		c := rawListen(t, l.A.NS, "ip4:icmp")
		out, errOut, err := extest.Run(t, l.A.NS, 10*time.Second, bin, "-proto", "icmp", "-dst", l.B.V4.String(), "-id", "4242", "-count", "2", "-gap", "10ms")
		if err != nil {
			t.Fatalf("%v\n%s", err, errOut)
		}
		if want := fmt.Sprintf("sent ICMP %s -> %s len=28 outbound id=4242 seq=1", l.A.V4, l.B.V4); !strings.Contains(out, want) {
			t.Fatalf("output lacks %q:\n%s", want, out)
		}
		// Go's ip4 raw sockets return the message without the IPv4 header.
		seen := map[uint16]bool{}
		await(t, c, 3*time.Second, func(b []byte, from netip.Addr) bool {
			if from == l.B.V4 && len(b) >= 8 && b[0] == 0 && b[4] == 4242>>8 && b[5] == 4242&0xff {
				seen[uint16(b[6])<<8|uint16(b[7])] = true
			}
			return len(seen) == 2
		})
		if !seen[1] || !seen[2] {
			t.Fatalf("echo replies seen for sequence numbers %v, want 1 and 2", seen)
		}
	})

	t.Run("icmp6-echo-reply", func(t *testing.T) {
		c := rawListen(t, l.A.NS, "ip6:ipv6-icmp")
		if _, errOut, err := extest.Run(t, l.A.NS, 10*time.Second, bin, "-proto", "icmp", "-dst", l.B.V6.String(), "-id", "777"); err != nil {
			t.Fatalf("%v\n%s", err, errOut)
		}
		// An ICMPv6 raw socket gets the ICMPv6 message without the IPv6 header.
		if !await(t, c, 3*time.Second, func(b []byte, from netip.Addr) bool {
			return from == l.B.V6 && len(b) >= 8 && b[0] == 129 && b[4] == 777>>8 && b[5] == 777&0xff
		}) {
			t.Fatal("no ICMPv6 echo reply")
		}
	})

	t.Run("udp4-delivered", func(t *testing.T) {
		u, err := l.B.NS.ListenUDP(netip.AddrPortFrom(l.B.V4, 7001).String())
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		if _, errOut, err := extest.Run(t, l.A.NS, 10*time.Second, bin, "-proto", "udp", "-dst", l.B.V4.String(), "-dport", "7001", "-payload", "over the wire"); err != nil {
			t.Fatalf("%v\n%s", err, errOut)
		}
		got, err := netnstest.RecvUDP(u, 1, 3*time.Second)
		if err != nil || len(got) != 1 || string(got[0]) != "over the wire" {
			t.Fatalf("received %q, %v", got, err)
		}
	})

	t.Run("tcp-syn-ack", func(t *testing.T) {
		var ln net.Listener
		if err := l.B.NS.Do(func() (err error) {
			ln, err = net.Listen("tcp4", netip.AddrPortFrom(l.B.V4, 8080).String())
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		c := rawListen(t, l.A.NS, "ip4:tcp")
		if _, errOut, err := extest.Run(t, l.A.NS, 10*time.Second, bin, "-proto", "tcp", "-dst", l.B.V4.String(), "-sport", "40001", "-dport", "8080"); err != nil {
			t.Fatalf("%v\n%s", err, errOut)
		}
		if !await(t, c, 3*time.Second, func(tcp []byte, from netip.Addr) bool {
			return from == l.B.V4 && len(tcp) >= 20 && tcp[0] == 8080>>8 && tcp[1] == 8080&0xff &&
				tcp[2] == 40001>>8 && tcp[3] == 40001&0xff && tcp[13]&0x12 == 0x12
		}) {
			t.Fatal("no SYN-ACK")
		}
	})
}

func TestInjectInbound(t *testing.T) {
	netnstest.RequireRoot(t)
	bin := extest.Build(t)
	l := netnstest.Pair(t, "dvinb", 0)
	for _, tc := range []struct {
		name     string
		src, dst netip.Addr
	}{
		{"ipv4", l.A.V4, l.B.V4},
		{"ipv6", l.A.V6, l.B.V6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u, err := l.B.NS.ListenUDP(netip.AddrPortFrom(tc.dst, 7002).String())
			if err != nil {
				t.Fatal(err)
			}
			defer u.Close()
			// In B, as if A had sent it over the veth.
			out, errOut, err := extest.Run(t, l.B.NS, 10*time.Second, bin, "-in", "-ifidx", fmt.Sprint(l.B.IfIdx),
				"-proto", "udp", "-src", tc.src.String(), "-sport", "5555", "-dst", tc.dst.String(), "-dport", "7002", "-payload", "delivered in")
			if err != nil {
				t.Fatalf("%v\n%s", err, errOut)
			}
			if !strings.Contains(out, "inbound (through lo)") {
				t.Fatalf("output: %s", out)
			}
			u.SetReadDeadline(time.Now().Add(3 * time.Second))
			buf := make([]byte, 100)
			n, from, err := u.ReadFromUDPAddrPort(buf)
			if err != nil || string(buf[:n]) != "delivered in" || from != netip.AddrPortFrom(tc.src, 5555) {
				t.Fatalf("received %q from %v: %v", buf[:n], from, err)
			}
		})
	}
}

func TestNoPrivileges(t *testing.T) {
	netnstest.RequireRoot(t)
	bin := extest.Build(t)
	ns := netnstest.NewT(t, "dvinjp")
	_, errOut, err := extest.Run(t, ns, 10*time.Second, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", bin, "-dst", "127.0.0.1")
	if err == nil || !strings.Contains(errOut, "run as root") {
		t.Fatalf("err %v, stderr:\n%s", err, errOut)
	}
}
