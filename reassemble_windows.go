package divert

// FlagReassemble on Windows.
//
// WinDivert hands over inbound datagrams at LayerNetwork already reassembled
// (FlagFragments, exclusive with FlagReassemble, would turn that off), but
// outbound packets and everything at LayerNetworkForward come as the
// fragments they are. With FlagReassemble every received packet goes
// through an internal/reassembly Reassembler: packets that are not fragments
// (the inbound datagrams the driver reassembled among them) come through
// untouched, fragments are held until their datagram is complete, and the
// datagram is returned instead. A fragment taken by WinDivert is already out
// of the stack, so holding it is just not sending it.
//
// Held fragments follow ParamQueueTime: a datagram whose first fragment was
// received longer ago than the queue time is dropped with what was held of
// it (checked on every received packet). Fragments the reassembler refuses
// (overlaps, tiny TCP fragments, inconsistent lengths, too many fragments,
// fragments of a datagram already refused, ...) are dropped, as the host's
// own reassembly would drop them. A packet that cannot be parsed and is not
// recognisably a fragment is handed over as it is.
//
// Send of a reassembled datagram (an Address Recv filled for it, Outbound
// as received) that is larger than the largest of the fragments it came in
// splits it again at that size with the datagram's identification, and
// injects the fragments with one WinDivertSendEx (more only beyond BatchMax
// fragments). The driver computes the checksums an Address's clear bits
// ask for on every packet it injects, but a fragment's TCP or UDP checksum
// it leaves alone (it covers the whole datagram; WinDivertHelperCalcChecksums
// skips it when MF or the offset is set), so those of a datagram the
// program changed are computed here before it is split, as on Linux.
// Changed means that its bytes hash otherwise than those Recv handed over
// (sysAddr.dsum); one sent back unchanged goes as it came, the sender's
// checksums included. A copy of the Address with Outbound reversed
// describes an answer, a new packet (see Handle.Send): it goes whole, as
// any new packet, and the driver computes its checksums.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/maphash"
	"time"

	"github.com/netdivert/divert/internal/packet"
	"github.com/netdivert/divert/internal/reassembly"
	"github.com/netdivert/divert/internal/windivert"
)

// reasmTimeout is the Reassembler's own timeout: the longest queue time.
// Shorter queue times are applied by expiring at a time shifted forward by
// the difference (see expireHeld), so SetParam(ParamQueueTime) takes effect
// at once, also for the fragments already held.
const reasmTimeout = QueueTimeMax * time.Millisecond

// winReasm is the state of FlagReassemble; receive fields are guarded by
// the backend's recvMu, send fields by its sendMu.
type winReasm struct {
	r *reassembly.Reassembler

	// receive side
	dbuf []byte // a completed datagram, before it is copied out
	info reassembly.Info
	one  [1]Message

	// send side
	fbuf   []byte   // fragments of one datagram, back to back
	cbuf   []byte   // a changed datagram whose checksums Send computes
	frags  [][]byte // views of fbuf
	sbuf   []byte   // a whole SendEx buffer
	saddrs []windivert.RawAddr
	owner  []int // message index of each item of saddrs
	ilens  []int // length of each item of saddrs
}

func newWinReasm() *winReasm {
	return &winReasm{
		r:      reassembly.New(reassembly.Config{Timeout: reasmTimeout}),
		dbuf:   make([]byte, 0, MTUMax),
		frags:  make([][]byte, 0, BatchMax),
		saddrs: make([]windivert.RawAddr, 0, BatchMax),
		owner:  make([]int, 0, BatchMax),
		ilens:  make([]int, 0, BatchMax),
	}
}

// expireHeld drops the held datagrams whose first fragment came more than
// the queue time before now.
func (b *winBackend) expireHeld(now time.Time) {
	qt := time.Duration(b.queueTime.Load())
	if n := b.reasm.r.Expire(now.Add(reasmTimeout - qt)); n > 0 {
		b.expired.Add(uint64(n))
	}
}

// recvReassembled is recv with FlagReassemble.
func (b *winBackend) recvReassembled(p []byte, a *Address) (int, error) {
	m := &b.reasm.one[0]
	m.Buf = p
	n, err := b.recvBatchReassembled(b.reasm.one[:])
	m.Buf = nil
	if n == 0 {
		return 0, err
	}
	*a = m.Addr
	return m.N, err
}

