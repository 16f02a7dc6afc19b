package ipfw

import (
	"math/bits"

	"github.com/netdivert/divert/filter"
)

// u128 is an unsigned 128-bit number.
type u128 struct{ hi, lo uint64 }

var maxU128 = u128{^uint64(0), ^uint64(0)}

func u64(v uint64) u128 { return u128{0, v} }

func (a u128) cmp(b u128) int {
	switch {
	case a.hi < b.hi:
		return -1
	case a.hi > b.hi:
		return 1
	case a.lo < b.lo:
		return -1
	case a.lo > b.lo:
		return 1
	}
	return 0
}

func (a u128) add1() u128 {
	lo, c := bits.Add64(a.lo, 1, 0)
	return u128{a.hi + c, lo}
}

func (a u128) sub1() u128 {
	lo, b := bits.Sub64(a.lo, 1, 0)
	return u128{a.hi - b, lo}
}

// mask returns the low n bits set (n in 0..128).
func lowMask(n int) u128 {
	switch {
	case n <= 0:
		return u128{}
	case n < 64:
		return u128{0, 1<<uint(n) - 1}
	case n < 128:
		return u128{1<<uint(n-64) - 1, ^uint64(0)}
	}
	return maxU128
}

func (a u128) and(b u128) u128 { return u128{a.hi & b.hi, a.lo & b.lo} }
func (a u128) or(b u128) u128  { return u128{a.hi | b.hi, a.lo | b.lo} }
func (a u128) not() u128       { return u128{^a.hi, ^a.lo} }

// trailingZeros of a, 128 for zero.
func (a u128) trailingZeros() int {
	if a.lo != 0 {
		return bits.TrailingZeros64(a.lo)
	}
	if a.hi != 0 {
		return 64 + bits.TrailingZeros64(a.hi)
	}
	return 128
}

// set is a set of field values: the interval [lo, hi] without the points in
// ne. It starts as the field's whole domain.
type set struct {
	lo, hi u128
	ne     []u128
	empty  bool
}

func fullSet(lo, hi u128) set { return set{lo: lo, hi: hi} }

// apply narrows s by "x op v" (filter semantics: a negative constant is
// below every value, -0 included).
func (s *set) apply(op filter.Op, v filter.Value) {
	if s.empty {
		return
	}
	c := u128{v.Hi, v.Lo}
	if v.Neg {
		switch op {
		case filter.OpEq, filter.OpLt, filter.OpLe:
			s.empty = true
		}
		return
	}
	switch op {
	case filter.OpEq:
		s.intersect(c, c)
	case filter.OpNe:
		if c.cmp(s.lo) >= 0 && c.cmp(s.hi) <= 0 {
			s.ne = append(s.ne, c)
		}
	case filter.OpLt:
		if c == (u128{}) {
			s.empty = true
			return
		}
		s.intersect(u128{}, c.sub1())
	case filter.OpLe:
		s.intersect(u128{}, c)
	case filter.OpGt:
		if c == maxU128 {
			s.empty = true
			return
		}
		s.intersect(c.add1(), maxU128)
	case filter.OpGe:
		s.intersect(c, maxU128)
	}
	s.normalize()
}

// intersect narrows s to [lo, hi], normalized: an exclusion left at an
// end of the narrowed interval shrinks it (or empties it), so that a set
// with no member is always empty.
func (s *set) intersect(lo, hi u128) {
	if lo.cmp(s.lo) > 0 {
		s.lo = lo
	}
	if hi.cmp(s.hi) < 0 {
		s.hi = hi
	}
	if s.lo.cmp(s.hi) > 0 {
		s.empty = true
	}
	s.normalize()
}

// normalize drops exclusions outside the interval and shrinks the interval
// past excluded end points.
func (s *set) normalize() {
	for !s.empty {
		changed := false
		kept := s.ne[:0]
		for _, p := range s.ne {
			switch {
			case p.cmp(s.lo) < 0 || p.cmp(s.hi) > 0:
				changed = true
			case p == s.lo:
				if s.lo == s.hi {
					s.empty = true
					return
				}
				s.lo = s.lo.add1()
				changed = true
			case p == s.hi:
				s.hi = s.hi.sub1()
				changed = true
			default:
				kept = append(kept, p)
			}
		}
		s.ne = kept
		if !changed {
			return
		}
	}
}

// has reports whether x is in s.
func (s *set) has(x u128) bool {
	if s.empty || x.cmp(s.lo) < 0 || x.cmp(s.hi) > 0 {
		return false
	}
	for _, p := range s.ne {
		if p == x {
			return false
		}
	}
	return true
}

// isFull reports whether s is the whole of [lo, hi].
func (s *set) isFull(lo, hi u128) bool {
	return !s.empty && s.lo == lo && s.hi == hi && len(s.ne) == 0
}

// ranges returns s as sorted disjoint intervals.
func (s *set) ranges() [][2]u128 {
	if s.empty {
		return nil
	}
	ne := append([]u128(nil), s.ne...)
	// insertion sort: the lists are tiny
	for i := 1; i < len(ne); i++ {
		for j := i; j > 0 && ne[j].cmp(ne[j-1]) < 0; j-- {
			ne[j], ne[j-1] = ne[j-1], ne[j]
		}
	}
	var out [][2]u128
	lo := s.lo
	for i, p := range ne {
		if i > 0 && p == ne[i-1] {
			continue
		}
		if p.cmp(lo) > 0 {
			out = append(out, [2]u128{lo, p.sub1()})
		}
		lo = p.add1()
	}
	if lo.cmp(s.hi) <= 0 {
		out = append(out, [2]u128{lo, s.hi})
	}
	return out
}

// cidrs splits [lo, hi] into prefix blocks of a width-bit space, each as
// (base, prefix length). It stops after limit blocks and reports false.
func cidrs(lo, hi u128, width, limit int) ([]cidr, bool) {
	var out []cidr
	for lo.cmp(hi) <= 0 {
		if len(out) == limit {
			return out, false
		}
		// largest block aligned at lo that fits in [lo, hi]
		n := lo.trailingZeros()
		if n > width {
			n = width
		}
		for n > 0 {
			end := lo.or(lowMask(n))
			if end.cmp(hi) <= 0 {
				break
			}
			n--
		}
		out = append(out, cidr{lo, width - n})
		end := lo.or(lowMask(n))
		if end == maxU128 || (width < 128 && end == lowMask(width)) {
			break
		}
		lo = end.add1()
	}
	return out, true
}

type cidr struct {
	base u128
	bits int
}

// cover returns the smallest prefix block of a width-bit space holding
// [lo, hi].
func cover(lo, hi u128, width int) cidr {
	n := 0
	for n < width && lo.and(lowMask(n).not()) != hi.and(lowMask(n).not()) {
		n++
	}
	return cidr{lo.and(lowMask(n).not()), width - n}
}
