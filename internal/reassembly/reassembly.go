// Package reassembly reassembles IPv4 and IPv6 fragments into whole datagrams
// and splits datagrams back into fragments. It is pure Go, allocation-free in
// steady state, and hardened against the classic fragment attacks:
//
//   - IPv6 overlapping fragments drop the whole datagram (RFC 5722); IPv4
//     overlaps follow Config.IPv4Overlap (by default the same, as Linux has
//     done since 4.19 / CVE-2018-5391).
//   - Exact duplicates (same offset, same length, same bytes) are ignored, as
//     RFC 8200 §4.5 allows; a "duplicate" with different bytes is an overlap.
//   - An IPv6 first fragment must hold the whole header chain through the
//     upper-layer header (RFC 7112); the minimum upper-layer header is 20
//     bytes for TCP, 12 for SCTP, 8 for UDP, UDP-Lite, ICMPv6 and ESP, 0 for
//     No Next Header, 1 for anything else (Linux's ipv6frag_thdr_truncated).
//   - IPv4 TCP tiny fragments are refused (RFC 1858): a fragment at offset 8
//     (fragment offset field 1) and a first fragment holding fewer than the 20
//     bytes of a minimal TCP header.
//   - IPv6 atomic fragments (offset 0, M clear; RFC 6946) are returned at once,
//     unchanged, without touching the reassembly state.
//   - Fragments with M/MF set whose length is not a multiple of 8, empty
//     fragments, last fragments that disagree on the datagram's length, data
//     beyond the end, and datagrams that would exceed 65535 bytes (IPv4 total
//     length, IPv6 payload length) are refused.
//   - ECN codepoints are combined as RFC 3168 §5.3 asks and Linux does
//     (ip_frag_ecn_table): the reassembled datagram is marked CE when any
//     fragment was and the others were ECN-capable, and fragments that mix
//     Not-ECT with ECT or CE drop the datagram (ErrECN).
//   - Each datagram has a timeout counted from its first fragment (by default
//     30 s for IPv4, Linux's ipfrag_time, and 60 s for IPv6 as RFC 8200 says),
//     and memory is bounded by Config.MaxBytes and Config.MaxDatagrams with
//     oldest-first eviction: whatever arrives, the buffers held never exceed
//     MaxBytes.
//
// Only fragments are validated: a packet that is not a fragment is returned
// as it is, whatever it holds. A Reassembler is safe for concurrent use; one
// per handle (or per direction) is the intended use. In steady state Add
// allocates nothing: datagram buffers come from a pool of six size classes
// (2 KiB to 64 KiB) bounded by MaxBytes, and the result is written into the
// caller's buffer.
//
// A refusal drops everything held for that datagram (when the fragment could
// be keyed) and returns one of the package's sentinel errors, so errors.Is
// tells the reason. No error allocates. A datagram dropped that way is
// remembered, without its data, until its timeout, and its later fragments
// are refused with ErrDiscarded: RFC 5722 requires discarding "any
// constituent fragments, including those not yet received". Running out of
// memory (ErrMemory) is not held against a datagram that way.
//
// Keying follows the RFCs: IPv4 (source, destination, protocol,
// identification); IPv6 (source, destination, identification) per RFC 8200.
// The IPv4 header of the reassembled datagram is the first fragment's (options
// included) with the total length fixed, MF and the offset cleared, the
// reserved bit kept as the first fragment had it, DF set when the largest
// fragment had it and clear otherwise (as Linux's ip_frag_reasm decides, so
// that a datagram that came as DF fragments is refragmented with DF: see
// Info.DF and FragmentDF), CE set when the ECN rules above say so, and the
// checksum recomputed. The IPv6 datagram is the
// first fragment's per-fragment headers with the Fragment header removed, the
// next-header chain and the payload length fixed, and CE set the same way.
package reassembly

import (
	"bytes"
	"encoding/binary"
	"errors"
	"sync"
	"time"

	"github.com/netdivert/divert/internal/packet"
)

