//go:build linux

// Package extest runs the examples' built binaries inside network
// namespaces for their end-to-end tests.
package extest

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/netdivert/divert/internal/netnstest"
)

var (
	buildMu  sync.Mutex
	buildDir string
	buildBin string
)

// Build compiles the main package in the test's working directory (the
// example's directory) once per test binary and returns the binary's path.
// Call Cleanup from TestMain to remove it.
func Build(t testing.TB) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if buildBin != "" {
		return buildBin
	}
	dir, err := os.MkdirTemp("", "divert-example-")
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "example")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// go test puts its own GOROOT/bin first in the test's PATH.
	out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		os.RemoveAll(dir)
		t.Fatalf("go build: %v\n%s", err, out)
	}
	// Readable and executable for the no-privilege tests (nobody).
	os.Chmod(dir, 0o755)
	buildDir, buildBin = dir, bin
	return bin
}

// Cleanup removes the binary Build made.
func Cleanup() {
	buildMu.Lock()
	defer buildMu.Unlock()
	if buildDir != "" {
		os.RemoveAll(buildDir)
		buildDir, buildBin = "", ""
	}
}

// Main is TestMain for the examples' tests: it runs them and removes the
// built binary.
func Main(m *testing.M) {
	code := m.Run()
	Cleanup()
	os.Exit(code)
}

// Proc is a binary running in a namespace.
type Proc struct {
	cmd            *exec.Cmd
	stdout, stderr SyncBuffer
	done           chan struct{}
	err            error
}

// Start starts bin with args inside ns (ip netns exec). The process is
// killed after limit and, at the latest, when the test ends.
func Start(t testing.TB, ns *netnstest.NS, limit time.Duration, bin string, args ...string) *Proc {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	argv := append([]string{"netns", "exec", ns.Name, bin}, args...)
	p := &Proc{cmd: exec.CommandContext(ctx, "ip", argv...), done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = &p.stdout, &p.stderr
	p.cmd.WaitDelay = 2 * time.Second
	if err := p.cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); cancel(); close(p.done) }()
	t.Cleanup(func() {
		cancel()
		<-p.done
	})
	return p
}

// Interrupt sends SIGINT (Ctrl-C) to the process.
func (p *Proc) Interrupt() error { return p.cmd.Process.Signal(interrupt) }

// Wait waits for the process to end and returns its error (nil for exit
// status 0), stdout and stderr.
func (p *Proc) Wait() (stdout, stderr string, err error) {
	<-p.done
	return p.stdout.String(), p.stderr.String(), p.err
}

// Output returns what the process wrote so far.
func (p *Proc) Output() (stdout, stderr string) { return p.stdout.String(), p.stderr.String() }

// WaitReady waits up to 10 s for the example's "Ctrl-C stops" line on
// stderr, which it prints once its handle is open; when it does not come,
// it interrupts the example and fails t with what it printed.
func (p *Proc) WaitReady(t testing.TB) {
	t.Helper()
	if !WaitFor(10*time.Second, func() bool { _, e := p.Output(); return strings.Contains(e, "Ctrl-C stops") }) {
		p.Interrupt()
		out, errOut, err := p.Wait()
		t.Fatalf("not ready: %v\nstdout:\n%s\nstderr:\n%s", err, out, errOut)
	}
}

// DecodeJSON decodes an example's -json summary from stdout, failing t
// when it is not one.
func DecodeJSON[T any](t testing.TB, stdout string) T {
	t.Helper()
	var v T
	if err := json.Unmarshal([]byte(stdout), &v); err != nil {
		t.Fatalf("summary is not JSON: %v\n%s", err, stdout)
	}
	return v
}

// WaitFor polls until cond holds or limit passes, and reports whether it held.
func WaitFor(limit time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(limit)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Run runs bin with args inside ns to completion, bounded by limit.
func Run(t testing.TB, ns *netnstest.NS, limit time.Duration, bin string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	return Start(t, ns, limit, bin, args...).Wait()
}

// NoNamespaces fails t for each of the named network namespaces that
// still exists (a demo that should have removed its own), and removes it.
func NoNamespaces(t testing.TB, names ...string) {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			have[f[0]] = true
		}
	}
	for _, n := range names {
		if have[n] {
			exec.Command("ip", "netns", "del", n).Run()
			t.Errorf("namespace %s left behind", n)
		}
	}
}
