package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/netdivert/divert"
	"github.com/netdivert/divert/filter"
	"github.com/netdivert/divert/internal/netnstest"
)

// Modes of a UDP run.
const (
	modeNone   = "none"   // no rule: the path's own limit
	modeRecv   = "recv"   // Recv→Send loop on every bench datagram
	modeBatch  = "batch"  // RecvBatch→SendBatch loop on every bench datagram
	modeNarrow = "narrow" // only the probes are diverted; the bulk must stay in the kernel
)

// TCP modes (iperf3).
const (
	modeTCPNone  = "tcp-none"
	modeTCPBatch = "tcp-batch"
	// tcp-narrow: the narrow filter's consumer is on the path, and the bulk
	// TCP must not reach it.
	modeTCPNarrow = "tcp-narrow"
)

// Ports of the bench traffic.
const (
	bulkPort  = 9000
	probePort = 9999
	iperfPort = 5201
)

// Config is one bench suite.
type Config struct {
	Modes        []string      // UDP modes, run interleaved
	TCP          bool          // also run iperf3 tcp-none, tcp-batch and tcp-narrow
	Runs         int           // runs per mode (medians are reported)
	Dur          time.Duration // traffic per run
	Size         int           // UDP payload bytes
	GenBatch     int           // datagrams per sendmmsg
	PPS          float64       // generator rate, 0 = flat out
	Pings        int           // sequential idle round trips per run
	ProbeHz      float64       // echo probes per second during the blast
	Batch        int           // messages per RecvBatch
	QLen, QSize  uint64        // consumer ParamQueueLength, ParamQueueSize (0 = default)
	QTime        uint64        // consumer ParamQueueTime in ms (0 = default)
	Pin          bool          // generator on CPU 0, the rest on CPU 1 (2+ CPUs, taskset)
	RPS          bool          // receive packet steering on the receiver's veth: its input path on CPU 1
	IPv6         bool          // traffic over fd00:: instead of 10.x
	FilterAll    string        // recv and batch modes
	FilterNarrow string        // narrow and tcp-narrow modes
	FilterTCP    string        // tcp-batch mode
	CPUProfile   string        // write the consumer's CPU profile of each batch run here (suffix .N)
	QuietMax     float64       // before a run wait until other load is below this many busy cores ...
	QuietWait    time.Duration // ... but at most this long per run (then run anyway, flagged)
	Log          io.Writer     `json:"-"` // progress lines (nil: none)
}

// DefaultConfig returns the defaults of the command's flags.
func DefaultConfig() Config {
	return Config{
		Modes:        []string{modeNone, modeRecv, modeBatch, modeNarrow},
		TCP:          true,
		Runs:         3,
		Dur:          3 * time.Second,
		Size:         64,
		GenBatch:     64,
		Pings:        1000,
		ProbeHz:      200,
		Batch:        64,
		Pin:          true,
		FilterAll:    fmt.Sprintf("inbound and (udp.DstPort == %d or udp.DstPort == %d)", bulkPort, probePort),
		FilterNarrow: fmt.Sprintf("udp.DstPort == %d", probePort),
		FilterTCP:    "true",
		QuietMax:     0.25,
		QuietWait:    10 * time.Second,
	}
}

// RunResult is one UDP run.
type RunResult struct {
	Mode  string
	Iter  int
	Err   string `json:",omitempty"`
	Noisy string `json:",omitempty"` // other load on the machine before the run

	Sent, Recv int64   // bulk datagrams sent, counted by the sink
	Elapsed    float64 // s of sending
	GenPPS     float64 // offered rate
	PPS        float64 // delivered rate (Recv / Elapsed)
	LossPct    num

	Handed      uint64  // packets the consumer got during the blast (queued at the NFQUEUE minus lost at its socket)
	QueueFull   uint64  // dropped at a full NFQUEUE
	NetlinkFull uint64  // dropped at a full netlink socket
	RcvbufErrs  uint64  // dropped at the sink's full UDP buffer
	ConsumerCPU float64 // s of consumer CPU during the blast
	CPUPerPkt   num     // µs of consumer CPU per handed packet
	Cores       num     // consumer CPU / elapsed
	Verdicts    uint64  // the consumer's own count, whole life

	Idle, Loaded Latency
}

