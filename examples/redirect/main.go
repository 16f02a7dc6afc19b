// Command redirect is a transparent port redirect, the classic use of a
// divert socket to change packets: connections and datagrams to local port
// -from reach a server listening on local port -to, and the client only
// ever sees port -from.
//
//	sudo redirect -proto tcp -from 8080 -to 9090
//	sudo redirect -proto udp -from 5353 -to 53 -filter "ip.SrcAddr == 10.0.0.5 or ip.DstAddr == 10.0.0.5"
//	sudo redirect -demo                  # Linux: a self-contained demonstration in namespaces
//
// One handle takes the inbound packets to port -from and the outbound
// packets from port -to; each batch is received with RecvBatch, parsed with
// ParsePacket, rewritten with the Packet setters (SetDstPort, SetSrcPort),
// which update the checksums incrementally, and reinjected with SendBatch.
// Packets from other hosts only: a loopback client is not redirected (see
// the README). Ctrl-C stops it; closing the handle removes its rules.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/netdivert/divert"
	"github.com/netdivert/divert/examples/internal/exutil"
)

const prog = "redirect"

// batchLen is the number of messages per RecvBatch.
const batchLen = 64

// defaultPriority is -priority's default. On Linux a handle of priority P
// has its input and output chains at nft priority -P: above 200 its output
// chain runs before conntrack's (-200), so conntrack sees the replies
// already rewritten to port -from, as it saw the requests (it takes them at
// prerouting, before the input chain rewrites them), and they fit the
// connection. At a priority of 200 or less conntrack sees replies from port
// -to that fit no connection, invalid, and a firewall that drops invalid
// packets (ct state invalid drop, ufw) drops them. Elsewhere a priority
// says only which handle sees a packet first.
const defaultPriority = 201

// config is the command line.
type config struct {
	redirect
	proto    string
	from, to int
	filter   string // -filter: narrows the redirection's own filter
	priority int16
	count    uint64
	duration time.Duration
	quiet    bool
	json     bool
	demo     bool
}

