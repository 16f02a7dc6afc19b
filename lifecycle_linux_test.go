package divert

import (
	"bytes"
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/netdivert/divert/internal/netnstest"
)

// lifecycleRun diverts n datagrams through h in l, with two readers (Recv
// and RecvBatch) handing packets to two workers that send each back
// (Send or SendBatch) or drop every seventh, while another goroutine moves
// the read deadline (past, near, far, none), changes the queue time and
// length and reads Stats. end, called once the datagrams are sent, ends
// the handle's use (Shutdown or Close). It returns how many datagrams the
// sink got and the handle's Stats after the readers and workers ended.
func lifecycleRun(t *testing.T, l *netnstest.Link, h *Handle, port uint16, n int, end func()) (int, Stats) {
	t.Helper()
	ap, sink := udpSink(t, l, port)
	ch := make(chan seen, 64)
	var readers, workers sync.WaitGroup
	fail := func(what string, err error) {
		// What a call racing with the end of the handle may return.
		if errors.Is(err, net.ErrClosed) || errors.Is(err, ErrShutdown) {
			return
		}
		if errors.Is(err, ErrNotQueued) {
			return // expired under a short queue time (counted in Expired)
		}
		t.Errorf("%s: %v", what, err)
	}
	for r := range 2 {
		readers.Add(1)
		go func() {
			defer readers.Done()
			ms := make([]Message, 8)
			for i := range ms {
				ms[i].Buf = make([]byte, 2048)
			}
			for {
				var k int
				var err error
				if r == 0 {
					k, err = h.Recv(ms[0].Buf, &ms[0].Addr)
					ms[0].N = k
					k = min(k, 1)
				} else {
					k, err = h.RecvBatch(ms)
				}
				for _, m := range ms[:k] {
					ch <- seen{m.Addr, bytes.Clone(m.Buf[:m.N])}
				}
				if errors.Is(err, os.ErrDeadlineExceeded) {
					// As a program would, not in a spin. With every
					// thread on one CPU (taskset -c 0, so GOMAXPROCS=1)
					// two readers spinning here keep the only P busy, and
					// a timer fires only when the scheduler next runs,
					// after a spinning goroutine is preempted (10 ms): the
					// sender's 300 µs sleeps took 15 ms each (p50, an
					// execution trace), and the test 14.5 s instead of
					// 3 s. A spin on a net.Conn past its deadline does
					// the same: neither returns through the scheduler.
					time.Sleep(time.Millisecond)
					continue
				}
				if err != nil {
					fail("receive", err)
					return
				}
			}
		}()
	}
	var handled atomic.Int32
	for range 2 {
		workers.Add(1)
		go func() {
			defer workers.Done()
			var batch []Message
			flush := func() {
				if len(batch) > 0 {
					if _, err := h.SendBatch(batch); err != nil {
						fail("SendBatch", err)
					}
					batch = batch[:0]
				}
			}
			for {
				var s seen
				var ok bool
				select {
				case s, ok = <-ch:
				default:
					flush()
					s, ok = <-ch
				}
				if !ok {
					flush()
					return
				}
				switch i := handled.Add(1); {
				case i%7 == 0:
					if err := h.Drop(&s.addr); err != nil {
						fail("Drop", err)
					}
				case i%3 == 0:
					if _, err := h.Send(s.pkt, &s.addr); err != nil {
						fail("Send", err)
					}
				default:
					batch = append(batch, Message{Buf: s.pkt, N: len(s.pkt), Addr: s.addr})
					if len(batch) == 4 {
						flush()
					}
				}
			}
		}()
	}
	stop := make(chan struct{})
	chaos := make(chan struct{})
	go func() {
		defer close(chaos)
		deadlines := []time.Duration{-time.Second, time.Millisecond, 0, 1 << 62, 3 * time.Millisecond, -1}
		for i := 0; i < 2000; i++ {
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
			var dl time.Time
			if d := deadlines[i%len(deadlines)]; d != 0 {
				dl = time.Now().Add(d)
			}
			if err := h.SetReadDeadline(dl); err != nil {
				fail("SetReadDeadline", err)
			}
			if err := h.SetParam(ParamQueueTime, []uint64{QueueTimeMax, 5000, QueueTimeDefault}[i%3]); err != nil {
				fail("SetParam(QueueTime)", err)
			}
			if err := h.SetParam(ParamQueueLength, []uint64{QueueLengthMax, QueueLengthDefault}[i%2]); err != nil {
				fail("SetParam(QueueLength)", err)
			}
			if _, err := h.Stats(); err != nil {
				t.Errorf("Stats: %v", err)
			}
		}
	}()
	var sunk atomic.Int64
	var sent atomic.Bool
	sinkDone := make(chan struct{})
	go func() { // read as they come: the sink's buffer holds a few hundred
		defer close(sinkDone)
		for {
			got, err := netnstest.RecvUDP(sink, 100, 300*time.Millisecond)
			if err != nil {
				t.Error(err)
				return
			}
			sunk.Add(int64(len(got)))
			if len(got) == 0 && sent.Load() {
				return // 300 ms with nothing more after the end
			}
		}
	}()
	if err := l.A.NS.SendUDP(ap, []byte("lifecycle"), n, 300*time.Microsecond); err != nil {
		t.Fatal(err)
	}
	end()
	close(stop)
	<-chaos
	readers.Wait()
	close(ch)
	workers.Wait()
	sent.Store(true)
	<-sinkDone
	got := int(sunk.Load())
	s, err := h.Stats()
	if err != nil {
		t.Fatal(err)
	}
	return got, s
}