// Errors returned by Add and Fragment. Every refusal wraps (is) exactly one of them.
var (
	// ErrMalformed reports a packet whose IP header cannot be parsed: too
	// short, a bad version, inconsistent lengths, a truncated extension header
	// chain or fragment, or (IPv4) a bad header checksum. Such a packet is
	// refused before it is matched to a datagram: what is held for its
	// datagram stays (the other refusals discard it).
	ErrMalformed = errors.New("reassembly: malformed packet")
	// ErrBadLength reports an empty fragment, or a fragment with more
	// fragments to come whose length is not a multiple of 8.
	ErrBadLength = errors.New("reassembly: bad fragment length")
	// ErrOverlap reports a fragment overlapping data already held with
	// different bounds or different bytes.
	ErrOverlap = errors.New("reassembly: overlapping fragment")
	// ErrTinyFragment reports an IPv4 TCP tiny-fragment attack (RFC 1858).
	ErrTinyFragment = errors.New("reassembly: tiny TCP fragment")
	// ErrHeaderChain reports an IPv6 first fragment that does not hold the
	// whole header chain through the upper-layer header (RFC 7112).
	ErrHeaderChain = errors.New("reassembly: first fragment lacks the header chain")
	// ErrInconsistent reports fragments that disagree on the datagram's
	// length (two different last fragments, or data beyond the last one).
	ErrInconsistent = errors.New("reassembly: inconsistent fragment lengths")
	// ErrTooBig reports a datagram that would exceed 65535 bytes.
	ErrTooBig = errors.New("reassembly: datagram too big")
	// ErrTooManyFragments reports a datagram split into more than
	// Config.MaxFragments pieces.
	ErrTooManyFragments = errors.New("reassembly: too many fragments")
	// ErrMemory reports a datagram that alone does not fit in Config.MaxBytes.
	ErrMemory = errors.New("reassembly: datagram exceeds the memory bound")
	// ErrECN reports fragments that mix the Not-ECT codepoint with ECT or
	// CE ones, a datagram RFC 3168 §5.3 says to drop (as Linux does).
	ErrECN = errors.New("reassembly: fragments mix ECN-capable and not ECN-capable codepoints")
	// ErrDiscarded reports a fragment of a datagram that was discarded
	// because one of its fragments was refused; it is refused until that
	// datagram's timeout.
	ErrDiscarded = errors.New("reassembly: fragment of a discarded datagram")
	// ErrDontFragment is returned by Fragment for an IPv4 datagram with DF set
	// that is larger than the MTU.
	ErrDontFragment = errors.New("reassembly: datagram larger than MTU has DF set")
	// ErrMTU is returned by Fragment when the MTU leaves no room for a
	// fragment's data (at least 8 bytes, and the first fragment must hold the
	// headers Add requires of it).
	ErrMTU = errors.New("reassembly: MTU too small to fragment")
	// ErrFragmented is returned by Fragment for an IPv6 packet that already
	// has a Fragment header.
	ErrFragmented = errors.New("reassembly: IPv6 packet is already a fragment")
)

// OverlapPolicy says what Add does with IPv4 fragments that overlap data
// already held (with different bounds or different bytes). IPv6 overlaps
// always drop the datagram (RFC 5722).
type OverlapPolicy uint8

const (
	// OverlapDrop drops the whole datagram and returns ErrOverlap, as IPv6
	// must and as Linux does for IPv4 since 4.19. This is the default.
	OverlapDrop OverlapPolicy = iota
	// OverlapFirstWins keeps the bytes that arrived first and fills only the
	// holes with a later fragment's bytes ("favour old"): a later fragment can
	// never rewrite what was already accepted, so it cannot change a
	// transport header that was inspected. It never drops for an overlap.
	OverlapFirstWins
)

// String returns the policy's name.
func (p OverlapPolicy) String() string {
	switch p {
	case OverlapDrop:
		return "drop"
	case OverlapFirstWins:
		return "first-wins"
	}
	return "OverlapPolicy(?)"
}

// Defaults for zero (or negative) Config fields.
const (
	DefaultTimeoutIPv4  = 30 * time.Second
	DefaultTimeoutIPv6  = 60 * time.Second
	DefaultMaxBytes     = 4 << 20
	DefaultMaxDatagrams = 1024
	DefaultMaxFragments = 128
)

// Config bounds a Reassembler. The zero value gives the defaults.
type Config struct {
	// Timeout is how long a datagram may wait for its missing fragments,
	// counted from its first fragment. Zero means DefaultTimeoutIPv4 for
	// IPv4 and DefaultTimeoutIPv6 for IPv6; otherwise it applies to both.
	Timeout time.Duration
	// MaxBytes bounds the buffer memory the Reassembler owns: the buffers of
	// pending datagrams plus the free buffers it keeps for reuse. When a new
	// fragment needs more, free buffers are released first, then the oldest
	// pending datagrams are dropped. A datagram that alone needs more is
	// refused with ErrMemory. Zero means DefaultMaxBytes. Buffers come in
	// sizes from 2 KiB up to 65575 bytes, so values below 64 KiB refuse
	// large datagrams. A datagram's data is placed at its offsets in one
	// buffer, so a pending datagram holds a buffer sized by the highest
	// offset it has seen (not by the bytes received): a fragment at offset
	// 60000 costs a 64 KiB buffer.
	MaxBytes int
	// MaxDatagrams bounds the number of pending datagrams; a new one beyond
	// it drops the oldest. Zero means DefaultMaxDatagrams.
	MaxDatagrams int
	// MaxFragments bounds the pieces one datagram may be split into (the
	// BSDs' maxfragsperpacket). Zero means DefaultMaxFragments.
	MaxFragments int
	// IPv4Overlap is the IPv4 overlap policy; the zero value is OverlapDrop.
	IPv4Overlap OverlapPolicy
	// SkipIPv4Checksum accepts IPv4 fragments whose header checksum is
	// wrong. By default they are refused with ErrMalformed, as the host's
	// stack would drop them.
	SkipIPv4Checksum bool
	// OnEvict, when set, is called with the key of every pending datagram
	// dropped to respect MaxBytes or MaxDatagrams, so that a caller holding
	// the datagram's fragments elsewhere (a queue) can let go of them at
	// once. It runs inside Add, with the Reassembler locked: it must not
	// call the Reassembler.
	OnEvict func(Key)
}

