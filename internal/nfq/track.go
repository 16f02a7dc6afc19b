package nfq

import (
	"bytes"
	"hash/maphash"
	"unsafe"
)

// Tracker remembers the packets a program holds (received, not yet
// verdicted) in arrival order, so that each gets exactly one verdict: a
// FIFO ring of ids (increasing in the kernel's wrapping order) with their
// arrival times. Lookup is a binary search, insertion and release are O(1)
// amortised, and nothing allocates once the ring has its size. Not safe for
// concurrent use.
//
// It also tells whether a packet comes back unchanged. AddHeld keeps a
// reference to the bytes handed over, which are still in the Conn's
// receive buffer; Seal, called before that buffer is reused, replaces the
// reference by a hash. A program that sends a batch back before the Conn
// reuses the area it was read into (the usual loop: the Conn alternates
// between two) has its packets compared byte for byte, and nothing is
// hashed.
type Tracker struct {
	ring   []trackEntry // power-of-two length
	head   uint32       // index (unwrapped) of the oldest entry
	tail   uint32       // index (unwrapped) one past the newest
	sealed uint32       // entries before this index hold no orig
	live   int
}

// trackEntry is one packet of the ring. AddHeld writes every field, one by
// one: a field added here must be written there too, or a reused slot
// would keep a stale value.
type trackEntry struct {
	id   uint32
	done bool
	n    uint32 // len(orig), kept when sealed
	t    int64
	orig []byte // the bytes handed over, in the receive buffer; nil once sealed
	sum  uint64 // maphash of orig, once sealed
}

var trackSeed = maphash.MakeSeed()

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
	t.sealed = 0 // the next Seal looks at every entry again
}

// Len returns how many packets are held.
func (t *Tracker) Len() int { return t.live }

func (t *Tracker) at(i uint32) *trackEntry { return &t.ring[int(i)&(len(t.ring)-1)] }

// Add records packet id, received at time now. Ids come in increasing
// order (the kernel's, wrapping at 2^32); one that does not (a queue whose
// sequence restarted, a packet put back and added again) is inserted in
// order, at a cost linear in the entries it passes.
func (t *Tracker) Add(id uint32, now int64) {
	t.AddHeld(id, now, nil)
}

// AddHeld is Add for a packet handed over as orig, which must stay
// unchanged until Seal or the packet's release (see Tracker).
func (t *Tracker) AddHeld(id uint32, now int64, orig []byte) {
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
	// Field by field, not a composite literal (see linuxBackend.pendAdd).
	e := t.at(i)
	e.id, e.done, e.n, e.t, e.orig, e.sum = id, false, uint32(len(orig)), now, orig, 0
	t.tail++
	t.live++
	if int32(i-t.sealed) < 0 {
		t.sealed = i // inserted among sealed entries
	}
}

// Seal hashes the bytes of every held packet whose bytes lie in buf and
// lets go of them: call it before buf is reused. A nil buf seals every
// held packet.
func (t *Tracker) Seal(buf []byte) {
	in := within(buf)
	prefix := true // every entry so far is sealed: move t.sealed on
	for i := t.firstUnsealed(); i != t.tail; i++ {
		e := t.at(i)
		if e.orig != nil {
			if buf != nil && !in(e.orig) {
				prefix = false // in the other area: keep it
				continue
			}
			if !e.done {
				e.sum = maphash.Bytes(trackSeed, e.orig)
			}
			e.orig = nil
		}
		if prefix {
			t.sealed = i + 1
		}
	}
}

// HoldsIn reports whether a held packet's bytes (not yet sealed) lie in
// buf.
func (t *Tracker) HoldsIn(buf []byte) bool {
	if t.live == 0 {
		return false
	}
	in := within(buf)
	for i := t.firstUnsealed(); i != t.tail; i++ {
		if e := t.at(i); e.orig != nil && in(e.orig) {
			return true
		}
	}
	return false
}

// firstUnsealed is the ring index (unwrapped) from which held packets may
// still keep their bytes: entries before it are sealed or released.
func (t *Tracker) firstUnsealed() uint32 {
	if int32(t.sealed-t.head) < 0 {
		return t.head
	}
	return t.sealed
}

// within returns a function reporting whether a slice starts inside buf.
func within(buf []byte) func(b []byte) bool {
	lo := uintptr(unsafe.Pointer(unsafe.SliceData(buf)))
	hi := lo + uintptr(len(buf))
	return func(b []byte) bool {
		p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
		return p >= lo && p < hi
	}
}

// Lookup returns the ring index of a held id, for Unchanged and ReleaseAt.
func (t *Tracker) Lookup(id uint32) (uint32, bool) {
	if t.head != t.tail {
		// Fast path: packets mostly come back in order.
		if e := t.at(t.head); e.id == id && !e.done {
			return t.head, true
		}
	}
	return t.find(id)
}

// Unchanged reports whether pkt is what was handed over for the packet at
// ring index i (from Lookup): byte for byte while its bytes are in the
// buffer, else by length and hash. Packets added with Add never are.
func (t *Tracker) Unchanged(i uint32, pkt []byte) bool {
	e := t.at(i)
	if e.orig != nil {
		return bytes.Equal(pkt, e.orig)
	}
	return e.n != 0 && uint32(len(pkt)) == e.n && maphash.Bytes(trackSeed, pkt) == e.sum
}

// Sealed reports whether the held packet id was sealed (its bytes let go
// of, a hash kept), and whether id is held.
func (t *Tracker) Sealed(id uint32) (sealed, ok bool) {
	i, ok := t.Lookup(id)
	if !ok {
		return false, false
	}
	return t.at(i).orig == nil, true
}

// ReleaseAt forgets the held packet at ring index i (from Lookup).
func (t *Tracker) ReleaseAt(i uint32) {
	e := t.at(i)
	e.done = true
	e.orig = nil
	t.live--
	t.trim()
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
	i, ok := t.Lookup(id)
	if !ok {
		return false
	}
	t.ReleaseAt(i)
	return true
}

func (t *Tracker) trim() {
	for t.head != t.tail && t.at(t.head).done {
		t.head++
	}
	if t.head == t.tail {
		// Empty: start again at the front of the ring, whose entries are
		// still in the cache when a program sends every batch back before
		// it receives the next.
		t.head, t.tail, t.sealed = 0, 0, 0
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
	t.ReleaseAt(t.head)
}
