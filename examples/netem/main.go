// Command netem impairs the packets a filter matches, like clumsy on
// Windows or Linux's netem qdisc, on every OS divert runs on: delay with
// jitter, loss, duplication, reordering, a rate limit (token bucket) and
// tampering (payload bytes flipped, checksums fixed). A statistics line runs
// on stderr; at exit it draws a histogram of the delay each packet got.
//
//	sudo netem -filter "outbound and tcp.DstPort == 443" -delay 100ms -jitter 20ms -loss 1
//	sudo netem -filter "icmp" -rate 64kbit -duration 30s
//
// Ctrl-C stops it: held packets are sent at once and the handle's rules are
// removed.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"time"

	"github.com/netdivert/divert"
	"github.com/netdivert/divert/examples/internal/exutil"
)

const prog = "netem"

// config is the command line.
type config struct {
	exutil.HandleFlags // -filter, -layer, -priority
	delay              time.Duration
	jitter             time.Duration
	loss               float64 // percent
	dup                float64 // percent
	dupCount           int
	reorder            float64 // percent
	reorderGap         time.Duration
	rate               float64 // bytes per second; 0 = unlimited
	burst              int     // bytes
	tamper             float64 // percent
	queue              int     // most packets held at once
	count              uint64
	duration           time.Duration
	seed               uint64
	quiet              bool
	json               bool
	interval           time.Duration
}

func parseFlags(args []string) (*config, error) {
	fs := flag.NewFlagSet(prog, flag.ContinueOnError)
	c := &config{}
	c.Register(fs, "icmp", "WinDivert filter selecting the packets to impair", "handle priority, -30000..30000")
	fs.DurationVar(&c.delay, "delay", 0, "delay every packet by this much")
	fs.DurationVar(&c.jitter, "jitter", 0, "add a uniformly random -jitter..+jitter to the delay")
	fs.Float64Var(&c.loss, "loss", 0, "drop this percentage of packets")
	fs.Float64Var(&c.dup, "dup", 0, "duplicate this percentage of packets")
	fs.IntVar(&c.dupCount, "dup-count", 1, "extra copies of a duplicated packet")
	fs.Float64Var(&c.reorder, "reorder", 0, "hold this percentage of packets back by -reorder-gap so later ones overtake them")
	fs.DurationVar(&c.reorderGap, "reorder-gap", 20*time.Millisecond, "extra delay of a reordered packet")
	rate := fs.String("rate", "", "rate limit, e.g. 512kbit, 10mbit, 100kB (per second); empty = none")
	fs.IntVar(&c.burst, "burst", 0, "token bucket size in bytes (0 = one MTU's worth, 1500)")
	fs.Float64Var(&c.tamper, "tamper", 0, "flip payload bytes of this percentage of packets (checksums are fixed)")
	fs.IntVar(&c.queue, "queue", 1024, "most packets held at once; more are dropped")
	fs.Uint64Var(&c.count, "count", 0, "stop after this many packets (0 = no limit)")
	fs.DurationVar(&c.duration, "duration", 0, "stop after this long (0 = until Ctrl-C)")
	fs.Uint64Var(&c.seed, "seed", 0, "random seed (0 = from the clock)")
	fs.BoolVar(&c.quiet, "quiet", false, "no statistics line")
	fs.BoolVar(&c.json, "json", false, "print the final statistics as JSON on stdout")
	fs.DurationVar(&c.interval, "interval", time.Second, "statistics line update interval")
	if err := exutil.ParseArgs(fs, args); err != nil {
		return nil, err
	}
	if err := c.HandleFlags.Parse(); err != nil {
		return nil, err
	}
	var err error
	if c.rate, err = parseRate(*rate); err != nil {
		return nil, err
	}
	for _, p := range []struct {
		name string
		v    float64
	}{{"loss", c.loss}, {"dup", c.dup}, {"reorder", c.reorder}, {"tamper", c.tamper}} {
		if p.v < 0 || p.v > 100 || p.v != p.v {
			return nil, fmt.Errorf("-%s %v is not a percentage 0..100", p.name, p.v)
		}
	}
	switch {
	case c.delay < 0 || c.jitter < 0 || c.reorderGap < 0:
		return nil, errors.New("-delay, -jitter and -reorder-gap must not be negative")
	case c.dupCount < 1 || c.dupCount > 16:
		return nil, fmt.Errorf("-dup-count %d outside 1..16", c.dupCount)
	case c.queue < 1 || c.queue > divert.QueueLengthMax:
		return nil, fmt.Errorf("-queue %d outside 1..%d", c.queue, divert.QueueLengthMax)
	case c.burst < 0:
		return nil, errors.New("-burst must not be negative")
	case c.interval <= 0:
		return nil, errors.New("-interval must be positive")
	}
	if c.burst == 0 {
		c.burst = 1500
	}
	if c.seed == 0 {
		c.seed = uint64(time.Now().UnixNano())
	}
	if hold := c.maxHold(); hold > maxQueueTime-queueMargin {
		return nil, fmt.Errorf("-delay + -jitter (+ -reorder-gap with -reorder) = %v: a packet can be held at most %v", hold, maxQueueTime-queueMargin)
	}
	return c, nil
}

