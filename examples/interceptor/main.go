// Command interceptor is the classic divert example: it takes the packets a
// filter matches out of the host's path, prints each one (direction,
// interface, protocol, addresses and the first 40 bytes in hex) and puts it
// back, or drops it with -drop.
//
//	sudo interceptor -filter "icmp" -count 10
//	sudo interceptor -port 1234          # attach to an administrator's NFQUEUE rule
//	sudo interceptor -demo               # Linux: a self-contained demonstration in namespaces
//
// Ctrl-C stops it; closing the handle removes the rules it installed.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/netdivert/divert"
	"github.com/netdivert/divert/examples/internal/exutil"
)

const prog = "interceptor"

// config is the command line.
type config struct {
	exutil.HandleFlags // -filter, -layer, -priority
	sniff              bool
	drop               bool
	count              uint64
	port               int
	duration           time.Duration
	quiet              bool
	json               bool
	demo               bool
}

func parseFlags(args []string) (*config, error) {
	fs := flag.NewFlagSet(prog, flag.ContinueOnError)
	c := &config{}
	c.Register(fs, "true", "WinDivert filter selecting the packets to intercept", "handle priority, -30000..30000 (higher sees packets first)")
	fs.BoolVar(&c.sniff, "sniff", false, "take copies and leave the packets on their path")
	fs.BoolVar(&c.drop, "drop", false, "drop the packets instead of reinjecting them")
	fs.Uint64Var(&c.count, "count", 0, "stop after this many packets (0 = no limit)")
	fs.IntVar(&c.port, "port", -1, "attach to an existing divert rule (Linux: NFQUEUE queue number, FreeBSD: divert port) instead of installing one; -filter, -layer and -priority are then ignored")
	fs.DurationVar(&c.duration, "duration", 0, "stop after this long (0 = until Ctrl-C)")
	fs.BoolVar(&c.quiet, "quiet", false, "do not print each packet")
	fs.BoolVar(&c.json, "json", false, "print the summary as JSON on stdout")
	fs.BoolVar(&c.demo, "demo", false, "Linux: run a self-contained demonstration in private network namespaces")
	if err := exutil.ParseArgs(fs, args); err != nil {
		return nil, err
	}
	if err := c.HandleFlags.Parse(); err != nil {
		return nil, err
	}
	if c.sniff && c.drop {
		return nil, errors.New("-sniff and -drop exclude each other")
	}
	if c.port > 0xffff {
		return nil, fmt.Errorf("-port %d outside 0..65535", c.port)
	}
	// The demo checks that every packet of its traffic was seen once and
	// reinjected: a count would stop it half way with its traffic held.
	if c.demo && (c.port >= 0 || c.drop || c.sniff || c.count > 0) {
		return nil, errors.New("-demo takes no -port, -drop, -sniff or -count")
	}
	return c, nil
}

func main() {
	c, err := parseFlags(os.Args[1:])
	exutil.CheckFlags(prog, err)
	exutil.Run(prog, c.duration, func(ctx context.Context) error {
		if c.demo {
			return runDemo(ctx, c, os.Stdout)
		}
		return run(ctx, c, os.Stdout)
	})
}

// packetOut is where the packet lines go: out, or stderr when stdout
// carries the JSON summary.
func (c *config) packetOut(out io.Writer) io.Writer {
	if c.json {
		return os.Stderr
	}
	return out
}

// open opens the handle the command line asks for.
func (c *config) open() (*divert.Handle, error) {
	var flags divert.Flag
	if c.sniff {
		flags |= divert.FlagSniff | divert.FlagRecvOnly
	}
	if c.port >= 0 {
		h, err := divert.OpenPort(uint16(c.port), flags)
		if err != nil {
			return nil, fmt.Errorf("attach to port %d: %w", c.port, err)
		}
		return h, nil
	}
	h, err := divert.Open(c.Filter, c.Layer, c.Priority, flags)
	if err != nil {
		return nil, fmt.Errorf("open filter %q: %w", c.Filter, err)
	}
	return h, nil
}

