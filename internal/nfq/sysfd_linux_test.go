package nfq

import (
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// fdOpen reports whether fd is an open descriptor.
func fdOpen(fd int) bool {
	_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return err == nil
}

func TestSysfdClose(t *testing.T) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	s := newSysfd(fd)
	if !s.acquire() {
		t.Fatal("acquire on an open sysfd failed")
	}
	if !s.close() {
		t.Fatal("first close reported already closed")
	}
	// A syscall in progress keeps the number valid.
	if !fdOpen(fd) {
		t.Fatal("fd closed while a reference was held")
	}
	if s.acquire() {
		t.Fatal("acquire after close succeeded")
	}
	if s.close() {
		t.Fatal("second close reported success")
	}
	s.release()
	if fdOpen(fd) {
		t.Fatal("fd still open after the last reference ended")
	}
}

func TestSysfdCloseIdle(t *testing.T) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	s := newSysfd(fd)
	s.close()
	if fdOpen(fd) {
		t.Fatal("fd still open after close with no reference")
	}
}

// TestSysfdRace closes while goroutines acquire and release: the number is
// closed exactly once, after every successful acquire was released (run
// with -race).
func TestSysfdRace(t *testing.T) {
	for round := 0; round < 50; round++ {
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		s := newSysfd(fd)
		var wg sync.WaitGroup
		var mu sync.Mutex
		bad := 0
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 200; i++ {
					if !s.acquire() {
						return
					}
					if !fdOpen(fd) {
						mu.Lock()
						bad++
						mu.Unlock()
					}
					s.release()
				}
			}()
		}
		s.close()
		wg.Wait()
		if bad != 0 {
			t.Fatalf("round %d: %d syscalls saw a closed fd inside acquire/release", round, bad)
		}
		if s.state.Load() != fdClosing {
			t.Fatalf("round %d: state %#x after everything ended, want closing with no reference", round, s.state.Load())
		}
		if fdOpen(fd) {
			t.Fatalf("round %d: fd still open", round)
		}
	}
}
