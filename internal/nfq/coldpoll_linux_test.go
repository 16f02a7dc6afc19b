package nfq

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// epollWatches returns the descriptors that c's epoll instance watches,
// from /proc/self/fdinfo (its "tfd:" lines).
func epollWatches(t *testing.T, c *Conn) []int {
	t.Helper()
	var ep uintptr
	if err := c.cold.rc.Control(func(fd uintptr) { ep = fd }); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", ep))
	if err != nil {
		t.Fatal(err)
	}
	var fds []int
	for _, line := range strings.Split(string(b), "\n") {
		var fd int
		if _, err := fmt.Sscanf(line, "tfd: %d", &fd); err == nil {
			fds = append(fds, fd)
		}
	}
	return fds
}

// waitCold starts a blocking Next in a goroutine and returns once it waits
// cold, past any hot wait (its 1 ms receive timeout lasts a tick or two:
// up to 8.8 ms measured with HZ=250, 20 ms with HZ=100).
func waitCold(t *testing.T, c *Conn, p *Packet) chan error {
	t.Helper()
	ch := make(chan error, 1)
	go func() { ch <- c.Next(p, true) }()
	for i := 0; i < 200 && !c.waiting.Load(); i++ {
		time.Sleep(time.Millisecond)
	}
	if !c.waiting.Load() {
		t.Fatal("Next never started waiting")
	}
	time.Sleep(30 * time.Millisecond)
	return ch
}

// TestColdWaitWakes checks cold waits in the runtime poller (coldPoll): each
// datagram that comes while the reader waits cold wakes it by the socket's
// readiness, never by the safety net (maxWait), wait after wait; the socket
// is in the epoll set while the reader waits cold and out of it once the
// reader waits hot again.
func TestColdWaitWakes(t *testing.T) {
	c, peer := pairConn(t, Config{Queue: 1})
	sock := c.Fd()
	var p Packet
	for i := uint32(1); i <= 12; i++ {
		ch := waitCold(t, c, &p)
		if w := epollWatches(t, c); len(w) != 1 || w[0] != sock {
			t.Fatalf("round %d: epoll set %v while waiting cold, want [%d]", i, w, sock)
		}
		if d := deliver(t, peer, ch, &p, i); d > wakeBound {
			t.Fatalf("round %d: the datagram woke the cold wait after %v: not by its readiness", i, d)
		}
	}
	// A datagram came: the next wait is hot, with the socket still in the
	// set (a lone packet's hot wait times out); once a hot wait brought a
	// datagram, the next one takes the socket out of the set. Each hot
	// wait reads the datagram written before it.
	for id, want := range []int{1, 0} {
		if _, err := unix.Write(peer, AppendPacket(nil, &Packet{ID: uint32(100 + id), Queue: 1, Payload: []byte{0x45, 0, 0, 20}})); err != nil {
			t.Fatal(err)
		}
		hot0 := c.Stats().HotWaits
		if err := c.Next(&p, true); err != nil || p.ID != uint32(100+id) {
			t.Fatalf("Next: %v (id %d)", err, p.ID)
		}
		if c.Stats().HotWaits != hot0+1 {
			t.Fatalf("the wait after a datagram was not hot: %+v", c.Stats())
		}
		if w := epollWatches(t, c); len(w) != want {
			t.Fatalf("epoll set %v after hot wait %d, want %d descriptors", w, id+1, want)
		}
	}
	if s := c.Stats(); s.Waits-s.HotWaits < 12 {
		t.Fatalf("%d cold waits, want 12 at least", s.Waits-s.HotWaits)
	}
}

// TestColdWaitLonePackets checks that lone datagrams, each followed by a
// hot wait that times out and then by a cold wait, leave the socket in the
// epoll set: with one P no epoll_ctl call after the first, with two only
// the two that mask it for the hot wait and arm it again, where taking it
// out for the hot wait and back for the cold one cost an epitem's
// allocation and release per datagram.
func TestColdWaitLonePackets(t *testing.T) { withProcs(t, testColdWaitLonePackets) }

