package reassembly

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"sync"
	"testing"
)

// TestConcurrentUse reassembles interleaved datagrams from several
// goroutines at once (run with -race).
func TestConcurrentUse(t *testing.T) {
	r := New(Config{})
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(61, uint64(g)))
			dst := make([]byte, 0, 1<<16)
			for i := range 200 {
				d := randomDgram(rng, 20000)
				// Distinct keys per goroutine and datagram.
				if d.v6 {
					d.id = uint32(g)<<16 | uint32(i)
				} else {
					binary.BigEndian.PutUint16(d.b[4:6], uint16(g)<<12|uint16(i))
					setSum4(d.b[:d.hl])
				}
				fs := split(d, cuts(rng, len(d.b)-d.hl, d.chainMin, 2+rng.IntN(10)))
				if len(fs) < 2 {
					continue
				}
				var got []byte
				var done bool
				for _, k := range rng.Perm(len(fs)) {
					var err error
					if got, done, err = r.Add(dst, fs[k], t0); err != nil {
						errs <- err
						return
					}
				}
				if !done || !bytes.Equal(got, d.b) {
					errs <- ErrInconsistent
					return
				}
				_ = r.Stats()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := r.checkInvariants(); err != nil {
		t.Fatal(err)
	}
}

// TestSteadyStateAllocations checks the allocation-free steady state: with a
// dst large enough, reassembling a datagram allocates nothing once the pool
// is warm.
func TestSteadyStateAllocations(t *testing.T) {
	rng := rand.New(rand.NewPCG(63, 64))
	d4 := makeV4(rng, protoUDP, 8980, false)
	d6 := makeV6(rng, protoTCP, 8960, true, true, false)
	f4, _ := Fragment(nil, nil, d4.b, 1500, 0)
	f6, _ := Fragment(nil, nil, d6.b, 1280, 99)
	r := New(Config{})
	dst := make([]byte, 0, 1<<16)
	run := func() {
		for _, fs := range [][][]byte{f4, f6} {
			for i := range fs {
				if _, _, err := r.Add(dst, fs[len(fs)-1-i], t0); err != nil {
					t.Fatal(err)
				}
			}
			for _, f := range fs {
				if _, _, err := r.Add(dst, f, t0); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	run()
	if n := testing.AllocsPerRun(100, run); n != 0 {
		t.Fatalf("%v allocations per run of 4 datagrams", n)
	}
	if s := r.Stats(); s.Completed != 4*102 /* run, AllocsPerRun warm-up, 100 runs */ || s.Pending != 0 {
		t.Fatalf("%+v", s)
	}
	frags := make([][]byte, 0, 16)
	buf := make([]byte, 0, 1<<15)
	if n := testing.AllocsPerRun(100, func() {
		if _, err := Fragment(buf, frags, d6.b, 1280, 1); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Fatalf("Fragment: %v allocations", n)
	}
}
