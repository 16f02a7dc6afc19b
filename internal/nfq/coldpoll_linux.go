package nfq

import (
	"fmt"
	"os"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// coldPoll is where a Conn waits cold: an epoll instance of its own, which
// is itself in the Go runtime's poller. While the Conn waits cold its queue
// socket is in that instance's set, so a packet makes the instance readable
// and the runtime readies the parked reader; while the Conn waits hot the
// socket is out of the set, as every packet would otherwise run the epoll
// callback (measured: 2% more CPU per packet under a flood, with the
// socket in the runtime's poller for good).
//
// A cold wait so parks the goroutine rather than blocking its thread in a
// syscall. A blocked syscall leaves its P in the syscall state: the
// runtime's monitor thread (sysmon) takes it back after 20 µs or more and
// starts another thread for it, and when the syscall returns the thread
// has to find a P again, waking the monitor, which then polls every 20 µs
// for a millisecond or more before it backs off again. With packets coming
// in bursts, each gap between them paid that twice; parked in the poller,
// a cold wait costs the runtime nothing until the packet comes.
type coldPoll struct {
	f  *os.File
	rc syscall.RawConn
	a  *coldRead
}

// coldRead holds the arguments and results of the non-blocking read that a
// cold wait retries each time the socket turns readable; its try method is
// made into a func value once, so that a wait allocates nothing.
type coldRead struct {
	sock, p, vlen uintptr
	n             uintptr
	e             syscall.Errno
	try           func(uintptr) bool

	// epoll_ctl's arguments and result, likewise (see ctl)
	op    uintptr
	ev    unix.EpollEvent
	ce    syscall.Errno
	doCtl func(uintptr)
	ctls  [4]uint64 // epoll_ctl calls made, by op (for tests)
}

func (a *coldRead) ctl(ep uintptr) {
	a.ctls[a.op&3]++
	_, _, a.ce = unix.RawSyscall6(unix.SYS_EPOLL_CTL, ep, a.op, a.sock, uintptr(unsafe.Pointer(&a.ev)), 0, 0)
}

func (a *coldRead) read(uintptr) bool {
	a.n, _, a.e = unix.RawSyscall6(unix.SYS_RECVMMSG, a.sock, a.p, a.vlen, unix.MSG_DONTWAIT, 0, 0)
	return a.e != unix.EAGAIN
}

// newColdPoll makes the epoll instance and puts it in the runtime poller.
func newColdPoll() (coldPoll, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return coldPoll{}, fmt.Errorf("nfq: epoll_create1: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return coldPoll{}, fmt.Errorf("nfq: epoll instance: %w", err)
	}
	// A non-blocking descriptor goes into the runtime poller; a deadline
	// can be set only if it went.
	f := os.NewFile(uintptr(fd), "nfq-epoll")
	if err := f.SetReadDeadline(time.Time{}); err != nil {
		f.Close()
		return coldPoll{}, fmt.Errorf("nfq: epoll instance not in the runtime poller: %w", err)
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return coldPoll{}, fmt.Errorf("nfq: epoll instance: %w", err)
	}
	a := &coldRead{}
	a.try, a.doCtl = a.read, a.ctl
	return coldPoll{f: f, rc: rc, a: a}, nil
}

// ctl runs epoll_ctl on the instance for sock, with events (EPOLLIN, or
// none), holding the instance's descriptor (a concurrent close cannot hand
// its number to another file meanwhile). It allocates nothing: the
// arguments live in cp.a.
func (cp coldPoll) ctl(op int, sock uintptr, events uint32) bool {
	a := cp.a
	a.op, a.sock = uintptr(op), sock
	a.ev = unix.EpollEvent{Events: events, Fd: int32(sock)}
	if err := cp.rc.Control(a.doCtl); err != nil {
		return false
	}
	return a.ce == 0 || (op == unix.EPOLL_CTL_ADD && a.ce == unix.EEXIST)
}

// add puts sock in the set; it reports whether sock is in it.
func (cp coldPoll) add(sock uintptr) bool { return cp.ctl(unix.EPOLL_CTL_ADD, sock, unix.EPOLLIN) }

// remove takes sock out of the set.
func (cp coldPoll) remove(sock uintptr) { cp.ctl(unix.EPOLL_CTL_DEL, sock, 0) }

// mask leaves sock in the set with no events: a packet then runs the
// set's callback, which returns at once, and never makes the instance
// readable. arm undoes it. Each reports whether it succeeded.
func (cp coldPoll) mask(sock uintptr) bool { return cp.ctl(unix.EPOLL_CTL_MOD, sock, 0) }

func (cp coldPoll) arm(sock uintptr) bool { return cp.ctl(unix.EPOLL_CTL_MOD, sock, unix.EPOLLIN) }

// recv is a cold wait: it reads sock (in the set) without blocking, and
// while nothing is queued parks in the runtime poller until the socket
// turns readable, for at most d. It returns the datagrams read, or EAGAIN
// when the wait ended without any: d passed, kick ended it, or the
// instance was closed (Close).
func (cp coldPoll) recv(sock, p, vlen uintptr, d time.Duration) (uintptr, syscall.Errno) {
	cp.f.SetReadDeadline(time.Now().Add(d))
	a := cp.a
	a.sock, a.p, a.vlen = sock, p, vlen
	if err := cp.rc.Read(a.try); err != nil {
		return 0, unix.EAGAIN
	}
	return a.n, a.e
}

// kick ends a cold wait in progress (EAGAIN); a later one sets its own
// deadline.
func (cp coldPoll) kick() { cp.f.SetReadDeadline(time.Unix(1, 0)) }

// close closes the instance; a cold wait in it returns EAGAIN.
func (cp coldPoll) close() { cp.f.Close() }
