//go:build freebsd || linux

package divert

import "testing"

// TestOwnerAlive: a rule's process is alive only while its PID exists and
// started when the tag says; a PID reused by a later process (this one's
// too) leaves the rule stale. Tags without a start, and processes whose
// start cannot be read, count as alive, as before starts were tagged.
func TestOwnerAlive(t *testing.T) {
	procs := map[int]int64{7: 5_000_000, 8: 0} // pid 8: start unknown
	startOf := func(pid int) (int64, bool, bool) {
		s, ok := procs[pid]
		return s, ok, ok && s != 0
	}
	for _, tc := range []struct {
		pid   int
		start int64
		want  bool
	}{
		{7, 5_000_000, true},
		{7, 5_000_400, true},  // read across a small clock adjustment
		{7, 1_000_000, false}, // pid 7 now is a later process
		{7, 9_000_000, false}, // or an earlier one's tag, by skew
		{7, 0, true},          // a tag without a start
		{8, 1_000_000, true},  // start unknown: cannot tell
		{9, 5_000_000, false}, // no such process
		{9, 0, false},         // no such process, old tag
		{7, 5_000_000 + startSlack, false},
	} {
		if got := ownerAlive(tc.pid, tc.start, startOf); got != tc.want {
			t.Errorf("ownerAlive(%d, %d) = %v, want %v", tc.pid, tc.start, got, tc.want)
		}
	}
}

// TestUptimeStartClockStep: a clock step between the reads of a process's
// wall-clock start and of the boot time (the kernel moves the boot time
// by the step) does not move the start by the step: the reads are made
// again. A clock that steps at every try gives no start, and a missing
// process or unreadable boot time none either.
func TestUptimeStartClockStep(t *testing.T) {
	const (
		up   = 7_000_000             // the process started 7 s after boot
		boot = 1_700_000_000_000_000 // boot time before the step
	)
	k := struct {
		boot, step int64 // step: an hour forward or back
		steps      int   // steps still to come, one right after each start read
	}{boot: boot}
	readBoot := func() (int64, bool) { return k.boot, true }
	readStart := func() (int64, bool, bool) {
		wall := up + k.boot // ki_start: the boot time of the read's moment
		if k.steps > 0 {
			k.steps--
			k.boot += k.step
		}
		return wall, true, true
	}
	for _, step := range []int64{3600 * 1_000_000, -3600 * 1_000_000} {
		k.step = step
		for _, steps := range []int{0, 1, startTries - 1} {
			k.boot, k.steps = boot, steps
			if s, exists, known := uptimeStart(readStart, readBoot); s != up || !exists || !known {
				t.Errorf("%d steps of %d µs: uptimeStart = %d, %v, %v; want %d, true, true", steps, step, s, exists, known, up)
			}
		}
	}
	k.boot, k.steps = boot, startTries
	if s, exists, known := uptimeStart(readStart, readBoot); known || !exists {
		t.Errorf("a step at every try: uptimeStart = %d, %v, %v; want unknown", s, exists, known)
	}
	gone := func() (int64, bool, bool) { return 0, false, false }
	if _, exists, known := uptimeStart(gone, readBoot); exists || known {
		t.Errorf("no process: exists %v, known %v", exists, known)
	}
	noBoot := func() (int64, bool) { return 0, false }
	k.steps = 0
	if _, exists, known := uptimeStart(readStart, noBoot); !exists || known {
		t.Errorf("no boot time: exists %v, known %v; want true, false", exists, known)
	}
	future := func() (int64, bool, bool) { return k.boot - 1, true, true } // before boot
	if _, exists, known := uptimeStart(future, readBoot); !exists || known {
		t.Errorf("a start before boot: exists %v, known %v; want true, false", exists, known)
	}
}
