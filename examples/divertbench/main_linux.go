// Command divertbench measures what a divert loop costs: it makes two
// network namespaces joined by a veth pair (sender 10.201.N.1 → receiver
// 10.201.N.2), blasts bounded UDP traffic from a Go generator in the sender
// to a counting sink in the receiver, and runs these modes side by side:
//
//	none    no rule: the path's own limit
//	recv    a divert handle in the receiver, Recv→Send on every datagram
//	batch   the same with RecvBatch→SendBatch
//	narrow  the filter "udp.DstPort == 9999" while the bulk goes to 9000:
//	        the bulk's rate against none's shows the filter runs in the kernel
//	tcp-*   iperf3 bulk TCP: without a rule (tcp-none), through a
//	        divert-everything batch loop (tcp-batch), and with the narrow
//	        filter's consumer on the path (tcp-narrow), which must see none
//	        of the transfer
//
// For each it prints delivered packets/s, loss and where it went, the
// consumer's CPU µs per packet, UDP echo RTT p50/p99 (idle and under load),
// and the ratios to no rule. Every phase is bounded in time; the namespaces
// are removed on exit and on Ctrl-C. It needs root.
//
//	divertbench -dur 3s -runs 3
//	divertbench -modes batch -tcp=false -cpuprofile /tmp/batch.pprof
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

func main() {
	if role := os.Getenv(envRole); role != "" {
		os.Exit(childMain(role))
	}
	// Named, not os.Args[0]: under go run that is a temporary path.
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "Usage of divertbench:\n")
		flag.PrintDefaults()
	}
	cfg := DefaultConfig()
	modes := flag.String("modes", strings.Join(cfg.Modes, ","), "UDP modes to run, comma-separated: none, recv, batch, narrow")
	flag.BoolVar(&cfg.TCP, "tcp", cfg.TCP, "also run bulk TCP (iperf3): no rule, a divert-everything batch loop, the narrow filter")
	flag.IntVar(&cfg.Runs, "runs", cfg.Runs, "runs per mode; medians are reported")
	flag.DurationVar(&cfg.Dur, "dur", cfg.Dur, "traffic per run (max 1m)")
	flag.IntVar(&cfg.Size, "size", cfg.Size, "UDP payload bytes")
	flag.IntVar(&cfg.GenBatch, "genbatch", cfg.GenBatch, "datagrams per sendmmsg")
	flag.Float64Var(&cfg.PPS, "pps", cfg.PPS, "generator rate, 0 = as fast as possible")
	flag.IntVar(&cfg.Pings, "pings", cfg.Pings, "sequential idle UDP echo round trips per run")
	flag.Float64Var(&cfg.ProbeHz, "probehz", cfg.ProbeHz, "UDP echo probes per second during the blast (0 = none)")
	flag.IntVar(&cfg.Batch, "batch", cfg.Batch, "messages per RecvBatch in the batch modes")
	flag.Uint64Var(&cfg.QLen, "qlen", cfg.QLen, "consumer ParamQueueLength (0 = default)")
	flag.Uint64Var(&cfg.QSize, "qsize", cfg.QSize, "consumer ParamQueueSize bytes (0 = default)")
	flag.Uint64Var(&cfg.QTime, "qtime", cfg.QTime, "consumer ParamQueueTime ms (0 = default)")
	flag.BoolVar(&cfg.Pin, "pin", cfg.Pin, "pin the generator to CPU 0 and everything else to CPU 1")
	flag.BoolVar(&cfg.RPS, "rps", cfg.RPS, "steer the receiver's input path to CPU 1 (RPS), off the sending CPU")
	flag.BoolVar(&cfg.IPv6, "6", cfg.IPv6, "send over IPv6 (fd00::/8) instead of IPv4")
	flag.StringVar(&cfg.FilterAll, "filter", cfg.FilterAll, "filter of the recv and batch modes")
	flag.StringVar(&cfg.FilterNarrow, "filter-narrow", cfg.FilterNarrow, "filter of the narrow and tcp-narrow modes")
	flag.StringVar(&cfg.FilterTCP, "filter-tcp", cfg.FilterTCP, "filter of the tcp-batch mode")
	flag.StringVar(&cfg.CPUProfile, "cpuprofile", "", "write the consumer's CPU profile of each batch-loop run to FILE.N")
	flag.Float64Var(&cfg.QuietMax, "quiet", cfg.QuietMax, "before each run wait until other processes use at most this many cores (0 = do not wait) ...")
	flag.DurationVar(&cfg.QuietWait, "quietwait", cfg.QuietWait, "... but at most this long (then run anyway, flagged noisy)")
	jsonOut := flag.String("json", "", "also write all results as JSON to this file")
	flag.Parse()
	if flag.NArg() > 0 {
		// "-tcp false" would otherwise turn the TCP modes on and drop
		// every flag after it.
		fmt.Fprintf(os.Stderr, "divertbench: unexpected argument %q (boolean flags take -flag=false)\n", flag.Arg(0))
		os.Exit(2)
	}
	cfg.Modes = nil
	for _, m := range strings.Split(*modes, ",") {
		if m = strings.TrimSpace(m); m != "" {
			cfg.Modes = append(cfg.Modes, m)
		}
	}
	cfg.Log = os.Stderr

	// SIGPIPE too: a reader of its output that goes away stops the run,
	// which then removes its namespaces (see exutil.SignalContext).
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM, syscall.SIGPIPE)
	defer stop()
	s, err := Run(ctx, cfg)
	if s != nil {
		s.WriteText(os.Stdout)
		if *jsonOut != "" {
			f, ferr := os.Create(*jsonOut)
			if ferr == nil {
				ferr = s.WriteJSON(f)
				if cerr := f.Close(); ferr == nil {
					ferr = cerr
				}
			}
			if ferr != nil {
				fmt.Fprintln(os.Stderr, "divertbench:", ferr)
			}
		}
	}
	switch {
	case errors.Is(err, context.Canceled):
		fmt.Fprintln(os.Stderr, "divertbench: interrupted; the table covers the runs completed")
		stop()
		os.Exit(1)
	case err != nil:
		fmt.Fprintln(os.Stderr, "divertbench:", err)
		stop()
		os.Exit(1)
	case s != nil && s.Failed() > 0:
		fmt.Fprintf(os.Stderr, "divertbench: %d of %d runs failed (ERROR lines above)\n", s.Failed(), len(s.Runs)+len(s.TCP))
		stop()
		os.Exit(1)
	}
}
