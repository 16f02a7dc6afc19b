package nfq

// Tracker remembers the packets a program holds (received, not yet
// verdicted) in arrival order, so that each gets exactly one verdict: a
// FIFO ring of ids (increasing in the kernel's wrapping order) with their
// arrival times. Lookup is a binary search, insertion and release are O(1)
// amortised, and nothing allocates once the ring has its size. Not safe for
// concurrent use.
type Tracker struct {
	ring []trackEntry // power-of-two length
	head uint32       // index (unwrapped) of the oldest entry
	tail uint32       // index (unwrapped) one past the newest
	live int
}

type trackEntry struct {
	id   uint32
	done bool
	t    int64
}

// NewTracker returns a Tracker with room for at least n entries.
func NewTracker(n int) *Tracker {
	t := &Tracker{}
	t.grow(n)
	return t
}

func (t *Tracker) grow(n int) {
	size := 16
	for size < n {
		size <<= 1
	}
	ring := make([]trackEntry, size)
	k := 0
	for i := t.head; i != t.tail; i++ {
		e := t.ring[int(i)&(len(t.ring)-1)]
		if !e.done {
			ring[k] = e
			k++
		}
	}
	t.ring, t.head, t.tail, t.live = ring, 0, uint32(k), k
}

// Len returns how many packets are held.
func (t *Tracker) Len() int { return t.live }

func (t *Tracker) at(i uint32) *trackEntry { return &t.ring[int(i)&(len(t.ring)-1)] }

// Add records packet id, received at time now. Ids come in increasing
// order (the kernel's, wrapping at 2^32); one that does not (a queue whose
// sequence restarted, a packet put back and added again) is inserted in
// order, at a cost linear in the entries it passes.
func (t *Tracker) Add(id uint32, now int64) {
	if int(t.tail-t.head) == len(t.ring) {
		// Full: drop released entries, and grow if half or more are live.
		size := len(t.ring)
		if t.live*2 >= size {
			size *= 2
		}
		t.grow(size)
	}
	i := t.tail
	for i != t.head && int32(t.at(i-1).id-id) > 0 {
		*t.at(i) = *t.at(i - 1)
		i--
	}
	*t.at(i) = trackEntry{id: id, t: now}
	t.tail++
	t.live++
}

// find returns the ring index of a held id. The search runs over offsets
// from head: head and tail are free-running counters, and once tail wraps
// past 2^32 (after that many Adds without a grow) comparing them directly
// would end the search at once.
func (t *Tracker) find(id uint32) (uint32, bool) {
	lo, hi := uint32(0), t.tail-t.head
	for lo < hi {
		mid := lo + (hi-lo)/2
		if int32(t.at(t.head+mid).id-id) < 0 {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	// The first entry not before id; an id added again after its release
	// follows its released twin.
	for i := t.head + lo; i != t.tail; i++ {
		e := t.at(i)
		if e.id != id {
			break
		}
		if !e.done {
			return i, true
		}
	}
	return 0, false
}

// Release forgets a held id and reports whether it was held.
func (t *Tracker) Release(id uint32) bool {
	i, ok := t.find(id)
	if !ok {
		return false
	}
	t.at(i).done = true
	t.live--
	t.trim()
	return true
}

func (t *Tracker) trim() {
	for t.head != t.tail && t.at(t.head).done {
		t.head++
	}
}

// Oldest returns the oldest held id and its arrival time.
func (t *Tracker) Oldest() (id uint32, at int64, ok bool) {
	if t.head == t.tail {
		return 0, 0, false
	}
	e := t.at(t.head)
	return e.id, e.t, true
}

// PopOldest forgets the oldest held id.
func (t *Tracker) PopOldest() {
	if t.head == t.tail {
		return
	}
	t.at(t.head).done = true
	t.live--
	t.trim()
}
