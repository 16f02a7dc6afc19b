// Package exutil holds what the divert examples share: plain-language errors,
// command-line parsing of layers, a small packet summary for printing, and a
// status line. It is example code, pure Go, and builds on every OS.
package exutil

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/netdivert/divert"
)

// PrivilegeHint is the sentence printed when an example lacks privileges.
const PrivilegeHint = "divert needs administrator privileges: run as root (for example with sudo) on Linux and FreeBSD, or as Administrator on Windows"

// Explain returns err with a plain sentence added when the cause is one a
// user can fix: missing privileges or an OS that lacks the feature. The
// result still wraps err.
func Explain(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, os.ErrPermission):
		return fmt.Errorf("%w\n%s", err, PrivilegeHint)
	case errors.Is(err, divert.ErrNotSupported):
		return fmt.Errorf("%w\nthis feature is not available on %s with its divert backend", err, runtime.GOOS)
	}
	return err
}

// Fatal prints err, explained, to stderr and exits with status 1.
func Fatal(prog string, err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", prog, Explain(err))
	os.Exit(1)
}

// SignalContext returns a context cancelled on Ctrl-C (SIGINT), SIGTERM or
// SIGPIPE. SIGPIPE comes when the reader of the program's output goes
// away (`interceptor -demo | head`): without it the runtime would end the
// program at its next write to standard output, before it removed its
// rules and namespaces; with it that write fails (and is ignored) and the
// program stops as on Ctrl-C, cleaning up.
func SignalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGPIPE)
}

// StopOnDone stops h's receive loop when ctx is done: it shuts the handle
// down for receiving (queued packets can still be received and sent back),
// and closes it when the loop has not returned grace later. Call the
// returned function when the loop has returned.
func StopOnDone(ctx context.Context, h *divert.Handle, grace time.Duration) (loopDone func()) {
	done := make(chan struct{})
	go func() {
		select {
		case <-done:
			return
		case <-ctx.Done():
		}
		if err := h.Shutdown(divert.ShutdownRecv); err != nil {
			h.Close()
			return
		}
		t := time.NewTimer(grace)
		defer t.Stop()
		select {
		case <-done:
		case <-t.C:
			h.Close()
		}
	}()
	return func() { close(done) }
}

// Stopped reports whether err means the receive loop ended because the
// handle was shut down or closed, not because of a fault.
func Stopped(err error) bool {
	return errors.Is(err, divert.ErrShutdown) || errors.Is(err, net.ErrClosed)
}

// ParseLayer parses a layer name: "network" or "forward"
// ("network_forward"), case-insensitive.
func ParseLayer(s string) (divert.Layer, error) {
	switch strings.ToLower(strings.ReplaceAll(s, "-", "_")) {
	case "network", "net":
		return divert.LayerNetwork, nil
	case "forward", "network_forward":
		return divert.LayerNetworkForward, nil
	}
	return 0, fmt.Errorf("unknown layer %q (want network or forward)", s)
}

// Direction returns "OUT" or "IN" for an address.
func Direction(a *divert.Address) string {
	if a.Outbound {
		return "OUT"
	}
	return "IN"
}

// PacketTime returns when a packet was taken. Linux and FreeBSD addresses
// carry Unix nanoseconds; Windows carries performance-counter ticks, which
// are not wall time, so there the receive time is used.
func PacketTime(a *divert.Address) time.Time {
	if runtime.GOOS == "windows" || a.Timestamp <= 0 {
		return time.Now()
	}
	return time.Unix(0, a.Timestamp)
}
