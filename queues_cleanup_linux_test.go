package divert

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/netdivert/divert/internal/netnstest"
	"github.com/netdivert/divert/internal/nfq"
	"github.com/netdivert/divert/internal/nftrules"
)

// queueSeams replaces OpenQueues' seams for one test: every queue opened
// and closed, and every namespace membership ended, is counted; the
// queues opened with a number in failOpen fail to open (errOpen), the
// first queue opened fails to close (errClose, after it is closed), and
// the Installs numbered in failInstall (from 1) fail (errInstall).
type queueSeams struct {
	opened, closed map[*nfq.Conn]int
	opens, leaves  int
	installs       int
	first          *nfq.Conn
}

var (
	errOpen    = errors.New("the queue could not be opened")
	errClose   = errors.New("the queue could not be closed")
	errInstall = errors.New("the rules could not be installed")
)

func setQueueSeams(t *testing.T, failOpen int, failInstall ...int) *queueSeams {
	t.Helper()
	s := &queueSeams{opened: map[*nfq.Conn]int{}, closed: map[*nfq.Conn]int{}}
	oo, oc, oi, ol := openQueue, closeQueue, installRules, leaveNamespace
	t.Cleanup(func() { openQueue, closeQueue, installRules, leaveNamespace = oo, oc, oi, ol })
	openQueue = func(c nfq.Config) (*nfq.Conn, error) {
		s.opens++
		if s.opens == failOpen {
			return nil, errOpen
		}
		q, err := oo(c)
		if err == nil {
			s.opened[q]++
			if s.first == nil {
				s.first = q
			}
		}
		return q, err
	}
	closeQueue = func(q *nfq.Conn) error {
		s.closed[q]++
		err := oc(q)
		if q == s.first {
			return errors.Join(err, errClose)
		}
		return err
	}
	installRules = func(c nftrules.Config) (*nftrules.Ruleset, error) {
		s.installs++
		if slices.Contains(failInstall, s.installs) {
			return nil, errInstall
		}
		return oi(c)
	}
	leaveNamespace = func(m *nftrules.Member) error {
		s.leaves++
		return ol(m)
	}
	return s
}

// requireAllClosed fails t unless every queue opened was closed once, n
// memberships ended, and ns has no queue bound and no table.
func (s *queueSeams) requireAllClosed(t *testing.T, ns *netnstest.NS, n int) {
	t.Helper()
	if len(s.opened) == 0 {
		t.Fatal("no queue was opened: the test drives nothing")
	}
	for q := range s.opened {
		if s.closed[q] != 1 {
			t.Errorf("queue %d closed %d times, want once", q.Queue(), s.closed[q])
		}
	}
	if s.leaves != n {
		t.Errorf("%d memberships of the namespace ended, want %d", s.leaves, n)
	}
	if qs := boundQueues(t, ns); len(qs) != 0 {
		t.Errorf("queues still bound in the namespace: %v", qs)
	}
	if tabs := nftTables(t, ns); len(tabs) != 0 {
		t.Errorf("tables left in the namespace: %v", tabs)
	}
}

// boundQueues returns the NFQUEUE queue numbers bound in ns.
func boundQueues(t *testing.T, ns *netnstest.NS) []int {
	t.Helper()
	var s string
	if err := ns.Do(func() error {
		b, err := os.ReadFile("/proc/thread-self/net/netfilter/nfnetlink_queue")
		if errors.Is(err, os.ErrNotExist) {
			return nil // nfnetlink_queue not loaded: nothing bound
		}
		s = string(b)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, line := range strings.Split(s, "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			if q, err := strconv.Atoi(f[0]); err == nil {
				out = append(out, q)
			}
		}
	}
	return out
}

// openFDs returns the process's open file descriptors, each with what it
// refers to. The directory's own, closed by the time it is looked up, is
// left out.
func openFDs(t *testing.T) map[string]string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	fds := make(map[string]string, len(ents))
	for _, e := range ents {
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil {
			fds[e.Name()] = target
		}
	}
	return fds
}