// Key identifies a datagram: the addresses (an IPv4 address in the first
// 4 bytes), the identification (IPv4's 16 bits, or the IPv6 Fragment
// header's 32) and, for IPv4, the protocol.
type Key struct {
	Src, Dst [16]byte
	ID       uint32
	Proto    uint8 // IPv4 only
	V6       bool
}

// Stats is a snapshot of a Reassembler's state and counters.
type Stats struct {
	Pending     int // datagrams being reassembled
	Discarded   int // refused datagrams remembered until their timeout (their fragments get ErrDiscarded)
	HeldBytes   int // buffer bytes held by pending datagrams
	PooledBytes int // free buffer bytes kept for reuse; HeldBytes+PooledBytes <= MaxBytes

	Fragments  uint64 // fragments accepted and held (duplicates not counted)
	Duplicates uint64 // exact duplicate fragments ignored (and, with OverlapFirstWins, fully covered ones)
	Completed  uint64 // datagrams reassembled and returned
	Atomic     uint64 // IPv6 atomic fragments returned as they are
	Timeouts   uint64 // pending datagrams dropped because their timeout passed
	Evicted    uint64 // pending datagrams dropped to respect MaxBytes or MaxDatagrams
	Dropped    uint64 // pending datagrams dropped because one of their fragments was refused

	// Packets refused by Add, by reason.
	RejectedMalformed    uint64
	RejectedBadLength    uint64
	RejectedOverlap      uint64
	RejectedTiny         uint64
	RejectedHeaderChain  uint64
	RejectedInconsistent uint64
	RejectedTooBig       uint64
	RejectedTooMany      uint64
	RejectedMemory       uint64
	RejectedECN          uint64
	RejectedDiscarded    uint64
}

// Info describes what Add returned, so that a reassembled datagram can be
// refragmented the way it came: Fragment(dst, frags, datagram, info.MaxFragLen, info.ID).
type Info struct {
	// Fragmented is set when the datagram was reassembled from fragments.
	Fragmented bool
	// Atomic is set for an IPv6 atomic fragment returned as it is.
	Atomic bool
	// ID is the identification: IPv4's 16 bits, or the IPv6 Fragment header's 32.
	ID uint32
	// Fragments is how many fragments made the datagram (duplicates not counted).
	Fragments int
	// MaxFragLen is the length of the largest fragment received (whole IP
	// packet), the size the sender fragmented to.
	MaxFragLen int
	// DF is set for an IPv4 datagram whose largest fragment had DF set
	// (the datagram has DF set then): Linux forwards such a datagram it
	// reassembled as fragments of at most MaxFragLen bytes, each with DF,
	// and refuses (ICMP fragmentation needed) to cut it smaller. FragmentDF
	// does the former.
	DF bool
	// Duplicate is set, with done false and no error, for a fragment that
	// brought nothing new: an exact duplicate of one held (or, with
	// OverlapFirstWins, one whose data is all held already). A caller that
	// holds the fragments elsewhere (a queue) can let go of this one at
	// once, as a kernel frees a duplicate at once.
	Duplicate bool
}

// span is a range [lo, hi) of fragment data held.
type span struct{ lo, hi int32 }

type key struct {
	src, dst [16]byte
	id       uint32
	proto    uint8 // IPv4 only
	v6       bool
}

const nilIdx = -1

type entry struct {
	key      key
	buf      []byte // pooled; header area buf[:area], data buf[area:]
	class    int8   // pool class of buf
	v6       bool
	dead     bool // discarded after a refusal; no data, kept until the deadline
	area     int  // size of the header area; data byte i lives at buf[area+i]
	hdrLen   int  // first fragment's header length (0 until it arrives)
	prevNH   int  // IPv6: offset in the header of the next-header byte to fix
	nh       uint8
	ecn      uint8 // the ecnBit of every fragment held, ORed
	total    int   // data length once the last fragment arrived, else -1
	have     int   // data bytes held
	extent   int   // highest data end held
	nfrags   int
	maxFrag  int
	maxDF    int // IPv4: length of the largest fragment with DF set
	ranges   []span
	deadline time.Time
	seq      uint64
	prev     int32
	next     int32
}

