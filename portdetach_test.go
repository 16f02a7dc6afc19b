//go:build freebsd || linux

package divert

import (
	"errors"
	"strconv"
	"syscall"
	"testing"

	"github.com/netdivert/divert/internal/ipfw"
)

// fakeDivert models the divert ports of a FreeBSD kernel: one socket per
// port (div_bind: EADDRINUSE), and a bound socket moves on a second bind
// (FreeBSD 14+) or is refused with EINVAL (FreeBSD 13, in_pcbbind).
type fakeDivert struct {
	owner    map[uint16]*fakeSock
	before14 bool
	opened   []*fakeSock
}

type fakeSock struct {
	k      *fakeDivert
	port   uint16 // 0: unbound
	closed bool
	fail   error // returned by bind when set
}

func newFakeDivert() *fakeDivert { return &fakeDivert{owner: map[uint16]*fakeSock{}} }

func (k *fakeDivert) open() (portSock, error) {
	s := &fakeSock{k: k}
	k.opened = append(k.opened, s)
	return s, nil
}

func (s *fakeSock) bind(port uint16) error {
	if s.fail != nil {
		return s.fail
	}
	if s.port != 0 && s.k.before14 {
		return syscall.EINVAL
	}
	if o := s.k.owner[port]; o != nil && o != s {
		return syscall.EADDRINUSE
	}
	if s.port != 0 {
		delete(s.k.owner, s.port)
	}
	s.port = port
	s.k.owner[port] = s
	return nil
}

func (s *fakeSock) close() error {
	s.closed = true
	if s.port != 0 && s.k.owner[s.port] == s {
		delete(s.k.owner, s.port)
	}
	return nil
}

// bound returns a socket bound to port, as OpenPort leaves it.
func (k *fakeDivert) bound(t *testing.T, port uint16) *fakeSock {
	t.Helper()
	s := &fakeSock{k: k}
	if err := s.bind(port); err != nil {
		t.Fatal(err)
	}
	return s
}

// TestDetachPort: Shutdown of an OpenPort handle moves its socket off the
// rule's port (so that the rule queues nothing more to it) and binds a
// passer there in its place, which only works in that order.
func TestDetachPort(t *testing.T) {
	const port = 8668
	k := newFakeDivert()
	h := k.bound(t, port)
	other := k.bound(t, divertPortMin+7) // the first candidate is taken
	p, err := detachPort(h, port, 7, false, busyPorts(nil, &bsdLeft), k.open)
	if err != nil {
		t.Fatal(err)
	}
	if p == nil {
		t.Fatal("no passer")
	}
	if k.owner[port] != p {
		t.Fatalf("port %d belongs to %+v, want the passer %+v", port, k.owner[port], p)
	}
	if h.port == port || h.port < divertPortMin || h.port >= divertPortMin+divertPorts || k.owner[h.port] != h {
		t.Fatalf("handle's socket on port %d, want a free one of the auto range", h.port)
	}
	if other.port != divertPortMin+7 || k.owner[other.port] != other {
		t.Fatalf("the other socket lost its port")
	}
}

// TestDetachPortSniff: a tee rule's packets go on by themselves; the copy
// that finds no socket is discarded, so no passer is opened.
func TestDetachPortSniff(t *testing.T) {
	const port = 8668
	k := newFakeDivert()
	h := k.bound(t, port)
	p, err := detachPort(h, port, 0, true, busyPorts(nil, &bsdLeft), k.open)
	if err != nil || p != nil {
		t.Fatalf("detachPort = %v, %v; want no passer, no error", p, err)
	}
	if k.owner[port] != nil || h.port == port {
		t.Fatalf("port %d still taken (handle on %d)", port, h.port)
	}
	if len(k.opened) != 0 {
		t.Fatalf("%d sockets opened", len(k.opened))
	}
}

// TestDetachPortBefore14: FreeBSD 13 cannot move a bound divert socket:
// errRebind, the socket stays, no passer.
func TestDetachPortBefore14(t *testing.T) {
	const port = 8668
	k := newFakeDivert()
	h := k.bound(t, port)
	k.before14 = true
	p, err := detachPort(h, port, 0, false, busyPorts(nil, &bsdLeft), k.open)
	if !errors.Is(err, errRebind) || p != nil {
		t.Fatalf("detachPort = %v, %v; want errRebind", p, err)
	}
	if k.owner[port] != h || len(k.opened) != 0 {
		t.Fatalf("port %d: %+v, %d opened; want the handle's socket, none opened", port, k.owner[port], len(k.opened))
	}
}

// TestDetachPortPasserBindFails: a passer that cannot bind is closed and
// the error returned.
func TestDetachPortPasserBindFails(t *testing.T) {
	const port = 8668
	k := newFakeDivert()
	h := k.bound(t, port)
	open := func() (portSock, error) {
		s, _ := k.open()
		s.(*fakeSock).fail = syscall.ENOBUFS
		return s, nil
	}
	p, err := detachPort(h, port, 0, false, busyPorts(nil, &bsdLeft), open)
	if !errors.Is(err, syscall.ENOBUFS) || p != nil {
		t.Fatalf("detachPort = %v, %v; want ENOBUFS", p, err)
	}
	if len(k.opened) != 1 || !k.opened[0].closed {
		t.Fatal("the passer was not closed")
	}
	// The handle's socket is back on the rule's port: the failed Shutdown
	// left the handle receiving what the rule takes, not dropping it.
	if k.owner[port] != h || h.port != port {
		t.Fatalf("port %d belongs to %+v (handle on %d); want the handle's socket back", port, k.owner[port], h.port)
	}
}