// openQueuesFails runs OpenQueues in ns, which must fail, and returns its
// error; no descriptor it opened may stay open.
func openQueuesFails(t *testing.T, ns *netnstest.NS, filt string, layer Layer, flags Flag, n int) error {
	t.Helper()
	before := openFDs(t)
	var err error
	ns.Do(func() error {
		var hs []*Handle
		if hs, err = OpenQueues(filt, layer, 0, flags, n); err == nil {
			for _, h := range hs {
				h.Close()
			}
		}
		return nil
	})
	if err == nil {
		t.Fatal("OpenQueues succeeded through a failing step")
	}
	// A descriptor open after that was not before is a leak. One closed
	// meanwhile is not: a finalizer of a file dropped unclosed may run.
	// (NS.Do closes its own before it returns: CI once saw its namespace
	// descriptor here, closed late, then one fewer in the next test.)
	after := openFDs(t)
	var added []string
	for fd, target := range after {
		if before[fd] != target {
			added = append(added, fd+" -> "+target)
		}
	}
	if len(added) > 0 {
		t.Errorf("descriptors open after the failed OpenQueues that were not before: %v", added)
	}
	return err
}

// TestQueuesBindFailureCleanup: when a later queue of OpenQueues fails to
// open, the ones bound before it are closed, and an error closing one
// comes with OpenQueues' error, next to the cause, as does an error
// ending a membership of the namespace; nothing stays open or bound.
func TestQueuesBindFailureCleanup(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "dqbf")
	const n = 3
	s := setQueueSeams(t, n) // the last queue fails
	ol := leaveNamespace
	errLeave := errors.New("the parked tables could not be deleted")
	leaveNamespace = func(m *nftrules.Member) error { return errors.Join(ol(m), errLeave) }
	err := openQueuesFails(t, ns, "udp.DstPort == 7300", LayerNetwork, 0, n)
	t.Logf("OpenQueues: %v", err)
	for _, want := range []error{errOpen, errClose, errLeave} {
		if !errors.Is(err, want) {
			t.Errorf("OpenQueues' error %q: errors.Is finds no %q", err, want)
		}
	}
	if !strings.HasPrefix(err.Error(), "divert: ") {
		t.Errorf("OpenQueues' error %q: want the divert: prefix", err)
	}
	requireOneCleanupGroup(t, err)
	if len(s.opened) != n-1 {
		t.Errorf("%d queues opened, want %d before the failing one", len(s.opened), n-1)
	}
	s.requireAllClosed(t, ns, n)
}

// requireOneCleanupGroup fails t unless err's message has exactly one
// "(and cleaning up: ...)" group.
func requireOneCleanupGroup(t *testing.T, err error) {
	t.Helper()
	if c := strings.Count(err.Error(), "(and cleaning up: "); c != 1 {
		t.Errorf("OpenQueues' error %q: %d cleanup groups, want one holding every cleanup error", err, c)
	}
}

// busyOnce makes the open numbered busyAt (from 1, counting every call)
// fail with nfq.ErrQueueBusy before it reaches the seams of s, as a queue
// another program holds does.
func busyOnce(t *testing.T, busyAt int) {
	t.Helper()
	inner := openQueue
	calls := 0
	openQueue = func(c nfq.Config) (*nfq.Conn, error) {
		calls++
		if calls == busyAt {
			return nil, fmt.Errorf("nfq: bind queue %d: %w", c.Queue, nfq.ErrQueueBusy)
		}
		return inner(c)
	}
}

