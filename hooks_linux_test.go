package divert

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/netdivert/divert/internal/netnstest"
)

// Removing a netfilter hook makes the kernel drop every packet queued in
// the namespace. These tests check that closing one handle of the process
// removes none while another is open there (nftrules' share_linux.go).

// nftTables returns the names of the nftables tables in ns.
func nftTables(t *testing.T, ns *netnstest.NS) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := ns.Run(ctx, "nft", "list", "tables")
	if err != nil {
		t.Fatalf("nft list tables: %v: %s", err, out)
	}
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "table" {
			names = append(names, f[2])
		}
	}
	return names
}

// holdOne sends one datagram to ap from l.A and receives it on h, which
// holds it; it returns the packet and its Address.
func holdOne(t *testing.T, l *netnstest.Link, h *Handle, ap netip.AddrPort, payload string) ([]byte, Address) {
	t.Helper()
	if err := l.A.NS.SendUDP(ap, []byte(payload), 1, 0); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, MTUMax)
	var a Address
	h.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, err := h.Recv(buf, &a)
	if err != nil {
		t.Fatalf("Recv: %v", err)
	}
	h.SetReadDeadline(time.Time{})
	return buf[:n], a
}

// TestLinuxCloseKeepsOthersHeld: a handle holds a packet while another
// handle of the process, in the same namespace, is opened and closed; the
// packet is still queued afterwards, and the first handle's Send delivers
// it. The other handle's chain runs after the first's (lower priority) or
// at another hook, so that opening it shifts nothing (see README).
func TestLinuxCloseKeepsOthersHeld(t *testing.T) {
	netnstest.RequireRoot(t)
	type opener func(t *testing.T, ns *netnstest.NS) []*Handle
	open := func(filt string, layer Layer, prio int16, flags Flag) opener {
		return func(t *testing.T, ns *netnstest.NS) []*Handle {
			return []*Handle{openIn(t, ns, filt, layer, prio, flags)}
		}
	}
	for _, tc := range []struct {
		name  string
		other opener
	}{
		{"same hook", open("inbound and udp.DstPort == 6001", LayerNetwork, -10, 0)},
		{"other hook", open("outbound and tcp", LayerNetwork, 50, 0)},
		{"sniff", open("inbound and udp", LayerNetwork, -10, FlagSniff)},
		{"drop", open("inbound and udp.DstPort == 6001", LayerNetwork, -10, FlagDrop)},
		{"fragments", open("inbound and udp.DstPort == 6001", LayerNetwork, -10, FlagFragments)},
		{"forward reassembly", open("udp", LayerNetworkForward, -10, FlagReassemble)},
		{"queues", func(t *testing.T, ns *netnstest.NS) []*Handle {
			var hs []*Handle
			if err := ns.Do(func() (err error) {
				hs, err = OpenQueues("inbound and udp.DstPort == 6001", LayerNetwork, -10, 0, 2)
				return err
			}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				for _, h := range hs {
					h.Close()
				}
			})
			return hs
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := netnstest.Pair(t, "dko", 0)
			ap, sink := udpSink(t, l, 6000)
			a := openIn(t, l.B.NS, "inbound and udp.DstPort == 6000", LayerNetwork, 10, 0)
			pkt, addr := holdOne(t, l, a, ap, "held")
			for _, h := range tc.other(t, l.B.NS) {
				if err := h.Close(); err != nil {
					t.Fatal(err)
				}
			}
			if n, _, ok := queueStat(t, l.B.NS, a.b.(*linuxBackend).queue); !ok || n != 1 {
				t.Fatalf("after the other handle's Close the kernel queue holds %d (found %v), want the held packet", n, ok)
			}
			if _, err := a.Send(pkt, &addr); err != nil {
				t.Fatal(err)
			}
			got, err := netnstest.RecvUDP(sink, 1, 3*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 1 || string(got[0]) != "held" {
				t.Fatalf("sink got %q, want the held datagram", got)
			}
		})
	}
}

