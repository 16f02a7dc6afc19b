//go:build freebsd || linux

package divert

import (
	"errors"
	"testing"

	"github.com/netdivert/divert/internal/ipfw"
)

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

// TestRuleAliveOwnPIDNoStart: a rule tagged with this process's PID and no
// start (an earlier release's tag) is a live handle's only when the
// process's own records have rules in its set for its port: otherwise an
// earlier process with the PID left it, and it is stale, though the PID
// runs. Other tags are judged by their process (ownerAlive).
func TestRuleAliveOwnPIDNoStart(t *testing.T) {
	const own = 7
	startOf := func(pid int) (int64, bool, bool) {
		switch pid {
		case own:
			return 5_000_000, true, true
		case 8:
			return 6_000_000, true, true
		}
		return 0, false, false
	}
	var live liveSets
	var left leftSets
	mine := func(set int, port uint16) bool { return ownsRules(&live, &left, set, port) }
	rule := func(pid int, start int64, set uint8, port uint16) ipfw.Listed {
		return ipfw.Listed{Number: 31000, Set: set, Owned: true, PID: pid, Start: start, Port: port}
	}
	alive := func(r ipfw.Listed) bool { return ruleAlive(r, own, mine, startOf) }

	// Nothing of the process's recorded: a start-less tag of its PID is
	// stale; a tag with its start, or another live process's, is not.
	if alive(rule(own, 0, 3, 40000)) {
		t.Error("a start-less rule of this PID, in a set the process has no rules in, counts as alive")
	}
	if !alive(rule(own, 5_000_000, 3, 40000)) || !alive(rule(8, 0, 3, 40000)) || !alive(rule(8, 6_000_000, 3, 40000)) {
		t.Error("a rule of a live process counts as stale")
	}
	if alive(rule(own, 1_000_000, 3, 40000)) || alive(rule(9, 0, 3, 40000)) {
		t.Error("a rule of a dead process counts as alive")
	}
	plan := ipfw.PlanSets([]ipfw.Listed{rule(own, 0, 3, 40000), rule(8, 0, 4, 40001)}, 0, 1, alive)
	if len(plan.Stale) != 1 || plan.Stale[0] != 3 {
		t.Errorf("PlanSets stale = %v, want [3]", plan.Stale)
	}

	// The process's own start-less rules (it did not know its start): an
	// open handle's, then a closed one's left, then deleted.
	var c setClaim
	c.init()
	c.claimFor(3, 40000, &live)
	if !alive(rule(own, 0, 3, 40000)) {
		t.Error("an open handle's start-less rule counts as stale")
	}
	if alive(rule(own, 0, 3, 40001)) || alive(rule(own, 0, 2, 40000)) {
		t.Error("a start-less rule of this PID with another set or port counts as the open handle's")
	}
	err := c.removeAtClose(func(int) error { return errRulesShared }, 1, func(int) {}, &left, 31000, 40000)
	if !errors.Is(err, errRulesShared) || live.has(3, 40000) {
		t.Fatalf("removeAtClose = %v, still live %v", err, live.has(3, 40000))
	}
	if !alive(rule(own, 0, 3, 40000)) {
		t.Error("a closed handle's left start-less rule counts as stale")
	}
	left.retry(func(leftSet) error { return nil })
	if alive(rule(own, 0, 3, 40000)) {
		t.Error("a deleted set's start-less rule still counts as alive")
	}
	c.claimFor(5, 40002, &live)
	if err := c.remove(func(int) error { return nil }); err != nil || live.has(5, 40002) || alive(rule(own, 0, 5, 40002)) {
		t.Errorf("remove = %v; the set is still recorded after its rules were deleted", err)
	}
}