// TCPResult is one iperf3 run.
type TCPResult struct {
	Mode        string
	Iter        int
	Err         string `json:",omitempty"`
	Noisy       string `json:",omitempty"`
	Gbps        float64
	Retransmits int64
	Handed      uint64
	ConsumerCPU float64
	CPUPerPkt   num
}

// Suite is everything a bench run produced.
type Suite struct {
	Config Config
	Kernel string
	CPUs   int
	Runs   []RunResult
	TCP    []TCPResult
}

type bench struct {
	cfg              Config
	exe              string
	link             *netnstest.Link
	tx, rx           *netnstest.NS
	dst              netip.Addr
	genCPU, otherCPU string
	logw             io.Writer
	profileN         int
}

func (b *bench) logf(format string, a ...any) {
	if b.logw != nil {
		fmt.Fprintf(b.logw, "[divertbench %s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, a...))
	}
}

// Run makes the namespaces, runs the suite and removes them again (also
// when ctx is cancelled).
func Run(ctx context.Context, cfg Config) (*Suite, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("needs root: it makes network namespaces, installs nftables rules and binds an NFQUEUE queue")
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	b := &bench{cfg: cfg, exe: exe, logw: cfg.Log}
	if cfg.Pin && runtime.NumCPU() >= 2 {
		if _, err := exec.LookPath("taskset"); err == nil {
			b.genCPU, b.otherCPU = "0", "1"
		} else {
			b.logf("taskset not found: not pinning")
		}
	}
	if cfg.TCP {
		if _, err := exec.LookPath("iperf3"); err != nil {
			return nil, fmt.Errorf("TCP modes need iperf3 (Debian package iperf3): %w", err)
		}
	}
	b.link, err = netnstest.NewLink("dvb", 0)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err := b.link.Close(); err != nil {
			b.logf("cleanup: %v", err)
		}
	}()
	b.tx, b.rx = b.link.A.NS, b.link.B.NS
	if cfg.RPS {
		if err := steerInput(ctx, b.rx, b.link.B.If); err != nil {
			return nil, err
		}
	}
	b.dst = b.link.B.V4
	if cfg.IPv6 {
		b.dst = b.link.B.V6
	}
	b.logf("namespaces %s -> %s (%v), modes %v, %d runs x %v", b.tx.Name, b.rx.Name, b.dst, cfg.Modes, cfg.Runs, cfg.Dur)

	s := &Suite{Config: cfg, CPUs: runtime.NumCPU()}
	if out, err := exec.Command("uname", "-r").Output(); err == nil {
		s.Kernel = strings.TrimSpace(string(out))
	}
	for it := 1; it <= cfg.Runs; it++ {
		for _, m := range cfg.Modes {
			if err := ctx.Err(); err != nil {
				return s, err
			}
			r := b.runUDP(ctx, m, it)
			if r.Err != "" {
				b.logf("%s #%d: ERROR %s", m, it, r.Err)
			} else {
				b.logf("%s #%d: sent %.0f/s, delivered %.0f/s, loss %.1f%%, handed %d, consumer %.2f us/pkt, idle rtt p50 %.0f us",
					m, it, r.GenPPS, r.PPS, r.LossPct, r.Handed, r.CPUPerPkt, r.Idle.P50)
			}
			s.Runs = append(s.Runs, r)
		}
		if cfg.TCP {
			for _, m := range tcpModes {
				if err := ctx.Err(); err != nil {
					return s, err
				}
				r := b.runTCP(ctx, m, it)
				if r.Err != "" {
					b.logf("%s #%d: ERROR %s", m, it, r.Err)
				} else {
					b.logf("%s #%d: %.2f Gbit/s, %d retransmits, handed %d", m, it, r.Gbps, r.Retransmits, r.Handed)
				}
				s.TCP = append(s.TCP, r)
			}
		}
	}
	return s, ctx.Err()
}

