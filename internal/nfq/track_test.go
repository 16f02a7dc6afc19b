package nfq

import (
	"math/rand"
	"testing"
)

func TestTracker(t *testing.T) {
	tr := NewTracker(4)
	held := map[uint32]bool{}
	id := uint32(0xffffff00) // cross the 32-bit wrap
	rng := rand.New(rand.NewSource(1))
	for step := 0; step < 20000; step++ {
		if rng.Intn(3) != 0 || len(held) == 0 {
			id++
			tr.Add(id, int64(step))
			held[id] = true
		} else {
			// release a random held id, sometimes one never held
			var victim uint32
			for k := range held {
				victim = k
				break
			}
			if rng.Intn(10) == 0 {
				if tr.Release(id + 1000) {
					t.Fatal("released an id never added")
				}
			}
			if !tr.Release(victim) {
				t.Fatalf("step %d: id %#x held but not found", step, victim)
			}
			if tr.Release(victim) {
				t.Fatalf("step %d: id %#x released twice", step, victim)
			}
			delete(held, victim)
		}
		if tr.Len() != len(held) {
			t.Fatalf("step %d: Len %d, want %d", step, tr.Len(), len(held))
		}
		if old, _, ok := tr.Oldest(); ok {
			for k := range held {
				if int32(k-old) < 0 {
					t.Fatalf("step %d: oldest %#x but %#x is older", step, old, k)
				}
			}
			if !held[old] {
				t.Fatalf("step %d: oldest %#x not held", step, old)
			}
		} else if len(held) != 0 {
			t.Fatal("Oldest found nothing while ids are held")
		}
	}
	for tr.Len() > 0 {
		tr.PopOldest()
	}
	if _, _, ok := tr.Oldest(); ok {
		t.Fatal("empty tracker has an oldest")
	}
	tr.Add(id+1, 0)
	if a := testing.AllocsPerRun(1000, func() { id += 2; tr.Add(id, 0); tr.Release(id) }); a != 0 {
		t.Fatalf("Add/Release allocate %v", a)
	}
}

// TestTrackerIndexWrap runs the ring's free-running head and tail counters
// across 2^32, as after four billion packets held and released in order
// (the ring never fills, so nothing resets them).
func TestTrackerIndexWrap(t *testing.T) {
	tr := NewTracker(16)
	tr.head, tr.tail = 0xfffffff8, 0xfffffff8
	id := uint32(1000)
	for step := 0; step < 64; step++ {
		// Hold four, release them out of order; the counters pass 2^32
		// while ids are held.
		for k := uint32(1); k <= 4; k++ {
			tr.Add(id+k, int64(step))
		}
		for _, k := range []uint32{3, 1, 4, 2} {
			if !tr.Release(id + k) {
				t.Fatalf("step %d (head %#x tail %#x): id %d held but not found", step, tr.head, tr.tail, id+k)
			}
		}
		if tr.Len() != 0 {
			t.Fatalf("step %d: Len %d", step, tr.Len())
		}
		id += 4
	}
	if tr.tail > 0x1000 {
		t.Fatalf("tail %#x: the counters did not wrap", tr.tail)
	}
}

// TestTrackerOutOfOrder adds ids that are not newer than the newest held
// (a restarted sequence, an id added again after its release): each must
// still be found exactly once, and Oldest must stay the oldest.
func TestTrackerOutOfOrder(t *testing.T) {
	tr := NewTracker(4)
	for _, id := range []uint32{10, 20, 30, 15, 5, 25} {
		tr.Add(id, int64(id))
	}
	if id, at, ok := tr.Oldest(); !ok || id != 5 || at != 5 {
		t.Fatalf("Oldest = %d, %d, %v; want 5", id, at, ok)
	}
	for _, id := range []uint32{15, 30, 5} {
		if !tr.Release(id) {
			t.Fatalf("id %d not found", id)
		}
	}
	// 20 released, then added again (put back): found once more, once.
	if !tr.Release(20) {
		t.Fatal("id 20 not found")
	}
	tr.Add(20, 99)
	if !tr.Release(20) || tr.Release(20) {
		t.Fatal("id 20 added again: want exactly one more release")
	}
	for _, id := range []uint32{10, 25} {
		if !tr.Release(id) {
			t.Fatalf("id %d not found", id)
		}
	}
	if tr.Len() != 0 {
		t.Fatalf("Len %d, want 0", tr.Len())
	}
}

