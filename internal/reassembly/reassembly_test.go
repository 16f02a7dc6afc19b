package reassembly

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"
)

var t0 = time.Unix(1_700_000_000, 0)

func TestNonFragmentPassesThrough(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	r := New(Config{})
	for _, d := range []dgram{makeV4(rng, protoUDP, 100, false), makeV6(rng, protoUDP, 100, true, true, true)} {
		got, done, err := r.Add(nil, d.b, t0)
		if err != nil || !done || &got[0] != &d.b[0] || len(got) != len(d.b) {
			t.Fatalf("non-fragment: done=%v err=%v same=%v", done, err, len(got) > 0 && &got[0] == &d.b[0])
		}
	}
	if s := r.Stats(); s.Pending != 0 || s.Fragments != 0 {
		t.Fatalf("stats touched: %+v", s)
	}
}

func TestInOrderAndReverse(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, d := range []dgram{
		makeV4(rng, protoUDP, 2980, false),
		makeV4(rng, protoTCP, 8980, true),
		makeV6(rng, protoUDP, 2960, false, false, false),
		makeV6(rng, protoTCP, 8900, true, true, true),
	} {
		n := len(d.b) - d.hl
		var cs []int
		for c := 1480 &^ 7; c < n; c += 1480 &^ 7 {
			cs = append(cs, c)
		}
		fs := split(d, cs)
		for _, rev := range []bool{false, true} {
			r := New(Config{})
			dst := make([]byte, 0, 65536)
			var info Info
			for i := range fs {
				f := fs[i]
				if rev {
					f = fs[len(fs)-1-i]
				}
				got, done, err := r.AddInfo(dst, f, t0, &info)
				if err != nil {
					t.Fatalf("v6=%v rev=%v frag %d: %v", d.v6, rev, i, err)
				}
				if done != (i == len(fs)-1) {
					t.Fatalf("v6=%v rev=%v frag %d: done=%v", d.v6, rev, i, done)
				}
				if done {
					if !bytes.Equal(got, d.b) {
						t.Fatalf("v6=%v rev=%v: reassembled datagram differs\n got %x\nwant %x", d.v6, rev, got[:64], d.b[:64])
					}
					if &got[0] != &dst[:1][0] {
						t.Fatalf("dst was not used")
					}
					if !info.Fragmented || info.ID != d.id || info.Fragments != len(fs) || info.MaxFragLen != len(fs[0]) {
						t.Fatalf("info %+v, want id %#x, %d fragments of %d", info, d.id, len(fs), len(fs[0]))
					}
				}
			}
			s := r.Stats()
			if s.Pending != 0 || s.HeldBytes != 0 || s.Completed != 1 || s.Fragments != uint64(len(fs)) {
				t.Fatalf("stats %+v", s)
			}
		}
	}
}

// model predicts Add's result for the fragments of one datagram (one key),
// delivered in any order, with either overlap policy. It keeps a byte map
// rather than spans, so it shares no code with the package.
type model struct {
	policy  OverlapPolicy
	v6      bool
	data    []byte
	have    []bool
	frags   [][2]int // accepted pieces
	total   int
	extent  int
	present bool
	dead    bool // refused after holding data: later fragments get ErrDiscarded

	lastTotal int // data length of the datagram last completed
}

func (m *model) reset() {
	if m.data == nil {
		m.data = make([]byte, 65536)
		m.have = make([]bool, 65536)
	}
	clear(m.data)
	clear(m.have)
	m.frags = m.frags[:0]
	m.total, m.extent, m.present = -1, 0, false
}

// add returns (complete, err) for data [lo, hi) and the last flag.
func (m *model) add(lo, hi int, b []byte, last bool) (bool, error) {
	if m.dead {
		return false, ErrDiscarded
	}
	if !m.present {
		m.reset()
		m.present = true
	}
	if (last && m.total >= 0 && m.total != hi) || (last && m.extent > hi) || (!last && m.total >= 0 && hi > m.total) {
		m.present = false
		m.dead = len(m.frags) > 0
		return false, ErrInconsistent
	}
	dup := false
	overlap := false
	for _, p := range m.frags {
		if p[0] == lo && p[1] == hi && bytes.Equal(m.data[lo:hi], b) {
			dup = true
		}
		if p[0] < hi && lo < p[1] {
			overlap = true
		}
	}
	switch {
	case dup:
	case overlap && (m.v6 || m.policy == OverlapDrop):
		m.present = false
		m.dead = len(m.frags) > 0
		return false, ErrOverlap
	default:
		added := false
		for i := lo; i < hi; i++ {
			if !m.have[i] {
				m.have[i] = true
				m.data[i] = b[i-lo]
				added = true
			}
		}
		if added {
			m.frags = append(m.frags, [2]int{lo, hi})
		}
		m.extent = max(m.extent, hi)
	}
	if last {
		m.total = hi
	}
	if m.total < 0 {
		return false, nil
	}
	for i := range m.total {
		if !m.have[i] {
			return false, nil
		}
	}
	m.present = false
	m.lastTotal = m.total
	return true, nil
}

