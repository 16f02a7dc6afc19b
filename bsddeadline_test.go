//go:build freebsd || linux

package divert

import (
	"sync/atomic"
	"testing"
	"time"
)

// TestDeadlineAfterShutdown: a SetReadDeadline that checked the shutdown
// flag just before Shutdown, and whose deadline lands after Shutdown's past
// one, must not leave the future deadline in force (a reader would block
// instead of draining and returning ErrShutdown).
func TestDeadlineAfterShutdown(t *testing.T) {
	var shut atomic.Bool
	var last time.Time
	future := time.Now().Add(time.Hour)
	set := func(d time.Time) error {
		if d.Equal(future) && !shut.Load() {
			// Shutdown runs between the check and this deadline landing.
			shut.Store(true)
			last = pastDeadline
		}
		last = d
		return nil
	}
	if err := setDeadlineUnlessShut(&shut, set, future); err != nil {
		t.Fatal(err)
	}
	if !last.Equal(pastDeadline) {
		t.Fatalf("deadline in force %v after Shutdown, want the past one", last)
	}
	// After Shutdown, nothing is set.
	last = time.Time{}
	if err := setDeadlineUnlessShut(&shut, set, future); err != nil || !last.IsZero() {
		t.Fatalf("after Shutdown: %v, deadline set to %v", err, last)
	}
	// Before it, the deadline is set.
	var open atomic.Bool
	var got time.Time
	if err := setDeadlineUnlessShut(&open, func(d time.Time) error { got = d; return nil }, future); err != nil || !got.Equal(future) {
		t.Fatalf("open handle: %v, deadline %v", err, got)
	}
}
