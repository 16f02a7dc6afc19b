//go:build freebsd || linux

package divert

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
)

// TestSetClaimWaits: a second removal (Close) that comes while the first
// (Shutdown) is deleting the rules waits until they are deleted, instead of
// returning at once because the set looks forgotten, and deletes nothing
// twice.
func TestSetClaimWaits(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var c setClaim
		c.init()
		c.claim(5)
		release := make(chan struct{})
		var deleted atomic.Bool
		dels := 0
		del := func(set int) error {
			dels++
			if set != 5 {
				t.Errorf("deleting set %d, want 5", set)
			}
			<-release // ipfw runs
			deleted.Store(true)
			return nil
		}
		first := make(chan error, 1)
		go func() { first <- c.remove(del) }()
		synctest.Wait() // the first removal is deleting

		var secondReturned atomic.Bool
		var sawDeleted bool
		second := make(chan error, 1)
		go func() {
			err := c.remove(del)
			sawDeleted = deleted.Load()
			secondReturned.Store(true)
			second <- err
		}()
		synctest.Wait()
		if secondReturned.Load() {
			t.Fatal("the second removal returned while the first was still deleting the rules")
		}
		close(release)
		if err := <-first; err != nil {
			t.Fatal(err)
		}
		if err := <-second; err != nil {
			t.Fatal(err)
		}
		if !sawDeleted {
			t.Fatal("the second removal returned before the rules were deleted")
		}
		if dels != 1 {
			t.Fatalf("%d deletions, want 1", dels)
		}
	})
}

// TestSetClaimRetry: a deletion that fails keeps the claim, so that Close
// tries again after a failed Shutdown; once it succeeds the set is gone.
func TestSetClaimRetry(t *testing.T) {
	var c setClaim
	c.init()
	c.claim(7)
	boom := errors.New("ipfw failed")
	if err := c.remove(func(int) error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("remove = %v, want the deletion's error", err)
	}
	calls := 0
	ok := func(set int) error {
		calls++
		if set != 7 {
			t.Errorf("retry deletes set %d, want 7", set)
		}
		return nil
	}
	if err := c.remove(ok); err != nil || calls != 1 {
		t.Fatalf("retry: %v, %d calls; want the set deleted once", err, calls)
	}
	if err := c.remove(ok); err != nil || calls != 1 {
		t.Fatalf("after deletion: %v, %d calls; want nothing to delete", err, calls)
	}
	var none setClaim
	none.init()
	if err := none.remove(func(int) error { t.Fatal("deleting without a set"); return nil }); err != nil {
		t.Fatal(err)
	}
}

// TestRemoveAtClose: Close tries the deletion again after a failure, but
// not after errRulesShared, which no retry mends; rules it could not
// delete are recorded for the process's later Opens and Closes, which
// delete them once ipfw lets them, and forget them then.
func TestRemoveAtClose(t *testing.T) {
	boom := errors.New("ipfw failed")
	var left leftSets
	var pauses []int
	pause := func(try int) { pauses = append(pauses, try) }

	// Fails once, then succeeds: deleted, nothing left.
	var c setClaim
	c.init()
	c.claim(3)
	calls := 0
	err := c.removeAtClose(func(int) error {
		if calls++; calls == 1 {
			return boom
		}
		return nil
	}, closeAttempts, pause, &left, 31000, 40000)
	if err != nil || calls != 2 || len(pauses) != 1 || len(left.sets) != 0 {
		t.Fatalf("transient failure: %v, %d calls, pauses %v, left %v", err, calls, pauses, left.sets)
	}

	// Fails every time: the error, every attempt made, the set left.
	c.claim(4)
	calls, pauses = 0, nil
	err = c.removeAtClose(func(int) error { calls++; return boom }, closeAttempts, pause, &left, 31001, 40001)
	if !errors.Is(err, boom) || calls != closeAttempts || len(pauses) != closeAttempts-1 {
		t.Fatalf("lasting failure: %v, %d calls, pauses %v", err, calls, pauses)
	}
	if len(left.sets) != 1 || left.sets[0] != (leftSet{set: 4, number: 31001, port: 40001}) {
		t.Fatalf("left = %v", left.sets)
	}

	// Shared number: no retry, left.
	c.claim(5)
	calls = 0
	err = c.removeAtClose(func(int) error { calls++; return errRulesShared }, closeAttempts, pause, &left, 31002, 40002)
	if !errors.Is(err, errRulesShared) || calls != 1 || len(left.sets) != 2 {
		t.Fatalf("shared: %v, %d calls, left %v", err, calls, left.sets)
	}
	if err := c.remove(func(int) error { t.Fatal("the claim kept a left set"); return nil }); err != nil {
		t.Fatal(err)
	}

	// A later Open retries: set 4 goes, set 5 (still shared) stays.
	var tried []int
	left.retry(func(s leftSet) error {
		tried = append(tried, s.set)
		if s.set == 5 {
			return errRulesShared
		}
		return nil
	})
	if len(tried) != 2 || len(left.sets) != 1 || left.sets[0].set != 5 {
		t.Fatalf("retry tried %v, left %v", tried, left.sets)
	}
	if left.empty() {
		t.Fatal("empty with a set left")
	}
	// A new handle does not bind the port the left rules divert to.
	if !left.holds(40002) || left.holds(40001) {
		t.Fatalf("holds: 40002 %v, 40001 %v; want true, false", left.holds(40002), left.holds(40001))
	}
	k := newFakeDivert()
	if p, err := bindFree(&fakeSock{k: k}, 40002-divertPortMin, left.holds); err != nil || p != 40003 {
		t.Fatalf("bindFree = %d, %v; want 40003, past the left rules' port", p, err)
	}
	left.retry(func(leftSet) error { return nil })
	if len(left.sets) != 0 || !left.empty() {
		t.Fatalf("left %v after a successful retry", left.sets)
	}
}