// TestLinuxCloseKeepsPortHeld: an OpenPort handle, whose rule is the
// administrator's, holds a packet while a handle with rules of its own is
// opened and closed; the packet stays queued and is delivered.
func TestLinuxCloseKeepsPortHeld(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dkp", 0)
	const q = 4343
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The administrator's rule, from outside the process.
	if out, err := l.B.NS.Run(ctx, "iptables", "-A", "INPUT", "-p", "udp", "--dport", "6000", "-j", "NFQUEUE", "--queue-num", fmt.Sprint(q)); err != nil {
		t.Fatalf("iptables: %v: %s", err, out)
	}
	ap, sink := udpSink(t, l, 6000)
	var a *Handle
	if err := l.B.NS.Do(func() (err error) { a, err = OpenPort(q, 0); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	pkt, addr := holdOne(t, l, a, ap, "held")
	b := openIn(t, l.B.NS, "inbound and udp.DstPort == 6001", LayerNetwork, -10, 0)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if n, _, ok := queueStat(t, l.B.NS, q); !ok || n != 1 {
		t.Fatalf("after the other handle's Close the kernel queue holds %d (found %v), want the held packet", n, ok)
	}
	if _, err := a.Send(pkt, &addr); err != nil {
		t.Fatal(err)
	}
	if got, _ := netnstest.RecvUDP(sink, 1, 3*time.Second); len(got) != 1 || string(got[0]) != "held" {
		t.Fatalf("sink got %q, want the held datagram", got)
	}
}

// TestLinuxClosedHandleQueuesNothing: the table a closed handle leaves
// while another is open queues nothing (a datagram its filter matches goes
// straight to its destination), and once the last handle is closed no
// table of the library remains in the namespace.
func TestLinuxClosedHandleQueuesNothing(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dkn", 0)
	apB, sinkB := udpSink(t, l, 6001)
	a := openIn(t, l.B.NS, "inbound and udp.DstPort == 6000", LayerNetwork, 0, 0)
	b := openIn(t, l.B.NS, "inbound and udp.DstPort == 6001", LayerNetwork, 5, 0)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if got := nftTables(t, l.B.NS); len(got) != 2 {
		t.Fatalf("tables while one handle is open: %v, want its own and the closed one's, emptied", got)
	}
	if err := l.A.NS.SendUDP(apB, []byte("free"), 3, 0); err != nil {
		t.Fatal(err)
	}
	if got, _ := netnstest.RecvUDP(sinkB, 3, 3*time.Second); len(got) != 3 {
		t.Fatalf("%d of 3 datagrams for the closed handle's filter passed", len(got))
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if got := nftTables(t, l.B.NS); len(got) != 0 {
		t.Fatalf("tables after every handle closed: %v", got)
	}
}

// TestLinuxReopenKeepsHookPositions: a handle opened with the layer,
// hooks, family and priority of one closed while another handle stays
// open takes the closed one's table over, registering no hook: a packet
// the open handle holds, whose chain runs after the new one's, is not
// shifted back into that chain and is delivered when sent.
func TestLinuxReopenKeepsHookPositions(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dkr", 0)
	ap, sink := udpSink(t, l, 6000)
	apC, sinkC := udpSink(t, l, 6002)
	a := openIn(t, l.B.NS, "inbound and udp.DstPort == 6000", LayerNetwork, 0, 0)
	b := openIn(t, l.B.NS, "inbound and udp.DstPort == 6001", LayerNetwork, 100, 0)
	parked := b.b.(*linuxBackend).rules.Table()
	b.Close()
	pkt, addr := holdOne(t, l, a, ap, "held")
	c := openIn(t, l.B.NS, "inbound and udp.DstPort == 6002", LayerNetwork, 100, 0)
	if got := c.b.(*linuxBackend).rules.Table(); got != parked {
		t.Errorf("the new handle's table is %s, want the closed handle's %s taken over", got, parked)
	}
	if _, err := a.Send(pkt, &addr); err != nil {
		t.Fatal(err)
	}
	if got, _ := netnstest.RecvUDP(sink, 1, 3*time.Second); len(got) != 1 || string(got[0]) != "held" {
		t.Fatalf("sink got %q, want the held datagram", got)
	}
	// The new handle works in the table it took over.
	stop := pump(t, c, true, nil)
	if err := l.A.NS.SendUDP(apC, []byte("c"), 1, 0); err != nil {
		t.Fatal(err)
	}
	gotC, _ := netnstest.RecvUDP(sinkC, 1, 3*time.Second)
	seenC := stop()
	if len(gotC) != 1 || len(seenC) != 1 {
		t.Fatalf("the new handle saw %d datagrams and its sink got %d, want 1 and 1", len(seenC), len(gotC))
	}
}

// TestLinuxConcurrentCloseKeepsHeld: handles opened and closed from many
// goroutines while one holds a packet leave it queued, and once all are
// closed no table remains (run with -race).
func TestLinuxConcurrentCloseKeepsHeld(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dkc", 0)
	ap, sink := udpSink(t, l, 6000)
	a := openIn(t, l.B.NS, "inbound and udp.DstPort == 6000", LayerNetwork, 10, 0)
	pkt, addr := holdOne(t, l, a, ap, "held")
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 3 {
				// Lower priorities than a's: their chains run after it
				// and opening them shifts nothing.
				filt := fmt.Sprintf("inbound and udp.DstPort == %d", 6001+g)
				var h *Handle
				if err := l.B.NS.Do(func() (err error) { h, err = Open(filt, LayerNetwork, int16(-1-i), 0); return err }); err != nil {
					t.Error(err)
					return
				}
				if err := h.Close(); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	if n, _, ok := queueStat(t, l.B.NS, a.b.(*linuxBackend).queue); !ok || n != 1 {
		t.Fatalf("after the other handles' Close the kernel queue holds %d (found %v), want the held packet", n, ok)
	}
	if _, err := a.Send(pkt, &addr); err != nil {
		t.Fatal(err)
	}
	if got, _ := netnstest.RecvUDP(sink, 1, 3*time.Second); len(got) != 1 || string(got[0]) != "held" {
		t.Fatalf("sink got %q, want the held datagram", got)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if got := nftTables(t, l.B.NS); len(got) != 0 {
		t.Fatalf("tables after every handle closed: %v", got)
	}
}

// TestLinuxDropShutdownRemovesRules: Shutdown of a FlagDrop handle, the
// only handle of the process in its namespace, removes its table at once
// (not parked until Close: nothing of the process is left there to keep
// queued packets for), and what its filter matches passes. With another
// handle open there, the table is parked instead, its hooks kept for the
// other handle's queue.
func TestLinuxDropShutdownRemovesRules(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dds", 0)
	ap, sink := udpSink(t, l, 6320)
	d := openIn(t, l.B.NS, "inbound and udp.DstPort == 6320", LayerNetwork, 0, FlagDrop)
	if got := nftTables(t, l.B.NS); len(got) != 1 {
		t.Fatalf("tables of an open FlagDrop handle: %v, want one", got)
	}
	if err := d.Shutdown(ShutdownRecv); err != nil {
		t.Fatal(err)
	}
	if got := nftTables(t, l.B.NS); len(got) != 0 {
		t.Fatalf("tables after a lone FlagDrop handle's Shutdown: %v, want none", got)
	}
	if err := l.A.NS.SendUDP(ap, []byte("pass"), 1, 0); err != nil {
		t.Fatal(err)
	}
	if got, _ := netnstest.RecvUDP(sink, 1, 3*time.Second); len(got) != 1 {
		t.Fatalf("sink got %d datagrams after Shutdown, want the one sent", len(got))
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	// With another handle open, Shutdown parks the table.
	a := openIn(t, l.B.NS, "inbound and udp.DstPort == 6321", LayerNetwork, 0, 0)
	d = openIn(t, l.B.NS, "inbound and udp.DstPort == 6320", LayerNetwork, 5, FlagDrop)
	if err := d.Shutdown(ShutdownRecv); err != nil {
		t.Fatal(err)
	}
	if got := nftTables(t, l.B.NS); len(got) != 2 {
		t.Fatalf("tables after a FlagDrop handle's Shutdown while another is open: %v, want both (one parked)", got)
	}
	d.Close()
	a.Close()
	if got := nftTables(t, l.B.NS); len(got) != 0 {
		t.Fatalf("tables after every handle closed: %v", got)
	}
}

// TestLinuxSendOfKernelDropped: when another program removes a netfilter
// hook in the namespace, the kernel drops the packet a handle holds, and
// the handle's Send of it returns no error, as documented (the kernel's
// ENOENT answer comes after Send returned, among the packets to receive);
// Recv skips that answer and the handle goes on working. The dropped
// datagram never arrives: it would have been delivered within Send's
// verdict, before the marker sent after it was even received.
func TestLinuxSendOfKernelDropped(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dskd", 0)
	ap, sink := udpSink(t, l, 7150)
	h := openIn(t, l.B.NS, "inbound and udp.DstPort == 7150", LayerNetwork, 0, 0)
	pkt, a := holdOne(t, l, h, ap, "dropped")
	// Another program's table with a base chain, added and deleted: the
	// hook goes, and with it every packet queued in the namespace.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, argv := range [][]string{
		{"nft", "add", "table", "inet", "dskd_other"},
		{"nft", "add", "chain", "inet", "dskd_other", "c", "{ type filter hook input priority 100 ; }"},
		{"nft", "delete", "table", "inet", "dskd_other"},
	} {
		if out, err := l.B.NS.Run(ctx, argv...); err != nil {
			t.Fatalf("%v: %v: %s", argv, err, out)
		}
	}
	if n, err := h.Send(pkt, &a); err != nil || n != len(pkt) {
		t.Fatalf("Send of the packet the kernel dropped: %d, %v; want %d, nil", n, err, len(pkt))
	}
	marker, ma := holdOne(t, l, h, ap, "marker")
	if _, err := h.Send(marker, &ma); err != nil {
		t.Fatal(err)
	}
	got, err := netnstest.RecvUDP(sink, 1, 3*time.Second)
	if err != nil || len(got) != 1 || string(got[0]) != "marker" {
		t.Fatalf("the receiver got %q (%v), want the marker first and alone", got, err)
	}
	// The kernel's ENOENT to the verdict came in before the marker was
	// queued, so the Recv that took the marker read it; the marker's own
	// verdict found its packet.
	if s, err := h.Stats(); err != nil || s.RefusedVerdicts != 1 {
		t.Fatalf("Stats: RefusedVerdicts %d (%v), want 1", s.RefusedVerdicts, err)
	}
}