func TestRandomOrderDuplicatesOverlaps(t *testing.T) {
	for _, policy := range []OverlapPolicy{OverlapDrop, OverlapFirstWins} {
		rng := rand.New(rand.NewPCG(5, uint64(policy)))
		r := New(Config{IPv4Overlap: policy, MaxFragments: 1 << 13})
		dst := make([]byte, 0, 70000)
		completed, overlaps := 0, 0
		for iter := range 1500 {
			d := randomDgram(rng, 1<<16)
			n := len(d.b) - d.hl
			fs := split(d, cuts(rng, n, d.chainMin, 1+rng.IntN(40)))
			type item struct {
				f      []byte
				lo, hi int
				last   bool
			}
			var seq []item
			lo := 0
			for _, f := range fs {
				hi := lo + len(f) - d.hl
				if d.v6 {
					hi -= 8
				}
				seq = append(seq, item{f, lo, hi, hi == n})
				lo = hi
			}
			// Exact duplicates.
			for range rng.IntN(3) {
				seq = append(seq, seq[rng.IntN(len(fs))])
			}
			// Overlapping pieces (same or different bytes) in some datagrams.
			if iter%3 == 0 && n > 16 {
				a := rng.IntN(n/8) * 8
				b := min(n, a+8+rng.IntN(n-a)&^7)
				if a >= d.chainMin || a == 0 && b >= d.chainMin {
					p := piece(d, a, b, b < n)
					if rng.IntN(2) == 0 {
						p[len(p)-1] ^= 0xFF
						if !d.v6 {
							// keep the header valid: only the data changed
						}
					}
					seq = append(seq, item{p, a, b, b == n})
				}
			}
			rng.Shuffle(len(seq), func(i, j int) { seq[i], seq[j] = seq[j], seq[i] })
			m := model{policy: policy, v6: d.v6}
			for k, it := range seq {
				hl := d.hl
				if d.v6 {
					hl += 8
				}
				got, done, err := r.Add(dst, it.f, t0)
				if it.lo == 0 && it.last {
					// Not a fragment (IPv4) or an atomic fragment (IPv6): as is.
					if err != nil || !done || !bytes.Equal(got, it.f) {
						t.Fatalf("whole piece: done=%v err=%v", done, err)
					}
					continue
				}
				wantDone, wantErr := m.add(it.lo, it.hi, it.f[hl:], it.last)
				if !errors.Is(err, wantErr) || (wantErr == nil) != (err == nil) || done != wantDone {
					t.Fatalf("policy %v iter %d step %d [%d,%d) last=%v v6=%v: got done=%v err=%v, want done=%v err=%v",
						policy, iter, k, it.lo, it.hi, it.last, d.v6, done, err, wantDone, wantErr)
				}
				if errors.Is(err, ErrOverlap) {
					overlaps++
				}
				if done {
					completed++
					want := append([]byte(nil), d.b...)
					copy(want[d.hl:], m.data[:n])
					if !bytes.Equal(got, want) {
						for i := range got {
							if i >= len(want) || got[i] != want[i] {
								t.Fatalf("policy %v iter %d v6=%v: datagram differs from the model at byte %d of %d/%d (hl %d)", policy, iter, d.v6, i, len(got), len(want), d.hl)
							}
						}
						t.Fatalf("policy %v iter %d: datagram differs from the model (length)", policy, iter)
					}
				}
			}
			r.Expire(t0.Add(time.Hour))
			if s := r.Stats(); s.Pending != 0 || s.HeldBytes != 0 {
				t.Fatalf("left over after Expire: %+v", s)
			}
		}
		t.Logf("policy %v: %d completed, %d overlaps refused", policy, completed, overlaps)
		if completed < 1000 {
			t.Fatalf("only %d datagrams completed", completed)
		}
		if policy == OverlapDrop && overlaps == 0 {
			t.Fatalf("no overlap exercised")
		}
	}
}

