//go:build linux

package netnstest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// nsDir is where ip(8) keeps named network namespaces.
const nsDir = "/run/netns"

// cmdTimeout bounds every ip(8) invocation made by this package.
const cmdTimeout = 10 * time.Second

var counter atomic.Uint32

// NS is a network namespace made by this process, removed by Close.
type NS struct {
	// Name is the namespace's name (ip netns list shows it).
	Name string

	mu     sync.Mutex
	closed bool
}

// New makes a network namespace with a unique name (prefix, the process id
// and a counter) and brings its loopback interface up.
func New(prefix string) (*NS, error) {
	if prefix == "" {
		prefix = "nt"
	}
	name := fmt.Sprintf("%s-%d-%d", prefix, os.Getpid(), counter.Add(1))
	if err := ipCmd("netns", "add", name); err != nil {
		return nil, fmt.Errorf("netnstest: create namespace %s: %w", name, err)
	}
	n := &NS{Name: name}
	if err := ipCmd("-n", name, "link", "set", "lo", "up"); err != nil {
		n.Close()
		return nil, fmt.Errorf("netnstest: bring lo up in %s: %w", name, err)
	}
	// No duplicate address detection on interfaces made later (link-local
	// addresses included), so IPv6 works the moment a link is up.
	for _, key := range []string{"net.ipv6.conf.default.accept_dad", "net.ipv6.conf.all.accept_dad"} {
		if err := n.Sysctl(key, "0"); err != nil {
			n.Close()
			return nil, err
		}
	}
	return n, nil
}

// NewT is New for tests: it fails t on error and removes the namespace when
// the test ends (also on failure).
func NewT(t testing.TB, prefix string) *NS {
	t.Helper()
	n, err := New(prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("netnstest: %v", err)
		}
	})
	return n
}

// Close deletes the namespace and with it every interface inside it (a veth
// pair disappears when either end does). It is idempotent.
func (n *NS) Close() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil
	}
	n.closed = true
	if err := ipCmd("netns", "delete", n.Name); err != nil {
		return fmt.Errorf("netnstest: delete namespace %s: %w", n.Name, err)
	}
	return nil
}

// Path is the namespace's bind-mount path, usable with setns(2) or
// netlink.Config.NetNS after opening it.
func (n *NS) Path() string { return nsDir + "/" + n.Name }

// Do runs fn on a locked OS thread inside the namespace and switches the
// thread back afterwards. Sockets fn opens stay in the namespace for their
// whole life; goroutines fn starts do not run in it. If the thread cannot be
// switched back it is left locked, so the runtime retires it.
func (n *NS) Do(fn func() error) error {
	target, err := unix.Open(n.Path(), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("netnstest: open %s: %w", n.Path(), err)
	}
	defer unix.Close(target)

	done := make(chan error, 1)
	// A fresh goroutine keeps the caller's own thread state untouched even
	// when restoring fails. The result is sent once enterRun has returned,
	// its descriptors closed: a caller counting its open descriptors after
	// Do must not see this one's (CI did: one more after than before).
	go func() { done <- n.enterRun(target, fn) }()
	return <-done
}

// enterRun runs fn on the calling goroutine's thread, locked to it, in the
// namespace target, then puts the thread back in its own. When that fails
// the thread stays locked: the goroutine's exit makes the runtime end it.
func (n *NS) enterRun(target int, fn func() error) error {
	runtime.LockOSThread()
	orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netnstest: open own namespace: %w", err)
	}
	defer unix.Close(orig)
	if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netnstest: enter %s: %w", n.Name, err)
	}
	var ferr error
	func() {
		defer func() {
			if r := recover(); r != nil {
				ferr = fmt.Errorf("netnstest: panic in %s: %v", n.Name, r)
			}
		}()
		ferr = fn()
	}()
	if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
		// Stay locked: the goroutine exits and the runtime kills the thread.
		return errors.Join(ferr, fmt.Errorf("netnstest: leave %s: %w", n.Name, err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// Run runs argv inside the namespace (`ip netns exec NAME argv...`) and
// returns its combined output. The command is killed when ctx ends.
func (n *NS) Run(ctx context.Context, argv ...string) ([]byte, error) {
	if len(argv) == 0 {
		return nil, errors.New("netnstest: Run needs a command")
	}
	args := append([]string{"netns", "exec", n.Name}, argv...)
	cmd := exec.CommandContext(ctx, "ip", args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("netnstest: %s in %s: %w: %s", strings.Join(argv, " "), n.Name, err, bytes.TrimSpace(out))
	}
	return out, nil
}

// Sysctl sets a sysctl inside the namespace, e.g.
// Sysctl("net.ipv4.ip_forward", "1").
func (n *NS) Sysctl(key, value string) error {
	path := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
	return n.Do(func() error {
		// /proc/sys/net follows the opening thread's namespace.
		if err := os.WriteFile(path, []byte(value), 0); err != nil {
			return fmt.Errorf("netnstest: sysctl %s=%s in %s: %w", key, value, n.Name, err)
		}
		return nil
	})
}

// IfIndex returns the index of the interface named ifName inside the
// namespace.
func (n *NS) IfIndex(ifName string) (int, error) {
	var idx int
	err := n.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		ifr, err := unix.NewIfreq(ifName)
		if err != nil {
			return err
		}
		if err := unix.IoctlIfreq(fd, unix.SIOCGIFINDEX, ifr); err != nil {
			return fmt.Errorf("netnstest: index of %s in %s: %w", ifName, n.Name, err)
		}
		idx = int(ifr.Uint32())
		return nil
	})
	return idx, err
}

