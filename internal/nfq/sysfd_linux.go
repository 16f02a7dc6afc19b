package nfq

import (
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// sysfd is a file descriptor used by concurrent syscalls and closed once
// the last of them is done: the reference count of os.File's internal/poll
// FD without its read and write mutexes and closures, which cost more than
// the rest of a verdict's user-space work. Every syscall on fd runs between
// acquire and release; close stops new acquires and closes fd when the
// last reference ends, so a syscall never meets a closed or reused number.
type sysfd struct {
	fd int
	// state is the number of references, plus fdClosing once close ran.
	// The Conn owns one reference from newSysfd until close.
	state atomic.Uint64
}

const fdClosing = 1 << 63

func newSysfd(fd int) *sysfd {
	s := &sysfd{fd: fd}
	s.state.Store(1)
	return s
}

// acquire takes a reference; it reports false once close has run.
func (s *sysfd) acquire() bool {
	for {
		old := s.state.Load()
		if old&fdClosing != 0 {
			return false
		}
		if s.state.CompareAndSwap(old, old+1) {
			return true
		}
	}
}

// release drops a reference; the last one after close closes fd.
func (s *sysfd) release() {
	if s.state.Add(^uint64(0)) == fdClosing {
		unix.Close(s.fd)
	}
}

// close stops new references and drops the owner's: fd is closed now, or
// by the release of the last syscall still using it. It reports false if
// close already ran.
func (s *sysfd) close() bool {
	for {
		old := s.state.Load()
		if old&fdClosing != 0 {
			return false
		}
		if s.state.CompareAndSwap(old, old|fdClosing) {
			s.release()
			return true
		}
	}
}