func TestCleanDeliveryEqualsOriginal(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	r := New(Config{MaxFragments: 1 << 13})
	whole := 0
	for iter := range 2000 {
		d := randomDgram(rng, 1<<16)
		n := len(d.b) - d.hl
		fs := split(d, cuts(rng, n, d.chainMin, 1+rng.IntN(64)))
		if len(fs) == 1 {
			whole++
		}
		order := rng.Perm(len(fs))
		seen := map[int]bool{}
		for k := 0; k < len(order); k++ {
			i := order[k]
			got, done, err := r.Add(nil, fs[i], t0)
			if err != nil {
				t.Fatalf("iter %d: %v", iter, err)
			}
			if seen[i] {
				if done {
					t.Fatalf("duplicate completed")
				}
				continue
			}
			seen[i] = true
			if done != (len(seen) == len(fs)) {
				t.Fatalf("iter %d: done=%v with %d/%d", iter, done, len(seen), len(fs))
			}
			want := d.b
			if len(fs) == 1 {
				want = fs[0] // IPv6 atomic fragment, as is
			}
			if done && !bytes.Equal(got, want) {
				t.Fatalf("iter %d (v6=%v, %d frags): differs", iter, d.v6, len(fs))
			}
			if rng.IntN(4) == 0 && k+1 < len(order) { // duplicate a fragment seen before
				order = append(order[:k+1], append([]int{order[rng.IntN(k+1)]}, order[k+1:]...)...)
			}
		}
	}
	if s := r.Stats(); s.Pending != 0 || s.Completed != uint64(2000-whole) || s.HeldBytes != 0 {
		t.Fatalf("stats %+v", s)
	}
}

func TestTinyFragments(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	d := makeV4(rng, protoTCP, 100, false)
	r := New(Config{})
	// First fragment with 16 bytes of TCP header: refused.
	if _, _, err := r.Add(nil, piece(d, 0, 16, true), t0); !errors.Is(err, ErrTinyFragment) {
		t.Fatalf("short first TCP fragment: %v", err)
	}
	// A held datagram, then a fragment at offset 8: refused, datagram dropped.
	if _, _, err := r.Add(nil, piece(d, 24, 48, true), t0); err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.Add(nil, piece(d, 8, 24, true), t0); !errors.Is(err, ErrTinyFragment) {
		t.Fatalf("offset-1 TCP fragment: %v", err)
	}
	if s := r.Stats(); s.Pending != 0 || s.Dropped != 1 || s.RejectedTiny != 2 {
		t.Fatalf("stats %+v", s)
	}
	// UDP is not subject to it.
	u := makeV4(rng, protoUDP, 100, false)
	if _, _, err := r.Add(nil, piece(u, 8, 16, true), t0); err != nil {
		t.Fatal(err)
	}
}

func TestIPv6HeaderChain(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	d := makeV6(rng, protoTCP, 200, false, false, true) // dest-opts (8) + TCP (20) after the Fragment header
	r := New(Config{})
	if _, _, err := r.Add(nil, piece(d, 0, 24, true), t0); !errors.Is(err, ErrHeaderChain) {
		t.Fatalf("first fragment without the whole TCP header: %v", err)
	}
	if _, _, err := r.Add(nil, piece(d, 0, 32, true), t0); err != nil {
		t.Fatalf("first fragment with the chain: %v", err)
	}
}

func TestAtomicFragment(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 14))
	d := makeV6(rng, protoUDP, 200, true, false, false)
	r := New(Config{})
	// A pending datagram with the same key and identification.
	if _, _, err := r.Add(nil, piece(d, 64, 128, true), t0); err != nil {
		t.Fatal(err)
	}
	a := piece(d, 0, len(d.b)-d.hl, false)
	var info Info
	got, done, err := r.AddInfo(nil, a, t0, &info)
	if err != nil || !done || !bytes.Equal(got, a) || !info.Atomic || info.ID != d.id {
		t.Fatalf("atomic: done=%v err=%v info=%+v", done, err, info)
	}
	if s := r.Stats(); s.Pending != 1 || s.Atomic != 1 || s.Fragments != 1 {
		t.Fatalf("state touched: %+v", s)
	}
}

