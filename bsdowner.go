//go:build freebsd || linux

package divert

// Whether the process named by a rule's tag still runs (FreeBSD backend),
// kept free of FreeBSD system calls so that it is unit-tested on Linux too.

// startSlack is how far apart two readings of one process's start may be:
// the kernel gives the start in wall-clock time (ki_start, the uptime at
// fork plus boottime), the backend takes boottime off again, and a clock
// step between the two readings moves it. A PID given to another process
// within a second of the first one's start is not seen.
const startSlack = 1_000_000 // microseconds

// ownerAlive reports whether the process that tagged a rule with pid and
// start (0 for a tag without one) is still running. startOf looks a PID up:
// whether such a process exists, and, when known, its start in the tag's
// clock. A PID that exists with another start is another process that
// got the PID after the tagging one died; so is this process's own PID
// with another start than its own.
func ownerAlive(pid int, start int64, startOf func(pid int) (s int64, exists, known bool)) bool {
	s, exists, known := startOf(pid)
	if !exists {
		return false
	}
	if start == 0 || !known {
		return true // cannot tell: keep its rules
	}
	d := s - start
	return -startSlack < d && d < startSlack
}