// TestDetachPortOpenFails: a passer that cannot be opened leaves the
// handle's socket on the rule's port.
func TestDetachPortOpenFails(t *testing.T) {
	const port = 8668
	k := newFakeDivert()
	h := k.bound(t, port)
	open := func() (portSock, error) { return nil, syscall.EMFILE }
	p, err := detachPort(h, port, 0, false, busyPorts(nil, &bsdLeft), open)
	if !errors.Is(err, syscall.EMFILE) || p != nil {
		t.Fatalf("detachPort = %v, %v; want EMFILE", p, err)
	}
	if k.owner[port] != h || h.port != port {
		t.Fatalf("port %d belongs to %+v (handle on %d); want the handle's socket back", port, k.owner[port], h.port)
	}
}

// TestBindFree: bindFree skips the port to avoid and ports in use, wraps
// the range, and stops at another error.
func TestBindFree(t *testing.T) {
	k := newFakeDivert()
	last := uint16(divertPortMin + divertPorts - 1)
	k.bound(t, last)
	s := &fakeSock{k: k}
	got, err := bindFree(s, divertPorts-1, nil)
	if err != nil || got != divertPortMin {
		t.Fatalf("bindFree = %d, %v; want %d (wrapped past the taken last port)", got, err, divertPortMin)
	}
	s2 := &fakeSock{k: k}
	got, err = bindFree(s2, 1, func(p uint16) bool { return p == divertPortMin+1 })
	if err != nil || got != divertPortMin+2 {
		t.Fatalf("bindFree = %d, %v; want %d (the avoided port skipped)", got, err, divertPortMin+2)
	}
	s3 := &fakeSock{k: k, fail: syscall.EACCES}
	if _, err := bindFree(s3, 0, nil); !errors.Is(err, syscall.EACCES) {
		t.Fatalf("bindFree = %v, want EACCES", err)
	}
}

// TestDetachPortAvoidsLeftRules: the port the handle's socket moves to is
// not one that rules a closed handle of the process left installed divert
// to (bsdLeft): on it, the socket would receive their packets, and Recv
// would drain them as the handle's after Shutdown.
func TestDetachPortAvoidsLeftRules(t *testing.T) {
	const port = 8668
	left := uint16(divertPortMin + 7) // where the process's first auto port usually is
	bsdLeft.add(leftSet{set: 9, number: 31000, port: left})
	defer bsdLeft.retry(func(l leftSet) error {
		if l.set == 9 && l.port == left {
			return nil // forget it
		}
		return errors.New("not this test's")
	})
	k := newFakeDivert()
	h := k.bound(t, port)
	p, err := detachPort(h, port, 7, false, busyPorts(nil, &bsdLeft), k.open)
	if err != nil || p == nil {
		t.Fatalf("detachPort = %v, %v", p, err)
	}
	if h.port != left+1 || k.owner[h.port] != h {
		t.Fatalf("handle's socket on port %d, want %d (past the left rules' port %d)", h.port, left+1, left)
	}
}

// TestBusyPortsStaleRules: a new handle's socket is not bound, at Open or
// when an OpenPort handle's Shutdown moves it, to a port that rules of
// ours in the ruleset divert to: a dead process's stale rules would feed
// it their packets until the next install deletes them. Nor to a port of
// the process's left rules; other programs' rules name no port of ours.
func TestBusyPortsStaleRules(t *testing.T) {
	stale := uint16(divertPortMin + 5)
	var left leftSets
	left.add(leftSet{set: 4, number: 31000, port: stale + 1})
	listed := ipfw.ParseList("31000 set 3 divert " + strconv.Itoa(int(stale)) + " ip from any to any in // netdivert pid=99 port=" + strconv.Itoa(int(stale)) + " prio=0 start=12\n" +
		"00100 set 0 allow ip from any to any\n" +
		// an administrator's rule for a daemon that is not running
		"00200 set 0 divert " + strconv.Itoa(int(stale+3)) + " ip from any to any via em0\n")
	busy := busyPorts(listed, &left)
	for p, want := range map[uint16]bool{stale: true, stale + 1: true, stale + 2: false, stale + 3: true, 0: false} {
		if busy(p) != want {
			t.Errorf("busy(%d) = %v, want %v", p, !want, want)
		}
	}
	k := newFakeDivert()
	if p, err := bindFree(&fakeSock{k: k}, 5, busy); err != nil || p != stale+2 {
		t.Fatalf("bindFree = %d, %v; want %d, past the stale and the left rules' ports", p, err, stale+2)
	}
	const port = 8668
	h := k.bound(t, port)
	if p, err := detachPort(h, port, 5, false, busy, k.open); err != nil || p == nil || h.port != stale+4 {
		t.Fatalf("detachPort = %v, %v: handle's socket on %d, want %d, past the administrator's rule's port", p, err, h.port, stale+4)
	}
}
