package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/netdivert/divert/internal/netnstest"
)

// child is a role process running inside a namespace.
type child struct {
	role   string
	cmd    *exec.Cmd
	ready  chan struct{}
	done   chan struct{} // closed when the process has exited and its output is read
	err    error         // Wait's error, valid after done
	result string        // the JSON line, valid after done
	stderr lockedBuf
}

// lockedBuf keeps the first 8 KiB of a child's stderr.
type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if room := 8192 - l.b.Len(); room > 0 {
		l.b.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (l *lockedBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.TrimSpace(l.b.String())
}

// startChild runs this executable as role inside ns (`ip netns exec`),
// pinned to cpus when not empty. ctx ending sends SIGTERM, then SIGKILL
// 3 s later; the child also dies with this process (PDEATHSIG).
func startChild(ctx context.Context, exe string, ns *netnstest.NS, cpus, role string, cfg *childConfig) (*child, error) {
	b, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	return startCmd(ctx, ns, cpus, role, []string{exe}, []string{envRole + "=" + role, envConfig + "=" + string(b)}, false)
}

// startCmd runs argv inside ns; extraEnv is added to this process's
// environment. A raw child's result is its whole output (another tool's,
// e.g. iperf3 -J); otherwise it is the line starting with '{' and the
// child signals readiness with a "ready" line.
func startCmd(ctx context.Context, ns *netnstest.NS, cpus, role string, argv, extraEnv []string, raw bool) (*child, error) {
	var full []string
	if cpus != "" {
		full = append(full, "taskset", "-c", cpus) // taskset and ip exec: the pid stays the program's
	}
	full = append(full, "ip", "netns", "exec", ns.Name)
	full = append(full, argv...)
	c := &child{role: role, ready: make(chan struct{}), done: make(chan struct{})}
	cmd := exec.CommandContext(ctx, full[0], full[1:]...)
	cmd.Env = append(cmd.Environ(), extraEnv...)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 3 * time.Second
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.Stderr = &c.stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", role, err)
	}
	c.cmd = cmd
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		var once sync.Once
		var all []string
		for sc.Scan() {
			line := sc.Text()
			switch {
			case raw:
				all = append(all, line)
			case line == "ready":
				once.Do(func() { close(c.ready) })
			case strings.HasPrefix(line, "{"):
				c.result = line
			}
		}
		if raw {
			c.result = strings.Join(all, "\n")
		}
		c.err = cmd.Wait()
		close(c.done)
	}()
	return c, nil
}

func (c *child) pid() int { return c.cmd.Process.Pid }

func (c *child) failure(what string) error {
	msg := c.stderr.String()
	if msg == "" {
		msg = c.result
		if len(msg) > 400 {
			msg = msg[:400] + "..."
		}
	}
	if c.err != nil {
		msg = strings.TrimSpace(c.err.Error() + ": " + msg)
	}
	return fmt.Errorf("%s %s: %s", c.role, what, msg)
}

// waitReady waits until the child printed "ready".
func (c *child) waitReady(timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-c.ready:
		return nil
	case <-c.done:
		return c.failure("exited before it was ready")
	case <-t.C:
		c.kill()
		return c.failure(fmt.Sprintf("not ready after %v", timeout))
	}
}

// wait waits for the child to end by itself and decodes its result into v.
func (c *child) wait(timeout time.Duration, v any) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-c.done:
	case <-t.C:
		c.kill()
		return c.failure(fmt.Sprintf("still running after %v (killed)", timeout))
	}
	return c.decode(v)
}

// stop sends SIGTERM, waits up to 3 s (then SIGKILL) and decodes the result
// into v (nil: ignore it).
func (c *child) stop(v any) error {
	c.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(3 * time.Second)
	defer t.Stop()
	select {
	case <-c.done:
	case <-t.C:
		c.kill()
		return c.failure("ignored SIGTERM for 3 s (killed)")
	}
	if v == nil {
		return nil
	}
	return c.decode(v)
}

func (c *child) kill() {
	c.cmd.Process.Kill()
	<-c.done
}

func (c *child) decode(v any) error {
	if c.err != nil {
		return c.failure("failed")
	}
	if c.result == "" {
		return c.failure("printed no result")
	}
	if err := json.Unmarshal([]byte(c.result), v); err != nil {
		return fmt.Errorf("%s result %q: %w", c.role, c.result, err)
	}
	return nil
}
