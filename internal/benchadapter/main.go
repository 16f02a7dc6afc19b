// Command benchadapter is the "ours" mode of the NFQUEUE throughput bench
// (/work/shared/bench/run.sh, OURS_DIR=internal/benchadapter): it attaches to
// the bench's NFQUEUE queue with divert.OpenPort and reinjects every packet
// unchanged with the batch loop the package documentation recommends
// (RecvBatch then SendBatch on the same messages).
//
// Contract with run.sh: flags -q N, -qlen L, -rcvbuf B, -t DURATION; bind
// queue N in copy-packet mode; no fail-open, no bypass; exit within 3 s of
// SIGTERM/SIGINT (and after -t at the latest), then print
// "daemon_verdicts=<packets reinjected>" on stdout; every loop but single
// adds "daemon_batches=<batches that brought packets>", as cnfq's batch
// mode prints its batches.
//
// Extra flags: -batch (messages per RecvBatch, 1..divert.BatchMax), -loop
// single (Recv→Send instead of the batch loop), -loop conn (the floor under
// the batch loop: the queue socket layer, internal/nfq, without a Handle;
// see conn_linux.go), -loop floor-recv and -loop floor-mmsg (the floor under
// that: the C batch loop's algorithm in Go with raw syscalls, reading one
// datagram per recvfrom or eight per recvmmsg; -loop floor-poll waits in
// the runtime's poller instead; see floor_linux.go) and
// -cpuprofile FILE (a pprof CPU profile of the whole run,
// for `go tool pprof -top`). Because run.sh
// passes no extra flags, the environment variables BENCHADAPTER_LOOP,
// BENCHADAPTER_BATCH and BENCHADAPTER_CPUPROFILE (a path prefix; the pid is
// appended) set the same things:
//
//	BENCHADAPTER_CPUPROFILE=/tmp/ours OURS_DIR=internal/benchadapter ../shared/bench/run.sh
//	go tool pprof -top /tmp/ours.<pid>
//
// Two scripts next to it measure side by side rather than one run after
// another: simul.sh runs this adapter and the shared bench's C batch loop
// at the same time on two queues (CPU per packet under a flood and idle,
// idle RTT), and narrowpair.sh floods two receivers at once, one behind a
// handle with a narrow filter (what the rules cost the traffic they do not
// match). See the README's performance section.
package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime/pprof"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/netdivert/divert"
)

func main() {
	queue := flag.Uint("q", 0, "NFQUEUE number (0..65535)")
	qlen := flag.Uint64("qlen", divert.QueueLengthDefault, "kernel queue max length (divert.ParamQueueLength)")
	rcvbuf := flag.Uint64("rcvbuf", divert.QueueSizeDefault, "netlink receive buffer bytes (divert.ParamQueueSize)")
	maxdur := flag.Duration("t", 60*time.Second, "hard cap on lifetime")
	batch := flag.Int("batch", 64, "messages per RecvBatch (1..255)")
	loop := flag.String("loop", "batch", "loop under test: batch (RecvBatch→SendBatch), single (Recv→Send), conn (internal/nfq alone), floor-recv or floor-mmsg (raw syscalls), floor-poll (raw syscalls, waiting in the runtime poller)")
	cpuprofile := flag.String("cpuprofile", "", "write a pprof CPU profile of the run to this file")
	if v := os.Getenv("BENCHADAPTER_LOOP"); v != "" {
		*loop = v
	}
	if v := os.Getenv("BENCHADAPTER_BATCH"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			fmt.Fprintln(os.Stderr, "ours: BENCHADAPTER_BATCH:", err)
			os.Exit(2)
		}
		*batch = n
	}
	if v := os.Getenv("BENCHADAPTER_CPUPROFILE"); v != "" {
		*cpuprofile = fmt.Sprintf("%s.%d", v, os.Getpid())
	}
	flag.Parse()

	if err := run(*queue, *qlen, *rcvbuf, *maxdur, *batch, *loop, *cpuprofile); err != nil {
		fmt.Fprintln(os.Stderr, "ours:", err)
		os.Exit(1)
	}
}

