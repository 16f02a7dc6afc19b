package reassembly

import "fmt"

// checkInvariants verifies the Reassembler's internal bookkeeping.
func (r *Reassembler) checkInvariants() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	held, count, dead := 0, 0, 0
	for li := range r.lists {
		prev := int32(nilIdx)
		var seq uint64
		for i := r.lists[li].head; i != nilIdx; i = r.slab[i].next {
			e := &r.slab[i]
			if e.prev != prev {
				return fmt.Errorf("list %d: entry %d prev %d, want %d", li, i, e.prev, prev)
			}
			if e.seq <= seq {
				return fmt.Errorf("list %d: sequence not increasing", li)
			}
			if prev != nilIdx && e.deadline.Before(r.slab[prev].deadline) {
				return fmt.Errorf("list %d: deadlines out of order", li)
			}
			seq = e.seq
			if j, ok := r.index[e.key]; !ok || j != i {
				return fmt.Errorf("entry %d not indexed", i)
			}
			if e.v6 != (li == 1) {
				return fmt.Errorf("entry %d on the wrong list", i)
			}
			if e.buf != nil {
				held += classSizes[e.class]
				if len(e.buf) != classSizes[e.class] || e.area+e.extent > len(e.buf) {
					return fmt.Errorf("entry %d: buffer %d for area %d + extent %d", i, len(e.buf), e.area, e.extent)
				}
			}
			have, last := 0, int32(0)
			for _, s := range e.ranges {
				if s.lo < last || s.hi <= s.lo || int(s.hi) > e.extent {
					return fmt.Errorf("entry %d: bad spans %v (extent %d)", i, e.ranges, e.extent)
				}
				have += int(s.hi - s.lo)
				last = s.hi
			}
			if have != e.have || (e.total >= 0 && e.extent > e.total) || len(e.ranges) > r.maxFrags {
				return fmt.Errorf("entry %d: have %d/%d total %d extent %d", i, have, e.have, e.total, e.extent)
			}
			if e.dead {
				dead++
				if e.buf != nil || len(e.ranges) != 0 || e.have != 0 {
					return fmt.Errorf("entry %d: discarded but holds data", i)
				}
			}
			if e.hdrLen > e.area {
				return fmt.Errorf("entry %d: header %d > area %d", i, e.hdrLen, e.area)
			}
			prev = i
			count++
		}
		if r.lists[li].tail != prev {
			return fmt.Errorf("list %d: tail %d, want %d", li, r.lists[li].tail, prev)
		}
	}
	if dead != r.dead {
		return fmt.Errorf("%d discarded entries, counted %d", dead, r.dead)
	}
	if count != len(r.index) || count > r.maxDgram {
		return fmt.Errorf("%d listed, %d indexed, max %d", count, len(r.index), r.maxDgram)
	}
	pooled := 0
	for c := range r.pool {
		for _, b := range r.pool[c] {
			if len(b) != classSizes[c] {
				return fmt.Errorf("pool class %d holds a %d-byte buffer", c, len(b))
			}
			pooled += len(b)
		}
	}
	if held != r.held || pooled != r.pooled || held+pooled > r.maxBytes {
		return fmt.Errorf("held %d/%d pooled %d/%d max %d", held, r.held, pooled, r.pooled, r.maxBytes)
	}
	return nil
}
