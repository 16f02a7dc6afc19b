package nfq

import "testing"

// TestYielderPolicy checks the back-off of the CPU yield (see Conn): idle
// yields skip 1, 3, 7, then 8 chances; a yield that ran something briefly
// ends the back-off; a long one stops yields for yieldHold.
func TestYielderPolicy(t *testing.T) {
	var y yielder
	now := int64(1_000_000_000)
	// count runs yield points until one is due and returns how many were
	// skipped.
	count := func() int {
		t.Helper()
		for n := 0; n < 100; n++ {
			if y.due(now) {
				return n
			}
		}
		t.Fatal("no yield due in 100 chances")
		return 0
	}
	if n := count(); n != 0 {
		t.Fatalf("a fresh yielder skipped %d chances", n)
	}
	for _, want := range []int{1, 3, 7, 8, 8} {
		y.done(now, yieldIdle-1)
		if n := count(); n != want {
			t.Fatalf("after an idle yield: skipped %d chances, want %d", n, want)
		}
	}
	// Something ran: the next chance is taken, and the back-off starts
	// over.
	y.done(now, yieldIdle)
	if n := count(); n != 0 {
		t.Fatalf("after a yield that ran something: skipped %d, want 0", n)
	}
	y.done(now, yieldIdle-1)
	if n := count(); n != 1 {
		t.Fatalf("back-off did not start over: skipped %d, want 1", n)
	}
	y.done(now, yieldLong)
	if n := count(); n != 0 {
		t.Fatalf("a yield of yieldLong is not a long one: skipped %d", n)
	}

	// A long yield holds further yields for yieldHold after its end.
	y.done(now, yieldLong+1)
	end := now + yieldLong + 1
	for _, at := range []int64{now, end, end + yieldHold - 1} {
		if y.due(at) {
			t.Fatalf("yield due %d ns after a long one began, within the hold", at-now)
		}
	}
	if !y.due(end + yieldHold) {
		t.Fatal("no yield due once the hold ended")
	}
}