// TestTrackerUnchanged checks how the tracker tells a packet sent back
// unchanged: byte for byte before Seal, by length and hash after it, never
// for a packet added without its bytes, and with sealing following entries
// that moved (out-of-order adds, grow).
func TestTrackerUnchanged(t *testing.T) {
	tr := NewTracker(4)
	buf := []byte("aaaa-bbbb-cccc")
	tr.AddHeld(10, 1, buf[0:4])
	tr.AddHeld(11, 1, buf[5:9])
	tr.Add(12, 1)
	check := func(id uint32, pkt string, want bool) {
		t.Helper()
		i, ok := tr.Lookup(id)
		if !ok {
			t.Fatalf("id %d not held", id)
		}
		if got := tr.Unchanged(i, []byte(pkt)); got != want {
			t.Fatalf("Unchanged(%d, %q) = %v, want %v", id, pkt, got, want)
		}
	}
	check(10, "aaaa", true)
	check(10, "aaab", false)
	check(10, "aaa", false)
	check(12, "", false)
	check(12, "x", false)
	tr.Seal(nil)
	copy(buf, "zzzzzzzzzzzzzz") // the buffer is reused: only the hashes remain
	check(10, "aaaa", true)
	check(11, "bbbb", true)
	check(11, "bbbc", false)
	check(11, "bbbbb", false)
	i, _ := tr.Lookup(10)
	tr.ReleaseAt(i)
	if _, ok := tr.Lookup(10); ok {
		t.Fatal("10 still held after ReleaseAt")
	}

	// An out-of-order add lands among sealed entries and is sealed too;
	// so are entries the ring moved when it grew.
	buf2 := []byte("dddd-eeee")
	tr.AddHeld(9, 2, buf2[0:4])
	for id := uint32(20); id < 40; id++ {
		tr.AddHeld(id, 2, buf2[5:9])
	}
	tr.Seal(nil)
	copy(buf2, "zzzzzzzzz")
	check(9, "dddd", true)
	check(25, "eeee", true)
	check(39, "eeee", true)
	check(39, "zzzz", false)
	if !tr.Release(11) || tr.Release(11) {
		t.Fatal("Release(11): want true once")
	}
}

// TestTrackerSealArea checks that Seal(area) hashes only the held packets
// whose bytes lie in area (the Conn's receive area about to be reused) and
// keeps comparing the others byte for byte, also when entries of the two
// areas interleave.
func TestTrackerSealArea(t *testing.T) {
	tr := NewTracker(4)
	areaA := []byte("aaaa-bbbb")
	areaB := []byte("cccc-dddd")
	tr.AddHeld(1, 1, areaA[0:4])
	tr.AddHeld(2, 1, areaB[0:4])
	tr.AddHeld(3, 1, areaA[5:9])
	tr.AddHeld(4, 1, areaB[5:9])
	unchanged := func(id uint32, pkt string) bool {
		t.Helper()
		i, ok := tr.Lookup(id)
		if !ok {
			t.Fatalf("id %d not held", id)
		}
		return tr.Unchanged(i, []byte(pkt))
	}

	if !tr.HoldsIn(areaA) || !tr.HoldsIn(areaB) || tr.HoldsIn([]byte("elsewhere")) {
		t.Fatal("HoldsIn wrong before any Seal")
	}
	tr.Seal(areaA)
	if tr.HoldsIn(areaA) || !tr.HoldsIn(areaB) {
		t.Fatal("HoldsIn wrong after Seal(areaA)")
	}
	copy(areaA, "zzzzzzzzz") // area A is reused
	if !unchanged(1, "aaaa") || !unchanged(3, "bbbb") {
		t.Fatal("packets of the sealed area not recognised by their hash")
	}
	if unchanged(1, "zzzz") {
		t.Fatal("sealed packet compared with the reused area")
	}
	// Area B was not sealed: its packets are still compared with its
	// bytes, so a change made there in place shows.
	if !unchanged(2, "cccc") {
		t.Fatal("packet of the other area not recognised")
	}
	copy(areaB, "yyyy")
	if !unchanged(2, "yyyy") {
		t.Fatal("packet of the other area was hashed by Seal(areaA)")
	}
	if tr.sealed != 1 {
		t.Fatalf("sealed prefix ends at %d, want 1 (entry 2 keeps its bytes)", tr.sealed)
	}

	sealed, ok := tr.Sealed(2)
	if sealed || !ok {
		t.Fatalf("Sealed(2) = %v, %v; want false, true", sealed, ok)
	}
	tr.Seal(areaB)
	if tr.HoldsIn(areaB) {
		t.Fatal("HoldsIn(areaB) after Seal(areaB)")
	}
	if sealed, ok := tr.Sealed(2); !sealed || !ok {
		t.Fatalf("Sealed(2) after Seal(areaB) = %v, %v", sealed, ok)
	}
	copy(areaB, "xxxxxxxxx")
	if !unchanged(2, "yyyy") || !unchanged(4, "dddd") || unchanged(4, "xxxx") {
		t.Fatal("packets of area B not sealed by Seal(areaB)")
	}
	if tr.sealed != tr.tail {
		t.Fatalf("sealed prefix ends at %d, want the tail %d", tr.sealed, tr.tail)
	}
}

// TestTrackerHoldsInRelease checks that HoldsIn forgets released packets,
// and that the ring starts again at its front once empty.
func TestTrackerHoldsInRelease(t *testing.T) {
	tr := NewTracker(4)
	area := []byte("aaaa-bbbb")
	for round := 0; round < 3; round++ {
		tr.AddHeld(uint32(10*round+1), 1, area[0:4])
		tr.AddHeld(uint32(10*round+2), 1, area[5:9])
		if !tr.HoldsIn(area) {
			t.Fatalf("round %d: HoldsIn false with two packets held", round)
		}
		tr.Release(uint32(10*round + 1))
		if !tr.HoldsIn(area) {
			t.Fatalf("round %d: HoldsIn false with one packet held", round)
		}
		tr.Release(uint32(10*round + 2))
		if tr.HoldsIn(area) || tr.Len() != 0 {
			t.Fatalf("round %d: HoldsIn true or Len %d after every release", round, tr.Len())
		}
		if tr.head != 0 || tr.tail != 0 {
			t.Fatalf("round %d: empty ring at head %d, tail %d, want 0", round, tr.head, tr.tail)
		}
	}
}
