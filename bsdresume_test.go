//go:build freebsd || linux

package divert

import "testing"

// TestResumePoints: a new packet of an OpenPort handle resumes after the
// highest rule that fed the handle in its direction, so that the
// administrator's rules that divert to the handle skip it; before any
// packet of that direction, after the other direction's; before any
// packet, 0 (the whole ruleset).
func TestResumePoints(t *testing.T) {
	var r resumePoints
	if got := r.resume(true); got != 0 {
		t.Fatalf("resume before any packet = %d, want 0", got)
	}
	// natd's single rule 100 for both directions.
	r.note(false, 100)
	if got := r.resume(true); got != 100 {
		t.Fatalf("outbound resume with only inbound seen = %d, want 100", got)
	}
	// "100 divert 8668 in", "300 divert 8668 out".
	r.note(true, 300)
	r.note(true, 200) // a lower rule does not lower it
	r.note(false, 50)
	if got := r.resume(true); got != 300 {
		t.Fatalf("outbound resume = %d, want 300", got)
	}
	if got := r.resume(false); got != 100 {
		t.Fatalf("inbound resume = %d, want 100", got)
	}
}

// TestNewPacketRule: an Open handle's new packets resume after its own
// rule number; an OpenPort handle's after what it learnt, not 0.
func TestNewPacketRule(t *testing.T) {
	var r resumePoints
	r.note(false, 8000)
	if got := newPacketRule(false, 31000, &r, true); got != 31000 {
		t.Fatalf("Open handle: %d, want 31000", got)
	}
	if got := newPacketRule(true, 0, &r, true); got != 8000 {
		t.Fatalf("OpenPort handle: %d, want 8000", got)
	}
}