type list struct{ head, tail int32 }

// Reassembler reassembles fragments. It is safe for concurrent use.
type Reassembler struct {
	mu       sync.Mutex
	timeout4 time.Duration
	timeout6 time.Duration
	maxBytes int
	maxDgram int
	maxFrags int
	overlap  OverlapPolicy
	skipCsum bool
	onEvict  func(Key)

	index map[key]int32
	slab  []entry
	free  []int32
	lists [2]list // by creation order: [0] IPv4, [1] IPv6
	seq   uint64

	pool   [numClasses][][]byte
	held   int
	pooled int
	dead   int // discarded entries in index

	st Stats

	// The completing fragment's data, copied by add into dst only.
	tail    []byte
	tailOff int
	dup     bool // place found the fragment a duplicate
}

// SetTimeout sets how long a datagram may take to complete, for both
// families, from its first fragment on; datagrams begun before keep the
// timeout they began with. A d of 0 or less leaves it unchanged.
func (r *Reassembler) SetTimeout(d time.Duration) {
	if d <= 0 {
		return
	}
	r.mu.Lock()
	r.timeout4, r.timeout6 = d, d
	r.mu.Unlock()
}

// New returns a Reassembler bounded by cfg.
func New(cfg Config) *Reassembler {
	r := &Reassembler{
		timeout4: DefaultTimeoutIPv4,
		timeout6: DefaultTimeoutIPv6,
		maxBytes: DefaultMaxBytes,
		maxDgram: DefaultMaxDatagrams,
		maxFrags: DefaultMaxFragments,
		overlap:  cfg.IPv4Overlap,
		skipCsum: cfg.SkipIPv4Checksum,
		onEvict:  cfg.OnEvict,
	}
	if cfg.Timeout > 0 {
		r.timeout4, r.timeout6 = cfg.Timeout, cfg.Timeout
	}
	if cfg.MaxBytes > 0 {
		r.maxBytes = cfg.MaxBytes
	}
	if cfg.MaxDatagrams > 0 {
		r.maxDgram = cfg.MaxDatagrams
	}
	if cfg.MaxFragments > 0 {
		r.maxFrags = cfg.MaxFragments
	}
	r.index = make(map[key]int32, min(r.maxDgram, 256))
	r.lists[0] = list{nilIdx, nilIdx}
	r.lists[1] = list{nilIdx, nilIdx}
	return r
}

// Add takes one IP packet. A packet that is not a fragment (and an IPv6
// atomic fragment) comes back as it is: datagram is pkt, done is true. A
// fragment is copied and held (done false, nil error) until its datagram is
// complete; then the reassembled datagram is written into dst (grown only
// when its capacity is too small) and returned with done true. An error says
// why the packet was refused; what was held for its datagram is dropped. The
// packet is never retained: the caller may reuse pkt at once.
func (r *Reassembler) Add(dst, pkt []byte, now time.Time) (datagram []byte, done bool, err error) {
	return r.AddInfo(dst, pkt, now, nil)
}

// AddInfo is Add that also fills info (when not nil) with what is needed to
// refragment the datagram the way it came.
func (r *Reassembler) AddInfo(dst, pkt []byte, now time.Time, info *Info) (datagram []byte, done bool, err error) {
	if info != nil {
		*info = Info{}
	}
	if len(pkt) == 0 {
		r.reject(ErrMalformed)
		return nil, false, ErrMalformed
	}
	switch pkt[0] >> 4 {
	case 4:
		return r.add4(dst, pkt, now, info)
	case 6:
		return r.add6(dst, pkt, now, info)
	}
	r.reject(ErrMalformed)
	return nil, false, ErrMalformed
}

func (r *Reassembler) reject(err error) {
	r.mu.Lock()
	r.countReject(err)
	r.mu.Unlock()
}

func (r *Reassembler) countReject(err error) {
	switch err {
	case ErrMalformed:
		r.st.RejectedMalformed++
	case ErrBadLength:
		r.st.RejectedBadLength++
	case ErrOverlap:
		r.st.RejectedOverlap++
	case ErrTinyFragment:
		r.st.RejectedTiny++
	case ErrHeaderChain:
		r.st.RejectedHeaderChain++
	case ErrInconsistent:
		r.st.RejectedInconsistent++
	case ErrTooBig:
		r.st.RejectedTooBig++
	case ErrTooManyFragments:
		r.st.RejectedTooMany++
	case ErrMemory:
		r.st.RejectedMemory++
	case ErrECN:
		r.st.RejectedECN++
	case ErrDiscarded:
		r.st.RejectedDiscarded++
	}
}

