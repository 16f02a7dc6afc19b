package main

import (
	"fmt"
	"io"
	"math"
	"strings"
	"text/tabwriter"
)

// WriteText prints the suite as tables of medians, ratios to the no-rule
// mode, and the per-run lines.
func (s *Suite) WriteText(w io.Writer) {
	c := s.Config
	fmt.Fprintf(w, "divertbench: kernel %s, %d CPUs, %d runs x %v per mode (interleaved), UDP %d B payload, sendmmsg batch %d, RecvBatch %d\n",
		s.Kernel, s.CPUs, c.Runs, c.Dur, c.Size, c.GenBatch, c.Batch)
	fmt.Fprintf(w, "filters: recv/batch %q, narrow %q, tcp-batch %q\n", c.FilterAll, c.FilterNarrow, c.FilterTCP)
	if c.RPS {
		fmt.Fprintf(w, "receiver input path steered to CPU 1 (RPS)\n")
	}
	fmt.Fprintln(w)

	byMode := map[string][]RunResult{}
	for _, r := range s.Runs {
		if r.Err == "" {
			byMode[r.Mode] = append(byMode[r.Mode], r)
		}
	}
	col := func(rs []RunResult, f func(RunResult) float64) []float64 {
		v := make([]float64, len(rs))
		for i, r := range rs {
			v[i] = f(r)
		}
		return v
	}
	nonePPS := median(col(byMode[modeNone], func(r RunResult) float64 { return r.PPS }))
	noneP50 := median(col(byMode[modeNone], func(r RunResult) float64 { return float64(r.Idle.P50) }))

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "mode\tdelivered/s\tmin..max\tx none\tsent/s\tloss%\thanded/s\tqfull%\tnlfull%\trcvbuf%\tcons us/pkt\tcons cores\tidle p50/p99 us\t+p50\tloaded p50/p99 us\truns\t")
	for _, m := range c.Modes {
		rs := byMode[m]
		if len(rs) == 0 {
			fmt.Fprintf(tw, "%s\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\t0\t\n", m)
			continue
		}
		pps := col(rs, func(r RunResult) float64 { return r.PPS })
		lo, hi := minMax(pps)
		pct := func(f func(RunResult) uint64) float64 {
			return median(col(rs, func(r RunResult) float64 {
				if r.Sent == 0 {
					return math.NaN()
				}
				return 100 * float64(f(r)) / float64(r.Sent)
			}))
		}
		p50 := median(col(rs, func(r RunResult) float64 { return float64(r.Idle.P50) }))
		added := "-"
		if m != modeNone && !math.IsNaN(p50) && !math.IsNaN(noneP50) {
			added = fmt.Sprintf("%+.0f", p50-noneP50)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s..%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s/%s\t%s\t%s/%s\t%d\t\n",
			m, grp(median(pps)), grp(lo), grp(hi), fix(ratio(median(pps), nonePPS), 2),
			grp(median(col(rs, func(r RunResult) float64 { return r.GenPPS }))),
			fix(median(col(rs, func(r RunResult) float64 { return float64(r.LossPct) })), 1),
			grp(median(col(rs, func(r RunResult) float64 {
				if m == modeNone || r.Elapsed == 0 {
					return math.NaN()
				}
				return float64(r.Handed) / r.Elapsed
			}))),
			fix(pct(func(r RunResult) uint64 { return r.QueueFull }), 2),
			fix(pct(func(r RunResult) uint64 { return r.NetlinkFull }), 2),
			fix(pct(func(r RunResult) uint64 { return r.RcvbufErrs }), 2),
			fix(median(col(rs, func(r RunResult) float64 { return float64(r.CPUPerPkt) })), 2),
			fix(median(col(rs, func(r RunResult) float64 { return float64(r.Cores) })), 2),
			fix(p50, 0), fix(median(col(rs, func(r RunResult) float64 { return float64(r.Idle.P99) })), 0), added,
			fix(median(col(rs, func(r RunResult) float64 { return float64(r.Loaded.P50) })), 0),
			fix(median(col(rs, func(r RunResult) float64 { return float64(r.Loaded.P99) })), 0),
			len(rs))
	}
	tw.Flush()

	if len(s.TCP) > 0 {
		fmt.Fprintln(w)
		tcp := map[string][]TCPResult{}
		for _, r := range s.TCP {
			if r.Err == "" {
				tcp[r.Mode] = append(tcp[r.Mode], r)
			}
		}
		tcol := func(rs []TCPResult, f func(TCPResult) float64) []float64 {
			v := make([]float64, len(rs))
			for i, r := range rs {
				v[i] = f(r)
			}
			return v
		}
		noneG := median(tcol(tcp[modeTCPNone], func(r TCPResult) float64 { return r.Gbps }))
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "mode\tGbit/s\tmin..max\tx none\tretransmits\thanded/s\tcons us/pkt\truns\t")
		for _, m := range tcpModes {
			rs := tcp[m]
			if len(rs) == 0 {
				fmt.Fprintf(tw, "%s\t-\t-\t-\t-\t-\t-\t0\t\n", m)
				continue
			}
			g := tcol(rs, func(r TCPResult) float64 { return r.Gbps })
			lo, hi := minMax(g)
			handed := "-"
			if m != modeTCPNone {
				handed = grp(median(tcol(rs, func(r TCPResult) float64 { return float64(r.Handed) })) / math.Max(1, math.Round(c.Dur.Seconds())))
			}
			fmt.Fprintf(tw, "%s\t%s\t%s..%s\t%s\t%s\t%s\t%s\t%d\t\n", m, fix(median(g), 2), fix(lo, 2), fix(hi, 2),
				fix(ratio(median(g), noneG), 2),
				fix(median(tcol(rs, func(r TCPResult) float64 { return float64(r.Retransmits) })), 0),
				handed, fix(median(tcol(rs, func(r TCPResult) float64 { return float64(r.CPUPerPkt) })), 2), len(rs))
		}
		tw.Flush()
	}

	fmt.Fprintln(w, "\nper run:")
	for _, r := range s.Runs {
		if r.Err != "" {
			fmt.Fprintf(w, "  %-7s #%d  ERROR %s\n", r.Mode, r.Iter, r.Err)
			continue
		}
		fmt.Fprintf(w, "  %-7s #%d  sent %d, delivered %d (%s/s), handed %d, verdicts %d, consumer %.2f s CPU, idle rtt %s/%s us (lost %d), loaded rtt %s/%s us (%d/%d lost)%s\n",
			r.Mode, r.Iter, r.Sent, r.Recv, grp(r.PPS), r.Handed, r.Verdicts, r.ConsumerCPU,
			fix(float64(r.Idle.P50), 0), fix(float64(r.Idle.P99), 0), r.Idle.Lost,
			fix(float64(r.Loaded.P50), 0), fix(float64(r.Loaded.P99), 0), r.Loaded.Lost, r.Loaded.N+r.Loaded.Lost, noisy(r.Noisy))
	}
	for _, r := range s.TCP {
		if r.Err != "" {
			fmt.Fprintf(w, "  %-9s #%d  ERROR %s\n", r.Mode, r.Iter, r.Err)
			continue
		}
		fmt.Fprintf(w, "  %-9s #%d  %.2f Gbit/s, %d retransmits, handed %d, consumer %.2f s CPU%s\n", r.Mode, r.Iter, r.Gbps, r.Retransmits, r.Handed, r.ConsumerCPU, noisy(r.Noisy))
	}
	fmt.Fprint(w, `
delivered/s = bulk datagrams the sink read / generator send time; x none = ratio to the no-rule mode.
handed/s = packets the consumer received during the blast (NFQUEUE id sequence - socket drops); qfull/nlfull/rcvbuf =
loss at a full NFQUEUE / netlink socket / sink UDP buffer, % of sent. cons us/pkt = the consumer process's
CPU (all threads, /proc/PID/stat) during the blast per handed packet. idle rtt = sequential UDP echo round
trips before the blast; loaded rtt = echo probes at a low rate during the blast. narrow: only the probes
match the filter, so its delivered/s near none's shows the filter runs in the kernel.
`)
}

func noisy(note string) string {
	if note == "" {
		return ""
	}
	return " [noisy: " + note + "]"
}

// grp formats x with thousands separators, "-" for NaN.
func grp(x float64) string {
	if math.IsNaN(x) {
		return "-"
	}
	s := fmt.Sprintf("%.0f", x)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, r := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(r)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

// fix formats x with prec decimals, "-" for NaN.
func fix(x float64, prec int) string {
	if math.IsNaN(x) {
		return "-"
	}
	return fmt.Sprintf("%.*f", prec, x)
}
