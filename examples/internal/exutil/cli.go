package exutil

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/netdivert/divert"
)

// ParseArgs parses args with fs and rejects positional arguments: the
// examples take flags only.
func ParseArgs(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	return nil
}

// ParsePriority checks a -priority flag against the range divert.Open
// accepts and converts it.
func ParsePriority(p int) (int16, error) {
	if p < divert.PriorityLowest || p > divert.PriorityHighest {
		return 0, fmt.Errorf("-priority %d outside %d..%d", p, divert.PriorityLowest, divert.PriorityHighest)
	}
	return int16(p), nil
}

// CheckFlags ends the program when parsing its command line failed: with
// status 0 after -help (the flag package has printed the usage), otherwise
// with the error on stderr and status 2. It returns when err is nil.
func CheckFlags(prog string, err error) {
	if code, msg := flagExit(prog, err); code >= 0 {
		if msg != "" {
			fmt.Fprint(os.Stderr, msg)
		}
		os.Exit(code)
	}
}

// flagExit is CheckFlags' decision: the exit status (-1: go on) and what to
// print first.
func flagExit(prog string, err error) (code int, msg string) {
	switch {
	case err == nil:
		return -1, ""
	case errors.Is(err, flag.ErrHelp):
		return 0, ""
	}
	return 2, fmt.Sprintf("%s: %v\n", prog, err)
}

// Context returns a context cancelled on Ctrl-C (SIGINT) or SIGTERM and,
// when limit is positive, after limit (a -duration flag). stop releases
// both.
func Context(limit time.Duration) (ctx context.Context, stop context.CancelFunc) {
	ctx, stopSignals := SignalContext()
	if limit <= 0 {
		return ctx, stopSignals
	}
	ctx, cancel := context.WithTimeout(ctx, limit)
	return ctx, func() { cancel(); stopSignals() }
}

// Run runs an example's body with the context Context(limit) gives and
// exits with status 1 and the error, explained (see Explain), when the body
// fails. The signal handling is released before the exit.
func Run(prog string, limit time.Duration, body func(ctx context.Context) error) {
	ctx, stop := Context(limit)
	err := body(ctx)
	stop()
	if err != nil {
		Fatal(prog, err)
	}
}

// HandleFlags are the command-line flags that choose what a handle diverts:
// -filter, -layer and -priority, the first three arguments of divert.Open.
// Embed it in an example's configuration, call Register before parsing the
// command line and Parse after.
type HandleFlags struct {
	Filter   string       // -filter: the WinDivert filter
	Layer    divert.Layer // -layer, parsed by ParseLayer
	Priority int16        // -priority, checked by ParsePriority

	layer    string
	priority int
}

// Register defines -filter (default filter, help filterUsage), -layer and
// -priority (help prioUsage) on fs.
func (h *HandleFlags) Register(fs *flag.FlagSet, filter, filterUsage, prioUsage string) {
	fs.StringVar(&h.Filter, "filter", filter, filterUsage)
	fs.StringVar(&h.layer, "layer", "network", "layer: network or forward")
	fs.IntVar(&h.priority, "priority", 0, prioUsage)
}

// Parse fills Layer and Priority from the parsed -layer and -priority.
func (h *HandleFlags) Parse() error {
	var err error
	if h.Layer, err = ParseLayer(h.layer); err != nil {
		return err
	}
	h.Priority, err = ParsePriority(h.priority)
	return err
}
