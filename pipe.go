package divert

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/netdivert/divert/filter"
)

// Pipe is the far side of a Handle made by NewPipe: a divert handle backed by
// memory instead of an OS, for testing code above the OS layer on any OS and
// without privileges. The test plays the network stack: Deliver offers the
// handle a packet as if the stack met it, and Next reads what continued on
// the path — packets the filter did not take, sniffed originals, and
// everything the handle sent (reinjected or injected).
//
// The handle behaves as on a real OS where the semantics are portable: the
// filter is WinDivert's, evaluated in user space; FlagSniff hands over a
// copy; FlagDrop drops what matches; ParamQueueLength bounds the queue (a
// full queue drops the oldest packet, as WinDivert does); a received packet
// that is neither sent nor dropped within ParamQueueTime is dropped, and so
// is a queued packet left unread that long; Close puts still-queued packets
// back on the path. As on Linux, Send and Drop clear the Address they are
// given: sending it again injects a new packet, and a copy of it taken
// before names a packet that is gone (an error). FlagFragments,
// FlagReassemble, FlagPassThrough, FlagFailOpen and FlagNoInstall are
// accepted and change nothing (fragments are handed over as delivered, and
// a full queue drops the oldest, as WinDivert's). After
// Shutdown(ShutdownRecv) Recv returns ErrShutdown once the queue is empty
// at every layer, LayerReflect included.
type Pipe struct {
	f      *filter.Filter
	layer  Layer
	flags  Flag
	mu     sync.Mutex
	cond   *sync.Cond // signalled when queue or path changes, or on close/shutdown
	queue  []pipePacket
	path   []pipePacket
	held   map[uint64]pipeHeld // received, not yet sent or dropped
	id     uint64              // this Pipe's number, in the high 32 bits of its references
	serial uint32
	pst    PipeStats
	hst    Stats // the handle's view (Handle.Stats)
	qlen   int
	qtime  time.Duration
	dl     time.Time
	shut   bool
	closed bool
	timer  *time.Timer
}

// PipeStats counts what happened to the packets a Pipe saw.
type PipeStats struct {
	Delivered uint64 // packets offered with Deliver
	Passed    uint64 // went on unseen: the filter did not match
	Queued    uint64 // queued for the handle
	Dropped   uint64 // dropped: FlagDrop, Drop, queue overflow or QueueTime expiry
	Sent      uint64 // sent by the handle (reinjected or new)
}

type pipeHeld struct {
	at   time.Time
	data []byte // as handed over, to tell an unchanged packet
}

type pipePacket struct {
	data []byte
	addr Address
	at   time.Time // when it was queued (the handle's queue only)
}

// pipeIDs numbers the Pipes, so that an Address received from one is a
// new packet to another, as a handle's own serial tells them apart on the
// OSes.
var pipeIDs atomic.Uint32

// NewPipe returns a Handle at layer that diverts what filter matches from a
// Pipe instead of from the OS, and that Pipe.
func NewPipe(filterText string, layer Layer, flags Flag) (*Handle, *Pipe, error) {
	cfg, err := prepare(filterText, layer, 0, flags, false)
	if err != nil {
		return nil, nil, err
	}
	p := &Pipe{
		f: cfg.filter, layer: layer, flags: flags,
		held: make(map[uint64]pipeHeld),
		id:   uint64(pipeIDs.Add(1)) << 32,
		qlen: QueueLengthDefault, qtime: QueueTimeDefault * time.Millisecond,
	}
	p.cond = sync.NewCond(&p.mu)
	h := &Handle{b: p, layer: layer, flags: flags,
		params: [3]uint64{QueueLengthDefault, QueueTimeDefault, QueueSizeDefault}}
	return h, p, nil
}