func testColdWaitLonePackets(t *testing.T, procs int) {
	c, peer := pairConn(t, Config{Queue: 1})
	var p Packet
	var ctls [4]uint64
	for i := uint32(1); i <= 6; i++ {
		before := c.Stats()
		deliver(t, peer, waitCold(t, c, &p), &p, i)
		s := c.Stats()
		if i > 1 && s.HotWaits == before.HotWaits {
			t.Fatalf("round %d: no hot wait before the cold one: %+v", i, s)
		}
		if s.Waits-s.HotWaits == before.Waits-before.HotWaits {
			t.Fatalf("round %d: the datagram did not come to a cold wait: %+v", i, s)
		}
		if i == 1 {
			ctls = c.cold.a.ctls
		} else {
			add := c.cold.a.ctls[unix.EPOLL_CTL_ADD] - ctls[unix.EPOLL_CTL_ADD]
			del := c.cold.a.ctls[unix.EPOLL_CTL_DEL] - ctls[unix.EPOLL_CTL_DEL]
			mod := c.cold.a.ctls[unix.EPOLL_CTL_MOD] - ctls[unix.EPOLL_CTL_MOD]
			want := uint64(0)
			if procs > 1 {
				want = 2 * uint64(i-1) // mask and arm per datagram
			}
			if add != 0 || del != 0 || mod != want {
				t.Fatalf("round %d: since the first lone datagram %d additions, %d removals, %d changes, want %d changes only", i, add, del, mod, want)
			}
		}
		if w := epollWatches(t, c); len(w) != 1 {
			t.Fatalf("round %d: epoll set %v, want the socket", i, w)
		}
	}
}

// deliver writes a datagram with id to peer, the other end of the Conn's
// socket, and waits for the Next whose result ch brings (waitCold) to
// return it; it returns how long that took from the write.
func deliver(t *testing.T, peer int, ch chan error, p *Packet, id uint32) time.Duration {
	t.Helper()
	start := time.Now()
	if _, err := unix.Write(peer, AppendPacket(nil, &Packet{ID: id, Queue: 1, Payload: []byte{0x45, 0, 0, 20}})); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-ch:
		if err != nil || p.ID != id {
			t.Fatalf("datagram %d: Next: %v (id %d)", id, err, p.ID)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("datagram %d: Next still blocked after 5 s", id)
	}
	return time.Since(start)
}

// withProcs runs f as subtests with GOMAXPROCS 1, then 2.
func withProcs(t *testing.T, f func(t *testing.T, procs int)) {
	for _, procs := range []int{1, 2} {
		t.Run(fmt.Sprintf("procs=%d", procs), func(t *testing.T) {
			defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(procs))
			f(t, procs)
		})
	}
}

// wakeBound is how soon a wake-up (a packet, Close, a deadline) must end a
// wait in these tests: far above a loaded machine's latency, far below
// maxWait, the safety net.
const wakeBound = 300 * time.Millisecond

