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
