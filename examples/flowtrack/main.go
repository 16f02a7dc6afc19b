// Command flowtrack prints the host's flows as they are established and
// deleted, like WinDivert's flowtrack sample: a handle at LayerFlow
// (Windows: WinDivert's flow layer; Linux: conntrack's events) reports each
// flow with a local endpoint, and flowtrack prints one line per event:
// time, ESTABLISHED or DELETED, protocol, local -> remote, direction, and
// the owning process when the OS tells it.
//
//	sudo flowtrack                          # every flow, until Ctrl-C
//	sudo flowtrack -filter "tcp and remotePort == 443" -count 10
//	sudo flowtrack -demo                    # Linux: a self-contained demonstration in namespaces
//
// On Linux a deletion comes when conntrack forgets the flow: TCP's
// TIME_WAIT (120 s) after the close, 30 s after a UDP flow's last packet
// (120 s once it saw packets both ways and one more 2 s after its first),
// and up to a minute later, when the kernel's garbage collector finds the
// entry expired.
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
	"time"

	"github.com/netdivert/divert"
	"github.com/netdivert/divert/examples/internal/exutil"
)

const prog = "flowtrack"

// config is the command line.
type config struct {
	filter   string
	count    uint64
	duration time.Duration
	json     bool
	demo     bool
}

func parseFlags(args []string) (*config, error) {
	fs := flag.NewFlagSet(prog, flag.ContinueOnError)
	c := &config{}
	fs.StringVar(&c.filter, "filter", "true", "WinDivert filter (flow layer fields: event, outbound, loopback, tcp, udp, protocol, localAddr, remoteAddr, localPort, remotePort, processId, ...)")
	fs.Uint64Var(&c.count, "count", 0, "stop after this many events (0 = no limit)")
	fs.DurationVar(&c.duration, "duration", 0, "stop after this long (0 = until Ctrl-C)")
	fs.BoolVar(&c.json, "json", false, "print the summary as JSON on stdout (event lines go to stderr)")
	fs.BoolVar(&c.demo, "demo", false, "Linux: run a self-contained demonstration in private network namespaces")
	if err := exutil.ParseArgs(fs, args); err != nil {
		return nil, err
	}
	if c.demo && c.count > 0 {
		return nil, errors.New("-demo takes no -count")
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

// Summary is the -json output.
type Summary struct {
	Established uint64      `json:"established"`
	Deleted     uint64      `json:"deleted"`
	Overflows   uint64      `json:"overflows"` // events lost (Stats.Overflows)
	Demo        *DemoResult `json:"demo,omitempty"`
}

// eventOut is where the event lines go: out, or stderr when stdout
// carries the JSON summary.
func (c *config) eventOut(out io.Writer) io.Writer {
	if c.json {
		return os.Stderr
	}
	return out
}

func open(filter string) (*divert.Handle, error) {
	h, err := divert.Open(filter, divert.LayerFlow, 0, divert.FlagSniff|divert.FlagRecvOnly)
	if err != nil {
		return nil, fmt.Errorf("open filter %q at the flow layer: %w", filter, err)
	}
	return h, nil
}

func run(ctx context.Context, c *config, out io.Writer) error {
	h, err := open(c.filter)
	if err != nil {
		return err
	}
	defer h.Close()
	fmt.Fprintf(os.Stderr, "%s: tracking flows matching %q; Ctrl-C stops\n", prog, c.filter)
	var s Summary
	err = track(ctx, h, c.count, c.eventOut(out), &s, nil)
	s.print(out, h, c.json)
	return err
}

// track receives flow events from h until ctx is done, count events were
// seen (0: no limit) or the handle fails, printing and counting each one,
// and handing it to seen when not nil.
func track(ctx context.Context, h *divert.Handle, count uint64, out io.Writer, s *Summary, seen func(*divert.Address)) error {
	loopDone := exutil.StopOnDone(ctx, h, 2*time.Second)
	defer loopDone()
	var a divert.Address
	for count == 0 || s.Established+s.Deleted < count {
		// A flow event carries no packet: no buffer.
		if _, err := h.Recv(nil, &a); err != nil {
			if exutil.Stopped(err) && ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("receive: %w", err)
		}
		fmt.Fprintln(out, formatEvent(&a))
		switch a.Event {
		case divert.EventFlowEstablished:
			s.Established++
		case divert.EventFlowDeleted:
			s.Deleted++
		}
		if seen != nil {
			seen(&a)
		}
	}
	return nil
}

// formatEvent is one line: time, event, protocol, local -> remote,
// direction, loopback, process.
func formatEvent(a *divert.Address) string {
	f := &a.Flow
	local := endpoint(f.LocalAddr, f.LocalPort, a)
	remote := endpoint(f.RemoteAddr, f.RemotePort, a)
	proto := exutil.ProtoName(f.Protocol)
	if f.Protocol == 1 || f.Protocol == 58 {
		// The ports hold the type and code of the flow's first packet.
		local, remote = endpoint(f.LocalAddr, 0, a), endpoint(f.RemoteAddr, 0, a)
		proto += fmt.Sprintf(" type=%d code=%d", f.LocalPort, f.RemotePort)
	}
	extra := ""
	if a.Loopback {
		extra = " loopback"
	}
	pid := "pid=?"
	if f.ProcessID != 0 {
		pid = fmt.Sprintf("pid=%d", f.ProcessID)
	}
	return fmt.Sprintf("%s %-11s %s %s -> %s %-3s%s %s", exutil.PacketTime(a).Format("15:04:05.000"), a.Event, proto, local, remote,
		exutil.Direction(a), extra, pid)
}

func endpoint(addr [16]byte, port uint16, a *divert.Address) string {
	ip := netip.AddrFrom16(addr)
	if !a.IPv6 {
		ip = ip.Unmap()
	}
	if port == 0 && (a.Flow.Protocol == 1 || a.Flow.Protocol == 58) {
		return ip.String()
	}
	return netip.AddrPortFrom(ip, port).String()
}

func (s *Summary) print(w io.Writer, h *divert.Handle, asJSON bool) {
	if st, err := h.Stats(); err == nil {
		s.Overflows = st.Overflows
	}
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(s)
		return
	}
	fmt.Fprintf(w, "\n%d established, %d deleted, %d lost\n", s.Established, s.Deleted, s.Overflows)
}
