package exutil

import (
	"context"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
)

// StatusLine is a one-line progress display. On a terminal it rewrites one
// line in place; elsewhere (a pipe, a log) it writes one line per update.
type StatusLine struct {
	mu    sync.Mutex
	w     io.Writer
	tty   bool
	dirty bool
}

// NewStatusLine returns a status line writing to f.
func NewStatusLine(f *os.File) *StatusLine {
	tty := false
	if fi, err := f.Stat(); err == nil {
		tty = fi.Mode()&os.ModeCharDevice != 0
	}
	return &StatusLine{w: f, tty: tty}
}

// Update shows line.
func (s *StatusLine) Update(line string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tty {
		fmt.Fprintf(s.w, "\r\x1b[K%s", line)
		s.dirty = true
		return
	}
	fmt.Fprintln(s.w, line)
}

// Done ends the status line so that later output starts on a fresh line.
func (s *StatusLine) Done() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dirty {
		fmt.Fprintln(s.w)
		s.dirty = false
	}
}

// Run calls line every interval and shows its result, until ctx is done;
// then it shows line once more and ends the status line.
func (s *StatusLine) Run(ctx context.Context, interval time.Duration, line func() string) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			s.Update(line())
			s.Done()
			return
		case <-t.C:
			s.Update(line())
		}
	}
}

// Start runs s.Run(ctx, interval, line) in the background and returns a
// function that cancels it and waits until the last line is shown. A
// status line thus ends when ctx is done or when stop is called, whichever
// comes first.
func (s *StatusLine) Start(ctx context.Context, interval time.Duration, line func() string) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.Run(ctx, interval, line)
	}()
	return func() { cancel(); <-done }
}

// Meter turns running totals into rates.
type Meter struct {
	t            time.Time
	pkts, bytes  uint64
	pps, bitRate float64
}

// Rate returns the packet and bit rates since the previous call.
func (m *Meter) Rate(now time.Time, pkts, bytes uint64) (pps, bitsPerSec float64) {
	if !m.t.IsZero() {
		if d := now.Sub(m.t).Seconds(); d > 0 {
			m.pps = float64(pkts-m.pkts) / d
			m.bitRate = float64(bytes-m.bytes) * 8 / d
		}
	}
	m.t, m.pkts, m.bytes = now, pkts, bytes
	return m.pps, m.bitRate
}

// Bytes formats a byte count with a binary unit ("1.5 KiB").
func Bytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// BitRate formats a rate in bits per second with a decimal unit.
func BitRate(bps float64) string {
	switch {
	case bps >= 1e9:
		return fmt.Sprintf("%.2f Gbit/s", bps/1e9)
	case bps >= 1e6:
		return fmt.Sprintf("%.2f Mbit/s", bps/1e6)
	case bps >= 1e3:
		return fmt.Sprintf("%.1f kbit/s", bps/1e3)
	}
	return fmt.Sprintf("%.0f bit/s", bps)
}
