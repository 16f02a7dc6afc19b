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
