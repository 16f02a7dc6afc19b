//go:build !linux

package main

import (
	"errors"
	"sync/atomic"
	"time"
)

// connLoop runs internal/nfq alone, which exists on Linux only.
type connLoop struct{}

func openConnLoop(queue uint16, qlen, rcvbuf uint64) (*connLoop, error) {
	return nil, errors.New("-loop conn: NFQUEUE is Linux-only")
}

func (*connLoop) SetReadDeadline(time.Time) error { return nil }
func (*connLoop) Close() error                    { return nil }
func (*connLoop) run(*atomic.Bool) (verdicts, batches uint64, err error) {
	return 0, 0, errors.New("-loop conn: NFQUEUE is Linux-only")
}

func (*connLoop) runFloor(string, bool, *atomic.Bool) (verdicts, batches uint64, err error) {
	return 0, 0, errors.New("-loop floor-*: NFQUEUE is Linux-only")
}
