package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/internal/nfq"
)

// Floor loops: the shared bench's C batch loop (cnfq -b 64) written in Go
// with raw syscalls on the queue socket, nothing else: what the language
// and its runtime cost, against which the conn loop (internal/nfq) and the
// batch loop (the Handle) are measured. -loop floor-recv is cnfq's
// algorithm: a blocking recvfrom of one datagram, then non-blocking ones
// until EAGAIN or 64 packets, then one batch verdict. -loop floor-mmsg
// reads as internal/nfq does: one recvmmsg of 8 datagrams with
// MSG_WAITFORONE. Both parse only each message's packet id. -loop
// floor-poll waits as Go programs do: the socket is non-blocking and in the
// runtime's poller for good (an *os.File's RawConn), each read is a
// non-blocking recvmmsg of 8, and the goroutine parks in the poller when
// one finds nothing; the floor of a loop that lets go of its P whenever
// the queue is empty, as ours does after a hot wait (see internal/nfq's
// Conn).
//
// Unlike cnfq, a floor loop's socket has a receive timeout: it is what
// makes a signal end the wait (EINTR) rather than restart it, so that the
// stop goroutine can run. It is floorTimeout (far, so that it is not the
// CPU's next timer event), or with BENCHADAPTER_FLOOR_HOT set internal/nfq's
// hot wait (1 ms).
const floorTimeout = 100e3 // µs

// runFloor runs the floor loop named by loop until the stop.
func (c *connLoop) runFloor(loop string, hot bool, stopping *atomic.Bool) (verdicts, batches uint64, err error) {
	fd := uintptr(c.Fd())
	tv := unix.Timeval{Usec: floorTimeout}
	if hot {
		tv.Usec = 1000
	}
	if err := unix.SetsockoptTimeval(int(fd), unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return 0, 0, fmt.Errorf("SO_RCVTIMEO: %w", err)
	}
	const slots, size = 8, 0x10000 + 1024
	area := make([]byte, slots*size)
	hdrs := make([]unix.Mmsghdr, slots)
	iovs := make([]unix.Iovec, slots)
	for i := range hdrs {
		iovs[i].Base = &area[i*size]
		iovs[i].SetLen(size)
		hdrs[i].Hdr.Iov = &iovs[i]
		hdrs[i].Hdr.SetIovlen(1)
	}
	buf := area[:size]
	msg := make([]byte, 0, 64)
	var last uint32
	pending := 0
	take := func(b []byte) { // the last packet id of the messages in b
		for len(b) >= 16 {
			l := int(binary.NativeEndian.Uint32(b))
			if l < 16 || l > len(b) {
				return
			}
			// NFQNL_MSG_PACKET; its NFQA_PACKET_HDR is the first attribute.
			if binary.NativeEndian.Uint16(b[4:]) == 0x300 && l >= 28 &&
				binary.NativeEndian.Uint16(b[22:])&0x3fff == 1 {
				last = binary.BigEndian.Uint32(b[24:])
				pending++
			}
			if l = (l + 3) &^ 3; l >= len(b) {
				return
			}
			b = b[l:]
		}
	}
	var rc syscall.RawConn
	var poll *os.File
	if loop == "floor-poll" {
		// O_NONBLOCK belongs to the open file, which the duplicate shares
		// with the Conn's descriptor; only this loop reads it.
		dfd, err := unix.Dup(int(fd))
		if err != nil {
			return 0, 0, fmt.Errorf("dup: %w", err)
		}
		if err := unix.SetNonblock(dfd, true); err != nil {
			unix.Close(dfd)
			return 0, 0, fmt.Errorf("nonblock: %w", err)
		}
		poll = os.NewFile(uintptr(dfd), "nfqueue")
		defer poll.Close()
		r, err := poll.SyscallConn()
		if err != nil {
			return 0, 0, err
		}
		rc = r
		poll.SetReadDeadline(time.Now().Add(floorTimeout * time.Microsecond))
	}
	p := uintptr(unsafe.Pointer(&buf[0]))
	for !stopping.Load() {
		var n uintptr
		var e unix.Errno
		if poll != nil {
			// Parks in the runtime poller while the socket is empty; the
			// deadline lets the loop look at stopping.
			err := rc.Read(func(fd uintptr) bool {
				n, _, e = unix.RawSyscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&hdrs[0])), slots, unix.MSG_DONTWAIT, 0, 0)
				return e != unix.EAGAIN
			})
			if errors.Is(err, os.ErrDeadlineExceeded) {
				poll.SetReadDeadline(time.Now().Add(floorTimeout * time.Microsecond))
				continue
			}
			if err != nil {
				return verdicts, batches, fmt.Errorf("read: %w", err)
			}
			for i := 0; e == 0 && i < int(n); i++ {
				take(area[i*size : i*size+int(hdrs[i].Len)])
			}
		} else if loop == "floor-mmsg" {
			n, _, e = unix.RawSyscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&hdrs[0])), slots, unix.MSG_WAITFORONE, 0, 0)
			for i := 0; e == 0 && i < int(n); i++ {
				take(area[i*size : i*size+int(hdrs[i].Len)])
			}
		} else {
			n, _, e = unix.RawSyscall6(unix.SYS_RECVFROM, fd, p, size, 0, 0, 0)
			if e == 0 {
				take(buf[:n])
			}
			for e == 0 && pending < 64 {
				if n, _, e = unix.RawSyscall6(unix.SYS_RECVFROM, fd, p, size, unix.MSG_DONTWAIT, 0, 0); e == 0 {
					take(buf[:n])
				}
			}
			if pending > 0 {
				e = 0
			}
		}
		switch e {
		case 0:
		case unix.EINTR:
			runtime.Gosched() // let the stop goroutine run
			continue
		case unix.EAGAIN, unix.ENOBUFS:
			continue
		default:
			return verdicts, batches, fmt.Errorf("read: %w", e)
		}
		if pending > 0 {
			msg = nfq.AppendVerdictBatch(msg[:0], c.Queue(), last, nfq.Accept)
			if _, _, e := unix.RawSyscall6(unix.SYS_SENDTO, fd, uintptr(unsafe.Pointer(&msg[0])), uintptr(len(msg)), 0, 0, 0); e != 0 {
				return verdicts, batches, fmt.Errorf("verdict: %w", e)
			}
			verdicts += uint64(pending)
			batches++
			pending = 0
		}
	}
	return verdicts, batches, nil
}