func run(queue uint, qlen, rcvbuf uint64, maxdur time.Duration, batch int, loop, cpuprofile string) error {
	if queue > 0xFFFF {
		return fmt.Errorf("queue %d out of range", queue)
	}
	if batch < 1 || batch > divert.BatchMax {
		return fmt.Errorf("-batch %d out of range [1, %d]", batch, divert.BatchMax)
	}
	floor := loop == "floor-recv" || loop == "floor-mmsg" || loop == "floor-poll"
	if loop != "batch" && loop != "single" && loop != "conn" && !floor {
		return fmt.Errorf("-loop %q: want batch, single, conn, floor-recv, floor-mmsg or floor-poll", loop)
	}
	// No FlagPassThrough, no FlagFailOpen: a slow loop must show up as loss.
	var h stopper
	var dh *divert.Handle
	var c *connLoop
	if loop == "conn" || floor {
		var err error
		if c, err = openConnLoop(uint16(queue), qlen, rcvbuf); err != nil {
			return err
		}
		h = c
	} else {
		var err error
		if dh, err = divert.OpenPort(uint16(queue), 0); err != nil {
			return err
		}
		h = dh
		if err := dh.SetParam(divert.ParamQueueLength, qlen); err != nil {
			dh.Close()
			return err
		}
		if err := dh.SetParam(divert.ParamQueueSize, rcvbuf); err != nil {
			dh.Close()
			return err
		}
	}
	defer h.Close()
	if cpuprofile != "" {
		f, err := os.Create(cpuprofile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}

	// Stop: a past read deadline makes the blocked RecvBatch return
	// os.ErrDeadlineExceeded, so the packets in hand are still reinjected.
	// Close is the backstop if the loop does not notice within 2 s.
	var stopping atomic.Bool
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-sig:
		case <-time.After(maxdur):
		case <-done:
			return
		}
		stopping.Store(true)
		h.SetReadDeadline(time.Unix(1, 0))
		select {
		case <-done:
		case <-time.After(2 * time.Second):
			h.Close()
		}
	}()

	var verdicts, batches uint64
	var err error
	switch loop {
	case "batch":
		verdicts, batches, err = batchLoop(dh, batch, &stopping)
	case "single":
		verdicts, err = singleLoop(dh, &stopping)
	case "conn":
		verdicts, batches, err = c.run(&stopping)
	default:
		verdicts, batches, err = c.runFloor(loop, os.Getenv("BENCHADAPTER_FLOOR_HOT") != "", &stopping)
	}
	fmt.Printf("daemon_verdicts=%d\n", verdicts)
	if loop != "single" {
		fmt.Printf("daemon_batches=%d\n", batches)
	}
	return err
}

// stopper is what the stop goroutine needs of a *divert.Handle or, with
// -loop conn, a *connLoop.
type stopper interface {
	SetReadDeadline(t time.Time) error
	Close() error
}

// stopErr reports whether err ends the loop normally: the stop deadline
// passed or the backstop closed the handle (net.ErrClosed) or the Conn
// (os.ErrClosed).
func stopErr(err error, stopping *atomic.Bool) bool {
	return stopping.Load() && (errors.Is(err, os.ErrDeadlineExceeded) ||
		errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrClosed))
}

// batchLoop is the documented fast loop: one RecvBatch, then one SendBatch of
// the same messages, unchanged.
func batchLoop(h *divert.Handle, batch int, stopping *atomic.Bool) (verdicts, batches uint64, err error) {
	ms := make([]divert.Message, batch)
	for i := range ms {
		ms[i].Buf = make([]byte, divert.MTUMax)
	}
	for {
		n, err := h.RecvBatch(ms)
		if errors.Is(err, divert.ErrTruncated) {
			// Cannot happen with MTUMax buffers; never echo a cut packet.
			return verdicts, batches, fmt.Errorf("RecvBatch: %w", err)
		}
		if n > 0 {
			batches++
			sent, serr := h.SendBatch(ms[:n])
			verdicts += uint64(sent)
			if serr != nil && !stopErr(serr, stopping) {
				return verdicts, batches, fmt.Errorf("SendBatch: %w", serr)
			}
		}
		if err != nil {
			if stopErr(err, stopping) {
				return verdicts, batches, nil
			}
			return verdicts, batches, fmt.Errorf("RecvBatch: %w", err)
		}
	}
}

// singleLoop is the classic loop of the package documentation: Recv, Send.
func singleLoop(h *divert.Handle, stopping *atomic.Bool) (uint64, error) {
	buf := make([]byte, divert.MTUMax)
	var addr divert.Address
	var verdicts uint64
	for {
		n, err := h.Recv(buf, &addr)
		if err != nil {
			if stopErr(err, stopping) {
				return verdicts, nil
			}
			return verdicts, fmt.Errorf("Recv: %w", err)
		}
		if _, err := h.Send(buf[:n], &addr); err != nil {
			if stopErr(err, stopping) {
				return verdicts, nil
			}
			return verdicts, fmt.Errorf("Send: %w", err)
		}
		verdicts++
	}
}
