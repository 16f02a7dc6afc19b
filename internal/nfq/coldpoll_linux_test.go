package nfq

import (
	"errors"
	"fmt"
	"os"
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
// cold, past any hot wait (hotWait is at most a tick, 10 ms with HZ=100).
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
		start := time.Now()
		if _, err := unix.Write(peer, AppendPacket(nil, &Packet{ID: i, Queue: 1, Payload: []byte{0x45, 0, 0, 20}})); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-ch:
			if err != nil || p.ID != i {
				t.Fatalf("round %d: Next: %v (id %d)", i, err, p.ID)
			}
			if d := time.Since(start); d > maxWait/2 {
				t.Fatalf("round %d: the datagram woke the cold wait after %v: not by its readiness", i, d)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("round %d: Next still blocked after 5 s", i)
		}
	}
	// A datagram came: the next wait is hot, with the socket out of the
	// set. The hot wait reads the datagram written meanwhile.
	if _, err := unix.Write(peer, AppendPacket(nil, &Packet{ID: 100, Queue: 1, Payload: []byte{0x45, 0, 0, 20}})); err != nil {
		t.Fatal(err)
	}
	hot0 := c.Stats().HotWaits
	if err := c.Next(&p, true); err != nil || p.ID != 100 {
		t.Fatalf("Next: %v (id %d)", err, p.ID)
	}
	if c.Stats().HotWaits != hot0+1 {
		t.Fatalf("the wait after a datagram was not hot: %+v", c.Stats())
	}
	if w := epollWatches(t, c); len(w) != 0 {
		t.Fatalf("epoll set %v after a hot wait, want it empty", w)
	}
	if s := c.Stats(); s.Waits-s.HotWaits < 12 {
		t.Fatalf("%d cold waits, want 12 at least", s.Waits-s.HotWaits)
	}
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
		if d := time.Since(start); d > maxWait*3/4 {
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
func TestColdWaitNoAlloc(t *testing.T) {
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
}
