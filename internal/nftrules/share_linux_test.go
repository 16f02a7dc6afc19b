package nftrules

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/filter"
	"github.com/netdivert/divert/internal/netnstest"
)

// shareCfg is a queueing configuration at input and output with a filter,
// so that its table has term, v6 and fragment chains besides the base
// chains.
func shareCfg(t *testing.T, prio int16, queue uint16) Config {
	t.Helper()
	f, err := filter.Compile(fmt.Sprintf("udp.DstPort == %d or tcp.DstPort == %d", 9000+int(queue), 9000+int(queue)), filter.LayerNetwork)
	if err != nil {
		t.Fatal(err)
	}
	return Config{Hooks: []Hook{HookInput, HookOutput}, IPv4: true, IPv6: true, Priority: prio,
		Lowered: f.Lower(), Action: ActionQueue, QueueNum: queue, QueueCount: 1, KeepNDP: true,
		Fragments: FragNone, QueueFragments: true}
}

// tables returns the names of the tables in ns.
func tables(t *testing.T, ns *netnstest.NS) []string {
	t.Helper()
	var out []string
	for _, line := range strings.Split(nftList(t, ns, "tables"), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "table" {
			out = append(out, f[2])
		}
	}
	return out
}

// nsKeyOf returns the registry's key of network namespace ns.
func nsKeyOf(t *testing.T, ns *netnstest.NS) nsKey {
	t.Helper()
	var key nsKey
	if err := ns.Do(func() error {
		k, fd, err := threadNS()
		if err == nil {
			unix.Close(fd)
		}
		key = k
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return key
}

// registered reports whether the process has an entry for ns in the
// registry.
func registered(t *testing.T, ns *netnstest.NS) bool {
	t.Helper()
	key := nsKeyOf(t, ns)
	registry.mu.Lock()
	defer registry.mu.Unlock()
	return registry.ns[key] != nil
}

// TestParkAndReuse: closing a Ruleset while another of the process is
// open in its namespace empties its table but keeps its base chains; an
// Install with the same family, hooks and priority takes that table
// over; the last Close deletes every table.
func TestParkAndReuse(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nfpk")
	a := install(t, ns, shareCfg(t, 0, 11))
	b := install(t, ns, shareCfg(t, 7, 12))
	name := b.Table()
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if got := tables(t, ns); len(got) != 2 {
		t.Fatalf("tables after closing one of two: %v, want both (one parked)", got)
	}
	out := nftList(t, ns, "table", "inet", name)
	for _, want := range []string{"chain input {", "hook input priority filter - 7; policy accept;", "chain output {", "hook output priority filter - 7; policy accept;"} {
		if !strings.Contains(out, want) {
			t.Errorf("parked table lacks %q:\n%s", want, out)
		}
	}
	rules := slices.DeleteFunc(chainRules(out), func(l string) bool { return l == "flags owner" })
	if len(rules) != 0 || strings.Count(out, "chain ") != 2 {
		t.Errorf("parked table keeps rules or chains beyond its two empty base chains:\n%s", out)
	}
	// A different priority does not fit the parked table; the same one does.
	c := install(t, ns, shareCfg(t, 8, 13))
	if c.Table() == name {
		t.Fatalf("Install at another priority took the parked table %s", name)
	}
	d := install(t, ns, shareCfg(t, 7, 14))
	if d.Table() != name {
		t.Fatalf("Install with the parked table's family, hooks and priority made %s, want %s taken over", d.Table(), name)
	}
	requireRules(t, ns, name, "the reused table")
	closeAll(t, d, c, a)
	requireGone(t, ns, "after the last Close")
}

// TestParkFailureDeletes: when emptying the table fails, Close deletes it.
func TestParkFailureDeletes(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nfpf")
	a := install(t, ns, shareCfg(t, 0, 21))
	b := install(t, ns, shareCfg(t, 3, 22))
	// A chain the table does not have: the kernel refuses the whole batch.
	b.chains = append(b.chains, "missing")
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if got := tables(t, ns); len(got) != 1 || got[0] != a.Table() {
		t.Fatalf("tables after a failed park: %v, want only %s", got, a.Table())
	}
	a.Close()
	requireGone(t, ns, "after the last Close")
}

// TestParkBound: past maxParked tables parked in a namespace, Close
// deletes.
func TestParkBound(t *testing.T) {
	netnstest.RequireRoot(t)
	defer func(n int) { maxParked = n }(maxParked)
	maxParked = 1
	ns := netnstest.NewT(t, "nfpb")
	a := install(t, ns, shareCfg(t, 0, 51))
	b := install(t, ns, shareCfg(t, 1, 52))
	c := install(t, ns, shareCfg(t, 2, 53))
	b.Close()
	c.Close()
	if got := tables(t, ns); len(got) != 2 || !slices.Contains(got, a.Table()) || !slices.Contains(got, b.Table()) {
		t.Fatalf("tables: %v, want %s (open) and %s (parked), %s deleted", got, a.Table(), b.Table(), c.Table())
	}
	a.Close()
	requireGone(t, ns, "after the last Close")
}

// TestMemberKeepsTable: a Member counts as a user of its namespace.
func TestMemberKeepsTable(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nfmb")
	var m *Member
	ns.Do(func() error { m = Join(); return nil })
	t.Cleanup(func() { m.Leave() })
	b := install(t, ns, shareCfg(t, 0, 31))
	b.Close()
	if got := tables(t, ns); len(got) != 1 || got[0] != b.Table() {
		t.Fatalf("tables while a Member is in: %v, want %s parked", got, b.Table())
	}
	if err := m.Leave(); err != nil {
		t.Fatal(err)
	}
	if err := m.Leave(); err != nil {
		t.Fatalf("second Leave: %v", err)
	}
	requireGone(t, ns, "after the Member left")
}

// TestShareConcurrent: Installs and Closes from many goroutines, in two
// namespaces, leave no table behind (run with -race).
func TestShareConcurrent(t *testing.T) {
	netnstest.RequireRoot(t)
	nss := []*netnstest.NS{netnstest.NewT(t, "nfc1"), netnstest.NewT(t, "nfc2")}
	var wg sync.WaitGroup
	for g := range 6 {
		ns := nss[g%2]
		wg.Go(func() {
			for i := range 4 {
				var r *Ruleset
				err := ns.Do(func() (err error) {
					r, err = Install(shareCfg(t, int16(i%2), uint16(40+g)))
					return err
				})
				if err != nil {
					t.Error(err)
					return
				}
				if err := r.Close(); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	for _, ns := range nss {
		if got := tables(t, ns); len(got) != 0 {
			t.Errorf("%s: tables left: %v", ns.Name, got)
		}
		if registered(t, ns) {
			t.Errorf("%s: the registry keeps the namespace", ns.Name)
		}
	}
}

// requireGone fails t unless ns has no table left and the registry no
// longer knows it, when (say, "after the last Close") everything is closed.
func requireGone(t *testing.T, ns *netnstest.NS, when string) {
	t.Helper()
	if got := tables(t, ns); len(got) != 0 {
		t.Fatalf("tables %s: %v", when, got)
	}
	if registered(t, ns) {
		t.Fatalf("the registry keeps the namespace %s", when)
	}
}

// requireRules fails the test unless table's input chain jumps to its
// rules; what says which table it is.
func requireRules(t *testing.T, ns *netnstest.NS, table, what string) {
	t.Helper()
	if out := nftList(t, ns, "chain", "inet", table, "input"); !strings.Contains(out, "jump input_0") {
		t.Fatalf("%s has no rules:\n%s", what, out)
	}
}

// closeAll closes rs in order, failing the test on the first error.
func closeAll(t *testing.T, rs ...*Ruleset) {
	t.Helper()
	for _, r := range rs {
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// parkedNames returns the names of the tables the registry has parked in
// ns.
func parkedNames(t *testing.T, ns *netnstest.NS) []string {
	t.Helper()
	key := nsKeyOf(t, ns)
	registry.mu.Lock()
	defer registry.mu.Unlock()
	var out []string
	if e := registry.ns[key]; e != nil {
		for _, p := range e.parked {
			out = append(out, p.table)
		}
	}
	return out
}

// requireParkedEmpty fails t unless table name in ns has its two base
// chains (input and output at priority -prio), empty, and nothing else.
func requireParkedEmpty(t *testing.T, ns *netnstest.NS, name string, prio int) {
	t.Helper()
	out := nftList(t, ns, "table", "inet", name)
	for _, want := range []string{"chain input {", fmt.Sprintf("hook input priority filter - %d; policy accept;", prio), "chain output {"} {
		if !strings.Contains(out, want) {
			t.Fatalf("table %s lacks %q:\n%s", name, want, out)
		}
	}
	rules := slices.DeleteFunc(chainRules(out), func(l string) bool { return l == "flags owner" })
	if len(rules) != 0 || strings.Count(out, "chain ") != 2 {
		t.Fatalf("table %s keeps rules or chains beyond its two empty base chains:\n%s", name, out)
	}
}

// TestFailedBatchKeepsParked: an Install whose batch fails, while another
// Ruleset of the process is open in the namespace, deletes no base chain
// (which would make the kernel drop the packets queued there): a parked
// table it took over goes back to the registry, empty, whether the kernel
// refused the batch or applied it (an answer that could not be read); so
// does a new table whose batch was applied, parked as Close would park
// it; a new table the kernel refused has no chain, and is deleted. A later
// Install takes the parked table over and works, and the last Close
// leaves nothing.
func TestFailedBatchKeepsParked(t *testing.T) {
	netnstest.RequireRoot(t)
	refuse := func(c batchBuilder, tb *nftables.Table) {
		// A jump to a chain the table does not have: the kernel refuses
		// the whole batch (ENOENT).
		ch := &nftables.Chain{Name: "input", Table: tb}
		c.AddRule(&nftables.Rule{Table: tb, Chain: ch, Exprs: []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: "missing"}}})
	}
	unsent := func(c batchBuilder, tb *nftables.Table) {
		// An expression the library cannot serialize: it keeps the error
		// on c and sends no batch again.
		ch := &nftables.Chain{Name: "input", Table: tb}
		c.AddRule(&nftables.Rule{Table: tb, Chain: ch, Exprs: []expr.Any{&expr.Numgen{Register: 1, Type: 99, Modulus: 2}}})
	}
	for _, c := range []struct {
		name    string
		reused  bool
		applied bool
		batch   func(batchBuilder, *nftables.Table)
		kept    bool // the failed Install's table stays, parked
	}{
		{"reused/refused", true, false, refuse, true},
		{"reused/applied", true, true, nil, true},
		{"new/applied", false, true, nil, true},
		{"new/refused", false, false, refuse, false},
		// Its socket is no use: deleted.
		{"reused/unsent", true, false, unsent, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			ns := netnstest.NewT(t, "nffb")
			a := install(t, ns, shareCfg(t, 0, 61))
			name := ""
			if c.reused {
				b := install(t, ns, shareCfg(t, 7, 62))
				name = b.Table()
				if err := b.Close(); err != nil {
					t.Fatal(err)
				}
			}
			if c.applied {
				testFlushErr = errors.New("the answer could not be read")
			}
			testBatch = c.batch
			var err error
			var got *Ruleset
			ns.Do(func() error { got, err = Install(shareCfg(t, 7, 63)); return nil })
			testBatch, testFlushErr = nil, nil
			if err == nil {
				got.Close()
				t.Fatal("Install succeeded through a failing batch")
			}
			tabs := tables(t, ns)
			parked := parkedNames(t, ns)
			if !c.kept {
				if len(tabs) != 1 || tabs[0] != a.Table() || len(parked) != 0 {
					t.Fatalf("tables %v, parked %v; want only %s", tabs, parked, a.Table())
				}
			} else {
				if len(tabs) != 2 || len(parked) != 1 || !slices.Contains(tabs, parked[0]) || !slices.Contains(tabs, a.Table()) {
					t.Fatalf("tables %v, parked %v; want %s and one parked", tabs, parked, a.Table())
				}
				if c.reused && parked[0] != name {
					t.Fatalf("parked %v, want %s, the table the failed Install took over", parked, name)
				}
				requireParkedEmpty(t, ns, parked[0], 7)
				name = parked[0]
			}
			d := install(t, ns, shareCfg(t, 7, 64))
			if c.kept && d.Table() != name || !c.kept && d.Table() == name {
				t.Fatalf("Install after the failure made %s (the failed Install's table kept: %v)", d.Table(), c.kept)
			}
			requireRules(t, ns, d.Table(), "the table installed after the failure")
			closeAll(t, d, a)
			requireGone(t, ns, "after the last Close")
		})
	}
}

// TestFailedBatchLeavesNoAnswer: google/nftables' Flush returns at the
// first EPERM of a batch without reading the kernel's answers to the
// batch's later messages. A parked table's socket keeps no such answer
// after a failed Install: otherwise the next batch on it reads them as
// its own, and an Install the kernel refuses passes for applied.
func TestFailedBatchLeavesNoAnswer(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nfsa")
	a := install(t, ns, shareCfg(t, 0, 71))
	b := install(t, ns, shareCfg(t, 7, 72))
	name := b.Table()
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	// A table another socket owns: a message about it fails with EPERM.
	var foreign *tableConn
	if err := ns.Do(func() (err error) {
		foreign, err = openOwned("divert_test_foreign", nftables.TableFamilyINet)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer foreign.CloseLasting()
	foreignT := &nftables.Table{Name: "divert_test_foreign", Family: nftables.TableFamilyINet}
	testBatch = func(c batchBuilder, tb *nftables.Table) {
		c.AddChain(&nftables.Chain{Name: "theirs", Table: foreignT})
		// The kernel answers these too, though it refuses the batch.
		for i := range 3 {
			c.AddChain(&nftables.Chain{Name: fmt.Sprintf("late_%d", i), Table: tb})
		}
	}
	var err error
	ns.Do(func() error { _, err = Install(shareCfg(t, 7, 73)); return nil })
	testBatch = nil
	if !errors.Is(err, os.ErrPermission) {
		t.Fatalf("Install through a batch with a message about another socket's table: %v, want EPERM", err)
	}
	if parked := parkedNames(t, ns); len(parked) != 1 || parked[0] != name {
		t.Fatalf("parked %v, want %s, the table the failed Install took over", parked, name)
	}
	requireParkedEmpty(t, ns, name, 7)
	key := nsKeyOf(t, ns)
	registry.mu.Lock()
	queued, qerr := answerQueued(registry.ns[key].parked[0].conn)
	registry.mu.Unlock()
	if queued || qerr != nil {
		t.Errorf("the parked table's socket holds an unread answer (%v), want none", qerr)
	}
	// A batch the kernel refuses (ENOENT for its last message) must fail.
	testBatch = func(c batchBuilder, tb *nftables.Table) {
		ch := &nftables.Chain{Name: "input", Table: tb}
		c.AddRule(&nftables.Rule{Table: tb, Chain: ch, Exprs: []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: "missing"}}})
	}
	var r *Ruleset
	ns.Do(func() error { r, err = Install(shareCfg(t, 7, 74)); return nil })
	testBatch = nil
	if err == nil {
		r.Close()
		t.Fatal("Install on the parked table succeeded though the kernel refused its batch")
	}
	if !errors.Is(err, unix.ENOENT) {
		t.Errorf("Install of a refused batch: %v, want ENOENT", err)
	}
	d := install(t, ns, shareCfg(t, 7, 75))
	if d.Table() != name {
		t.Fatalf("Install after the failures made %s, want %s taken over", d.Table(), name)
	}
	requireRules(t, ns, name, "the table installed after the failures")
	closeAll(t, d, a)
	foreign.CloseLasting()
	requireGone(t, ns, "after the last Close")
}

// TestBatchAnsweredOnce: the kernel answers a batch one of whose messages
// fails with ENOMEM with that error alone, not one answer a message
// (nfnetlink_rcv_batch). An Install through such a batch fails with
// ENOMEM instead of waiting forever for the answers to the batch's other
// messages, and the parked table it took over is parked again, its socket
// clean, for the next Install.
func TestBatchAnsweredOnce(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nfao")
	a := install(t, ns, shareCfg(t, 0, 81))
	b := install(t, ns, shareCfg(t, 7, 82))
	name := b.Table()
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	var setErr error
	testBatch = func(c batchBuilder, tb *nftables.Table) {
		// A hash set of 2^31 elements: its buckets alone take more than
		// INT_MAX bytes, which nf_tables_newset refuses with ENOMEM
		// before allocating anything.
		setErr = c.AddSet(&nftables.Set{Table: tb, Name: "huge", KeyType: nftables.TypeIP6Addr, Size: 1 << 31}, nil)
		for i := range 3 {
			c.AddChain(&nftables.Chain{Name: fmt.Sprintf("late_%d", i), Table: tb})
		}
	}
	var err error
	ns.Do(func() error { _, err = Install(shareCfg(t, 7, 83)); return nil })
	testBatch = nil
	if setErr != nil {
		t.Fatal(setErr)
	}
	if !errors.Is(err, unix.ENOMEM) {
		t.Fatalf("Install through a batch with a set too large: %v, want ENOMEM", err)
	}
	if strings.Contains(err.Error(), errNoAnswer.Error()) || !strings.Contains(err.Error(), "unanswered") {
		t.Errorf("Install's error %q: want the kernel's answer and the count of the unanswered messages", err)
	}
	if parked := parkedNames(t, ns); len(parked) != 1 || parked[0] != name {
		t.Fatalf("parked %v, want %s, the table the failed Install took over", parked, name)
	}
	requireParkedEmpty(t, ns, name, 7)
	key := nsKeyOf(t, ns)
	registry.mu.Lock()
	queued, qerr := answerQueued(registry.ns[key].parked[0].conn)
	registry.mu.Unlock()
	if queued || qerr != nil {
		t.Errorf("the parked table's socket holds an unread answer (%v), want none", qerr)
	}
	d := install(t, ns, shareCfg(t, 7, 84))
	if d.Table() != name {
		t.Fatalf("Install after the failure made %s, want %s taken over", d.Table(), name)
	}
	requireRules(t, ns, name, "the table installed after the failure")
	closeAll(t, d, a)
	requireGone(t, ns, "after the last Close")
}

// answerQueued reports whether a datagram waits on c's socket, leaving it
// there.
func answerQueued(c *tableConn) (bool, error) {
	raw, err := c.sock.SyscallConn()
	if err != nil {
		return false, err
	}
	var rerr error
	queued := false
	if err := raw.Control(func(fd uintptr) {
		var b [64]byte
		_, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_DONTWAIT|unix.MSG_PEEK|unix.MSG_TRUNC)
		switch err {
		case nil:
			queued = true
		case unix.EAGAIN:
		default:
			rerr = err
		}
	}); err != nil {
		return false, err
	}
	return queued, rerr
}
