package divert

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/netdivert/divert/internal/netnstest"
)

// TestLinuxOpenPortOwnInjection: an OpenPort handle attached to an
// administrator's rule that queues every outbound UDP packet (a plain
// iptables rule, which knows nothing of the library's marks) does not receive the
// new packets it injects itself: WinDivert's handles never see their own
// injections, and the rule would otherwise hand each one back to the
// handle, whose program would send it again. The injected packet still
// reaches its destination; the next packet the handle receives is the
// host's own datagram, sent after it.
func TestLinuxOpenPortOwnInjection(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dopi", 0)
	const q = 4243
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// In A's namespace, removed with it.
	for _, cmd := range [][]string{
		{"iptables", "-A", "OUTPUT", "-p", "udp", "-j", "NFQUEUE", "--queue-num", fmt.Sprint(q)},
		{"ip6tables", "-A", "OUTPUT", "-p", "udp", "-j", "NFQUEUE", "--queue-num", fmt.Sprint(q)},
	} {
		if out, err := l.A.NS.Run(ctx, cmd...); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
	}
	var h *Handle
	if err := l.A.NS.Do(func() (err error) { h, err = OpenPort(q, 0); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	if err := h.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	for _, v6 := range []bool{false, true} {
		t.Run(fmt.Sprint("v6=", v6), func(t *testing.T) {
			src, dst := netip.AddrPortFrom(l.A.V4, 1111), netip.AddrPortFrom(l.B.V4, 5000)
			if v6 {
				src, dst = netip.AddrPortFrom(l.A.V6, 1111), netip.AddrPortFrom(l.B.V6, 5000)
			}
			sink, err := l.B.NS.ListenUDP(dst.String())
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()
			if _, err := h.Send(udpPacket(t, src, dst, []byte("injected")), &Address{Outbound: true}); err != nil {
				t.Fatal(err)
			}
			// The host's own datagram, queued after the injected packet.
			if err := l.A.NS.SendUDP(dst, []byte("host's own"), 1, 0); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, MTUMax)
			var a Address
			n, err := h.Recv(buf, &a)
			if err != nil {
				t.Fatal(err)
			}
			p, err := ParsePacket(buf[:n])
			if err != nil {
				t.Fatal(err)
			}
			if got := string(p.Payload); got != "host's own" {
				t.Fatalf("the handle received %q (source port %d) first: its own injection came back", got, p.SrcPort())
			}
			if _, err := h.Send(buf[:n], &a); err != nil {
				t.Fatal(err)
			}
			got, err := netnstest.RecvUDP(sink, 2, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 2 || string(got[0]) != "injected" || string(got[1]) != "host's own" {
				t.Fatalf("B received %q, want the injected datagram, then the host's", got)
			}
		})
	}
	// Each injection came back once, and was accepted unseen.
	if s, err := h.Stats(); err != nil || s.Passed != 2 || s.Received != 2 || s.Injected != 2 {
		t.Fatalf("Stats %+v, %v: want 2 passed (the injections), 2 received, 2 injected", s, err)
	}
}