func TestRefusals(t *testing.T) {
	rng := rand.New(rand.NewPCG(15, 16))
	u4 := makeV4(rng, protoUDP, 400, false)
	u6 := makeV6(rng, protoUDP, 400, false, false, false)
	bad := func(f []byte, mod func([]byte)) []byte {
		f = append([]byte(nil), f...)
		mod(f)
		if f[0]>>4 == 4 {
			setSum4(f[:20])
		}
		return f
	}
	cases := []struct {
		name string
		pre  [][]byte
		pkt  []byte
		want error
	}{
		{"empty", nil, nil, ErrMalformed},
		{"version 5", nil, []byte{0x50, 0, 0, 0}, ErrMalformed},
		{"short v4", nil, piece(u4, 0, 8, true)[:19], ErrMalformed},
		{"v4 bad checksum", nil, bad(piece(u4, 0, 8, true), func(f []byte) {}) /* fixed below */, nil},
		{"v4 total length beyond packet", nil, piece(u4, 0, 64, true)[:60], ErrMalformed},
		{"v4 not multiple of 8", nil, piece(u4, 0, 12, true), ErrBadLength},
		{"v4 empty fragment", nil, piece(u4, 8, 8, true), ErrBadLength},
		{"v4 too big", nil, bad(piece(u4, 0, 8, false), func(f []byte) { binary.BigEndian.PutUint16(f[6:8], 8189) }), ErrTooBig},
		{"v4 second last", [][]byte{piece(u4, 64, 128, false)}, piece(u4, 128, 192, false), ErrInconsistent},
		{"v4 beyond last", [][]byte{piece(u4, 64, 128, false)}, piece(u4, 128, 192, true), ErrInconsistent},
		{"v4 last before data", [][]byte{piece(u4, 64, 128, true)}, piece(u4, 8, 32, false), ErrInconsistent},
		{"v4 overlap", [][]byte{piece(u4, 64, 128, true)}, piece(u4, 120, 136, true), ErrOverlap},
		{"v4 same range other bytes", [][]byte{piece(u4, 64, 128, true)}, bad(piece(u4, 64, 128, true), func(f []byte) { f[30] ^= 1 }), ErrOverlap},
		{"v4 duplicate", [][]byte{piece(u4, 64, 128, true)}, piece(u4, 64, 128, true), nil},
		{"v6 short", nil, piece(u6, 0, 8, true)[:39], ErrMalformed},
		{"v6 truncated", nil, piece(u6, 0, 64, true)[:90], ErrMalformed},
		{"v6 jumbo fragment", nil, bad(piece(u6, 0, 64, true), func(f []byte) { f[4], f[5] = 0, 0 }), ErrMalformed},
		{"v6 not multiple of 8", nil, piece(u6, 8, 20, true), ErrBadLength},
		{"v6 overlap", [][]byte{piece(u6, 64, 128, true)}, piece(u6, 0, 72, true), ErrOverlap},
		{"v6 too big", nil, bad(piece(u6, 8, 16, true), func(f []byte) { binary.BigEndian.PutUint16(f[42:44], 65528|1) }), ErrTooBig},
	}
	// A v4 fragment whose checksum is wrong.
	cases[3].pkt[10] ^= 0xFF
	cases[3].want = ErrMalformed
	for _, c := range cases {
		r := New(Config{})
		for _, p := range c.pre {
			if _, _, err := r.Add(nil, p, t0); err != nil {
				t.Fatalf("%s: setup: %v", c.name, err)
			}
		}
		_, done, err := r.Add(nil, c.pkt, t0)
		if !errors.Is(err, c.want) || (c.want == nil) != (err == nil) || done {
			t.Errorf("%s: done=%v err=%v, want %v", c.name, done, err, c.want)
			continue
		}
		s := r.Stats()
		if c.want != nil && s.Pending != 0 {
			t.Errorf("%s: refused but %d datagrams still held", c.name, s.Pending)
		}
	}
	// SkipIPv4Checksum accepts the bad checksum.
	r := New(Config{SkipIPv4Checksum: true})
	if _, _, err := r.Add(nil, cases[3].pkt, t0); err != nil {
		t.Fatalf("SkipIPv4Checksum: %v", err)
	}
}

