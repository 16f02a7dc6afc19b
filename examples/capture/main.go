// Command capture sniffs the packets a filter matches into a pcapng file
// that Wireshark and tshark read: one interface block per interface the
// packets name (LINKTYPE_RAW, nanosecond timestamps) and each packet's
// direction in its epb_flags. The packets are copies (FlagSniff): traffic
// is not disturbed.
//
//	sudo capture -filter "tcp.DstPort == 443 or tcp.SrcPort == 443" -o https.pcapng -duration 30s
//	tshark -r https.pcapng
//
// Ctrl-C stops it; the file is complete whenever it stops.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/netdivert/divert"
	"github.com/netdivert/divert/examples/internal/exutil"
)

const prog = "capture"

// config is the command line.
type config struct {
	exutil.HandleFlags // -filter, -layer, -priority
	out                string
	count              uint64
	duration           time.Duration
	snaplen            uint
	quiet              bool
}

func parseFlags(args []string) (*config, error) {
	fs := flag.NewFlagSet(prog, flag.ContinueOnError)
	c := &config{}
	c.Register(fs, "true", "WinDivert filter selecting the packets to capture", "handle priority, -30000..30000")
	fs.StringVar(&c.out, "o", "capture.pcapng", "output file (- for stdout)")
	fs.Uint64Var(&c.count, "count", 0, "stop after this many packets (0 = no limit)")
	fs.DurationVar(&c.duration, "duration", 0, "stop after this long (0 = until Ctrl-C)")
	fs.UintVar(&c.snaplen, "snaplen", 0, "keep at most this many bytes of each packet (0 = all)")
	fs.BoolVar(&c.quiet, "quiet", false, "no status line")
	if err := exutil.ParseArgs(fs, args); err != nil {
		return nil, err
	}
	if err := c.HandleFlags.Parse(); err != nil {
		return nil, err
	}
	if c.snaplen > divert.MTUMax {
		c.snaplen = 0
	}
	return c, nil
}

func main() {
	c, err := parseFlags(os.Args[1:])
	exutil.CheckFlags(prog, err)
	exutil.Run(prog, c.duration, func(ctx context.Context) error { return run(ctx, c) })
}

func run(ctx context.Context, c *config) error {
	h, err := divert.Open(c.Filter, c.Layer, c.Priority, divert.FlagSniff|divert.FlagRecvOnly)
	if err != nil {
		return fmt.Errorf("open filter %q: %w", c.Filter, err)
	}
	defer h.Close()

	var w io.Writer = os.Stdout
	if c.out != "-" {
		f, err := os.Create(c.out)
		if err != nil {
			return err
		}
		defer f.Close()
		w = f
	}
	pw, err := newPcapngWriter(w, uint32(c.snaplen), "divert capture example")
	if err != nil {
		return err
	}

	fmt.Fprintf(os.Stderr, "%s: capturing %q to %s; Ctrl-C stops\n", prog, c.Filter, c.out)
	var packets, bytes atomic.Uint64
	stopStatus := func() {}
	if !c.quiet {
		var meter exutil.Meter
		stopStatus = exutil.NewStatusLine(os.Stderr).Start(context.Background(), time.Second, func() string {
			pk, by := packets.Load(), bytes.Load()
			pps, bps := meter.Rate(time.Now(), pk, by)
			return fmt.Sprintf("captured %d packets, %s  rate %.0f pkt/s %s", pk, exutil.Bytes(by), pps, exutil.BitRate(bps))
		})
	}
	defer stopStatus() // on the early returns; the normal end stops it first

	fw := &flushingWriter{pw: pw}
	stopFlush := fw.flushEvery(time.Second)
	loopDone := exutil.StopOnDone(ctx, h, 2*time.Second)
	err = capture(ctx, h, c, fw, &packets, &bytes)
	loopDone()
	stopFlush()
	stopStatus() // before the last lines, which it would otherwise overwrite
	if ferr := fw.flush(); err == nil {
		err = ferr
	}
	if err == nil && c.out != "-" {
		fmt.Fprintf(os.Stderr, "%s: %d packets written to %s\n", prog, packets.Load(), c.out)
	}
	if st, serr := h.Stats(); serr == nil && st.Expired+st.Overflows+st.KernelQueueDropped+st.KernelUserDropped > 0 {
		fmt.Fprintf(os.Stderr, "%s: copies lost: %d expired unread, %d to a full receive buffer, %d dropped by the kernel's queue\n",
			prog, st.Expired, st.Overflows, st.KernelQueueDropped+st.KernelUserDropped)
	}
	return err
}

// flushingWriter is the pcapng writer shared by the capture loop and a
// once-a-second flush, so that a reader of the file (tshark -r -, or a
// capture killed) sees what came, also when traffic stops.
type flushingWriter struct {
	mu   sync.Mutex
	pw   *pcapngWriter
	ferr error // the first error of a periodic flush
}

// flushEvery flushes every d until the returned function is called.
func (fw *flushingWriter) flushEvery(d time.Duration) (stop func()) {
	done := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		t := time.NewTicker(d)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if err := fw.flush(); err != nil {
					fw.mu.Lock()
					if fw.ferr == nil {
						fw.ferr = err
					}
					fw.mu.Unlock()
				}
			}
		}
	}()
	return func() { close(done); <-exited }
}

func (fw *flushingWriter) flush() error {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	return fw.pw.Flush()
}

// write writes one packet, adding its interface first if it is new.
func (fw *flushingWriter) write(addr *divert.Address, pkt []byte) error {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	if fw.ferr != nil {
		return fw.ferr
	}
	id, ok := fw.pw.Interface(addr.IfIdx)
	if !ok { // the name costs a netlink request: only for a new interface
		var err error
		if id, err = fw.pw.AddInterface(addr.IfIdx, ifaceName(addr.IfIdx), ifaceDesc(addr.IfIdx)); err != nil {
			return err
		}
	}
	return fw.pw.WritePacket(id, exutil.PacketTime(addr), pkt, addr.Outbound)
}

// capture receives copies until ctx is done or c.count packets were
// written.
func capture(ctx context.Context, h *divert.Handle, c *config, fw *flushingWriter, packets, bytes *atomic.Uint64) error {
	buf := make([]byte, divert.MTUMax)
	var addr divert.Address
	for c.count == 0 || packets.Load() < c.count {
		n, err := h.Recv(buf, &addr)
		if err != nil && !errors.Is(err, divert.ErrTruncated) {
			if exutil.Stopped(err) && ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("receive: %w", err)
		}
		if err := fw.write(&addr, buf[:n]); err != nil {
			return err
		}
		packets.Add(1)
		bytes.Add(uint64(n))
	}
	return nil
}

// ifaceName names the interface with index idx, as the system does where
// it can (a netlink request): called once per interface.
func ifaceName(idx uint32) string {
	if idx == 0 {
		return "unknown"
	}
	if ifi, err := net.InterfaceByIndex(int(idx)); err == nil {
		return ifi.Name
	}
	return "if" + strconv.Itoa(int(idx))
}

func ifaceDesc(idx uint32) string {
	return "divert interface index " + strconv.Itoa(int(idx))
}