func (c *Config) check() error {
	if c.Runs < 1 || c.Runs > 100 {
		return fmt.Errorf("runs %d out of range [1, 100]", c.Runs)
	}
	if c.Dur <= 0 || c.Dur > time.Minute {
		return fmt.Errorf("duration %v out of range (0, 1m]", c.Dur)
	}
	if c.Size < hdrLen || c.Size > 1400 {
		return fmt.Errorf("size %d out of range [%d, 1400]", c.Size, hdrLen)
	}
	if c.Pings < 0 || c.Pings > 100000 || c.ProbeHz < 0 || c.ProbeHz > 10000 {
		return errors.New("pings or probe rate out of range")
	}
	for _, m := range c.Modes {
		switch m {
		case modeNone, modeRecv, modeBatch, modeNarrow:
		default:
			return fmt.Errorf("unknown mode %q (want none, recv, batch, narrow)", m)
		}
	}
	// What the consumers would refuse, refused before any run: each run's
	// consumer would fail alone, and the suite would report nothing else.
	for _, f := range []struct{ name, text string }{{"-filter", c.FilterAll}, {"-filter-narrow", c.FilterNarrow}, {"-filter-tcp", c.FilterTCP}} {
		if _, err := filter.Compile(f.text, filter.LayerNetwork); err != nil {
			return fmt.Errorf("%s: %w", f.name, err)
		}
	}
	for _, p := range []struct {
		name      string
		v, lo, hi uint64
	}{
		{"-qlen", c.QLen, divert.QueueLengthMin, divert.QueueLengthMax},
		{"-qsize", c.QSize, divert.QueueSizeMin, divert.QueueSizeMax},
		{"-qtime", c.QTime, divert.QueueTimeMin, divert.QueueTimeMax},
	} {
		if p.v != 0 && (p.v < p.lo || p.v > p.hi) {
			return fmt.Errorf("%s %d out of range [%d, %d] (0 = the default)", p.name, p.v, p.lo, p.hi)
		}
	}
	if c.Batch < 1 || c.Batch > divert.BatchMax {
		return fmt.Errorf("batch %d out of range [1, %d]", c.Batch, divert.BatchMax)
	}
	return nil
}

// Failed returns how many runs of s failed (an ERROR line each).
func (s *Suite) Failed() int {
	n := 0
	for _, r := range s.Runs {
		if r.Err != "" {
			n++
		}
	}
	for _, r := range s.TCP {
		if r.Err != "" {
			n++
		}
	}
	return n
}

func (b *bench) consumerConfig(loop, filter string) *childConfig {
	cc := &childConfig{Loop: loop, Filter: filter, Batch: b.cfg.Batch, QLen: b.cfg.QLen, QSize: b.cfg.QSize, QTime: b.cfg.QTime,
		Dur: b.cfg.Dur + 90*time.Second}
	if b.cfg.CPUProfile != "" && loop == "batch" {
		b.profileN++
		cc.CPUProfile = fmt.Sprintf("%s.%d", b.cfg.CPUProfile, b.profileN)
	}
	return cc
}

