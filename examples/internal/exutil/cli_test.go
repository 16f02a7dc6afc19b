package exutil

import (
	"context"
	"errors"
	"flag"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/netdivert/divert"
)

func newFS() *flag.FlagSet {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return fs
}

func TestHandleFlags(t *testing.T) {
	var h HandleFlags
	fs := newFS()
	h.Register(fs, "icmp", "f", "p")
	if err := ParseArgs(fs, []string{"-layer", "forward", "-priority", "-7"}); err != nil {
		t.Fatal(err)
	}
	if err := h.Parse(); err != nil {
		t.Fatal(err)
	}
	if h.Filter != "icmp" || h.Layer != divert.LayerNetworkForward || h.Priority != -7 {
		t.Errorf("got %+v", h)
	}
	for _, args := range [][]string{{"-layer", "socket"}, {"-priority", "30001"}, {"-priority", "-30001"}} {
		var h HandleFlags
		fs := newFS()
		h.Register(fs, "true", "", "")
		if err := ParseArgs(fs, args); err != nil {
			t.Fatal(err)
		}
		if err := h.Parse(); err == nil {
			t.Errorf("%q accepted", args)
		}
	}
}

func TestParseArgs(t *testing.T) {
	if err := ParseArgs(newFS(), []string{"extra"}); err == nil || !strings.Contains(err.Error(), `"extra"`) {
		t.Errorf("positional argument: %v", err)
	}
	if err := ParseArgs(newFS(), []string{"-h"}); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("-h: %v, want flag.ErrHelp", err)
	}
	if p, err := ParsePriority(30000); p != 30000 || err != nil {
		t.Errorf("ParsePriority(30000) = %d, %v", p, err)
	}
}

func TestFlagExit(t *testing.T) {
	for _, tc := range []struct {
		err  error
		code int
		msg  string
	}{
		{nil, -1, ""},
		{flag.ErrHelp, 0, ""},
		{errors.New("bad"), 2, "p: bad\n"},
	} {
		if code, msg := flagExit("p", tc.err); code != tc.code || msg != tc.msg {
			t.Errorf("flagExit(%v) = %d, %q; want %d, %q", tc.err, code, msg, tc.code, tc.msg)
		}
	}
}

func TestContext(t *testing.T) {
	ctx, stop := Context(20 * time.Millisecond)
	defer stop()
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the -duration limit did not end the context")
	}
	if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
		t.Errorf("err %v", ctx.Err())
	}
	ctx, stop = Context(0)
	if _, ok := ctx.Deadline(); ok {
		t.Error("no limit, yet a deadline")
	}
	stop()
	if ctx.Err() == nil {
		t.Error("stop did not cancel")
	}
}

func TestStatusLineStart(t *testing.T) {
	var b strings.Builder
	s := &StatusLine{w: &b}
	n := 0
	stop := s.Start(context.Background(), time.Hour, func() string { n++; return "line" })
	stop()
	if b.String() != "line\n" || n != 1 {
		t.Errorf("wrote %q after %d calls; want one final line", b.String(), n)
	}
}