func parseFlags(args []string) (*config, error) {
	fs := flag.NewFlagSet(prog, flag.ContinueOnError)
	c := &config{}
	var prio int
	fs.StringVar(&c.proto, "proto", "tcp", "protocol: tcp or udp")
	fs.IntVar(&c.from, "from", 0, "the local port clients use (required; -demo: 8080)")
	fs.IntVar(&c.to, "to", 0, "the local port the server listens on (required; -demo: 9090)")
	fs.StringVar(&c.filter, "filter", "", "WinDivert filter narrowing the redirection further; it must match the replies too (e.g. \"ip.SrcAddr == C or ip.DstAddr == C\")")
	fs.IntVar(&prio, "priority", defaultPriority, "handle priority, -30000..30000 (higher sees packets first; Linux: above 200 the replies are rewritten before conntrack sees them)")
	fs.Uint64Var(&c.count, "count", 0, "stop after this many packets (0 = no limit)")
	fs.DurationVar(&c.duration, "duration", 0, "stop after this long (0 = until Ctrl-C)")
	fs.BoolVar(&c.quiet, "quiet", false, "do not print each packet (a status line instead)")
	fs.BoolVar(&c.json, "json", false, "print the summary as JSON on stdout (packet lines go to stderr)")
	fs.BoolVar(&c.demo, "demo", false, "Linux: run a self-contained demonstration in private network namespaces")
	if err := exutil.ParseArgs(fs, args); err != nil {
		return nil, err
	}
	var err error
	if c.priority, err = exutil.ParsePriority(prio); err != nil {
		return nil, err
	}
	switch c.proto {
	case "tcp":
		c.redirect.proto = protoTCP
	case "udp":
		c.redirect.proto = protoUDP
	default:
		return nil, fmt.Errorf("-proto %q: want tcp or udp", c.proto)
	}
	if c.demo {
		// The demo checks that its whole exchange went through: a count
		// would stop the redirection half way.
		if c.count > 0 {
			return nil, errors.New("-demo takes no -count")
		}
		if c.from == 0 {
			c.from = demoFrom
		}
		if c.to == 0 {
			c.to = demoTo
		}
	}
	for _, p := range []struct {
		name string
		v    int
	}{{"-from", c.from}, {"-to", c.to}} {
		if p.v < 1 || p.v > 0xffff {
			return nil, fmt.Errorf("%s %d: want a port 1..65535", p.name, p.v)
		}
	}
	if c.from == c.to {
		return nil, fmt.Errorf("-from and -to are both %d", c.from)
	}
	c.redirect.from, c.redirect.to = uint16(c.from), uint16(c.to)
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

// open opens the handle of the redirection.
func (c *config) open() (*divert.Handle, error) {
	f := c.redirect.filter(c.filter)
	h, err := divert.Open(f, divert.LayerNetwork, c.priority, 0)
	if err != nil {
		return nil, fmt.Errorf("open filter %q: %w", f, err)
	}
	return h, nil
}

func run(ctx context.Context, c *config, out io.Writer) error {
	h, err := c.open()
	if err != nil {
		return err
	}
	defer h.Close()
	fmt.Fprintf(os.Stderr, "%s: %s port %d -> %d, filter %q, priority %d; Ctrl-C stops\n",
		prog, c.proto, c.from, c.to, c.redirect.filter(c.filter), c.priority)
	st := newStats(c)
	stopStatus := func() {}
	if c.quiet && !c.json {
		stopStatus = exutil.NewStatusLine(os.Stderr).Start(ctx, time.Second, st.statusLine)
	}
	err = relay(ctx, h, c, c.packetOut(out), st)
	stopStatus() // before the summary, which it would otherwise follow
	st.print(out, c.json)
	return err
}

// relay is the batch loop: it receives batches from h until ctx is done,
// c.count packets were received or the handle fails, rewrites each packet
// (or leaves it unchanged), prints and counts it, and sends the batch back.
// Nothing is dropped: a packet it cannot rewrite goes back as it came.
func relay(ctx context.Context, h *divert.Handle, c *config, out io.Writer, st *stats) error {
	loopDone := exutil.StopOnDone(ctx, h, 2*time.Second)
	defer loopDone()
	ms := make([]divert.Message, batchLen)
	for i := range ms {
		// MTUMax: no packet is cut by a short buffer.
		ms[i].Buf = make([]byte, divert.MTUMax)
	}
	for {
		batch := ms
		if c.count > 0 {
			seen := st.packets()
			if seen >= c.count {
				return nil
			}
			if left := c.count - seen; left < uint64(len(batch)) {
				batch = batch[:left]
			}
		}
		n, err := h.RecvBatch(batch)
		// ErrTruncated: a packet the kernel (Linux) handed over cut, longer
		// than its queue takes; rewrite leaves it unchanged (malformed)
		// and it goes on whole.
		if err != nil && !errors.Is(err, divert.ErrTruncated) {
			if exutil.Stopped(err) && ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("receive: %w", err)
		}
		for i := range batch[:n] {
			m := &batch[i]
			res := c.rewrite(m.Buf[:m.N], &m.Addr)
			seq := st.add(&res, m.N)
			if !c.quiet {
				printResult(out, seq, &c.redirect, &res, &m.Addr, m.N)
			}
		}
		sendAll(h, batch[:n], st)
	}
}

// sendAll reinjects the batch. A message that fails is counted and
// reported, and the rest is sent on. When the handle was closed under it
// (exutil.StopOnDone's grace ran out) it returns: Close reinjected what the
// handle still held, and the next receive ends the loop.
func sendAll(h *divert.Handle, ms []divert.Message, st *stats) {
	for len(ms) > 0 {
		k, err := h.SendBatch(ms)
		if err == nil || exutil.Stopped(err) {
			return
		}
		// k messages went before the one that failed (on Windows k counts
		// every message: the driver sent the others).
		fmt.Fprintf(os.Stderr, "%s: reinject: %v\n", prog, err)
		st.sendFailed()
		if k >= len(ms) {
			return
		}
		ms = ms[k+1:]
	}
}

// printResult prints one packet's line: the rewritten ones with the
// endpoints as they came and the port that changed, the others with why
// they went back unchanged.
func printResult(w io.Writer, seq uint64, r *redirect, res *result, a *divert.Address, n int) {
	p := &res.pkt
	switch res.kind {
	case malformed:
		fmt.Fprintf(w, "#%d %-3s if=%d len=%d malformed, reinjected unchanged: %v\n", seq, exutil.Direction(a), a.IfIdx, n, res.err)
		return
	case unexpected:
		src, dst := exutil.Endpoints(p)
		fmt.Fprintf(w, "#%d %-3s if=%d %s %s -> %s len=%d unexpected, reinjected unchanged: %v\n",
			seq, exutil.Direction(a), a.IfIdx, exutil.ProtoName(p.Protocol), src, dst, n, res.err)
		return
	}
	src := netip.AddrPortFrom(p.SrcAddr(), p.SrcPort())
	dst := netip.AddrPortFrom(p.DstAddr(), p.DstPort())
	change := fmt.Sprintf("dst port %d -> %d", r.from, r.to)
	if res.kind == rewroteIn {
		dst = netip.AddrPortFrom(dst.Addr(), res.oldPort)
	} else {
		src = netip.AddrPortFrom(src.Addr(), res.oldPort)
		change = fmt.Sprintf("src port %d -> %d", r.to, r.from)
	}
	sum := "checksum updated"
	if res.recomputed {
		sum = "checksums recomputed (offloaded)"
		if res.err != nil {
			sum = fmt.Sprintf("checksums NOT recomputed: %v", res.err)
		}
	}
	fmt.Fprintf(w, "#%d %-3s if=%d %s %s -> %s len=%d: %s, %s\n",
		seq, exutil.Direction(a), a.IfIdx, exutil.ProtoName(p.Protocol), src, dst, n, change, sum)
}

// Summary is what the redirection did, printed on exit (-json: as JSON).
type Summary struct {
	Proto  string `json:"proto"`
	From   uint16 `json:"from"`
	To     uint16 `json:"to"`
	Filter string `json:"filter"`

	Packets uint64 `json:"packets"` // received
	Bytes   uint64 `json:"bytes"`
	// Inbound and Outbound count the rewritten packets: destination port
	// From → To, source port To → From.
	Inbound  uint64 `json:"inbound"`
	Outbound uint64 `json:"outbound"`
	// Incremental counts the rewritten packets whose checksums only the
	// setters' incremental update touched; Recomputed those whose Address
	// said a checksum was unfinished (offloaded), recomputed in full;
	// Unfinished those CalcChecksums could not finish (a first fragment),
	// sent with the incremental update alone.
	Incremental uint64 `json:"incremental"`
	Recomputed  uint64 `json:"recomputed"`
	Unfinished  uint64 `json:"unfinished"`
	// Malformed and Unexpected count the packets reinjected unchanged:
	// ones that did not parse, and ones not of the redirection.
	Malformed  uint64 `json:"malformed"`
	Unexpected uint64 `json:"unexpected"`
	// SendFailed counts the packets whose reinjection failed.
	SendFailed uint64 `json:"send_failed"`

	Demo *DemoResult `json:"demo,omitempty"`
}

// stats counts what relay did; the status line reads it concurrently.
type stats struct {
	mu    sync.Mutex
	s     Summary
	meter exutil.Meter
}

func newStats(c *config) *stats {
	return &stats{s: Summary{Proto: c.proto, From: c.redirect.from, To: c.redirect.to, Filter: c.redirect.filter(c.filter)}}
}

func (st *stats) packets() uint64 {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.s.Packets
}

// add counts one packet of n bytes and returns its sequence number.
func (st *stats) add(res *result, n int) uint64 {
	st.mu.Lock()
	defer st.mu.Unlock()
	s := &st.s
	s.Packets++
	s.Bytes += uint64(n)
	switch res.kind {
	case rewroteIn, rewroteOut:
		if res.kind == rewroteIn {
			s.Inbound++
		} else {
			s.Outbound++
		}
		switch {
		case !res.recomputed:
			s.Incremental++
		case res.err != nil:
			s.Unfinished++
		default:
			s.Recomputed++
		}
	case malformed:
		s.Malformed++
	case unexpected:
		s.Unexpected++
	}
	return s.Packets
}

func (st *stats) sendFailed() {
	st.mu.Lock()
	st.s.SendFailed++
	st.mu.Unlock()
}

func (st *stats) snapshot() Summary {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.s
}

func (st *stats) statusLine() string {
	st.mu.Lock()
	s := st.s
	st.mu.Unlock()
	pps, bps := st.meter.Rate(time.Now(), s.Packets, s.Bytes)
	return fmt.Sprintf("packets %d  in %d  out %d  unchanged %d  rate %.0f pkt/s %s",
		s.Packets, s.Inbound, s.Outbound, s.Malformed+s.Unexpected, pps, exutil.BitRate(bps))
}

func (st *stats) print(w io.Writer, asJSON bool) {
	s := st.snapshot()
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(s)
		return
	}
	printSummary(w, &s)
}

func printSummary(w io.Writer, s *Summary) {
	fmt.Fprintf(w, "\n%s port %d -> %d: %d packets, %s\n", s.Proto, s.From, s.To, s.Packets, exutil.Bytes(s.Bytes))
	fmt.Fprintf(w, "  rewritten:            %d inbound (dst port %d -> %d), %d outbound (src port %d -> %d)\n",
		s.Inbound, s.From, s.To, s.Outbound, s.To, s.From)
	fmt.Fprintf(w, "  checksums:            %d updated incrementally, %d recomputed (offloaded), %d left unfinished\n",
		s.Incremental, s.Recomputed, s.Unfinished)
	fmt.Fprintf(w, "  reinjected unchanged: %d malformed, %d unexpected\n", s.Malformed, s.Unexpected)
	fmt.Fprintf(w, "  reinjections failed: %d\n", s.SendFailed)
}