// runUDP is one UDP run: sink, consumer, idle pings, blast with probes.
func (b *bench) runUDP(ctx context.Context, mode string, it int) (r RunResult) {
	r = RunResult{Mode: mode, Iter: it, Noisy: b.waitQuiet(ctx)}
	fail := func(err error) RunResult { r.Err = err.Error(); return r }
	run := rand.Uint32() | 1
	base := childConfig{Run: run, Dst: b.dst, Port: bulkPort, Probe: probePort, Size: b.cfg.Size}

	sc := base
	sc.Dur = b.cfg.Dur + 90*time.Second
	sink, err := startChild(ctx, b.exe, b.rx, b.otherCPU, "sink", &sc)
	if err != nil {
		return fail(err)
	}
	defer sink.stop(nil)
	if err := sink.waitReady(10 * time.Second); err != nil {
		return fail(err)
	}

	var cons *child
	switch mode {
	case modeRecv, modeBatch, modeNarrow:
		loop, filter := "batch", b.cfg.FilterAll
		if mode == modeRecv {
			loop = "recv"
		}
		if mode == modeNarrow {
			filter = b.cfg.FilterNarrow
		}
		cons, err = startChild(ctx, b.exe, b.rx, b.otherCPU, "consumer", b.consumerConfig(loop, filter))
		if err != nil {
			return fail(err)
		}
		defer cons.stop(nil)
		if err := cons.waitReady(15 * time.Second); err != nil {
			return fail(err)
		}
	}

	// 1) idle latency: one probe in flight.
	if b.cfg.Pings > 0 {
		pc := base
		pc.Kind, pc.Pings, pc.Dur = "ping", b.cfg.Pings, 10*time.Second
		p, err := startChild(ctx, b.exe, b.tx, b.otherCPU, "gen", &pc)
		if err != nil {
			return fail(err)
		}
		var pr genResult
		if err := p.wait(20*time.Second, &pr); err != nil {
			return fail(err)
		}
		r.Idle = pr.RTT
	}

	// 2) throughput with probes alongside.
	var q0, q1 queueStats
	var c0, c1 float64
	var u0, u1 uint64
	if cons != nil {
		if q0, err = nfqStats(cons.pid()); err != nil {
			return fail(err)
		}
		if c0, err = procCPU(cons.pid()); err != nil {
			return fail(err)
		}
	}
	if u0, err = udpRcvbufErrors(sink.pid()); err != nil {
		return fail(err)
	}
	// the prober (on the other CPU, like the idle pings) runs for the blast's duration
	var prober *child
	if b.cfg.ProbeHz > 0 {
		pc := base
		pc.Kind, pc.ProbeHz, pc.Dur = "probe", b.cfg.ProbeHz, b.cfg.Dur
		if prober, err = startChild(ctx, b.exe, b.tx, b.otherCPU, "gen", &pc); err != nil {
			return fail(err)
		}
		defer prober.stop(nil)
		if err := prober.waitReady(10 * time.Second); err != nil {
			return fail(err)
		}
	}
	gc := base
	gc.Kind, gc.Dur, gc.Batch, gc.PPS = "blast", b.cfg.Dur, b.cfg.GenBatch, b.cfg.PPS
	g, err := startChild(ctx, b.exe, b.tx, b.genCPU, "gen", &gc)
	if err != nil {
		return fail(err)
	}
	var gr genResult
	if err := g.wait(b.cfg.Dur+20*time.Second, &gr); err != nil {
		return fail(err)
	}
	if prober != nil {
		var pr genResult
		if err := prober.wait(5*time.Second, &pr); err != nil {
			return fail(err)
		}
		r.Loaded = pr.RTT
	}
	if cons != nil {
		if c1, err = procCPU(cons.pid()); err != nil {
			return fail(err)
		}
		// let the consumer drain its queue (at most 3 s)
		for i := 0; i < 150; i++ {
			if q, err := nfqStats(cons.pid()); err != nil || q.Total == 0 {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	time.Sleep(100 * time.Millisecond) // the sink's socket buffer empties
	if cons != nil {
		if q1, err = nfqStats(cons.pid()); err != nil {
			return fail(err)
		}
		if q1.Queues == 0 {
			return fail(errors.New("the consumer has no NFQUEUE queue bound"))
		}
	}
	if u1, err = udpRcvbufErrors(sink.pid()); err != nil {
		return fail(err)
	}
	var sr sinkResult
	if err := sink.stop(&sr); err != nil {
		return fail(err)
	}
	if cons != nil {
		var cr consumerResult
		if err := cons.stop(&cr); err != nil {
			return fail(err)
		}
		if cr.Err != "" {
			return fail(fmt.Errorf("consumer: %s", cr.Err))
		}
		r.Verdicts = cr.Verdicts
	}

	r.Sent, r.Recv, r.Elapsed = gr.Sent, sr.Recv, gr.Elapsed
	if gr.Elapsed > 0 {
		r.GenPPS = float64(gr.Sent) / gr.Elapsed
		r.PPS = float64(sr.Recv) / gr.Elapsed
	}
	r.LossPct = num(math.NaN())
	if gr.Sent > 0 {
		r.LossPct = num(100 * float64(gr.Sent-sr.Recv) / float64(gr.Sent))
	}
	r.RcvbufErrs = u1 - u0
	r.CPUPerPkt, r.Cores = num(math.NaN()), num(math.NaN())
	if cons != nil {
		r.Handed = q0.handed(q1)
		r.QueueFull = q1.Dropped - q0.Dropped
		r.NetlinkFull = q1.UserDrp - q0.UserDrp
		r.ConsumerCPU = c1 - c0
		if r.Handed > 0 {
			r.CPUPerPkt = num(r.ConsumerCPU * 1e6 / float64(r.Handed))
		}
		if gr.Elapsed > 0 {
			r.Cores = num(r.ConsumerCPU / gr.Elapsed)
		}
	}
	switch {
	case sr.Recv > gr.Sent:
		r.Err = fmt.Sprintf("sink counted %d datagrams but only %d were sent", sr.Recv, gr.Sent)
	case (mode == modeRecv || mode == modeBatch) && r.Handed < uint64(sr.Recv):
		// every delivered bulk datagram must have passed the consumer
		r.Err = fmt.Sprintf("rule bypassed: %d delivered but only %d handed to the consumer", sr.Recv, r.Handed)
	case (mode == modeRecv || mode == modeBatch) && r.Verdicts < r.Handed:
		r.Err = fmt.Sprintf("consumer reinjected %d < %d handed to it", r.Verdicts, r.Handed)
	}
	return r
}

// waitQuiet waits (bounded) until the machine is quiet and returns a note
// when it was not.
func (b *bench) waitQuiet(ctx context.Context) string {
	if b.cfg.QuietMax <= 0 {
		return ""
	}
	t0 := time.Now()
	for {
		busy, err := busyCores(300 * time.Millisecond)
		if err != nil {
			return err.Error()
		}
		if busy <= b.cfg.QuietMax {
			return ""
		}
		if time.Since(t0) >= b.cfg.QuietWait || ctx.Err() != nil {
			b.logf("machine busy (%.2f cores used by others); running anyway", busy)
			return fmt.Sprintf("%.2f cores busy before the run", busy)
		}
	}
}

// tcpModes are the TCP modes, in the order they run and are reported.
var tcpModes = []string{modeTCPNone, modeTCPBatch, modeTCPNarrow}

// narrowChecks is how many datagrams tcp-narrow sends to the probe port
// after the transfer, to show that its consumer was on the path.
const narrowChecks = 3

// runTCP is one iperf3 run: without a consumer, with a divert-everything
// batch loop in the receiver, or with the narrow filter's (which must see
// none of the transfer).
func (b *bench) runTCP(ctx context.Context, mode string, it int) (r TCPResult) {
	r = TCPResult{Mode: mode, Iter: it, CPUPerPkt: num(math.NaN()), Noisy: b.waitQuiet(ctx)}
	fail := func(err error) TCPResult { r.Err = err.Error(); return r }
	secs := max(1, int(math.Round(b.cfg.Dur.Seconds())))
	// iperf3 is not pinned: TCP is self-clocked, and a pinned pair suffers
	// most from other load on a shared machine.
	srv, err := startCmd(ctx, b.rx, "", "iperf3 -s",
		[]string{"iperf3", "-s", "-1", "-p", strconv.Itoa(iperfPort)}, nil, true)
	if err != nil {
		return fail(err)
	}
	defer srv.stop(nil)
	if err := waitListen(ctx, b.rx, iperfPort); err != nil {
		return fail(err)
	}
	var cons *child
	if mode != modeTCPNone {
		filter := b.cfg.FilterTCP
		if mode == modeTCPNarrow {
			filter = b.cfg.FilterNarrow
		}
		cons, err = startChild(ctx, b.exe, b.rx, b.otherCPU, "consumer", b.consumerConfig("batch", filter))
		if err != nil {
			return fail(err)
		}
		defer cons.stop(nil)
		if err := cons.waitReady(15 * time.Second); err != nil {
			return fail(err)
		}
	}
	var q0, q1 queueStats
	var c0, c1 float64
	if cons != nil {
		q0, _ = nfqStats(cons.pid())
		c0, _ = procCPU(cons.pid())
	}
	cl, err := startCmd(ctx, b.tx, "", "iperf3 -c",
		[]string{"iperf3", "-c", b.dst.String(), "-p", strconv.Itoa(iperfPort), "-t", strconv.Itoa(secs), "-J"}, nil, true)
	if err != nil {
		return fail(err)
	}
	var ir struct {
		End struct {
			SumSent struct {
				Retransmits int64 `json:"retransmits"`
			} `json:"sum_sent"`
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if err := cl.wait(time.Duration(secs)*time.Second+30*time.Second, &ir); err != nil {
		return fail(err)
	}
	if ir.Error != "" {
		return fail(fmt.Errorf("iperf3: %s", ir.Error))
	}
	r.Gbps = ir.End.SumReceived.BitsPerSecond / 1e9
	r.Retransmits = ir.End.SumSent.Retransmits
	if cons != nil {
		q1, _ = nfqStats(cons.pid())
		c1, _ = procCPU(cons.pid())
		r.Handed = q0.handed(q1)
		r.ConsumerCPU = c1 - c0
		if r.Handed > 0 {
			r.CPUPerPkt = num(r.ConsumerCPU * 1e6 / float64(r.Handed))
		}
		if mode == modeTCPNarrow {
			if r.Handed != 0 {
				return fail(fmt.Errorf("%d packets of the transfer reached the narrow filter's consumer: the filter is not in the kernel", r.Handed))
			}
			if err := b.checkNarrowPath(ctx, cons.pid(), q1); err != nil {
				return fail(err)
			}
		}
		var cr consumerResult
		if err := cons.stop(&cr); err != nil {
			return fail(err)
		}
		if cr.Err != "" {
			return fail(fmt.Errorf("consumer: %s", cr.Err))
		}
		if r.Handed == 0 && mode == modeTCPBatch {
			return fail(errors.New("no packet reached the consumer: the rule is not on the path"))
		}
	}
	return r
}

// checkNarrowPath sends narrowChecks datagrams to the probe port from the
// sender and waits (2 s at most) until the consumer with pid has been handed
// them since s: the narrow filter's rule was on the path the transfer took.
func (b *bench) checkNarrowPath(ctx context.Context, pid int, s queueStats) error {
	// One socket per datagram: nothing listens on the port, and the ICMP
	// error the first draws must not fail the next write.
	dst := netip.AddrPortFrom(b.dst, probePort)
	for i := 0; i < narrowChecks; i++ {
		if err := b.tx.SendUDP(dst, make([]byte, hdrLen), 1, 0); err != nil {
			return fmt.Errorf("narrow path check: %w", err)
		}
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		q, err := nfqStats(pid)
		if err != nil {
			return fmt.Errorf("narrow path check: %w", err)
		}
		if n := s.handed(q); n >= narrowChecks {
			return nil
		} else if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("narrow path check: the consumer got %d of %d datagrams to port %d: its rule is not on the path", n, narrowChecks, probePort)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// steerInput turns on receive packet steering to CPU 1 for dev in ns, so
// that the receiver's input path (netfilter hooks included) runs there
// rather than on the sending CPU, which a veth transmit otherwise uses.
func steerInput(ctx context.Context, ns *netnstest.NS, dev string) error {
	if runtime.NumCPU() < 2 {
		return errors.New("-rps needs 2 CPUs or more")
	}
	// `ip netns exec` mounts the namespace's own sysfs.
	path := "/sys/class/net/" + dev + "/queues/rx-0/rps_cpus"
	if _, err := ns.Run(ctx, "sh", "-c", "echo 2 > "+path); err != nil {
		return fmt.Errorf("turn on RPS: %w", err)
	}
	return nil
}

// waitListen waits until a TCP socket listens on port in ns.
func waitListen(ctx context.Context, ns *netnstest.NS, port int) error {
	for i := 0; i < 250; i++ {
		out, err := ns.Run(ctx, "ss", "-Hltn", fmt.Sprintf("sport = :%d", port))
		if err == nil && len(strings.TrimSpace(string(out))) > 0 {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("nothing listens on tcp port %d in %s", port, ns.Name)
}

// WriteJSON writes the suite as indented JSON (NaN as null).
func (s *Suite) WriteJSON(w io.Writer) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}
