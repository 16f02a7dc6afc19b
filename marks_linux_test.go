package divert

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/netdivert/divert/internal/netnstest"
)

// TestLinuxInjectMarkSparesKubeProxyBits: the socket mark on new packets
// keeps clear the bits kube-proxy gives a meaning to on every Kubernetes
// node (its defaults: 0x4000, "masquerade this packet" in nat
// POSTROUTING; 0x8000, "drop this packet" in the filter table). With
// those rules in place, a datagram injected from a secondary address of
// the host leaves with that source, not the interface's masqueraded
// one, and is not dropped, whatever the handle's priority.
func TestLinuxInjectMarkSparesKubeProxyBits(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dkm", 0)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a4 := l.A.V4.As4()
	a4[3] = 77
	second := netip.AddrFrom4(a4)
	// In A's namespace, removed with it.
	for _, cmd := range [][]string{
		{"ip", "addr", "add", second.String() + "/24", "dev", l.A.If},
		{"iptables", "-t", "nat", "-A", "POSTROUTING", "-m", "mark", "--mark", "0x4000/0x4000", "-j", "MASQUERADE"},
		{"iptables", "-A", "OUTPUT", "-m", "mark", "--mark", "0x8000/0x8000", "-j", "DROP"},
	} {
		if out, err := l.A.NS.Run(ctx, cmd...); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
	}
	dst, sink := udpSink(t, l, 5001)
	for i, prio := range []int16{0, 3000, -30000, 30000, 2767, 2768} {
		t.Run(fmt.Sprint(prio), func(t *testing.T) {
			h := openIn(t, l.A.NS, "false", LayerNetwork, prio, FlagSendOnly)
			src := netip.AddrPortFrom(second, uint16(2000+i))
			if _, err := h.Send(udpPacket(t, src, dst, []byte("from .77")), &Address{Outbound: true}); err != nil {
				t.Fatalf("Send: %v", err)
			}
			if err := sink.SetReadDeadline(time.Now().Add(2 * time.Second)); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 100)
			n, from, err := sink.ReadFromUDPAddrPort(buf)
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) {
					t.Fatalf("B received nothing: the injected datagram was dropped")
				}
				t.Fatal(err)
			}
			if string(buf[:n]) != "from .77" || from.Addr().Unmap() != second || from.Port() != src.Port() {
				t.Fatalf("B received %q from %v, want %q from %v", buf[:n], from, "from .77", src)
			}
		})
	}
}
