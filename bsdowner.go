//go:build freebsd || linux

package divert

// Whether the process named by a rule's tag still runs (FreeBSD backend),
// kept free of FreeBSD system calls so that it is unit-tested on Linux too.

import "github.com/netdivert/divert/internal/ipfw"

// startSlack is how far apart two readings of one process's start may be:
// the kernel gives the start in wall-clock time (ki_start, the uptime at
// fork plus boottime), and the backend takes boottime off again
// (uptimeStart, which reads again across a clock step, so that two of its
// readings agree to the microsecond); the slack is for the tags of
// releases that read boottime once, across a step smaller than it. A PID
// given to another process within a second of the first one's start is
// not seen.
const startSlack = 1_000_000 // microseconds

// startTries is how many times uptimeStart reads a process's start while
// the clock steps between its readings.
const startTries = 4

// uptimeStart returns when a process started, in microseconds of uptime,
// from readStart, its start in wall-clock microseconds (kern.proc.pid's
// ki_start: the kernel adds the boot time of the moment to the uptime at
// fork), and readBoot, the boot time in wall-clock microseconds
// (kern.boottime). A clock step moves the boot time, not the uptime: one
// between the two reads would move the result by the step, and a rule's
// tag would name another start than the process's (its rules would look
// stale to the next Open, or a dead process's alive). So the boot time is
// read before and after the start, and all three again while the two
// differ. exists and known are readStart's; known is also false when the
// boot time cannot be read or moved at every try.
func uptimeStart(readStart func() (wall int64, exists, known bool), readBoot func() (int64, bool)) (start int64, exists, known bool) {
	for range startTries {
		before, ok1 := readBoot()
		wall, exists, known := readStart()
		if !exists || !known {
			return 0, exists, false
		}
		after, ok2 := readBoot()
		if !ok1 || !ok2 {
			return 0, true, false
		}
		if before != after {
			continue // the clock stepped: read again
		}
		if s := wall - before; s > 0 {
			return s, true, true
		}
		return 0, true, false
	}
	return 0, true, false
}

// ruleAlive reports whether rule r, one of our tags, may be a live
// handle's: ownerAlive, with startOf, judges it by the process its tag
// names, except for a tag of this process's PID (own) without a start.
// This process tags its rules with its start whenever it knows it, so
// such a rule is, most likely, an earlier process's that had the PID (a
// release of the library before tags had a start): it is a live handle's
// only when this process has rules in its set that divert to its port
// (mine: the process's own records, ownsRules), else it is stale, though
// the PID runs.
func ruleAlive(r ipfw.Listed, own int, mine func(set int, port uint16) bool, startOf func(pid int) (s int64, exists, known bool)) bool {
	if r.PID == own && r.Start == 0 {
		return mine(int(r.Set), r.Port)
	}
	return ownerAlive(r.PID, r.Start, startOf)
}

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