// frag is one parsed fragment.
type frag struct {
	key    key
	hdr    []byte // per-fragment headers (IPv4 header; IPv6 header through the header before the Fragment header)
	data   []byte // fragment data
	off    int    // data offset in the datagram
	more   bool   // MF / M
	plen   int    // whole packet length (for MaxFragLen)
	prevNH int    // IPv6: offset in hdr of the next-header byte that said 44
	nh     uint8  // IPv6: the Fragment header's next header
	ecn    uint8  // ecnBit of its ECN codepoint
	df     bool   // IPv4: DF set
	id     uint32
}

// The ECN codepoints seen in a datagram's fragments, one bit each, as
// Linux's IPFRAG_ECN_* flags: bit 1<<codepoint.
const (
	ecnNotECT = 1 << 0
	ecnCE     = 1 << 3
	ecnECT    = 1<<1 | 1<<2 // ECT(1), ECT(0)
)

// ecnCombine applies RFC 3168 §5.3 to the ORed bits of a datagram's
// fragments: it returns the codepoint to OR into the reassembled header
// (3, CE, when a fragment had CE and the others ECT; else 0), and ok false
// when Not-ECT is mixed with ECT or CE, a datagram to drop. Linux's
// ip_frag_ecn_table says the same.
func ecnCombine(bits uint8) (or uint8, ok bool) {
	switch {
	case bits&ecnNotECT != 0 && bits&^ecnNotECT != 0:
		return 0, false
	case bits&ecnCE != 0 && bits&ecnECT != 0:
		return 3, true
	}
	return 0, true
}

const (
	protoTCP    = 6
	protoUDP    = 17
	protoFrag6  = 44
	protoICMP6  = 58
	maxDatagram = 0xFFFF
)

func (r *Reassembler) add4(dst, pkt []byte, now time.Time, info *Info) ([]byte, bool, error) {
	if len(pkt) < 20 {
		r.reject(ErrMalformed)
		return nil, false, ErrMalformed
	}
	fo := binary.BigEndian.Uint16(pkt[6:8])
	if fo&0x3FFF == 0 {
		return pkt, true, nil
	}
	hl := int(pkt[0]&0x0F) * 4
	tl := int(binary.BigEndian.Uint16(pkt[2:4]))
	if hl < 20 || tl < hl || tl > len(pkt) || (!r.skipCsum && packet.Checksum(pkt[:hl], 0) != 0xFFFF) {
		r.reject(ErrMalformed)
		return nil, false, ErrMalformed
	}
	f := frag{
		hdr:  pkt[:hl],
		data: pkt[hl:tl],
		off:  int(fo&0x1FFF) * 8,
		more: fo&0x2000 != 0,
		plen: tl,
		ecn:  1 << (pkt[1] & 3),
		df:   fo&0x4000 != 0,
		id:   uint32(binary.BigEndian.Uint16(pkt[4:6])),
	}
	f.key.id = f.id
	f.key.proto = pkt[9]
	copy(f.key.src[:4], pkt[12:16])
	copy(f.key.dst[:4], pkt[16:20])
	var err error
	switch n := len(f.data); {
	case n == 0 || (f.more && n%8 != 0):
		err = ErrBadLength
	case f.key.proto == protoTCP && (f.off == 8 || (f.off == 0 && n < 20)):
		err = ErrTinyFragment
	case hl+f.off+n > maxDatagram:
		err = ErrTooBig
	}
	return r.add(dst, &f, err, now, info)
}

func (r *Reassembler) add6(dst, pkt []byte, now time.Time, info *Info) ([]byte, bool, error) {
	if len(pkt) < 40 {
		r.reject(ErrMalformed)
		return nil, false, ErrMalformed
	}
	end := len(pkt)
	plen := int(binary.BigEndian.Uint16(pkt[4:6]))
	truncated := false
	if plen != 0 {
		if 40+plen <= end {
			end = 40 + plen
		} else {
			truncated = true
		}
	}
	nh, off, prev := pkt[6], 40, 6
	for nh != protoFrag6 {
		switch {
		case nh == 0 && off == 40, nh == 43, nh == 60:
			if off+2 > end {
				r.reject(ErrMalformed)
				return nil, false, ErrMalformed
			}
			prev = off
			nh = pkt[off]
			off += (int(pkt[off+1]) + 1) * 8
		default:
			return pkt, true, nil // not a fragment
		}
	}
	if off+8 > end || plen == 0 || truncated {
		r.reject(ErrMalformed)
		return nil, false, ErrMalformed
	}
	fo := binary.BigEndian.Uint16(pkt[off+2 : off+4])
	f := frag{
		hdr:    pkt[:off],
		data:   pkt[off+8 : end],
		off:    int(fo &^ 7),
		more:   fo&1 != 0,
		plen:   end,
		prevNH: prev,
		nh:     pkt[off],
		ecn:    1 << (pkt[1] >> 4 & 3),
		id:     binary.BigEndian.Uint32(pkt[off+4 : off+8]),
	}
	if f.off == 0 && !f.more {
		// Atomic fragment (RFC 6946): a whole datagram, processed in isolation.
		r.mu.Lock()
		r.st.Atomic++
		r.mu.Unlock()
		if info != nil {
			info.Atomic = true
			info.ID = f.id
			info.Fragments = 1
			info.MaxFragLen = end
		}
		return pkt, true, nil
	}
	f.key.v6 = true
	f.key.id = f.id
	copy(f.key.src[:], pkt[8:24])
	copy(f.key.dst[:], pkt[24:40])
	var err error
	switch n := len(f.data); {
	case n == 0 || (f.more && n%8 != 0):
		err = ErrBadLength
	case off-40+f.off+n > maxDatagram:
		err = ErrTooBig
	case f.off == 0 && !headerChainComplete(f.nh, f.data):
		err = ErrHeaderChain
	}
	return r.add(dst, &f, err, now, info)
}