// recvBatchReassembled is recvBatch with FlagReassemble: it receives raw
// batches until at least one whole datagram (or non-fragment) comes out of
// the reassembler. recvMu is held.
func (b *winBackend) recvBatchReassembled(ms []Message) (int, error) {
	total := 0
	for i := range ms {
		if len(ms[i].Buf) == 0 {
			ms = ms[:i] // an empty Buf ends the batch (RecvBatch; packets only here)
			break
		}
		total += len(ms[i].Buf)
	}
	// At least MTUMax, so that the driver never truncates a fragment.
	total = min(max(total, MTUMax), BatchMax*MTUMax)
	if cap(b.rbuf) < total {
		b.rbuf = make([]byte, total)
	}
	buf := b.rbuf[:total]
	layer := uint8(b.layer)
	for {
		n, c, err := b.recvRaw(buf, b.raddrs[:len(ms)])
		if err != nil && windivert.Code(err) != windivert.ErrorInsufficientBuffer {
			return 0, err
		}
		if c < 1 || c > len(ms) {
			return 0, fmt.Errorf("divert: recv: driver returned %d addresses", c)
		}
		if !windivert.Split(buf, n, c, layer, b.lens[:c]) {
			return 0, fmt.Errorf("divert: recv: cannot split a batch of %d items in %d bytes", c, n)
		}
		now := time.Now()
		b.expireHeld(now)
		out, off, trunc := 0, 0, false
		for i := 0; i < c; i++ {
			pkt := buf[off : off+b.lens[i]]
			off += b.lens[i]
			m := &ms[out]
			decodeAddr(&b.raddrs[i], &m.Addr)
			if m.Addr.Outbound && !m.Addr.IPChecksum {
				// Checksum offload: the stack left the IPv4 header
				// checksum to the NIC; the reassembler checks it.
				fixIPv4HeaderChecksum(pkt)
			}
			d, done, rerr := b.reasm.r.AddInfo(b.reasm.dbuf[:0], pkt, now, &b.reasm.info)
			switch {
			case errors.Is(rerr, reassembly.ErrMalformed) && !isFragment(pkt):
				d = pkt // not parsable, not a fragment: the caller decides
			case rerr != nil, !done:
				continue // refused (dropped) or held
			}
			if in := &b.reasm.info; in.Fragmented {
				m.Addr.sys = sysAddr{reassembled: true, out: m.Addr.Outbound, id: in.ID,
					fragLen: uint32(in.MaxFragLen), fragDF: in.DF, dsum: maphash.Bytes(dgramSeed, d)}
				if d[0]>>4 == 4 {
					m.Addr.IPChecksum = true // the reassembler recomputed it
				}
			}
			m.N = copy(m.Buf, d)
			trunc = trunc || m.N < len(d)
			out++
		}
		if out > 0 {
			if trunc {
				return out, ErrTruncated
			}
			return out, nil
		}
		// Every packet was a fragment held or dropped: wait for more.
	}
}

// fixIPv4HeaderChecksum recomputes, in place, the header checksum of an
// IPv4 fragment; other packets are left alone.
func fixIPv4HeaderChecksum(p []byte) {
	if len(p) < 20 || p[0]>>4 != 4 || binary.BigEndian.Uint16(p[6:8])&0x3FFF == 0 {
		return
	}
	hl := int(p[0]&0x0F) * 4
	if hl < 20 || hl > len(p) {
		return
	}
	p[10], p[11] = 0, 0
	binary.BigEndian.PutUint16(p[10:12], ^packet.Checksum(p[:hl], 0))
}

// isFragment reports whether p says it is an IP fragment: IPv4 with MF set
// or a fragment offset, IPv6 with a Fragment header in its chain (as far as
// the chain can be followed).
func isFragment(p []byte) bool {
	if len(p) == 0 {
		return false
	}
	switch p[0] >> 4 {
	case 4:
		return len(p) >= 8 && binary.BigEndian.Uint16(p[6:8])&0x3FFF != 0
	case 6:
		if len(p) < 40 {
			return false
		}
		nh, off := p[6], 40
		for {
			switch {
			case nh == 44:
				return true
			case (nh == 0 && off == 40) || nh == 43 || nh == 60:
				if off+2 > len(p) {
					return false
				}
				nh = p[off]
				off += (int(p[off+1]) + 1) * 8
			default:
				return false
			}
		}
	}
	return false
}

// refragment returns the packets that Send injects for p with a: the
// fragments of a reassembled datagram larger than the largest one it came
// in, cut at that size with its identification into the send state's
// fragment buffer; else p alone. A copy of its Address with Outbound
// reversed describes a new packet, an answer, which goes whole: the
// fragment size and identification are the received datagram's, not the
// answer's. A datagram the program changed gets the checksums a's clear
// bits ask for computed first (in a copy): the driver computes a clear
// bit's checksum on every packet it injects, but no TCP or UDP checksum of
// a fragment, which lacks the rest of its datagram. One sent back
// unchanged goes as it came. sendMu is held.
func (b *winBackend) refragment(p []byte, a *Address) ([][]byte, error) {
	r := b.reasm
	s := &a.sys
	if !s.reassembled || a.Outbound != s.out || len(p) <= int(s.fragLen) {
		r.frags = append(r.frags[:0], p)
		return r.frags, nil
	}
	if l, err := ipPacketLen(p); err == nil {
		p = p[:l] // checked by Send: bytes past the IP length are left out
	}
	if !(a.IPChecksum && a.TCPChecksum && a.UDPChecksum) && maphash.Bytes(dgramSeed, p) != s.dsum {
		r.cbuf = append(r.cbuf[:0], p...)
		p = r.cbuf
		_ = CalcChecksums(p, nil, unfinished(a))
	}
	cut := reassembly.Fragment
	if s.fragDF {
		cut = reassembly.FragmentDF // it came as DF fragments of that size
	}
	frags, err := cut(r.fbuf[:0], r.frags[:0], p, int(s.fragLen), s.id)
	if cap(frags) > cap(r.frags) {
		r.frags = frags[:0] // keep what Fragment grew
	}
	if err != nil {
		if errors.Is(err, reassembly.ErrDontFragment) {
			return nil, fmt.Errorf("divert: send: reassembled datagram of %d bytes is larger than the %d-byte fragments it came in and has DF set; clear DF to let it be refragmented: %w",
				len(p), s.fragLen, err)
		}
		return nil, fmt.Errorf("divert: send: cannot refragment the %d-byte reassembled datagram at %d bytes: %w", len(p), s.fragLen, err)
	}
	if len(frags) > 1 && cap(frags[0]) > cap(r.fbuf) {
		r.fbuf = frags[0][:0:cap(frags[0])] // keep what Fragment grew
	}
	return frags, nil
}

