package divert

import (
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/netdivert/divert/internal/netnstest"
)

// statsOf returns h's counters or fails the test.
func statsOf(t *testing.T, h *Handle) Stats {
	t.Helper()
	s, err := h.Stats()
	if err != nil {
		t.Fatalf("Stats: %v", err)
	}
	return s
}

// waitStats polls h's counters until ok accepts them or 3 s pass.
func waitStats(t *testing.T, h *Handle, ok func(Stats) bool) Stats {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		s := statsOf(t, h)
		if ok(s) || time.Now().After(deadline) {
			return s
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestStatsLinuxRecvSend: every packet received and sent back (by
// RecvBatch/SendBatch) is counted once on each side; a new packet counts
// as Sent and Injected.
func TestStatsLinuxRecvSend(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dsr", 0)
	const n = 40
	ap, sink := udpSink(t, l, 6400)
	h := openIn(t, l.B.NS, "udp.DstPort == 6400", LayerNetwork, 0, 0)
	if s := statsOf(t, h); s != (Stats{}) {
		t.Fatalf("fresh handle: %+v", s)
	}
	done := make(chan int)
	go func() {
		ms := make([]Message, 8)
		for i := range ms {
			ms[i].Buf = make([]byte, MTUMax)
		}
		total := 0
		defer func() { done <- total }()
		for {
			k, err := h.RecvBatch(ms)
			if err != nil && !errors.Is(err, ErrTruncated) {
				if !errors.Is(err, ErrShutdown) && !errors.Is(err, net.ErrClosed) {
					t.Errorf("RecvBatch: %v", err)
				}
				return
			}
			total += k
			if _, err := h.SendBatch(ms[:k]); err != nil {
				t.Errorf("SendBatch: %v", err)
				return
			}
		}
	}()
	if err := l.A.NS.SendUDP(ap, []byte("count me"), n, time.Millisecond); err != nil {
		t.Fatal(err)
	}
	got, err := netnstest.RecvUDP(sink, n, 3*time.Second)
	if err != nil || len(got) != n {
		t.Fatalf("sink got %d of %d: %v", len(got), n, err)
	}
	// A new packet, from another port: not diverted, but counted as sent.
	src := netip.AddrPortFrom(l.A.V4, 1234)
	if _, err := h.Send(udpPacket(t, src, netip.AddrPortFrom(l.B.V4, 6401), []byte("new")), &Address{IfIdx: uint32(l.B.IfIdx)}); err != nil {
		t.Fatal(err)
	}
	if err := h.Shutdown(ShutdownRecv); err != nil {
		t.Fatal(err)
	}
	seen := <-done
	s := statsOf(t, h)
	want := Stats{Received: n, Sent: n + 1, Injected: 1}
	s.KernelQueueDropped, s.KernelUserDropped, s.Overflows = 0, 0, 0 // checked below
	if seen != n || s != want {
		t.Fatalf("%d packets seen; stats %+v, want %+v", seen, s, want)
	}
	full := statsOf(t, h)
	if full.KernelQueueDropped != 0 || full.KernelUserDropped != 0 || full.Overflows != 0 {
		t.Fatalf("losses with a reader keeping up: %+v", full)
	}
	// After Close the counters stay.
	h.Close()
	if after := statsOf(t, h); after.Received != n || after.Sent != n+1 {
		t.Fatalf("after Close: %+v", after)
	}
}

// TestStatsLinuxDropExpire: Drop counts as Dropped; a packet held past
// ParamQueueTime and packets left unread in the queue count as Expired.
func TestStatsLinuxDropExpire(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dse", 0)
	ap := netip.AddrPortFrom(l.B.V4, 6410)
	h := openIn(t, l.B.NS, "udp.DstPort == 6410", LayerNetwork, 0, 0)
	if err := h.SetParam(ParamQueueTime, 100); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, MTUMax)
	var a Address
	recv1 := func() int {
		t.Helper()
		if err := h.SetReadDeadline(time.Now().Add(3 * time.Second)); err != nil {
			t.Fatal(err)
		}
		n, err := h.Recv(buf, &a)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	// Drop.
	if err := l.A.NS.SendUDP(ap, []byte("drop"), 1, 0); err != nil {
		t.Fatal(err)
	}
	recv1()
	if err := h.Drop(&a); err != nil {
		t.Fatal(err)
	}
	if s := statsOf(t, h); s.Received != 1 || s.Dropped != 1 || s.Sent != 0 || s.Expired != 0 {
		t.Fatalf("after Drop: %+v", s)
	}
	// Held past the queue time.
	if err := l.A.NS.SendUDP(ap, []byte("hold"), 1, 0); err != nil {
		t.Fatal(err)
	}
	n := recv1()
	s := waitStats(t, h, func(s Stats) bool { return s.Expired >= 1 })
	if s.Received != 2 || s.Expired != 1 || s.Dropped != 1 {
		t.Fatalf("after holding past the queue time: %+v", s)
	}
	if _, err := h.Send(buf[:n], &a); err == nil {
		t.Fatal("Send of an expired packet succeeded")
	}
	if s := statsOf(t, h); s.Sent != 0 {
		t.Fatalf("a failed Send counted: %+v", s)
	}
	// Left unread: the reaper drains them after the queue time.
	const unread = 5
	if err := l.A.NS.SendUDP(ap, []byte("unread"), unread, 0); err != nil {
		t.Fatal(err)
	}
	s = waitStats(t, h, func(s Stats) bool { return s.Expired >= 1+unread })
	if s.Received != 2 || s.Expired != 1+unread || s.Dropped != 1 {
		t.Fatalf("after leaving %d unread: %+v", unread, s)
	}
}

// TestStatsLinuxPassed: packets the kernel rules queue but the user-space
// filter rejects are counted as Passed, and never as Received.
func TestStatsLinuxPassed(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dsp", 0)
	ap, sink := udpSink(t, l, 6420)
	// No kernel rule tests the timestamp: user space finishes the match,
	// and nothing matches.
	h := openIn(t, l.B.NS, "udp.DstPort == 6420 and timestamp < 0", LayerNetwork, 0, 0)
	if !h.b.(*linuxBackend).userSide {
		t.Fatal("the rules claim to test the timestamp exactly")
	}
	stop := pump(t, h, true, nil)
	const n = 7
	if err := l.A.NS.SendUDP(ap, []byte("pass"), n, time.Millisecond); err != nil {
		t.Fatal(err)
	}
	got, err := netnstest.RecvUDP(sink, n, 3*time.Second)
	if err != nil || len(got) != n {
		t.Fatalf("sink got %d of %d: %v", len(got), n, err)
	}
	s := waitStats(t, h, func(s Stats) bool { return s.Passed >= n })
	if seen := stop(); len(seen) != 0 || s.Passed != n || s.Received != 0 || s.Sent != 0 {
		t.Fatalf("%d seen; %+v, want Passed %d and nothing received", len(seen), s, n)
	}
}

// TestStatsLinuxKernelCounters: the kernel's queue_dropped reaches Stats,
// agreeing with the proc file read independently.
func TestStatsLinuxKernelCounters(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dsk", 0)
	ap := netip.AddrPortFrom(l.B.V4, 6430)
	h := openIn(t, l.B.NS, "udp.DstPort == 6430", LayerNetwork, 0, 0)
	if err := h.SetParam(ParamQueueLength, QueueLengthMin); err != nil {
		t.Fatal(err)
	}
	const n = 50
	if err := l.A.NS.SendUDP(ap, []byte("x"), n, 0); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	s := statsOf(t, h)
	_, dropped, ok := queueStat(t, l.B.NS, h.b.(*linuxBackend).queue)
	if !ok || s.KernelQueueDropped != n-QueueLengthMin || int(s.KernelQueueDropped) != dropped {
		t.Fatalf("KernelQueueDropped %d, proc says %d (found %v); want %d", s.KernelQueueDropped, dropped, ok, n-QueueLengthMin)
	}
	if s.KernelUserDropped != 0 || s.Received != 0 {
		t.Fatalf("%+v", s)
	}
}

// TestStatsLinuxNoQueue: a send-only handle counts what it injects.
func TestStatsLinuxNoQueue(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dsn", 0)
	h := openIn(t, l.B.NS, "false", LayerNetwork, 0, FlagSendOnly)
	src, dst := netip.AddrPortFrom(l.A.V4, 1234), netip.AddrPortFrom(l.B.V4, 6440)
	pkt := udpPacket(t, src, dst, []byte("x"))
	ms := []Message{{Buf: pkt, N: len(pkt), Addr: Address{IfIdx: uint32(l.B.IfIdx)}}, {Buf: pkt, N: len(pkt), Addr: Address{IfIdx: uint32(l.B.IfIdx)}}}
	if k, err := h.SendBatch(ms); k != 2 || err != nil {
		t.Fatalf("SendBatch: %d, %v", k, err)
	}
	if s := statsOf(t, h); s != (Stats{Sent: 2, Injected: 2}) {
		t.Fatalf("%+v", s)
	}
}

// TestStatsLinuxSniffNoRefusedVerdicts: a sniffing handle's two ways of
// accepting an original, its reader's (the copy read) and the reaper's
// batch every tick (the originals nobody read within a tick), must not
// both accept one packet: the kernel refuses the second verdict (ENOENT)
// and Stats.RefusedVerdicts, which reports packets the kernel lost while
// the handle held them, would count it. A reader that takes a moment over
// each copy, under steady traffic, meets the reaper's ticks often.
func TestStatsLinuxSniffNoRefusedVerdicts(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dsv", 0)
	ap, sink := udpSink(t, l, 6450)
	h := openIn(t, l.B.NS, "udp.DstPort == 6450", LayerNetwork, 0, FlagSniff|FlagRecvOnly)
	const n = 300
	done := make(chan int, 1)
	go func() {
		buf := make([]byte, MTUMax)
		var a Address
		k := 0
		defer func() { done <- k }()
		for {
			if _, err := h.Recv(buf, &a); err != nil {
				if !errors.Is(err, ErrShutdown) && !errors.Is(err, net.ErrClosed) {
					t.Errorf("Recv: %v", err)
				}
				return
			}
			k++
			time.Sleep(2 * time.Millisecond) // the program's work on the copy
		}
	}()
	sunk := make(chan int, 1)
	go func() { // read as they come: n datagrams overflow the sink's buffer
		got, err := netnstest.RecvUDP(sink, n, 5*time.Second)
		if err != nil {
			t.Error(err)
		}
		sunk <- len(got)
	}()
	if err := l.A.NS.SendUDP(ap, []byte("sniffed"), n, 3*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if got := <-sunk; got != n {
		t.Fatalf("sink got %d of %d originals", got, n)
	}
	time.Sleep(100 * time.Millisecond) // the last verdicts' answers, if any, reach the socket
	if err := h.Shutdown(ShutdownRecv); err != nil {
		t.Fatal(err)
	}
	k := <-done // the reader read every answer waiting in the socket
	s := statsOf(t, h)
	if k != n || s.Received != n || s.RefusedVerdicts != 0 || s.Overflows != 0 || s.Expired != 0 {
		t.Fatalf("read %d of %d copies; %+v: want every copy received and no verdict refused", k, n, s)
	}
}