func run(ctx context.Context, c *config, out io.Writer) error {
	h, err := c.open()
	if err != nil {
		return err
	}
	defer h.Close()
	if c.port >= 0 {
		fmt.Fprintf(os.Stderr, "%s: attached to port %d; Ctrl-C stops\n", prog, c.port)
	} else {
		fmt.Fprintf(os.Stderr, "%s: diverting %q at layer %v, priority %d; Ctrl-C stops\n", prog, c.Filter, c.Layer, c.Priority)
	}
	st := newStats()
	stopStatus := func() {}
	if c.quiet && !c.json {
		stopStatus = exutil.NewStatusLine(os.Stderr).Start(ctx, time.Second, st.statusLine)
	}
	err = intercept(ctx, h, c, c.packetOut(out), st)
	stopStatus() // before the summary, which it would otherwise follow
	st.print(out, c.json)
	return err
}

// intercept receives packets from h until ctx is done, c.count packets were
// seen or the handle fails, printing and counting each one.
func intercept(ctx context.Context, h *divert.Handle, c *config, out io.Writer, st *stats) error {
	loopDone := exutil.StopOnDone(ctx, h, 2*time.Second)
	defer loopDone()
	buf := make([]byte, divert.MTUMax)
	var addr divert.Address
	for c.count == 0 || st.seen() < c.count {
		n, err := h.Recv(buf, &addr)
		if err != nil && !errors.Is(err, divert.ErrTruncated) {
			if exutil.Stopped(err) && ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("receive: %w", err)
		}
		pkt := buf[:n]
		p, perr := divert.ParsePacket(pkt)
		if !c.quiet {
			printPacket(out, st.seen()+1, pkt, &addr, &p, perr)
		}
		verdict := vReinjected
		switch {
		case addr.Sniffed || c.sniff:
			verdict = vSniffed
		case c.drop:
			verdict = vDropped
			if err := h.Drop(&addr); err != nil {
				if exutil.Stopped(err) {
					return nil
				}
				return fmt.Errorf("drop: %w", err)
			}
		default:
			if _, err := h.Send(pkt, &addr); err != nil {
				if exutil.Stopped(err) {
					return nil
				}
				fmt.Fprintf(os.Stderr, "%s: reinject: %v\n", prog, err)
				verdict = vFailed
			}
		}
		st.add(&p, &addr, n, verdict)
	}
	return nil
}

func printPacket(w io.Writer, seq uint64, pkt []byte, a *divert.Address, p *divert.Packet, perr error) {
	if p.IPv4 == nil && p.IPv6 == nil {
		fmt.Fprintf(w, "#%d %-3s if=%d unparsable (%v) len=%d\n    %s\n", seq, exutil.Direction(a), a.IfIdx, perr, len(pkt), exutil.HexPrefix(pkt, 40))
		return
	}
	extra := ""
	if icmp := p.ICMP; icmp != nil || p.ICMPv6 != nil {
		if icmp == nil {
			icmp = p.ICMPv6
		}
		extra = fmt.Sprintf(" type=%d code=%d", icmp[0], icmp[1])
	}
	if p.Fragment {
		extra += fmt.Sprintf(" fragment(off=%d mf=%v)", p.FragOff*8, p.MF)
	}
	if a.Loopback {
		extra += " loopback"
	}
	if a.Sniffed {
		extra += " sniffed"
	}
	src, dst := exutil.Endpoints(p)
	fmt.Fprintf(w, "#%d %-3s if=%d %s(%d) %s -> %s len=%d%s\n    %s\n",
		seq, exutil.Direction(a), a.IfIdx, exutil.ProtoName(p.Protocol), p.Protocol,
		src, dst, len(pkt), extra, exutil.HexPrefix(pkt, 40))
}

type verdict int