// Veth joins a and b with a veth pair, gives the ends the addresses aAddr and
// bAddr (CIDR, e.g. "10.201.1.1/24" or "fd00:201::1/64"; empty = none), sets
// the MTU (0 = default) and brings both ends up. IPv6 addresses are added
// with nodad so they are usable at once. It returns the interface names.
func Veth(a, b *NS, aAddr, bAddr string, mtu int) (ifA, ifB string, err error) {
	id := counter.Add(1)
	// Interface names are at most 15 bytes; they only need to be unique
	// within each namespace, the temporary names within the root namespace.
	tmpA := fmt.Sprintf("nt%da%d", os.Getpid()%100000, id%10000)
	tmpB := fmt.Sprintf("nt%db%d", os.Getpid()%100000, id%10000)
	ifA, ifB = fmt.Sprintf("veth%d", id), fmt.Sprintf("veth%d", id)
	if a == b {
		ifB = ifB + "p"
	}
	// Create the pair directly inside the namespaces so that nothing ever
	// appears in the root namespace under a final name.
	if err := ipCmd("link", "add", tmpA, "netns", a.Name, "type", "veth", "peer", "name", tmpB, "netns", b.Name); err != nil {
		return "", "", fmt.Errorf("netnstest: create veth %s-%s: %w", a.Name, b.Name, err)
	}
	setup := func(ns *NS, tmp, name, addr string) error {
		if err := ipCmd("-n", ns.Name, "link", "set", tmp, "name", name); err != nil {
			return err
		}
		if mtu > 0 {
			if err := ipCmd("-n", ns.Name, "link", "set", name, "mtu", fmt.Sprint(mtu)); err != nil {
				return err
			}
		}
		if addr != "" {
			p, err := netip.ParsePrefix(addr)
			if err != nil {
				return fmt.Errorf("netnstest: address %q: %w", addr, err)
			}
			args := []string{"-n", ns.Name, "addr", "add", addr, "dev", name}
			if p.Addr().Is6() {
				args = append(args, "nodad")
			}
			if err := ipCmd(args...); err != nil {
				return err
			}
		}
		return ipCmd("-n", ns.Name, "link", "set", name, "up")
	}
	if err := setup(a, tmpA, ifA, aAddr); err != nil {
		ipCmd("-n", a.Name, "link", "del", tmpA)
		ipCmd("-n", a.Name, "link", "del", ifA)
		return "", "", fmt.Errorf("netnstest: configure veth in %s: %w", a.Name, err)
	}
	if err := setup(b, tmpB, ifB, bAddr); err != nil {
		ipCmd("-n", a.Name, "link", "del", ifA)
		return "", "", fmt.Errorf("netnstest: configure veth in %s: %w", b.Name, err)
	}
	return ifA, ifB, nil
}

// AddRoute adds a route inside the namespace: AddRoute("10.202.0.0/24",
// "10.201.0.1") or AddRoute("default", "fd00:201::1").
func (n *NS) AddRoute(dst, via string) error {
	args := []string{"-n", n.Name}
	if strings.Contains(via, ":") {
		args = append(args, "-6")
	}
	args = append(args, "route", "add", dst, "via", via)
	if err := ipCmd(args...); err != nil {
		return fmt.Errorf("netnstest: route %s via %s in %s: %w", dst, via, n.Name, err)
	}
	return nil
}

// ipCmd runs ip(8) with args and a timeout.
func ipCmd(args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// RequireRoot skips t when the process is not root and the environment
// variable CI is unset; when CI is set (CI must run every privileged test)
// it fails t instead.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		if _, err := exec.LookPath("ip"); err != nil {
			t.Fatalf("netnstest: the ip(8) binary (iproute2) is needed: %v", err)
		}
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatal("netnstest: this test needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and CI is set, so it must not skip")
	}
	t.Skip("netnstest: skipped, needs root (set CI to make this a failure)")
}