// Deliver offers the handle a packet as if the network stack met it, with
// a describing it (Outbound, IfIdx, Loopback, ...). It reports whether the
// handle took the packet out of the path (false: it went on, see Next). At
// the network layers pkt must be one whole IPv4 or IPv6 packet, its length
// field equal to len(pkt), as the stack's packets are; others are refused.
func (p *Pipe) Deliver(pkt []byte, a Address) (taken bool, err error) {
	if carriesPackets(p.layer) {
		l, err := ipPacketLen(pkt)
		if err == nil && l != len(pkt) {
			err = fmt.Errorf("%d bytes past the IP length %d", len(pkt)-l, l)
		}
		if err != nil {
			return false, fmt.Errorf("divert: pipe: Deliver: not a whole packet: %w", err)
		}
	}
	a.Layer = p.layer
	a.IPv6 = len(pkt) > 0 && pkt[0]>>4 == 6
	a.Sniffed = false // the pipe sets it for its copies
	a.pipe = 0        // an Address received from a handle names its packet there
	meta := a.Meta()
	match, err := p.f.Eval(pkt, &meta)
	if err != nil {
		return false, fmt.Errorf("divert: pipe: %w", err)
	}
	data := append([]byte(nil), pkt...)
	p.mu.Lock()
	defer p.mu.Unlock()
	defer p.cond.Broadcast()
	p.pst.Delivered++
	if p.closed {
		return false, errClosed
	}
	p.expireLocked(time.Now())
	switch {
	case !match || p.shut:
		p.pst.Passed++
		p.hst.Passed++
		p.path = append(p.path, pipePacket{data: data, addr: a})
		return false, nil
	case p.flags&FlagDrop != 0:
		p.pst.Dropped++
		return true, nil
	case p.flags&FlagSniff != 0:
		p.path = append(p.path, pipePacket{data: data, addr: a})
		a.Sniffed = true
		taken = false
	default:
		taken = true
	}
	if len(p.queue) >= p.qlen {
		p.queue = p.queue[1:] // the oldest goes, as in WinDivert
		p.pst.Dropped++
		p.hst.Overflows++
	}
	p.pst.Queued++
	p.queue = append(p.queue, pipePacket{data, a, time.Now()})
	return taken, nil
}

// Next returns the next packet that continued on the path, waiting up to
// timeout. ok is false when none came in time.
func (p *Pipe) Next(timeout time.Duration) (pkt []byte, a Address, ok bool) {
	deadline := time.Now().Add(timeout)
	t := time.AfterFunc(timeout, func() { p.mu.Lock(); p.cond.Broadcast(); p.mu.Unlock() })
	defer t.Stop()
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.path) == 0 {
		if !time.Now().Before(deadline) {
			return nil, Address{}, false
		}
		p.cond.Wait()
	}
	x := p.path[0]
	p.path = p.path[1:]
	return x.data, x.addr, true
}

// Stats returns the counters.
func (p *Pipe) Stats() PipeStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pst
}

// stats is the handle's view of the counters: Passed are the packets the
// filter did not take (or that came after Shutdown), Overflows the packets
// a full queue pushed out, Expired the received packets neither sent nor
// dropped within ParamQueueTime, and the queued packets left unread that
// long (as the OSes drain them), counted when the pipe next looks: at its
// next call or here. The kernel counters stay 0.
func (p *Pipe) stats() (Stats, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.closed {
		p.expireLocked(time.Now())
	}
	return p.hst, nil
}

// expireLocked drops the received packets held and the queued packets
// left unread for ParamQueueTime or longer. It runs whenever the pipe is
// used, so a packet expires no later than the next call that could see it.
func (p *Pipe) expireLocked(now time.Time) {
	for id, h := range p.held {
		if now.Sub(h.at) >= p.qtime {
			delete(p.held, id)
			p.pst.Dropped++
			p.hst.Expired++
		}
	}
	k := 0
	for k < len(p.queue) && now.Sub(p.queue[k].at) >= p.qtime {
		k++
	}
	if k > 0 {
		p.queue = p.queue[k:]
		p.pst.Dropped += uint64(k)
		p.hst.Expired += uint64(k)
	}
}

func (p *Pipe) recv(b []byte, a *Address) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.recvLocked(b, a)
}

// recvLocked takes the next packet, waiting for one. A read deadline that
// has passed fails the call even with packets queued, as Go's deadlines
// do; after Shutdown the queue drains whatever the deadline. Called with
// p.mu held.
func (p *Pipe) recvLocked(b []byte, a *Address) (int, error) {
	for {
		now := time.Now()
		switch {
		case p.closed:
			return 0, errClosed
		case !p.shut && !p.dl.IsZero() && !now.Before(p.dl):
			return 0, fmt.Errorf("divert: recv: %w", os.ErrDeadlineExceeded)
		}
		p.expireLocked(now)
		if len(p.queue) > 0 {
			return p.takeLocked(b, a)
		}
		if p.shut {
			return 0, ErrShutdown
		}
		p.cond.Wait()
	}
}

// takeLocked hands over the oldest queued packet, cut to b with
// ErrTruncated when b is short. Called with p.mu held and the queue not
// empty.
func (p *Pipe) takeLocked(b []byte, a *Address) (int, error) {
	x := p.queue[0]
	p.queue = p.queue[1:]
	p.serial++
	p.hst.Received++
	*a = x.addr
	if !a.Sniffed {
		// A sniffed copy holds nothing: sending it is an injection, as on
		// the OSes.
		a.pipe = p.id | uint64(p.serial&^pipeOutBit)
		if a.Outbound {
			a.pipe |= pipeOutBit
		}
		p.held[a.pipe] = pipeHeld{time.Now(), x.data}
	}
	n := copy(b, x.data)
	if n < len(x.data) {
		return n, ErrTruncated
	}
	return n, nil
}

