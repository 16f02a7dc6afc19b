package main

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/netdivert/divert"
	"github.com/netdivert/divert/examples/internal/exutil"
)

// held is a packet the emulator holds until due.
type held struct {
	buf    []byte // slot buffer; the packet is buf[:n]
	n      int
	addr   divert.Address
	fresh  bool // a duplicate: injected as a new packet, not a reinjection
	recvAt time.Time
	due    time.Time
	seq    uint64 // keeps equal due times in arrival order
	index  int
}

// schedule is a min-heap of held packets by due time.
type schedule []*held

func (s schedule) Len() int { return len(s) }
func (s schedule) Less(i, j int) bool {
	if s[i].due.Equal(s[j].due) {
		return s[i].seq < s[j].seq
	}
	return s[i].due.Before(s[j].due)
}
func (s schedule) Swap(i, j int) { s[i], s[j] = s[j], s[i]; s[i].index = i; s[j].index = j }
func (s *schedule) Push(x any)   { p := x.(*held); p.index = len(*s); *s = append(*s, p) }
func (s *schedule) Pop() any {
	old := *s
	p := old[len(old)-1]
	old[len(old)-1] = nil
	*s = old[:len(old)-1]
	return p
}
func (s schedule) peek() *held { return s[0] }
func (s schedule) empty() bool { return len(s) == 0 }

// slotSize is the buffer every slot starts with; a larger packet grows its
// slot once and the slot keeps the larger buffer.
const slotSize = 2048

// counters are the emulator's statistics, updated atomically so the status
// line can read them from another goroutine.
type counters struct {
	packets, bytes         atomic.Uint64
	in, out                atomic.Uint64
	dropped, queueDrops    atomic.Uint64
	delayed, holding       atomic.Uint64
	duplicated, tampered   atomic.Uint64
	reordered, rateLimited atomic.Uint64
	sent, sendErrors       atomic.Uint64
}

// emulator receives packets from a handle, decides their fate and sends
// them back when due.
type emulator struct {
	c    *config
	h    *divert.Handle
	rng  rng
	rate bucket
	cnt  counters
	hist histogram // guarded by mu

	mu    sync.Mutex
	sched schedule
	// sending counts the packets taken off sched and not yet sent: while
	// any is, a new packet must not overtake it (see handle).
	sending int
	free    []*held
	// sendPkt is h.Send; tests replace it to pause the scheduler.
	sendPkt func([]byte, *divert.Address) (int, error)
	seq     uint64
	wake    chan struct{}
	meter   exutil.Meter
	start   time.Time
}

func newEmulator(c *config, h *divert.Handle) *emulator {
	e := &emulator{
		c:     c,
		h:     h,
		rng:   newRNG(c.seed),
		rate:  newBucket(c.rate, c.burst),
		wake:  make(chan struct{}, 1),
		sched: make(schedule, 0, c.queue),
		free:  make([]*held, 0, c.queue),
		start: time.Now(),
	}
	for range c.queue {
		e.free = append(e.free, &held{buf: make([]byte, slotSize)})
	}
	e.sendPkt = h.Send
	return e
}

// get takes a free slot able to hold n bytes, or nil when all are in use.
// Called with mu held.
func (e *emulator) get(n int) *held {
	if len(e.free) == 0 {
		return nil
	}
	p := e.free[len(e.free)-1]
	e.free = e.free[:len(e.free)-1]
	if cap(p.buf) < n {
		p.buf = make([]byte, n)
	}
	p.n, p.fresh = n, false
	return p
}

// run receives until ctx is done or c.count packets were received, then
// sends everything still held at once.
func (e *emulator) run(ctx context.Context) error {
	loopDone := exutil.StopOnDone(ctx, e.h, 2*time.Second)
	schedDone := make(chan struct{})
	schedCtx, stopSched := context.WithCancel(context.Background())
	go func() { defer close(schedDone); e.scheduler(schedCtx) }()

	err := e.receive(ctx)
	loopDone()
	stopSched()
	<-schedDone
	e.flush()
	return err
}

func (e *emulator) receive(ctx context.Context) error {
	buf := make([]byte, divert.MTUMax)
	var addr divert.Address
	for e.c.count == 0 || e.cnt.packets.Load() < e.c.count {
		n, err := e.h.Recv(buf, &addr)
		if err != nil {
			if exutil.Stopped(err) && ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("receive: %w", err)
		}
		now := time.Now()
		e.cnt.packets.Add(1)
		e.cnt.bytes.Add(uint64(n))
		if addr.Outbound {
			e.cnt.out.Add(1)
		} else {
			e.cnt.in.Add(1)
		}
		if err := e.handle(buf[:n], &addr, now); err != nil {
			if exutil.Stopped(err) {
				return nil
			}
			return err
		}
	}
	return nil
}

