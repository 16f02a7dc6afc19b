//go:build !linux

package main

import (
	"context"
	"fmt"
	"io"
	"runtime"

	"github.com/netdivert/divert"
)

func runDemo(ctx context.Context, c *config, out io.Writer) error {
	return fmt.Errorf("-demo builds its network namespaces with Linux tools and does not run on %s: %w", runtime.GOOS, divert.ErrNotSupported)
}