// TestColdWaitDeadline checks that a cold wait honours the read deadline
// by itself where nothing answers the wake-up message (the peer of a
// socketpair does not): a deadline set before the wait, one set during it,
// and a later one set during it, which the wait goes on to.
func TestColdWaitDeadline(t *testing.T) {
	if maxWait < 4*wakeBound {
		t.Fatalf("maxWait %v is too short for this test", maxWait)
	}
	c, peer := pairConn(t, Config{Queue: 1})
	var p Packet
	get := func(ch chan error, what string, min time.Duration, start time.Time) {
		t.Helper()
		select {
		case err := <-ch:
			if d := time.Since(start); !errors.Is(err, os.ErrDeadlineExceeded) || d < min || d > wakeBound {
				t.Fatalf("%s: %v after %v, want %v after %v to %v", what, err, d, os.ErrDeadlineExceeded, min, wakeBound)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: Next still blocked after 5 s", what)
		}
	}

	// Set before the wait.
	start := time.Now()
	c.SetReadDeadline(start.Add(60 * time.Millisecond))
	ch := make(chan error, 1)
	go func() { ch <- c.Next(&p, true) }()
	get(ch, "deadline set before a cold wait", 55*time.Millisecond, start)

	// Set during the wait.
	c.SetReadDeadline(time.Time{})
	ch = waitCold(t, c, &p)
	start = time.Now()
	c.SetReadDeadline(start.Add(40 * time.Millisecond))
	get(ch, "deadline set during a cold wait", 35*time.Millisecond, start)

	// A later deadline set during the wait: the wait goes on, and reads
	// the datagram that comes before it.
	c.SetReadDeadline(time.Time{})
	ch = waitCold(t, c, &p)
	c.SetReadDeadline(time.Now().Add(time.Minute))
	select {
	case err := <-ch:
		t.Fatalf("Next returned when a later deadline was set: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	deliver(t, peer, ch, &p, 9)
}

// TestColdWaitClose checks that Close ends a cold wait at once, with
// os.ErrClosed, even where nothing answers its wake-up message (the peer
// of a socketpair does not), and closes the epoll instance.
func TestColdWaitClose(t *testing.T) {
	c, _ := pairConn(t, Config{Queue: 1})
	var ep uintptr
	if err := c.cold.rc.Control(func(fd uintptr) { ep = fd }); err != nil {
		t.Fatal(err)
	}
	var p Packet
	ch := waitCold(t, c, &p)
	start := time.Now()
	c.Close()
	select {
	case err := <-ch:
		if !errors.Is(err, os.ErrClosed) {
			t.Fatalf("Next woken by Close: %v", err)
		}
		if d := time.Since(start); d > wakeBound {
			t.Fatalf("Close ended the cold wait after %v: only by the safety net", d)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Next still blocked 5 s after Close")
	}
	if err := c.cold.rc.Control(func(uintptr) {}); err == nil {
		t.Errorf("epoll instance (descriptor %d) still open after Close", ep)
	}
}

// TestColdWaitNoAlloc checks that a cold wait allocates nothing (with a
// datagram queued, it reads it at its first try).
func TestColdWaitNoAlloc(t *testing.T) { withProcs(t, testColdWaitNoAlloc) }

func testColdWaitNoAlloc(t *testing.T, procs int) {
	c, peer := pairConn(t, Config{Queue: 1})
	msg := AppendPacket(nil, &Packet{ID: 7, Queue: 1, Payload: []byte{0x45, 0, 0, 20}})
	var p Packet
	cold0 := c.Stats()
	cycle := func() {
		if _, err := unix.Write(peer, msg); err != nil {
			t.Fatal(err)
		}
		c.wantHot = false // as after a hot wait's timeout
		if err := c.Next(&p, true); err != nil || p.ID != 7 {
			t.Fatalf("Next: %v (id %d)", err, p.ID)
		}
	}
	if a := testing.AllocsPerRun(50, cycle); a != 0 {
		t.Fatalf("%v allocations per cold wait", a)
	}
	if s := c.Stats(); s.HotWaits != cold0.HotWaits || s.Waits-cold0.Waits != 51 {
		t.Fatalf("stats %+v then %+v: want 51 cold waits", cold0, s)
	}

	// A burst after a cold wait: two hot waits, the second of which takes
	// the socket out of the epoll set (with two Ps the first masks it),
	// then a cold wait puts it back.
	ctls := c.cold.a.ctls
	burst := func() {
		for range 3 {
			if _, err := unix.Write(peer, msg); err != nil {
				t.Fatal(err)
			}
			if err := c.Next(&p, true); err != nil || p.ID != 7 {
				t.Fatalf("Next: %v (id %d)", err, p.ID)
			}
		}
		c.wantHot = false
	}
	if procs == 1 {
		if a := testing.AllocsPerRun(20, burst); a != 0 {
			t.Fatalf("%v allocations per burst", a)
		}
	} else {
		// AllocsPerRun runs with one P: count by hand, where the rest of
		// the process may allocate now and then (seen: once in 21 bursts);
		// a burst's epoll_ctl calls allocating would add three a burst.
		var m0, m1 runtime.MemStats
		runtime.ReadMemStats(&m0)
		for range 21 {
			burst()
		}
		runtime.ReadMemStats(&m1)
		if n := m1.Mallocs - m0.Mallocs; n >= 21 {
			t.Fatalf("%d allocations in 21 bursts", n)
		}
	}
	// 21 removals, and an addition at each burst's cold wait but the first
	// (the cold waits before left the socket in the set); with two Ps 21
	// masks too.
	var got, want [4]uint64
	for i := range got {
		got[i] = c.cold.a.ctls[i] - ctls[i]
	}
	want[unix.EPOLL_CTL_ADD], want[unix.EPOLL_CTL_DEL] = 20, 21
	if procs > 1 {
		want[unix.EPOLL_CTL_MOD] = 21
	}
	if got != want {
		t.Fatalf("epoll_ctl calls by op for 21 bursts: %v, want %v", got, want)
	}
}