// handle decides the fate of one received packet.
func (e *emulator) handle(pkt []byte, addr *divert.Address, now time.Time) error {
	c := e.c
	if e.rng.chance(c.loss) {
		e.cnt.dropped.Add(1)
		return e.h.Drop(addr)
	}
	if e.rng.chance(c.tamper) && tamper(pkt, addr, e.rng) {
		e.cnt.tampered.Add(1)
	}
	d := c.delay
	if c.jitter > 0 {
		d += time.Duration(e.rng.r.Int64N(int64(2*c.jitter)+1)) - c.jitter
		d = max(d, 0)
	}
	if e.rng.chance(c.reorder) {
		d += c.reorderGap
		e.cnt.reordered.Add(1)
	}
	dups := 0
	if e.rng.chance(c.dup) {
		dups = c.dupCount
	}

	e.mu.Lock()
	// A packet dropped below takes no share of the rate: the bucket is
	// charged only for packets that are sent or held.
	bucket := e.rate
	due := e.rate.depart(now.Add(d), len(pkt))
	limited := due.After(now.Add(d))
	if due.Sub(now) > time.Duration(c.queueTime())*time.Millisecond-queueMargin {
		// The rate limit would hold it past the queue time: a full queue.
		e.rate = bucket
		e.mu.Unlock()
		e.cnt.queueDrops.Add(1)
		return e.h.Drop(addr)
	}
	// Sent at once only when nothing received before it is waiting: not
	// in the schedule, nor being sent by the scheduler.
	immediate := !due.After(now) && e.sched.empty() && e.sending == 0
	var err error
	if immediate {
		e.mu.Unlock()
		if err = e.send(pkt, addr, now); err != nil {
			return err
		}
		e.mu.Lock()
	} else if !e.hold(pkt, addr, false, now, due) {
		e.rate = bucket
		e.mu.Unlock()
		e.cnt.queueDrops.Add(1)
		return e.h.Drop(addr)
	}
	if limited {
		e.cnt.rateLimited.Add(1)
	}
	for range dups {
		if e.hold(pkt, addr, true, now, due) {
			e.cnt.duplicated.Add(1)
		} else {
			e.cnt.queueDrops.Add(1)
		}
	}
	e.mu.Unlock()
	if !immediate || dups > 0 {
		select {
		case e.wake <- struct{}{}:
		default:
		}
	}
	return nil
}

// hold copies pkt into a slot due at due. Called with mu held.
func (e *emulator) hold(pkt []byte, addr *divert.Address, fresh bool, now, due time.Time) bool {
	p := e.get(len(pkt))
	if p == nil {
		return false
	}
	copy(p.buf, pkt)
	if fresh {
		// A new packet: only what Send reads for injection, no reference
		// to the queued original. A received packet's checksums may be
		// unfinished (offload: the address's checksum flags are clear); a
		// new packet must carry valid ones, so compute them.
		p.addr = divert.Address{
			Layer: addr.Layer, Outbound: addr.Outbound, IPv6: addr.IPv6, Loopback: addr.Loopback,
			IfIdx: addr.IfIdx, SubIfIdx: addr.SubIfIdx,
		}
		divert.CalcChecksums(p.buf[:p.n], &p.addr, 0)
	} else {
		p.addr = *addr
		e.cnt.delayed.Add(1)
	}
	p.fresh, p.recvAt, p.due = fresh, now, due
	e.seq++
	p.seq = e.seq
	heap.Push(&e.sched, p)
	e.cnt.holding.Add(1)
	return true
}

// send sends one packet and records how long it was held.
func (e *emulator) send(pkt []byte, addr *divert.Address, recvAt time.Time) error {
	_, err := e.sendPkt(pkt, addr)
	if err != nil {
		if exutil.Stopped(err) {
			return err
		}
		e.cnt.sendErrors.Add(1)
		return nil
	}
	e.cnt.sent.Add(1)
	e.mu.Lock()
	e.hist.add(time.Since(recvAt))
	e.mu.Unlock()
	return nil
}

// scheduler sends held packets when they are due.
func (e *emulator) scheduler(ctx context.Context) {
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	for {
		e.mu.Lock()
		var wait time.Duration = -1
		for !e.sched.empty() {
			p := e.sched.peek()
			if d := time.Until(p.due); d > 0 {
				wait = d
				break
			}
			heap.Pop(&e.sched)
			e.sending++
			e.mu.Unlock()
			err := e.send(p.buf[:p.n], &p.addr, p.recvAt)
			e.mu.Lock()
			e.sending--
			e.cnt.holding.Add(^uint64(0))
			e.free = append(e.free, p)
			if err != nil && errors.Is(err, divert.ErrShutdown) {
				// Sending is shut down: nothing more can leave.
				break
			}
		}
		e.mu.Unlock()
		if wait < 0 {
			wait = time.Hour
		}
		t.Reset(wait)
		select {
		case <-ctx.Done():
			return
		case <-e.wake:
		case <-t.C:
		}
	}
}

// flush sends every held packet at once (at exit).
func (e *emulator) flush() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for !e.sched.empty() {
		p := heap.Pop(&e.sched).(*held)
		e.sending++
		e.mu.Unlock()
		e.send(p.buf[:p.n], &p.addr, p.recvAt)
		e.mu.Lock()
		e.sending--
		e.cnt.holding.Add(^uint64(0))
		e.free = append(e.free, p)
	}
}

func (e *emulator) statusLine() string {
	pk, by := e.cnt.packets.Load(), e.cnt.bytes.Load()
	e.mu.Lock()
	pps, bps := e.meter.Rate(time.Now(), pk, by)
	e.mu.Unlock()
	return fmt.Sprintf("packets %d (in %d out %d)  bytes %s  rate %.0f pkt/s %s  dropped %d  delayed %d (holding %d)  dup %d  tampered %d",
		pk, e.cnt.in.Load(), e.cnt.out.Load(), exutil.Bytes(by), pps, exutil.BitRate(bps),
		e.cnt.dropped.Load()+e.cnt.queueDrops.Load(), e.cnt.delayed.Load(), e.cnt.holding.Load(),
		e.cnt.duplicated.Load(), e.cnt.tampered.Load())
}
