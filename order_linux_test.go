package divert

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/netdivert/divert/internal/netnstest"
)

// TestLinuxSendOrder: packets leave in the order the program sends them,
// whether it reinjects a received packet or injects a new one, as
// WinDivertSend's do: a reinjected packet's verdict that Send or SendBatch
// keeps back to send with later ones (another received packet is waiting,
// or the batch goes on) goes out before a new packet sent after it. The
// handle takes A's datagrams to B; the program reinjects each and after
// the first injects a new datagram; B must receive them in that order.
func TestLinuxSendOrder(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dso", 0)
	for _, batch := range []bool{false, true} {
		t.Run(fmt.Sprint("batch=", batch), func(t *testing.T) {
			port := uint16(5100)
			if batch {
				port++
			}
			dst, sink := udpSink(t, l, port)
			h := openIn(t, l.A.NS, fmt.Sprintf("outbound and udp.DstPort == %d", port), LayerNetwork, 0, 0)
			if err := h.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
				t.Fatal(err)
			}
			// Both queued before the handle reads: one read takes them.
			for _, m := range []string{"first", "third"} {
				if err := l.A.NS.SendUDP(dst, []byte(m), 1, 0); err != nil {
					t.Fatal(err)
				}
			}
			fresh := udpPacket(t, netip.AddrPortFrom(l.A.V4, 999), dst, []byte("second"))
			buf := make([]byte, MTUMax)
			var a Address
			n, err := h.Recv(buf, &a)
			if err != nil {
				t.Fatal(err)
			}
			if batch {
				ms := []Message{
					{Buf: buf, N: n, Addr: a},
					{Buf: fresh, N: len(fresh), Addr: Address{Outbound: true}},
				}
				if k, err := h.SendBatch(ms); k != 2 || err != nil {
					t.Fatalf("SendBatch: %d, %v", k, err)
				}
			} else {
				if _, err := h.Send(buf[:n], &a); err != nil {
					t.Fatal(err)
				}
				if _, err := h.Send(fresh, &Address{Outbound: true}); err != nil {
					t.Fatal(err)
				}
			}
			n, err = h.Recv(buf, &a)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := h.Send(buf[:n], &a); err != nil {
				t.Fatal(err)
			}
			got, err := netnstest.RecvUDP(sink, 3, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 3 || string(got[0]) != "first" || string(got[1]) != "second" || string(got[2]) != "third" {
				t.Fatalf("B received %q, want first, second, third", got)
			}
		})
	}
}

// TestLinuxSendBatchPartial: a batch whose third message cannot be sent
// (a new inbound packet for another host) returns 2 with an error wrapping
// ErrNotSupported; the reinjected first message and the new second one
// arrive, in that order, the fourth is not sent, and Stats count two
// packets sent, one of them injected. The message that failed leaves its
// held packet nothing: the fourth, a received packet, stays held, and a
// later Send delivers it.
func TestLinuxSendBatchPartial(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dsp", 0)
	dst, sink := udpSink(t, l, 5200)
	h := openIn(t, l.A.NS, "outbound and udp.DstPort == 5200", LayerNetwork, 0, 0)
	if err := h.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{"first", "fourth"} {
		if err := l.A.NS.SendUDP(dst, []byte(m), 1, 0); err != nil {
			t.Fatal(err)
		}
	}
	ms := make([]Message, 4)
	for _, i := range []int{0, 3} {
		ms[i].Buf = make([]byte, MTUMax)
		n, err := h.Recv(ms[i].Buf, &ms[i].Addr)
		if err != nil {
			t.Fatal(err)
		}
		ms[i].N = n
	}
	second := udpPacket(t, netip.AddrPortFrom(l.A.V4, 998), dst, []byte("second"))
	ms[1] = Message{Buf: second, N: len(second), Addr: Address{Outbound: true}}
	// Inbound, for B: not an address of A.
	bad := udpPacket(t, netip.AddrPortFrom(l.A.V4, 997), dst, []byte("third"))
	ms[2] = Message{Buf: bad, N: len(bad), Addr: Address{IfIdx: uint32(l.A.IfIdx)}}
	k, err := h.SendBatch(ms)
	if k != 2 || !errors.Is(err, ErrNotSupported) {
		t.Fatalf("SendBatch: %d, %v; want 2 and ErrNotSupported", k, err)
	}
	if s, err := h.Stats(); err != nil || s.Sent != 2 || s.Injected != 1 {
		t.Fatalf("Stats %+v, %v: want 2 sent, 1 injected", s, err)
	}
	if _, err := h.Send(ms[3].Buf[:ms[3].N], &ms[3].Addr); err != nil {
		t.Fatalf("Send of the fourth: %v", err)
	}
	got, err := netnstest.RecvUDP(sink, 3, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 || string(got[0]) != "first" || string(got[1]) != "second" || string(got[2]) != "fourth" {
		t.Fatalf("B received %q, want first, second, fourth", got)
	}
}