// TestQueuesBindBusyCleanup: OpenQueues (n = 2) binds a first queue, finds
// the next busy, gives the first up (its close fails: errClose) and binds
// two further up. If a later open fails, errClose is among the cleanup
// errors of OpenQueues' error, in its one cleanup group with the others;
// if none fails, OpenQueues succeeds (the close error, which left nothing
// behind, is not reported: there is no error to hold it) and its handles
// hold the two queues bound after the busy one.
func TestQueuesBindBusyCleanup(t *testing.T) {
	netnstest.RequireRoot(t)
	const n = 2
	t.Run("then-failure", func(t *testing.T) {
		ns := netnstest.NewT(t, "dqbb")
		// Opens reaching s: the first queue, then (after the busy
		// one) the two further up, the second of which fails.
		s := setQueueSeams(t, 3)
		busyOnce(t, 2)
		ol := leaveNamespace
		errLeave := errors.New("the parked tables could not be deleted")
		leaveNamespace = func(m *nftrules.Member) error { return errors.Join(ol(m), errLeave) }
		err := openQueuesFails(t, ns, "udp.DstPort == 7302", LayerNetwork, 0, n)
		t.Logf("OpenQueues: %v", err)
		for _, want := range []error{errOpen, errClose, errLeave} {
			if !errors.Is(err, want) {
				t.Errorf("OpenQueues' error %q: errors.Is finds no %q", err, want)
			}
		}
		requireOneCleanupGroup(t, err)
		if len(s.opened) != 2 {
			t.Errorf("%d queues opened, want 2 (one given up, one before the failing one)", len(s.opened))
		}
		s.requireAllClosed(t, ns, n)
	})
	t.Run("then-success", func(t *testing.T) {
		ns := netnstest.NewT(t, "dqbs")
		s := setQueueSeams(t, 0)
		busyOnce(t, 2)
		var hs []*Handle
		var err error
		var bound []int
		ns.Do(func() error {
			hs, err = OpenQueues("udp.DstPort == 7303", LayerNetwork, 0, 0, n)
			return nil
		})
		if err != nil {
			t.Fatalf("OpenQueues with a busy queue on its way and a failed close of the queue it gave up: %v", err)
		}
		bound = boundQueues(t, ns)
		for _, h := range hs {
			if err := h.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		}
		if len(s.opened) != 3 {
			t.Fatalf("%d queues opened, want 3 (one given up, two kept)", len(s.opened))
		}
		if s.closed[s.first] != 1 {
			t.Errorf("the queue given up closed %d times, want once", s.closed[s.first])
		}
		first := int(s.first.Queue())
		slices.Sort(bound)
		if !slices.Equal(bound, []int{first + 2, first + 3}) {
			t.Errorf("queues bound while the handles were open: %v, want [%d %d] (after the busy %d)", bound, first+2, first+3, first+1)
		}
		// Close closes its queue without the seam: the namespace tells.
		if qs := boundQueues(t, ns); len(qs) != 0 {
			t.Errorf("queues still bound after Close: %v", qs)
		}
		if tabs := nftTables(t, ns); len(tabs) != 0 {
			t.Errorf("tables left after Close: %v", tabs)
		}
	})
}

// TestQueuesSetupFailureCleanup: when OpenQueues fails after binding its
// queues (installing the rules fails; or, for LayerNetworkForward's
// reassembly, installing the fragments' table after the rules), every
// handle is released: an error closing a queue comes with OpenQueues'
// error, next to the cause, and nothing stays open, bound or installed
// (the rules installed go with the last handle released).
func TestQueuesSetupFailureCleanup(t *testing.T) {
	netnstest.RequireRoot(t)
	for _, c := range []struct {
		name        string
		layer       Layer
		flags       Flag
		failInstall int
	}{
		{"rules", LayerNetwork, 0, 1},
		{"fragments", LayerNetworkForward, FlagReassemble, 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			ns := netnstest.NewT(t, "dqsf")
			const n = 2
			s := setQueueSeams(t, 0, c.failInstall)
			err := openQueuesFails(t, ns, "udp.DstPort == 7301", c.layer, c.flags, n)
			t.Logf("OpenQueues: %v", err)
			if !errors.Is(err, errInstall) || !errors.Is(err, errClose) {
				t.Errorf("OpenQueues' error %q: want both %q and %q in it", err, errInstall, errClose)
			}
			requireOneCleanupGroup(t, err)
			if s.installs != c.failInstall {
				t.Errorf("%d Installs, want %d", s.installs, c.failInstall)
			}
			if len(s.opened) != n {
				t.Errorf("%d queues opened, want %d", len(s.opened), n)
			}
			s.requireAllClosed(t, ns, n)
		})
	}
}
