//go:build freebsd || linux

package divert

import (
	"errors"
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