// TestLinuxLifecycleShutdown: under concurrent receives, sends, drops and
// changes of the read deadline, queue time and length, every packet gets
// exactly one verdict: once the handle is shut down and drained, nothing
// is left in the kernel's queue, no verdict was refused, every received
// packet was sent back, dropped or expired, and the sink got what was
// sent back.
func TestLinuxLifecycleShutdown(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dls", 0)
	h := openIn(t, l.B.NS, "udp.DstPort == 7100", LayerNetwork, 0, 0)
	const n = 600
	got, s := lifecycleRun(t, l, h, 7100, n, func() {
		// Until every datagram was received and handled.
		deadline := time.Now().Add(10 * time.Second)
		for {
			st, _ := h.Stats()
			if st.Received >= n && st.Sent+st.Dropped+st.Expired >= st.Received || time.Now().After(deadline) {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if err := h.Shutdown(ShutdownRecv); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	})
	total, _, ok := queueStat(t, l.B.NS, h.b.(*linuxBackend).queue)
	if !ok || total != 0 {
		t.Errorf("kernel queue holds %d packets after the drain (found %v)", total, ok)
	}
	if s.Received != n || s.Received != s.Sent+s.Dropped+s.Expired || s.Injected != 0 ||
		s.RefusedVerdicts != 0 || s.Overflows != 0 || uint64(got) != s.Sent {
		t.Errorf("sink got %d of %d; %+v: want every datagram received once, sent back, dropped or expired, none refused", got, n, s)
	}
}

// TestLinuxLifecycleClose: the same traffic with Close in its middle,
// while packets are read, held, sent and dropped: Close returns, every
// call racing it ends with net.ErrClosed (or succeeds), every datagram the
// program did not drop (or let expire) reaches the sink (sent back,
// reinjected by Close, or passed unqueued once Close stopped the queue),
// and no verdict is refused: Close's own, which finds nothing queued when
// the program had sent everything back, and those of receive calls still
// running after it, are not packets lost.
func TestLinuxLifecycleClose(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dlc", 0)
	h := openIn(t, l.B.NS, "udp.DstPort == 7101", LayerNetwork, 0, 0)
	const n = 600
	closed := make(chan error, 1)
	go func() {
		time.Sleep(100 * time.Millisecond) // the traffic takes 180 ms or more
		closed <- h.Close()
	}()
	got, s := lifecycleRun(t, l, h, 7101, n, func() {
		select {
		case err := <-closed:
			if err != nil {
				t.Errorf("Close: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Close did not return within 10 s")
		}
	})
	if s.Received == n || s.Received == 0 {
		t.Logf("Close came after %d of %d packets were received: not in the middle", s.Received, n)
	}
	if uint64(got) != n-s.Dropped-s.Expired || s.RefusedVerdicts != 0 {
		t.Errorf("sink got %d of %d; %+v: want all but the dropped and expired, no verdict refused", got, n, s)
	}
}