// headerChainComplete reports whether b, the start of an IPv6 first
// fragment's fragmentable part whose first header is nh, holds every
// extension header and the upper-layer header (RFC 7112).
func headerChainComplete(nh uint8, b []byte) bool {
	off := 0
	for {
		switch nh {
		case 0, 43, 44, 60, 135, 139, 140: // extension headers in the (len+1)*8 format
			if off+2 > len(b) {
				return false
			}
			l := (int(b[off+1]) + 1) * 8
			if nh == 44 {
				l = 8
			}
			nh = b[off]
			off += l
		case 51: // AH: (len+2)*4
			if off+2 > len(b) {
				return false
			}
			nh = b[off]
			off += (int(b[off+1]) + 2) * 4
		case 59: // No Next Header
			return off <= len(b)
		case protoTCP:
			return off+20 <= len(b)
		case 132: // SCTP
			return off+12 <= len(b)
		case protoUDP, 136, protoICMP6, 50: // UDP, UDP-Lite, ICMPv6, ESP
			return off+8 <= len(b)
		default:
			return off+1 <= len(b)
		}
	}
}

// add holds a parsed fragment; perr is a refusal found while parsing.
func (r *Reassembler) add(dst []byte, f *frag, perr error, now time.Time, info *Info) ([]byte, bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.expireLocked(now)
	r.tail, r.dup = nil, false
	idx, ok := r.index[f.key] // expired datagrams are gone already
	if ok && r.slab[idx].dead {
		r.countReject(ErrDiscarded)
		return nil, false, ErrDiscarded
	}
	if perr != nil {
		return r.refuse(idx, ok, perr)
	}
	if !ok {
		idx = r.create(f, now)
	}
	e := &r.slab[idx]
	if err := r.place(idx, e, f); err != nil {
		return r.refuse(idx, true, err)
	}
	if e.total < 0 || e.have != e.total {
		if info != nil {
			info.Duplicate = r.dup
		}
		return nil, false, nil
	}
	// Complete.
	n := e.hdrLen + e.total
	if (!e.v6 && n > maxDatagram) || (e.v6 && n-40 > maxDatagram) {
		return r.refuse(idx, true, ErrTooBig)
	}
	out := e.buf[e.area-e.hdrLen : e.area+e.total]
	ecn, _ := ecnCombine(e.ecn) // place refused a mix already
	if e.v6 {
		binary.BigEndian.PutUint16(out[4:6], uint16(n-40))
		out[e.prevNH] = e.nh
		out[1] |= ecn << 4
	} else {
		binary.BigEndian.PutUint16(out[2:4], uint16(n))
		out[1] |= ecn
		// Keep RF; DF when the largest fragment had it (Linux's
		// max_df_size == max_size); clear MF and the offset.
		out[6] &= 0x80
		if e.maxDF == e.maxFrag {
			out[6] |= 0x40
		}
		out[7] = 0
		out[10], out[11] = 0, 0
		binary.BigEndian.PutUint16(out[10:12], ^packet.Checksum(out[:e.hdrLen], 0))
	}
	if cap(dst) < n {
		dst = make([]byte, n)
	}
	dst = dst[:n]
	copy(dst, out)
	if r.tail != nil {
		copy(dst[e.hdrLen+r.tailOff:], r.tail)
		r.tail = nil
	}
	if info != nil {
		info.Fragmented = true
		info.ID = e.key.id
		info.Fragments = e.nfrags
		info.MaxFragLen = e.maxFrag
		info.DF = !e.v6 && e.maxDF == e.maxFrag
	}
	r.st.Completed++
	r.release(idx)
	return dst, true, nil
}