func TestFirstWinsKeepsOldBytes(t *testing.T) {
	rng := rand.New(rand.NewPCG(17, 18))
	d := makeV4(rng, protoUDP, 64, false)
	r := New(Config{IPv4Overlap: OverlapFirstWins})
	evil := piece(d, 8, 40, true)
	for i := 20; i < len(evil); i++ {
		evil[i] ^= 0xFF
	}
	steps := [][]byte{piece(d, 16, 32, true), evil, piece(d, 0, 8, true), piece(d, 40, 64, false)}
	var got []byte
	var done bool
	for _, s := range steps {
		var err error
		if got, done, err = r.Add(nil, s, t0); err != nil {
			t.Fatal(err)
		}
	}
	if !done {
		t.Fatal("not complete")
	}
	want := append([]byte(nil), d.b...)
	for i := 8; i < 16; i++ {
		want[20+i] ^= 0xFF
	}
	for i := 32; i < 40; i++ {
		want[20+i] ^= 0xFF
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("first-wins:\n got %x\nwant %x", got, want)
	}
}

func TestTimeout(t *testing.T) {
	rng := rand.New(rand.NewPCG(19, 20))
	d4 := makeV4(rng, protoUDP, 100, false)
	d6 := makeV6(rng, protoUDP, 100, false, false, false)
	r := New(Config{})
	r.Add(nil, piece(d4, 0, 32, true), t0)
	r.Add(nil, piece(d6, 0, 32, true), t0)
	if n := r.Expire(t0.Add(DefaultTimeoutIPv4 - time.Nanosecond)); n != 0 {
		t.Fatalf("expired %d early", n)
	}
	if n := r.Expire(t0.Add(DefaultTimeoutIPv4)); n != 1 {
		t.Fatalf("IPv4 expiry: %d", n)
	}
	// The IPv6 one lives 60 s; a fragment after its timeout starts over.
	if _, done, err := r.Add(nil, piece(d6, 32, len(d6.b)-d6.hl, false), t0.Add(DefaultTimeoutIPv6)); done || err != nil {
		t.Fatalf("late fragment: done=%v err=%v", done, err)
	}
	if s := r.Stats(); s.Timeouts != 2 || s.Pending != 1 {
		t.Fatalf("stats %+v", s)
	}
	r2 := New(Config{Timeout: time.Second})
	r2.Add(nil, piece(d6, 0, 32, true), t0)
	if n := r2.Expire(t0.Add(time.Second)); n != 1 {
		t.Fatalf("configured timeout: %d", n)
	}
}

func TestMemoryBoundFlood(t *testing.T) {
	rng := rand.New(rand.NewPCG(21, 22))
	const maxBytes = 256 << 10
	r := New(Config{MaxBytes: maxBytes, MaxDatagrams: 64})
	big4 := makeV4(rng, protoUDP, 65000, false)
	big6 := makeV6(rng, protoUDP, 65000, false, false, false)
	for i := range 20000 {
		// A new key each time, claiming a datagram of up to 65000 bytes.
		d := big6
		d.id = uint32(i)
		if i%2 == 0 {
			d = big4
			binary.BigEndian.PutUint16(d.b[4:6], uint16(i))
			setSum4(d.b[:d.hl])
		}
		n := 1000 + rng.IntN(len(d.b)-d.hl-1000)
		lo := rng.IntN(n/8) * 8
		hi := min(n, lo+8+rng.IntN(3000)&^7)
		if _, done, err := r.Add(nil, piece(d, lo, hi, hi < n), t0.Add(time.Duration(i)*time.Millisecond)); done || err != nil {
			// A single fragment never completes here (lo > 0 or hi < n), except the rare whole one.
			if !(lo == 0 && hi == n) {
				t.Fatalf("flood %d: done=%v err=%v", i, done, err)
			}
		}
		s := r.Stats()
		if s.HeldBytes+s.PooledBytes > maxBytes || s.Pending > 64 {
			t.Fatalf("bound broken at %d: %+v", i, s)
		}
	}
	s := r.Stats()
	t.Logf("after flood: %+v", s)
	if s.Evicted == 0 {
		t.Fatal("nothing evicted")
	}
	// The reassembler still works.
	d := makeV4(rng, protoUDP, 40000, false)
	fs := split(d, []int{1480, 2960, 20000, 39000})
	var got []byte
	for _, f := range fs {
		got, _, _ = r.Add(nil, f, t0.Add(time.Hour))
	}
	if !bytes.Equal(got, d.b) {
		t.Fatal("reassembly after flood failed")
	}
}

func TestMemoryTooSmall(t *testing.T) {
	rng := rand.New(rand.NewPCG(23, 24))
	r := New(Config{MaxBytes: 8192})
	d := makeV4(rng, protoUDP, 30000, false)
	if _, _, err := r.Add(nil, piece(d, 20000, 30000, false), t0); !errors.Is(err, ErrMemory) {
		t.Fatalf("want ErrMemory, got %v", err)
	}
	if s := r.Stats(); s.Pending != 0 || s.HeldBytes != 0 {
		t.Fatalf("%+v", s)
	}
}