const (
	vReinjected verdict = iota
	vDropped
	vSniffed
	vFailed
)

// ProtoStats counts the packets of one protocol.
type ProtoStats struct {
	In         uint64 `json:"in"`
	Out        uint64 `json:"out"`
	Bytes      uint64 `json:"bytes"`
	Reinjected uint64 `json:"reinjected"`
	Dropped    uint64 `json:"dropped"`
	Sniffed    uint64 `json:"sniffed"`
	Failed     uint64 `json:"failed"`
}

// Summary is the -json output.
type Summary struct {
	Seen       uint64                 `json:"seen"`
	Bytes      uint64                 `json:"bytes"`
	Reinjected uint64                 `json:"reinjected"`
	Dropped    uint64                 `json:"dropped"`
	Sniffed    uint64                 `json:"sniffed"`
	Failed     uint64                 `json:"failed"`
	Protocols  map[string]*ProtoStats `json:"protocols"`
	Demo       *DemoResult            `json:"demo,omitempty"`
}

type stats struct {
	mu    sync.Mutex
	s     Summary
	meter exutil.Meter
}

func newStats() *stats { return &stats{s: Summary{Protocols: map[string]*ProtoStats{}}} }

func (st *stats) seen() uint64 {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.s.Seen
}

func (st *stats) add(pk *divert.Packet, a *divert.Address, n int, v verdict) {
	name := "unparsable"
	if pk.IPv4 != nil || pk.IPv6 != nil {
		name = exutil.ProtoName(pk.Protocol)
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	p := st.s.Protocols[name]
	if p == nil {
		p = &ProtoStats{}
		st.s.Protocols[name] = p
	}
	st.s.Seen++
	st.s.Bytes += uint64(n)
	p.Bytes += uint64(n)
	if a.Outbound {
		p.Out++
	} else {
		p.In++
	}
	switch v {
	case vReinjected:
		st.s.Reinjected++
		p.Reinjected++
	case vDropped:
		st.s.Dropped++
		p.Dropped++
	case vSniffed:
		st.s.Sniffed++
		p.Sniffed++
	case vFailed:
		st.s.Failed++
		p.Failed++
	}
}

func (st *stats) statusLine() string {
	st.mu.Lock()
	seen, bytes := st.s.Seen, st.s.Bytes
	st.mu.Unlock()
	pps, bps := st.meter.Rate(time.Now(), seen, bytes)
	return fmt.Sprintf("packets %d  bytes %s  rate %.0f pkt/s %s", seen, exutil.Bytes(bytes), pps, exutil.BitRate(bps))
}

func (st *stats) snapshot() Summary {
	st.mu.Lock()
	defer st.mu.Unlock()
	s := st.s
	s.Protocols = make(map[string]*ProtoStats, len(st.s.Protocols))
	for k, v := range st.s.Protocols {
		c := *v
		s.Protocols[k] = &c
	}
	return s
}

func (st *stats) print(w io.Writer, asJSON bool) {
	s := st.snapshot()
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(s)
		return
	}
	fmt.Fprintf(w, "\n%d packets, %s: %d reinjected, %d dropped, %d sniffed, %d failed\n",
		s.Seen, exutil.Bytes(s.Bytes), s.Reinjected, s.Dropped, s.Sniffed, s.Failed)
	names := make([]string, 0, len(s.Protocols))
	for k := range s.Protocols {
		names = append(names, k)
	}
	sort.Strings(names)
	if len(names) > 0 {
		fmt.Fprintf(w, "%-10s %6s %6s %10s %10s %8s %8s\n", "protocol", "in", "out", "bytes", "reinjected", "dropped", "sniffed")
	}
	for _, k := range names {
		p := s.Protocols[k]
		fmt.Fprintf(w, "%-10s %6d %6d %10d %10d %8d %8d\n", k, p.In, p.Out, p.Bytes, p.Reinjected, p.Dropped, p.Sniffed)
	}
}