func (r *Reassembler) refuse(idx int32, held bool, err error) ([]byte, bool, error) {
	r.tail = nil
	r.countReject(err)
	if held {
		r.st.Dropped++
		e := &r.slab[idx]
		if err == ErrMemory || e.nfrags == 0 {
			r.release(idx)
		} else {
			// Keep the key until the deadline so that later fragments are
			// refused too (RFC 5722); free the data now.
			e.dead = true
			r.dead++
			if e.buf != nil {
				r.putBuf(e.buf, e.class)
				e.buf = nil
			}
			e.ranges = e.ranges[:0]
			e.have, e.extent, e.hdrLen = 0, 0, 0
		}
	}
	return nil, false, err
}

// create makes a pending datagram for f's key.
func (r *Reassembler) create(f *frag, now time.Time) int32 {
	if len(r.index) >= r.maxDgram {
		r.evictOldest(nilIdx)
	}
	var idx int32
	if n := len(r.free); n > 0 {
		idx = r.free[n-1]
		r.free = r.free[:n-1]
	} else {
		r.slab = append(r.slab, entry{})
		idx = int32(len(r.slab) - 1)
	}
	e := &r.slab[idx]
	e.key = f.key
	e.v6 = f.key.v6
	e.class = -1
	e.buf = nil
	e.dead = false
	e.hdrLen, e.prevNH, e.nh, e.ecn = 0, 0, 0, 0
	e.total, e.have, e.extent, e.nfrags, e.maxFrag, e.maxDF = -1, 0, 0, 0, 0, -1
	e.ranges = e.ranges[:0]
	timeout := r.timeout4
	li := 0
	if e.v6 {
		timeout, li = r.timeout6, 1
		// The datagram takes the first fragment's per-fragment headers
		// (RFC 8200 4.5): another fragment's, bigger maybe, must not
		// size the area, which place grows when the first one comes.
		e.area = 40
		if f.off == 0 {
			e.area = len(f.hdr)
		}
	} else {
		e.area = 60
	}
	e.deadline = now.Add(timeout)
	r.seq++
	e.seq = r.seq
	// Append to the family's creation-order list.
	l := &r.lists[li]
	e.prev, e.next = l.tail, nilIdx
	if l.tail != nilIdx {
		r.slab[l.tail].next = idx
	} else {
		l.head = idx
	}
	l.tail = idx
	r.index[f.key] = idx
	return idx
}

// release drops a pending datagram: its buffer goes back to the pool.
func (r *Reassembler) release(idx int32) {
	e := &r.slab[idx]
	li := 0
	if e.v6 {
		li = 1
	}
	l := &r.lists[li]
	if e.prev != nilIdx {
		r.slab[e.prev].next = e.next
	} else {
		l.head = e.next
	}
	if e.next != nilIdx {
		r.slab[e.next].prev = e.prev
	} else {
		l.tail = e.prev
	}
	delete(r.index, e.key)
	if e.dead {
		r.dead--
		e.dead = false
	}
	if e.buf != nil {
		r.putBuf(e.buf, e.class)
		e.buf = nil
	}
	if cap(e.ranges) > 32 {
		e.ranges = nil // keep the bookkeeping kept for reuse small
	}
	r.free = append(r.free, idx)
}

// evictOldest drops the oldest pending datagram other than keep; it reports
// whether there was one.
func (r *Reassembler) evictOldest(keep int32) bool {
	best := int32(nilIdx)
	for li := range r.lists {
		i := r.lists[li].head
		if i == keep && i != nilIdx {
			i = r.slab[i].next
		}
		if i != nilIdx && (best == nilIdx || r.slab[i].seq < r.slab[best].seq) {
			best = i
		}
	}
	if best == nilIdx {
		return false
	}
	if e := &r.slab[best]; !e.dead {
		r.st.Evicted++
		if r.onEvict != nil {
			k := e.key
			r.onEvict(Key{Src: k.src, Dst: k.dst, ID: k.id, Proto: k.proto, V6: k.v6})
		}
	}
	r.release(best)
	return true
}

// Expire drops the datagrams whose timeout has passed at now and returns how
// many (discarded datagrams are forgotten then too, and not counted). Add
// also drops them as it goes, so calling Expire is needed only to release
// memory when no packets come.
func (r *Reassembler) Expire(now time.Time) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.expireLocked(now)
}

func (r *Reassembler) expireLocked(now time.Time) int {
	n := 0
	for li := range r.lists {
		for {
			i := r.lists[li].head
			if i == nilIdx || now.Before(r.slab[i].deadline) {
				break
			}
			if !r.slab[i].dead {
				n++
			}
			r.release(i)
		}
	}
	r.st.Timeouts += uint64(n)
	return n
}

// Stats returns a snapshot of the counters.
func (r *Reassembler) Stats() Stats {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.st
	s.Pending = len(r.index) - r.dead
	s.Discarded = r.dead
	s.HeldBytes = r.held
	s.PooledBytes = r.pooled
	return s
}