func TestMaxFragments(t *testing.T) {
	rng := rand.New(rand.NewPCG(25, 26))
	r := New(Config{MaxFragments: 4})
	d := makeV4(rng, protoUDP, 100, false)
	for i := range 4 {
		if _, _, err := r.Add(nil, piece(d, 8*i, 8*i+8, true), t0); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := r.Add(nil, piece(d, 32, 40, true), t0); !errors.Is(err, ErrTooManyFragments) {
		t.Fatalf("got %v", err)
	}
}

func TestMaxDatagramsOldestFirst(t *testing.T) {
	rng := rand.New(rand.NewPCG(27, 28))
	r := New(Config{MaxDatagrams: 3})
	var ds []dgram
	for i := range 4 {
		d := makeV4(rng, protoUDP, 100, false)
		binary.BigEndian.PutUint16(d.b[4:6], uint16(i))
		setSum4(d.b[:20])
		ds = append(ds, d)
		if _, _, err := r.Add(nil, piece(d, 0, 32, true), t0.Add(time.Duration(i))); err != nil {
			t.Fatal(err)
		}
	}
	if s := r.Stats(); s.Pending != 3 || s.Evicted != 1 {
		t.Fatalf("%+v", s)
	}
	// The oldest (0) was evicted: completing 1 works, completing 0 does not.
	if _, done, _ := r.Add(nil, piece(ds[1], 32, 100, false), t0); !done {
		t.Fatal("datagram 1 lost")
	}
	if _, done, _ := r.Add(nil, piece(ds[0], 32, 100, false), t0); done {
		t.Fatal("evicted datagram completed")
	}
}

func TestDiscardedUntilTimeout(t *testing.T) {
	rng := rand.New(rand.NewPCG(29, 30))
	d := makeV6(rng, protoUDP, 400, false, false, false)
	n := len(d.b) - d.hl
	r := New(Config{})
	if _, _, err := r.Add(nil, piece(d, 0, 64, true), t0); err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.Add(nil, piece(d, 56, 128, true), t0); !errors.Is(err, ErrOverlap) {
		t.Fatalf("overlap: %v", err)
	}
	// The rest of the datagram, even correct, is refused until the timeout.
	for _, f := range [][]byte{piece(d, 0, 64, true), piece(d, 64, n, false)} {
		if _, done, err := r.Add(nil, f, t0.Add(59*time.Second)); !errors.Is(err, ErrDiscarded) || done {
			t.Fatalf("after overlap: done=%v err=%v", done, err)
		}
	}
	s := r.Stats()
	if s.Pending != 0 || s.Discarded != 1 || s.HeldBytes != 0 || s.RejectedDiscarded != 2 || s.Dropped != 1 {
		t.Fatalf("%+v", s)
	}
	// After the timeout the key is free again.
	later := t0.Add(DefaultTimeoutIPv6)
	if _, _, err := r.Add(nil, piece(d, 0, 64, true), later); err != nil {
		t.Fatal(err)
	}
	got, done, err := r.Add(nil, piece(d, 64, n, false), later)
	if err != nil || !done || !bytes.Equal(got, d.b) {
		t.Fatalf("after timeout: done=%v err=%v", done, err)
	}
	if s := r.Stats(); s.Discarded != 0 || s.Timeouts != 0 {
		t.Fatalf("%+v", s)
	}
}

// TestV6AreaFromFirstFragment: the reassembled datagram takes the first
// fragment's per-fragment headers (RFC 8200 4.5), so a bigger header on a
// non-first fragment that arrives first must not count against the
// datagram's size: here a 2 KiB Hop-by-Hop header on the second fragment
// of a datagram of 65000 payload bytes, the most an IPv6 packet holds
// being 65535.
func TestV6AreaFromFirstFragment(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	d := makeV6(rng, protoUDP, 65000, false, false, false)
	// withHBH inserts an n-byte Hop-by-Hop header (Pad1 options) after
	// the fixed header of the fragment f.
	withHBH := func(f []byte, n int) []byte {
		out := make([]byte, 0, len(f)+n)
		out = append(out, f[:40]...)
		hbh := make([]byte, n)
		hbh[0], hbh[1] = f[6], byte(n/8-1)
		out = append(append(out, hbh...), f[40:]...)
		out[6] = 0
		binary.BigEndian.PutUint16(out[4:6], uint16(len(out)-40))
		return out
	}
	frags := [][]byte{
		withHBH(piece(d, 8, 16, true), 2048), // arrives first
		piece(d, 0, 8, true),
		piece(d, 16, 64000, true),
		piece(d, 64000, 65000, false),
	}
	r := New(Config{})
	for i, f := range frags {
		got, done, err := r.Add(nil, f, t0)
		if err != nil {
			t.Fatalf("fragment %d: %v", i, err)
		}
		if i == len(frags)-1 && (!done || len(got) != 40+65000) {
			t.Fatalf("done %v, %d bytes; want the 40+65000-byte datagram", done, len(got))
		}
	}
}

// TestSetTimeout: a new timeout applies to the datagrams begun after it.
func TestSetTimeout(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 3))
	d := makeV4(rng, protoUDP, 64, false)
	r := New(Config{Timeout: time.Hour})
	r.SetTimeout(time.Second)
	if _, _, err := r.Add(nil, piece(d, 0, 32, true), t0); err != nil {
		t.Fatal(err)
	}
	// Two seconds on, the datagram has expired: its last fragment alone
	// does not complete it.
	got, done, err := r.Add(nil, piece(d, 32, 64, false), t0.Add(2*time.Second))
	if err != nil || done {
		t.Fatalf("after the new timeout: done %v (%d bytes), %v; want the datagram expired", done, len(got), err)
	}
}