const (
	maxQueueTime = divert.QueueTimeMax * time.Millisecond
	// queueMargin is kept between the longest hold and the handle's
	// ParamQueueTime so that a held packet is sent before the backend
	// gives up on it.
	queueMargin = 500 * time.Millisecond
)

// maxHold is the longest a packet is held for delay, jitter and reordering
// (the rate limit adds to it; packets it would hold past the queue time are
// dropped). The reorder gap counts only when packets are reordered.
func (c *config) maxHold() time.Duration {
	h := c.delay + c.jitter
	if c.reorder > 0 {
		h += c.reorderGap
	}
	return h
}

// queueTime is the ParamQueueTime (ms) the handle needs.
func (c *config) queueTime() uint64 {
	need := c.maxHold() + queueMargin
	if c.rate > 0 {
		need = maxQueueTime // the rate limit may hold packets up to the limit
	}
	ms := uint64(need / time.Millisecond)
	return min(max(ms, divert.QueueTimeDefault), divert.QueueTimeMax)
}

func main() {
	c, err := parseFlags(os.Args[1:])
	exutil.CheckFlags(prog, err)
	exutil.Run(prog, c.duration, func(ctx context.Context) error { return run(ctx, c, os.Stdout, os.Stderr) })
}

func run(ctx context.Context, c *config, out, errw io.Writer) error {
	h, err := divert.Open(c.Filter, c.Layer, c.Priority, 0)
	if err != nil {
		return fmt.Errorf("open filter %q: %w", c.Filter, err)
	}
	defer h.Close()
	if err := h.SetParam(divert.ParamQueueTime, c.queueTime()); err != nil {
		return fmt.Errorf("set queue time: %w", err)
	}
	if ql := uint64(c.queue) + 256; ql > divert.QueueLengthDefault {
		if err := h.SetParam(divert.ParamQueueLength, min(ql, divert.QueueLengthMax)); err != nil {
			return fmt.Errorf("set queue length: %w", err)
		}
	}
	fmt.Fprintf(errw, "%s: impairing %q; Ctrl-C stops\n", prog, c.Filter)
	e := newEmulator(c, h)
	stopStatus := func() {}
	if !c.quiet {
		stopStatus = exutil.NewStatusLine(os.Stderr).Start(context.Background(), c.interval, e.statusLine)
	}
	err = e.run(ctx)
	stopStatus()
	s := e.summary()
	if c.json {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		enc.Encode(s)
	} else {
		s.print(errw)
	}
	return err
}

// rng is the emulator's randomness: a seeded PCG, used from the receive
// goroutine only.
type rng struct{ r *rand.Rand }

func newRNG(seed uint64) rng { return rng{rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))} }

// chance reports true with probability pct percent.
func (r rng) chance(pct float64) bool { return pct > 0 && r.r.Float64()*100 < pct }