// pipeOutBit, in a reference, is the Outbound the packet was received
// with.
const pipeOutBit = 1 << 31

// own reports whether a names a packet this Pipe handed over (held or not
// any more), its direction unchanged: as on the OSes, a copy whose
// Outbound was flipped describes a new packet (see Handle.Send).
func (p *Pipe) own(a *Address) bool {
	return a.pipe != 0 && a.pipe&^0xFFFFFFFF == p.id && (a.pipe&pipeOutBit != 0) == a.Outbound
}

// recvBatch waits for the first packet only, then takes what is queued,
// all under one lock: a concurrent reader cannot take a packet between
// the check and the take.
func (p *Pipe) recvBatch(ms []Message) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n, err := p.recvLocked(ms[0].Buf, &ms[0].Addr)
	if err != nil && !errors.Is(err, ErrTruncated) {
		return 0, err
	}
	ms[0].N = n
	k := 1
	for ; k < len(ms) && len(p.queue) > 0 && (len(ms[k].Buf) > 0 || !carriesPackets(p.layer)); k++ { // an empty Buf ends a batch of packets
		m, rerr := p.takeLocked(ms[k].Buf, &ms[k].Addr)
		ms[k].N = m
		if rerr != nil && err == nil {
			err = rerr // ErrTruncated, the only error with a packet queued
		}
	}
	return k, err
}

func (p *Pipe) send(b []byte, a *Address) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	defer p.cond.Broadcast()
	if p.closed {
		return 0, errClosed
	}
	p.expireLocked(time.Now())
	// Another Pipe's Address, like a fresh one, injects a new packet.
	mine := p.own(a)
	var h pipeHeld
	if mine {
		var ok bool
		if h, ok = p.held[a.pipe]; !ok {
			return 0, errNoLongerQueued
		}
	}
	// As on Linux: a packet sent back unchanged is the stack's own; others
	// must be whole, and a refused held packet stays held.
	if !mine || !bytes.Equal(b, h.data) {
		var err error
		if b, err = sendable(b); err != nil {
			return 0, err
		}
	}
	if mine {
		delete(p.held, a.pipe)
	}
	out := *a
	out.pipe = 0
	p.path = append(p.path, pipePacket{data: append([]byte(nil), b...), addr: out})
	p.pst.Sent++
	p.hst.Sent++
	if mine {
		a.pipe = 0 // sent: the Address now names no queued packet, as on Linux
	} else {
		p.hst.Injected++
	}
	return len(b), nil
}

var errNoLongerQueued = fmt.Errorf("%w: pipe (expired, or sent or dropped through a copy of its Address)", ErrNotQueued)

func (p *Pipe) sendBatch(ms []Message) (int, error) {
	for i := range ms {
		if _, err := p.send(ms[i].Buf[:ms[i].N], &ms[i].Addr); err != nil {
			return i, err
		}
	}
	return len(ms), nil
}

func (p *Pipe) drop(a *Address) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return errClosed
	}
	p.expireLocked(time.Now())
	if p.own(a) {
		if _, ok := p.held[a.pipe]; !ok {
			return errNoLongerQueued
		}
		delete(p.held, a.pipe)
		p.pst.Dropped++
		p.hst.Dropped++
		a.pipe = 0
	}
	return nil
}

func (p *Pipe) shutdown(how ShutdownHow) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if how&ShutdownRecv != 0 {
		p.shut = true
		p.cond.Broadcast()
	}
	return nil
}

func (p *Pipe) close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for _, x := range p.queue { // reinjected, as WinDivert does on close
		if !x.addr.Sniffed {
			p.path = append(p.path, x)
		}
	}
	p.queue = nil
	if p.timer != nil {
		p.timer.Stop()
	}
	p.cond.Broadcast()
	return nil
}

func (p *Pipe) setParam(param Param, v uint64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch param {
	case ParamQueueLength:
		p.qlen = int(v)
	case ParamQueueTime:
		p.qtime = time.Duration(v) * time.Millisecond
	}
	return nil
}

func (p *Pipe) setReadDeadline(t time.Time) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.dl = t
	if p.timer != nil {
		p.timer.Stop()
	}
	if !t.IsZero() {
		p.timer = time.AfterFunc(time.Until(t), func() { p.mu.Lock(); p.cond.Broadcast(); p.mu.Unlock() })
	}
	p.cond.Broadcast()
	return nil
}

func (p *Pipe) version() (uint64, uint64) { return 2, 2 }