// TestOnEvict: every datagram dropped for a bound is reported with its
// key, once, and nothing else is: a caller holding the fragments in a
// queue can let go of exactly those.
func TestOnEvict(t *testing.T) {
	rng := rand.New(rand.NewPCG(41, 42))
	t.Run("MaxDatagrams", func(t *testing.T) {
		var got []Key
		r := New(Config{MaxDatagrams: 2, OnEvict: func(k Key) { got = append(got, k) }})
		var ds []dgram
		for i := range 3 {
			d := makeV4(rng, protoUDP, 100, false)
			binary.BigEndian.PutUint16(d.b[4:6], uint16(0x100+i))
			setSum4(d.b[:20])
			ds = append(ds, d)
			if _, _, err := r.Add(nil, piece(d, 0, 32, true), t0.Add(time.Duration(i))); err != nil {
				t.Fatal(err)
			}
		}
		var want Key
		copy(want.Src[:], ds[0].b[12:16])
		copy(want.Dst[:], ds[0].b[16:20])
		want.ID, want.Proto = 0x100, protoUDP
		if len(got) != 1 || got[0] != want {
			t.Fatalf("evicted %+v, want only %+v", got, want)
		}
		// Completing a datagram, refusing one, and timing out report nothing.
		if _, done, _ := r.Add(nil, piece(ds[1], 32, 100, false), t0); !done {
			t.Fatal("datagram 1 lost")
		}
		if _, _, err := r.Add(nil, piece(ds[2], 16, 48, true), t0); !errors.Is(err, ErrOverlap) {
			t.Fatalf("overlap: %v", err)
		}
		d6 := makeV6(rng, protoUDP, 400, false, false, false)
		if _, _, err := r.Add(nil, piece(d6, 0, 64, true), t0); err != nil {
			t.Fatal(err)
		}
		if n := r.Expire(t0.Add(time.Hour)); n != 1 {
			t.Fatalf("expired %d, want 1", n)
		}
		if len(got) != 1 {
			t.Fatalf("evicted %+v after completion, refusal and timeout", got)
		}
	})
	t.Run("MaxBytes", func(t *testing.T) {
		n := 0
		r := New(Config{MaxBytes: 128 << 10, OnEvict: func(k Key) {
			if !k.V6 || k.ID >= 100 {
				t.Errorf("evicted %+v", k)
			}
			n++
		}})
		big := makeV6(rng, protoUDP, 65000, false, false, false)
		for i := range 100 {
			d := big
			d.id = uint32(i)
			// The last fragment of each: a buffer for all 65000 bytes.
			if _, _, err := r.Add(nil, piece(d, 64000, len(d.b)-d.hl, false), t0); err != nil {
				t.Fatal(err)
			}
		}
		if s := r.Stats(); uint64(n) != s.Evicted || n < 90 {
			t.Fatalf("%d reported, stats %+v", n, s)
		}
	})
}