// TestRemoveAtCloseRacedShutdown: when a concurrent Shutdown deletes the
// rules after Close's last try failed (here the failing deletion stands
// for both: it fails, and the set is gone when Close looks again), Close
// reports no error and records nothing: the rules are not left installed.
func TestRemoveAtCloseRacedShutdown(t *testing.T) {
	var left leftSets
	var c setClaim
	c.init()
	c.claim(6)
	err := c.removeAtClose(func(int) error {
		c.set = -1 // the sem is held: as a Shutdown's remove right after
		return errors.New("ipfw failed")
	}, 1, func(int) {}, &left, 31000, 40000)
	if err != nil || !left.empty() {
		t.Fatalf("removeAtClose = %v, left %v; want nil, nothing left", err, left.sets)
	}
}

// TestLeftErrorMessage: Close's error for rules it leaves installed says
// "divert: " once, though the deletion's error, which it tells, starts
// with it too, and still wraps that error's sentinels.
func TestLeftErrorMessage(t *testing.T) {
	for _, tc := range []struct {
		cause error
		is    error
	}{
		{sharedError(5, 31000), errRulesShared},
		{fmt.Errorf("divert: ipfw -S list: Operation not permitted: %w", os.ErrPermission), os.ErrPermission},
	} {
		err := leftError(31000, tc.cause)
		msg := err.Error()
		if !strings.HasPrefix(msg, "divert: close: ") || strings.Count(msg, "divert:") != 1 {
			t.Errorf("message %q: want one \"divert: \", at the start", msg)
		}
		if !strings.HasSuffix(msg, strings.TrimPrefix(tc.cause.Error(), "divert: ")) {
			t.Errorf("message %q does not end with the cause %q", msg, tc.cause)
		}
		if !errors.Is(err, tc.is) || !errors.Is(err, tc.cause) {
			t.Errorf("%v: errors.Is(%v) = false", err, tc.is)
		}
	}
	if msg := sharedError(5, 31000).Error(); !strings.HasPrefix(msg, "divert: ipfw set 5: ") || strings.Count(msg, "divert:") != 1 {
		t.Errorf("shared error %q", msg)
	}
}

// TestAddRulesFails: when ipfw refuses a rule partway, the set stays
// claimed, and undoAdd deletes the rules added before; when they cannot be, they are recorded as a closed
// handle's left rules (their socket closes with the failed Open), so that
// later Opens and Closes delete them and no new handle binds their port,
// and the error tells both failures.
func TestAddRulesFails(t *testing.T) {
	refused := errors.New("ipfw add failed")
	stuck := errors.New("ipfw delete failed")
	addUntil := func(fail int, added *int) func(int) error {
		return func(i int) error {
			if i == fail {
				return refused
			}
			*added++
			return nil
		}
	}

	// Deleted: nothing left, the claim gone, add's error alone.
	var left leftSets
	var c setClaim
	c.init()
	added, dels := 0, 0
	n, err := c.addRules(8, 4, addUntil(2, &added), nil, 40100)
	if err != refused || n != 2 || added != 2 {
		t.Fatalf("addRules = %d, %v; want 2, add's error", n, err)
	}
	err = c.undoAdd(err, n, func(set int) error {
		dels++
		if set != 8 {
			t.Errorf("deleting set %d, want 8", set)
		}
		return nil
	}, closeAttempts, func(int) {}, &left, 31000, 40100)
	if err != refused || dels != 1 || !left.empty() {
		t.Fatalf("undoAdd = %v, %d deletions, left %v; want add's error, 1, none", err, dels, left.sets)
	}
	if err := c.remove(func(int) error { t.Fatal("the claim outlived a deletion"); return nil }); err != nil {
		t.Fatal(err)
	}

	// Not deleted: left, the claim handed over, both errors.
	added, dels = 0, 0
	n, err = c.addRules(9, 4, addUntil(3, &added), nil, 40101)
	if n != 3 {
		t.Fatalf("addRules added %d, want 3", n)
	}
	err = c.undoAdd(err, n, func(int) error { dels++; return stuck }, closeAttempts, func(int) {}, &left, 31001, 40101)
	if !errors.Is(err, refused) || !errors.Is(err, stuck) || dels != closeAttempts {
		t.Fatalf("undoAdd = %v, %d deletions; want both errors, %d deletions", err, dels, closeAttempts)
	}
	if msg := err.Error(); strings.Count(msg, "divert:") > 1 {
		t.Errorf("message %q says \"divert:\" twice", msg)
	}
	if len(left.sets) != 1 || left.sets[0] != (leftSet{set: 9, number: 31001, port: 40101}) || !left.holds(40101) {
		t.Fatalf("left = %v; want set 9's rules on port 40101", left.sets)
	}
	if err := c.remove(func(int) error { t.Fatal("the claim kept a left set"); return nil }); err != nil {
		t.Fatal(err)
	}

	// Every rule added: claimed, nothing left.
	added = 0
	if n, err := c.addRules(10, 3, addUntil(-1, &added), nil, 40102); err != nil || n != 3 || added != 3 {
		t.Fatalf("addRules = %d, %v, %d added", n, err, added)
	}
	got := -1
	if err := c.remove(func(set int) error { got = set; return nil }); err != nil || got != 10 {
		t.Fatalf("remove deleted set %d (%v), want 10", got, err)
	}
}