// sendReassembled is send with FlagReassemble.
func (b *winBackend) sendReassembled(p []byte, a *Address) (int, error) {
	b.sendMu.Lock()
	defer b.sendMu.Unlock()
	frags, err := b.refragment(p, a)
	if err != nil {
		return 0, err
	}
	if len(frags) == 1 {
		encodeAddr(&b.saddrs[0], a, b.layer)
		n, err := b.h.SendEx(frags[0], b.saddrs[:1])
		if err != nil {
			return 0, b.mapError("send", err)
		}
		return n, nil
	}
	r := b.reasm
	r.resetItems()
	r.appendItems(a, b.layer, 0, frags)
	// The fragments lie back to back in fbuf.
	n := 0
	for _, f := range frags {
		n += len(f)
	}
	if _, err := b.sendChunks(frags[0][:n]); err != nil {
		return 0, err
	}
	return len(p), nil
}

// sendBatchReassembled is sendBatch with FlagReassemble.
func (b *winBackend) sendBatchReassembled(ms []Message) (int, error) {
	valid, verr := validBatch(ms) // as sendBatch: the driver cuts by IP length
	if valid == 0 {
		return 0, verr
	}
	ms = ms[:valid]
	b.sendMu.Lock()
	defer b.sendMu.Unlock()
	r := b.reasm
	r.resetItems()
	for i := range ms {
		frags, err := b.refragment(ms[i].Buf[:ms[i].N], &ms[i].Addr)
		if err != nil {
			if i > 0 {
				// Send what came before, so that the count is right.
				sent, serr := b.sendChunks(r.sbuf)
				if serr != nil {
					return sent, serr
				}
			}
			return i, fmt.Errorf("divert: message %d: %w", i, err)
		}
		for _, f := range frags {
			r.sbuf = append(r.sbuf, f...)
		}
		r.appendItems(&ms[i].Addr, b.layer, i, frags)
	}
	n, err := b.sendChunks(r.sbuf)
	if err == nil {
		err = verr
	}
	return n, err
}

// appendItems appends count copies of a, encoded, owned by message msg,
// for the packets frags.
func (r *winReasm) appendItems(a *Address, layer Layer, msg int, frags [][]byte) {
	var raw windivert.RawAddr
	encodeAddr(&raw, a, layer)
	for _, f := range frags {
		r.saddrs = append(r.saddrs, raw)
		r.owner = append(r.owner, msg)
		r.ilens = append(r.ilens, len(f))
	}
}

// resetItems empties the send state.
func (r *winReasm) resetItems() {
	r.sbuf = r.sbuf[:0]
	r.saddrs = r.saddrs[:0]
	r.owner = r.owner[:0]
	r.ilens = r.ilens[:0]
}

// sendChunks injects the items of buf (lengths r.ilens, addresses r.saddrs)
// with as few WinDivertSendEx calls as BatchMax allows (one, up to BatchMax
// items). It returns how many messages were sent whole (r.owner[i] is the
// message of item i); a message split across two calls of which the second
// failed counts as not sent. A packet the driver could not inject does not
// stop the others (see softSendError): the messages count as sent, and the
// error is returned after the last call.
func (b *winBackend) sendChunks(buf []byte) (int, error) {
	r := b.reasm
	if len(r.saddrs) == 0 {
		return 0, nil
	}
	off := 0
	var soft error
	for start := 0; start < len(r.saddrs); {
		end := min(start+BatchMax, len(r.saddrs))
		n := 0
		for _, l := range r.ilens[start:end] {
			n += l
		}
		if _, err := b.h.SendEx(buf[off:off+n], r.saddrs[start:end]); err != nil {
			if !softSendError(err) {
				return r.owner[start], b.mapError("send", err)
			}
			if soft == nil {
				soft = fmt.Errorf("divert: send: %w, the others were: %w", errNotInjected, b.mapError("send", err))
			}
		}
		off += n
		start = end
	}
	return r.owner[len(r.owner)-1] + 1, soft
}