// TestECNCombination: the ECN codepoints of a datagram's fragments combine
// as RFC 3168 §5.3 and Linux's ip_frag_ecn_table say, whichever fragment
// carries which: CE on any fragment of an ECN-capable datagram marks the
// whole datagram CE (the header checksum recomputed), ECT(0) with ECT(1)
// keeps the first fragment's codepoint, and Not-ECT mixed with ECT or CE
// drops the datagram (ErrECN) and its later fragments.
func TestECNCombination(t *testing.T) {
	const notECT, ect1, ect0, ce = 0, 1, 2, 3
	cases := []struct {
		name   string
		first  uint8 // the first fragment's codepoint
		others uint8 // the other two fragments'
		last   uint8 // the last fragment's
		want   uint8 // the datagram's, or 0xff for ErrECN
	}{
		{"all not-ECT", notECT, notECT, notECT, notECT},
		{"all ECT(0)", ect0, ect0, ect0, ect0},
		{"all CE", ce, ce, ce, ce},
		{"CE on the last", ect0, ect0, ce, ce},
		{"CE in the middle", ect1, ce, ect1, ce},
		{"ECT(0) and ECT(1)", ect1, ect0, ect0, ect1},
		{"not-ECT first, ECT after", notECT, ect0, ect0, 0xff},
		{"not-ECT last", ect0, ect0, notECT, 0xff},
		{"not-ECT with CE", ce, notECT, notECT, 0xff},
	}
	for _, v6 := range []bool{false, true} {
		for _, c := range cases {
			rng := rand.New(rand.NewPCG(41, 42))
			var d dgram
			if v6 {
				d = makeV6(rng, protoUDP, 3000, true, false, false)
			} else {
				d = makeV4(rng, protoUDP, 3000, true)
			}
			setECN := func(p []byte, cp uint8) {
				if v6 {
					p[1] = p[1]&^0x30 | cp<<4
					return
				}
				p[1] = p[1]&^3 | cp
				setSum4(p[:d.hl])
			}
			setECN(d.b, c.first)
			fs := split(d, []int{1000, 2000})
			setECN(fs[1], c.others)
			setECN(fs[2], c.last)
			r := New(Config{})
			var got []byte
			var done bool
			var err error
			// The last fragment first, so the first one's header is not
			// simply the last one seen.
			for _, i := range []int{2, 0, 1} {
				if got, done, err = r.Add(nil, fs[i], t0); err != nil {
					break
				}
			}
			name := fmt.Sprintf("v6=%v %s", v6, c.name)
			if c.want == 0xff {
				if !errors.Is(err, ErrECN) || done {
					t.Errorf("%s: done=%v err=%v, want ErrECN", name, done, err)
				}
				if s := r.Stats(); s.RejectedECN != 1 || s.Pending != 0 || s.HeldBytes != 0 {
					t.Errorf("%s: stats %+v", name, s)
				}
				if _, _, err := r.Add(nil, fs[1], t0); !errors.Is(err, ErrDiscarded) {
					t.Errorf("%s: a later fragment: %v, want ErrDiscarded", name, err)
				}
				continue
			}
			if err != nil || !done {
				t.Errorf("%s: done=%v err=%v", name, done, err)
				continue
			}
			want := append([]byte(nil), d.b...)
			setECN(want, c.want)
			if !bytes.Equal(got, want) {
				t.Errorf("%s: datagram header %x, want %x", name, got[:d.hl], want[:d.hl])
			}
		}
	}
}

// TestInfoDuplicate: Info.Duplicate says that a fragment brought nothing
// new (an exact duplicate; with OverlapFirstWins one whose data is all
// held), and only that.
func TestInfoDuplicate(t *testing.T) {
	rng := rand.New(rand.NewPCG(45, 46))
	d := makeV4(rng, protoUDP, 400, false)
	for _, policy := range []OverlapPolicy{OverlapDrop, OverlapFirstWins} {
		r := New(Config{IPv4Overlap: policy})
		var info Info
		step := func(p []byte, wantDup bool) {
			t.Helper()
			if _, done, err := r.AddInfo(nil, p, t0, &info); err != nil || done || info.Duplicate != wantDup {
				t.Fatalf("%v: done %v, %v, Duplicate %v; want %v", policy, done, err, info.Duplicate, wantDup)
			}
		}
		step(piece(d, 0, 64, true), false)
		step(piece(d, 0, 64, true), true)
		step(piece(d, 128, 192, true), false)
		if policy == OverlapFirstWins {
			step(piece(d, 8, 56, true), true) // covered
			step(piece(d, 56, 136, true), false)
		}
		step(piece(d, 128, 192, true), true)
	}
}