// place checks f against the datagram e and copies its data in.
func (r *Reassembler) place(idx int32, e *entry, f *frag) error {
	lo, hi := f.off, f.off+len(f.data)
	last := !f.more
	switch {
	case last && e.total >= 0 && e.total != hi,
		last && e.extent > hi,
		!last && e.total >= 0 && hi > e.total:
		return ErrInconsistent
	}
	area := e.area
	first := lo == 0 && e.hdrLen == 0
	if first && len(f.hdr) > area {
		area = len(f.hdr) // IPv6 only: the header area grows before the header is placed
	}
	ext := max(e.extent, hi)
	if area+ext > maxBuf {
		return ErrTooBig
	}
	want := area + ext
	switch {
	case last: // the length is known: hi
	case e.total >= 0:
		want = area + e.total
	case e.buf == nil:
		want += hi - lo // room for one more fragment like this one
	default:
		want *= 2 // grow geometrically
	}
	if err := r.ensure(idx, e, area, area+ext, min(want, maxBuf)); err != nil {
		return err
	}
	if first {
		copy(e.buf[e.area-len(f.hdr):e.area], f.hdr)
		e.hdrLen = len(f.hdr)
		e.prevNH = f.prevNH
		e.nh = f.nh
	}
	data := e.buf[e.area:]
	// First span ending after lo.
	i, j := 0, len(e.ranges)
	for i < j {
		h := int(uint(i+j) >> 1)
		if int(e.ranges[h].hi) <= lo {
			i = h + 1
		} else {
			j = h
		}
	}
	switch {
	case i == len(e.ranges) || int(e.ranges[i].lo) >= hi: // no overlap
		if len(e.ranges) >= r.maxFrags {
			return ErrTooManyFragments
		}
		if total := e.total; (total >= 0 || last) && e.have+hi-lo == max(total, hi) {
			// This fragment completes the datagram: add copies its data
			// straight into dst.
			r.tail, r.tailOff = f.data, lo
		} else {
			copy(data[lo:hi], f.data)
		}
		e.ranges = append(e.ranges, span{})
		copy(e.ranges[i+1:], e.ranges[i:])
		e.ranges[i] = span{int32(lo), int32(hi)}
		e.have += hi - lo
	case int(e.ranges[i].lo) == lo && int(e.ranges[i].hi) == hi && bytes.Equal(data[lo:hi], f.data):
		r.st.Duplicates++
		r.dup = true
		if last {
			e.total = hi
		}
		return nil
	case e.v6 || r.overlap == OverlapDrop:
		return ErrOverlap
	default: // OverlapFirstWins: fill the holes only.
		added := false
		for cur := lo; cur < hi; {
			if i < len(e.ranges) && int(e.ranges[i].lo) <= cur {
				cur = max(cur, int(e.ranges[i].hi))
				i++
				continue
			}
			end := hi
			if i < len(e.ranges) && int(e.ranges[i].lo) < end {
				end = int(e.ranges[i].lo)
			}
			if len(e.ranges) >= r.maxFrags {
				return ErrTooManyFragments
			}
			copy(data[cur:end], f.data[cur-lo:end-lo])
			e.ranges = append(e.ranges, span{})
			copy(e.ranges[i+1:], e.ranges[i:])
			e.ranges[i] = span{int32(cur), int32(end)}
			i++
			e.have += end - cur
			cur = end
			added = true
		}
		if !added {
			r.st.Duplicates++
			r.dup = true
			if last {
				e.total = hi
			}
			return nil
		}
	}
	e.ecn |= f.ecn
	if _, ok := ecnCombine(e.ecn); !ok {
		return ErrECN
	}
	r.st.Fragments++
	if last {
		e.total = hi
	}
	e.extent = ext
	e.nfrags++
	e.maxFrag = max(e.maxFrag, f.plen)
	if f.df {
		e.maxDF = max(e.maxDF, f.plen)
	}
	return nil
}

// ensure makes e.buf hold a header area of area bytes followed by data, need
// bytes in all, allocating want bytes when it must grow.
func (r *Reassembler) ensure(idx int32, e *entry, area, need, want int) error {
	if e.buf != nil && area == e.area && need <= len(e.buf) {
		return nil
	}
	if e.buf != nil && need <= len(e.buf) {
		// Grow the header area in place (no header placed yet).
		copy(e.buf[area:area+e.extent], e.buf[e.area:e.area+e.extent])
		e.area = area
		return nil
	}
	c := classFor(max(need, want))
	if c < 0 {
		return ErrTooBig
	}
	nb, ok := r.getBuf(c, idx)
	if !ok {
		return ErrMemory
	}
	if e.buf != nil {
		if area == e.area {
			copy(nb, e.buf[:e.area+e.extent])
		} else {
			copy(nb[area:area+e.extent], e.buf[e.area:e.area+e.extent])
		}
		r.putBuf(e.buf, e.class)
	}
	e.buf, e.class, e.area = nb, int8(c), area
	return nil
}
