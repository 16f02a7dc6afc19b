package nftrules

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	nfqueue "github.com/florianl/go-nfqueue/v2"
	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/filter"
	"github.com/netdivert/divert/internal/netcap"
	"github.com/netdivert/divert/internal/netnstest"
)

func listRuleset(t *testing.T, ns *netnstest.NS) string {
	t.Helper()
	return nftList(t, ns, "ruleset")
}

// nftList returns what `nft list what...` prints in ns.
func nftList(t *testing.T, ns *netnstest.NS, what ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := ns.Run(ctx, append([]string{"nft", "list"}, what...)...)
	if err != nil {
		t.Fatalf("nft list %v: %v: %s", what, err, out)
	}
	return string(out)
}

func install(t *testing.T, ns *netnstest.NS, cfg Config) *Ruleset {
	t.Helper()
	var r *Ruleset
	if err := ns.Do(func() (err error) { r, err = Install(cfg); return }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// TestOwnedTable: the table exists with the owner flag, other sockets cannot
// delete it, and Close removes it.
func TestOwnedTable(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nfto")
	r := install(t, ns, Config{Hooks: []Hook{HookInput, HookOutput}, IPv4: true, IPv6: true, Priority: -5,
		Action: ActionQueue, QueueNum: 7, QueueCount: 1, Bypass: true, KeepNDP: true})
	rs := listRuleset(t, ns)
	for _, want := range []string{"table inet " + r.Table(), "flags owner", "hook input priority filter + 5", "hook output priority filter + 5"} {
		if !strings.Contains(rs, want) {
			t.Errorf("ruleset lacks %q:\n%s", want, rs)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if out, err := ns.Run(ctx, "nft", "delete", "table", "inet", r.Table()); err == nil {
		t.Errorf("another socket deleted the owned table: %s", out)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if rs := listRuleset(t, ns); strings.Contains(rs, r.Table()) {
		t.Errorf("table still there after Close:\n%s", rs)
	}
}

// TestLayout checks where rules go: the table is ip6 for rules that match
// only IPv6 (else inet), nft can list it, and each base chain holds only the
// filter's terms, so that a packet the filter does not match leaves after
// the filter's own expressions; the skips (marks, neighbour discovery,
// fragments) come after the jump, in the term's chain.
func TestLayout(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nftl")
	f, err := filter.Compile("udp.DstPort == 9999 or tcp.DstPort == 80", filter.LayerNetwork)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		ipv4, ipv6 bool
		family     string
	}{{true, true, "inet"}, {false, true, "ip6"}, {true, false, "inet"}} {
		r := install(t, ns, Config{Hooks: []Hook{HookInput}, IPv4: tc.ipv4, IPv6: tc.ipv6,
			Lowered: f.Lower(), Action: ActionQueue, QueueNum: 9, QueueCount: 1,
			KeepNDP: true, Fragments: FragNone})
		out := nftList(t, ns, "chain", tc.family, r.Table(), "input")
		rules := chainRules(out)
		// With IPv6, one more rule sends the IPv6 packets whose headers the
		// kernel walks otherwise than WinDivert to their own chain.
		want := 2
		if tc.ipv6 {
			want = 3
			if last := rules[len(rules)-1]; !strings.Contains(last, "jump input_v6") {
				t.Errorf("%s: last base chain rule %q: want the jump to input_v6", tc.family, last)
			}
		}
		if len(rules) != want {
			t.Fatalf("%s: base chain has %d rules, want the 2 terms (and the IPv6 jump):\n%s", tc.family, len(rules), out)
		}
		for _, rule := range rules[:2] {
			if !strings.Contains(rule, "jump input_") || strings.Contains(rule, "mark") || strings.Contains(rule, "frag") {
				t.Errorf("%s: base chain rule %q: want only a filter term jumping to its chain", tc.family, rule)
			}
		}
		sub := nftList(t, ns, "chain", tc.family, r.Table(), "input_0")
		for _, want := range []string{"meta mark", "queue"} {
			if !strings.Contains(sub, want) {
				t.Errorf("%s: term chain lacks %q:\n%s", tc.family, want, sub)
			}
		}
		if tc.ipv6 {
			// Packets with no extension header and a loadable transport
			// header (TCP, UDP, ICMPv6) leave the IPv6 chain first, before
			// the rules that walk the headers.
			v6 := nftList(t, ns, "chain", tc.family, r.Table(), "input_v6")
			// nft prints the three by family: "@nh,48,8 0x11 ..." in inet,
			// "ip6 nexthdr udp ..." or "icmpv6 type >= 0" in ip6.
			var before []string
			for _, line := range strings.Split(v6, "\n") {
				line = strings.TrimSpace(line)
				if strings.HasPrefix(line, "meta l4proto mobility-header") {
					break
				}
				if strings.HasSuffix(line, " return") {
					before = append(before, line)
				}
			}
			if len(before) != 3 || !slices.ContainsFunc(before, func(l string) bool { return strings.Contains(l, "udp") || strings.Contains(l, "0x11") }) {
				t.Errorf("%s: IPv6 chain does not start with the plain packets' 3 returns:\n%s", tc.family, v6)
			}
		}
		if r.Close() != nil {
			t.Fatal("Close failed")
		}
	}
}

// TestLayoutQueueFragments checks where a QueueFragments rule set takes
// the fragments its terms leave: IPv6 ones in the IPv6 chain right after
// the plain packets' returns (which never walk for a Fragment header),
// IPv4 ones by one base chain rule after the terms at output but not at
// input (IPv4 arrives there reassembled); and that their chain skips the
// handles' injections before it queues.
func TestLayoutQueueFragments(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nftq")
	f, err := filter.Compile("udp.DstPort == 9999", filter.LayerNetwork)
	if err != nil {
		t.Fatal(err)
	}
	r := install(t, ns, Config{Hooks: []Hook{HookInput, HookOutput}, IPv4: true, IPv6: true,
		Lowered: f.Lower(), Action: ActionQueue, QueueNum: 9, QueueCount: 1,
		KeepNDP: true, Fragments: FragNone, QueueFragments: true})
	rules := func(chain string) []string { return chainRules(nftList(t, ns, "chain", "inet", r.Table(), chain)) }
	for _, h := range []string{"input", "output"} {
		base := rules(h)
		var want []string
		want = append(want, "jump "+h+"_0")
		if h == "output" {
			want = append(want, "jump output_frag")
		}
		want = append(want, "jump "+h+"_v6")
		if len(base) != len(want) {
			t.Fatalf("%s: base chain %q, want rules ending in %q", h, base, want)
		}
		for i, w := range want {
			if !strings.HasSuffix(base[i], w) {
				t.Errorf("%s: base chain rule %d %q, want it to %s", h, i, base[i], w)
			}
		}
		v6 := rules(h + "_v6")
		if len(v6) < 4 || !strings.Contains(v6[3], "exthdr frag exists") || !strings.HasSuffix(v6[3], "jump "+h+"_frag") {
			t.Errorf("%s: IPv6 chain %q: want its 4th rule, after the 3 plain returns, to send fragments to %s_frag", h, v6, h)
		}
		fr := rules(h + "_frag")
		if len(fr) != 2 || !strings.Contains(fr[0], "meta mark") || !strings.HasSuffix(fr[0], "accept") || !strings.Contains(fr[1], "queue") {
			t.Errorf("%s: fragments' chain %q: want the mark skip, then the queue", h, fr)
		}
		for _, rule := range rules(h + "_0") {
			if strings.Contains(rule, "frag") && !strings.HasSuffix(rule, "jump "+h+"_frag") {
				t.Errorf("%s: term chain rule %q: a fragment must go to %s_frag", h, rule, h)
			}
		}
	}
}

// chainRules returns the rules of one chain in `nft list chain` output,
// one per line, without the table and chain lines, the chain's type line,
// the braces and nft's notes about the xt target.
func chainRules(listing string) []string {
	var out []string
	for _, line := range strings.Split(listing, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "table") || strings.HasPrefix(line, "chain") ||
			strings.HasPrefix(line, "type") || line == "}" ||
			strings.HasPrefix(line, "#") || strings.HasPrefix(line, "libxtables:") {
			continue
		}
		out = append(out, line)
	}
	return out
}

func TestChainPriority(t *testing.T) {
	for _, h := range []Hook{HookPrerouting, HookInput, HookForward, HookOutput, HookPostrouting} {
		prev := ChainPriority(h, PriorityLowest)
		for p := PriorityLowest + 1; p <= PriorityHighest; p++ {
			cur := ChainPriority(h, int16(p))
			if cur != prev-1 {
				t.Fatalf("%v: priority %d → %d, previous %d", h, p, cur, prev)
			}
			prev = cur
		}
	}
	if ChainPriority(HookPrerouting, PriorityLowest) >= -400 || ChainPriority(HookPostrouting, PriorityHighest) <= 100 {
		t.Error("prerouting must stay below -400 and postrouting above 100")
	}
	if Mark(0) != 0xD1103530 || Mark(-30000) != MarkMagic || Mark(30000) != 0xD1302A60 {
		t.Errorf("Mark: %#x %#x %#x", Mark(0), Mark(-30000), Mark(30000))
	}
}

// TestMarkBits: the marks grow with the priority (markSkip's range
// compare needs it), all keep MarkMagic's top byte, and none sets a bit
// other tools give a meaning to (markFree: kube-proxy's masquerade and
// drop bits, Calico's and Tailscale's).
func TestMarkBits(t *testing.T) {
	prev := Mark(PriorityLowest)
	if prev != MarkMagic {
		t.Fatalf("Mark(%d) = %#x, want MarkMagic", PriorityLowest, prev)
	}
	for p := PriorityLowest; p <= PriorityHighest; p++ {
		m := Mark(int16(p))
		if m>>24 != MarkMagic>>24 || m&markFree != 0 {
			t.Fatalf("Mark(%d) = %#x: top byte not MarkMagic's, or a bit of %#x set", p, m, markFree)
		}
		if p > PriorityLowest && m <= prev {
			t.Fatalf("Mark(%d) = %#x, not above Mark(%d) = %#x", p, m, p-1, prev)
		}
		prev = m
	}
}

func TestConfigErrors(t *testing.T) {
	for _, c := range []Config{
		{},
		{Hooks: []Hook{9}, QueueCount: 1},
		{Hooks: []Hook{HookInput, HookInput}, QueueCount: 1},
		{Hooks: []Hook{HookInput}, QueueCount: 0},
		{Hooks: []Hook{HookInput}, QueueNum: 65535, QueueCount: 2},
		{Hooks: []Hook{HookInput}, Priority: 30001, QueueCount: 1},
		{Hooks: []Hook{HookInput}, Action: 7},
		{Hooks: []Hook{HookInput}, QueueCount: 1, QueueFragments: true},                           // not with FragAny
		{Hooks: []Hook{HookInput}, Action: ActionDrop, Fragments: FragNone, QueueFragments: true}, // queues: not with drop
	} {
		if _, err := Install(c); err == nil {
			t.Errorf("Install(%+v) succeeded", c)
		}
	}
}

// consumer is a go-nfqueue listener inside ns that accepts every packet and
// counts them.
func consumer(t *testing.T, ns *netnstest.NS, queue uint16) *atomic.Int64 {
	t.Helper()
	var n atomic.Int64
	var q *nfqueue.Nfqueue
	err := ns.Do(func() (err error) {
		q, err = nfqueue.Open(&nfqueue.Config{NfQueue: queue, MaxPacketLen: 0xFFFF, MaxQueueLen: 1024,
			Copymode: nfqueue.NfQnlCopyPacket, WriteTimeout: time.Second})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); q.Close() })
	if err := q.SetOption(netlink.NoENOBUFS, true); err != nil {
		t.Fatal(err)
	}
	err = q.RegisterWithErrorFunc(ctx, func(a nfqueue.Attribute) int {
		n.Add(1)
		q.SetVerdict(*a.PacketID, nfqueue.NfAccept)
		return 0
	}, func(e error) int { return 0 })
	if err != nil {
		t.Fatal(err)
	}
	return &n
}

// TestQueueAll: a match-all queue rule at B's input hands pings to a real
// NFQUEUE consumer; without a consumer the packets are dropped, unless the
// rule has the bypass flag. ICMPv6 neighbour discovery stays out of the
// queue with KeepNDP.
func TestQueueAll(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "nftq", 0)
	r := install(t, l.B.NS, Config{Hooks: []Hook{HookInput}, IPv4: true, IPv6: true, Action: ActionQueue,
		QueueNum: 3, QueueCount: 1, KeepNDP: true})
	t.Logf("native queue: %v", r.Native())
	// No listener, no bypass: dropped.
	if got, err := l.A.NS.Ping(l.B.V4, 2, 300*time.Millisecond); err != nil || got != 0 {
		t.Fatalf("no listener: %d replies, %v", got, err)
	}
	n := consumer(t, l.B.NS, 3)
	for _, dst := range []string{"v4", "v6"} {
		a := l.B.V4
		if dst == "v6" {
			a = l.B.V6
		}
		before := n.Load()
		got, err := l.A.NS.Ping(a, 3, 2*time.Second)
		if err != nil || got != 3 {
			t.Fatalf("%s via consumer: %d/3 replies, %v", dst, got, err)
		}
		if d := n.Load() - before; d != 3 {
			t.Errorf("%s: consumer saw %d packets, want 3 echo requests", dst, d)
		}
	}
	// Bypass: no listener, packets pass.
	r.Close()
	install(t, l.B.NS, Config{Hooks: []Hook{HookInput}, IPv4: true, IPv6: true, Action: ActionQueue,
		QueueNum: 4, QueueCount: 1, Bypass: true})
	if got, err := l.A.NS.Ping(l.B.V4, 2, time.Second); err != nil || got != 2 {
		t.Fatalf("bypass: %d/2 replies, %v", got, err)
	}
}

// TestQueueFiltered: only what the filter selects is queued.
func TestQueueFiltered(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "nftf", 0)
	install(t, l.B.NS, Config{Hooks: []Hook{HookInput}, IPv4: true, IPv6: true, Action: ActionQueue,
		QueueNum: 5, QueueCount: 1, KeepNDP: true,
		Lowered: L(T(C(filter.FieldUDP, eq, 1), C(filter.FieldUDPDstPort, eq, 9999)))})
	n := consumer(t, l.B.NS, 5)
	if got, _ := l.A.NS.Ping(l.B.V6, 2, time.Second); got != 2 || n.Load() != 0 {
		t.Fatalf("ping: %d replies, %d queued", got, n.Load())
	}
	c, err := l.B.NS.ListenUDP(fmt.Sprintf("[%s]:9999", l.B.V6))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := l.A.NS.SendUDP(c.LocalAddr().(*net.UDPAddr).AddrPort(), []byte("x"), 4, 0); err != nil {
		t.Fatal(err)
	}
	msgs, err := netnstest.RecvUDP(c, 4, 2*time.Second)
	if err != nil || len(msgs) != 4 || n.Load() != 4 {
		t.Fatalf("udp: %d delivered, %d queued, %v", len(msgs), n.Load(), err)
	}
}

const childEnv = "NFTRULES_TEST_CHILD"

// TestMain lets the test binary act as the child of the crash and
// permission tests.
func TestMain(m *testing.M) {
	switch os.Getenv(childEnv) {
	case "":
		os.Exit(m.Run())
	case "crash":
		r, err := Install(Config{Hooks: []Hook{HookInput}, IPv4: true, IPv6: true, Action: ActionDrop})
		if err != nil {
			fmt.Println("error", err)
			os.Exit(1)
		}
		fmt.Println("table", r.Table())
		time.Sleep(30 * time.Second) // killed long before
		os.Exit(2)
	case "noperm":
		if err := syscall.Setuid(65534); err != nil {
			fmt.Println("setuid", err)
			os.Exit(1)
		}
		_, err := Install(Config{Hooks: []Hook{HookInput}, IPv4: true, Action: ActionDrop})
		fmt.Printf("perm=%v err=%v\n", errors.Is(err, os.ErrPermission), err)
		os.Exit(0)
	case "userns":
		// Run in a user namespace of its own: every capability there,
		// none over the network namespace, which the parent's owns.
		_, err := Install(Config{Hooks: []Hook{HookInput}, IPv4: true, Action: ActionDrop})
		fmt.Printf("perm=%v netadmin=%v err=%v\n", errors.Is(err, os.ErrPermission), netcap.Effective(), err)
		os.Exit(0)
	}
	os.Exit(3)
}

// TestCrashRemovesTable: a child installs a drop-everything ruleset and is
// SIGKILLed; the table vanishes and traffic flows again.
func TestCrashRemovesTable(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "nftc", 0)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", l.B.NS.Name, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=crash")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "table ") {
		t.Fatalf("child: %q %v", line, err)
	}
	table := strings.TrimSpace(strings.TrimPrefix(line, "table "))
	if !strings.Contains(listRuleset(t, l.B.NS), table) {
		t.Fatalf("table %s not installed", table)
	}
	if got, _ := l.A.NS.Ping(l.B.V4, 1, 300*time.Millisecond); got != 0 {
		t.Fatal("drop rule not effective")
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	if rs := listRuleset(t, l.B.NS); strings.Contains(rs, table) {
		t.Fatalf("table survived SIGKILL:\n%s", rs)
	}
	if got, _ := l.A.NS.Ping(l.B.V4, 2, time.Second); got != 2 {
		t.Fatalf("traffic blocked after the crash: %d/2", got)
	}
}

// TestNoPermission: without CAP_NET_ADMIN, Install fails with an error
// wrapping os.ErrPermission that says what is missing.
func TestNoPermission(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nftp")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns.Name, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=noperm")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v: %s", err, out)
	}
	s := string(out)
	if !strings.Contains(s, "perm=true") || !strings.Contains(s, "CAP_NET_ADMIN") {
		t.Fatalf("child said: %s", s)
	}
}

// TestNoPermissionUserNS: a process with CAP_NET_ADMIN in a user
// namespace of its own, but not over the network namespace (owned by the
// initial user namespace), is refused for the missing capability, and the
// error says so, not that a table is another socket's.
func TestNoPermissionUserNS(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nftu")
	s := netnstest.UserNSChild(t, ns, childEnv+"=userns")
	t.Logf("child: %s", s)
	if strings.Contains(s, "netadmin=false") {
		t.Fatalf("the child has no CAP_NET_ADMIN in its user namespace, so it cannot tell the two EPERMs apart: %s", s)
	}
	if !strings.Contains(s, "perm=true") || !strings.Contains(s, "CAP_NET_ADMIN in this network namespace is needed") || strings.Contains(s, ErrTableOwned.Error()) {
		t.Fatalf("child said: %s", s)
	}
}

// ownNames creates, in ns, an owned table of each name on a socket of its
// own (another socket than any of Install's), with a chain in it, and
// returns what `nft list table inet <name>` prints for each. The sockets
// close when the test ends, or with closeOwned.
func ownNames(t *testing.T, ns *netnstest.NS, names []string) (listings []string, closeOwned func()) {
	t.Helper()
	var conns []*tableConn
	closeOwned = func() {
		for _, c := range conns {
			c.CloseLasting()
		}
		conns = nil
	}
	t.Cleanup(closeOwned)
	for _, name := range names {
		if err := ns.Do(func() error {
			c, err := openOwned(name, nftables.TableFamilyINet)
			if err != nil {
				return err
			}
			conns = append(conns, c)
			c.AddChain(&nftables.Chain{Name: "theirs", Table: &nftables.Table{Name: name, Family: nftables.TableFamilyINet}})
			return c.flush()
		}); err != nil {
			t.Fatal(err)
		}
		listings = append(listings, nftList(t, ns, "table", "inet", name))
	}
	return listings, closeOwned
}

// nextNames returns the n names that openFresh gives a table of prefix
// next, in order.
func nextNames(prefix string, n int) []string {
	seq := tableSeq.Load()
	var names []string
	for i := range n {
		names = append(names, fmt.Sprintf("%s_%d_%d", prefix, os.Getpid(), seq+1+uint32(i)))
	}
	return names
}

// requireUntouched fails the test unless the tables of names are listed
// as they were (listings, from ownNames).
func requireUntouched(t *testing.T, ns *netnstest.NS, names, listings []string, when string) {
	t.Helper()
	for i, name := range names {
		if got := nftList(t, ns, "table", "inet", name); got != listings[i] {
			t.Errorf("%s, %s is now\n%s\nwas\n%s", when, name, got, listings[i])
		}
	}
}

// countDials counts the sockets openOwned opens until the test ends, and
// refuses to open more than limit (a guard against a loop of tries
// without end, which would otherwise make the test hang).
func countDials(t *testing.T, limit int64) *atomic.Int64 {
	var n atomic.Int64
	dial := dialNetfilter
	t.Cleanup(func() { dialNetfilter = dial })
	dialNetfilter = func() (*netlink.Conn, error) {
		if n.Add(1) > limit {
			return nil, fmt.Errorf("test guard: more than %d sockets opened", limit)
		}
		return dial()
	}
	return &n
}

// TestOwnedByAnother: the kernel answers EPERM, not EEXIST, to a NEWTABLE
// for the name of a table another socket owns, also to a caller with
// CAP_NET_ADMIN (a process of the same PID in another PID namespace,
// sharing the network namespace, makes the same names). Install then
// tries the next name: when another socket owns the name Install would
// use next, or the next several, Install makes its table under the first
// free one, leaves the other socket's tables as they were, and its Close
// removes only its own.
func TestOwnedByAnother(t *testing.T) {
	netnstest.RequireRoot(t)
	for _, owned := range []int{1, 5} {
		t.Run(fmt.Sprint(owned), func(t *testing.T) {
			ns := netnstest.NewT(t, "nfow")
			// A drop rule set asks for no probe, which would take a
			// number first.
			names := nextNames("divert", owned+1)
			want := names[owned]
			names = names[:owned]
			listings, closeOwned := ownNames(t, ns, names)
			dials := countDials(t, int64(owned)+8)
			var r *Ruleset
			if err := ns.Do(func() (err error) {
				r, err = Install(Config{Hooks: []Hook{HookInput}, IPv4: true, IPv6: true, Action: ActionDrop})
				return err
			}); err != nil {
				t.Fatalf("Install with %v another socket's: %v", names, err)
			}
			if r.Table() != want {
				t.Errorf("Install's table %s, want %s, the first name no other socket owns", r.Table(), want)
			}
			if n := dials.Load(); n != int64(owned)+1 {
				t.Errorf("Install opened %d sockets, want %d", n, owned+1)
			}
			if got, w := tables(t, ns), append(slices.Clone(names), want); !slices.Equal(got, w) {
				t.Errorf("tables %v, want %v", got, w)
			}
			requireRules(t, ns, r.Table(), "Install's table")
			requireUntouched(t, ns, names, listings, "after Install")
			if err := r.Close(); err != nil {
				t.Fatal(err)
			}
			if got := tables(t, ns); !slices.Equal(got, names) {
				t.Errorf("tables after Close %v, want the other socket's %v", got, names)
			}
			requireUntouched(t, ns, names, listings, "after Close")
			closeOwned()
			requireGone(t, ns, "after the other socket closed")
		})
	}
}

// TestExistingNameUnowned: a table of the name Install would use next
// that nobody owns (an administrator's, made with nft) makes Install take
// the name after it, as one another socket owns does, and leaves that
// table alone.
func TestExistingNameUnowned(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nfun")
	names := nextNames("divert", 2)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if out, err := ns.Run(ctx, "nft", "add", "table", "inet", names[0]); err != nil {
		t.Fatalf("nft add table: %v: %s", err, out)
	}
	before := nftList(t, ns, "table", "inet", names[0])
	var r *Ruleset
	if err := ns.Do(func() (err error) {
		r, err = Install(Config{Hooks: []Hook{HookInput}, IPv4: true, IPv6: true, Action: ActionDrop})
		return err
	}); err != nil {
		t.Fatalf("Install with a table %s nobody owns: %v", names[0], err)
	}
	defer r.Close()
	if r.Table() != names[1] {
		t.Errorf("Install's table %s, want %s", r.Table(), names[1])
	}
	requireRules(t, ns, r.Table(), "Install's table")
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if got := nftList(t, ns, "table", "inet", names[0]); got != before {
		t.Errorf("the unowned table is now\n%s\nwas\n%s", got, before)
	}
}

// TestOwnedNamesExhausted: when another socket owns every name Install
// tries (maxNameTries of them), Install fails after that many, with an
// error that wraps ErrTableOwned and os.ErrPermission, names the last
// name tried and says that the table is another socket's rather than
// that a capability is missing; and it leaves nothing behind.
func TestOwnedNamesExhausted(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nfox")
	defer func(n int) { maxNameTries = n }(maxNameTries)
	maxNameTries = 2
	names := nextNames("divert", maxNameTries)
	listings, closeOwned := ownNames(t, ns, names)
	dials := countDials(t, 10)
	var err error
	ns.Do(func() error {
		r, ierr := Install(Config{Hooks: []Hook{HookInput}, IPv4: true, IPv6: true, Action: ActionDrop})
		if ierr == nil {
			r.Close()
		}
		err = ierr
		return nil
	})
	if err == nil {
		t.Fatalf("Install made a table though another socket owns %v, every name it may try", names)
	}
	msg := err.Error()
	t.Logf("Install: %s", msg)
	if n := dials.Load(); n != int64(maxNameTries) {
		t.Errorf("Install opened %d sockets, want %d, one a name", n, maxNameTries)
	}
	if !errors.Is(err, os.ErrPermission) || !errors.Is(err, unix.EPERM) || !errors.Is(err, ErrTableOwned) {
		t.Fatalf("Install: %v, want EPERM for a table another socket owns", err)
	}
	last := names[len(names)-1]
	if !strings.Contains(msg, "2 table names tried") || !strings.Contains(msg, last+" belongs to another process") || strings.Contains(msg, "is needed") {
		t.Errorf("Install's error %q: want it to say that every name tried, the last %s, is another socket's, not that a capability is missing", msg, last)
	}
	if got := tables(t, ns); !slices.Equal(got, names) {
		t.Errorf("tables %v, want only the other socket's %v", got, names)
	}
	requireUntouched(t, ns, names, listings, "after Install")
	closeOwned()
	requireGone(t, ns, "after the other socket closed")
}

// resetProbe forgets the probe's answer until the test ends.
func resetProbe(t *testing.T) {
	probe.mu.Lock()
	done, native := probe.done, probe.native
	probe.done, probe.native = false, false
	probe.mu.Unlock()
	t.Cleanup(func() {
		probe.mu.Lock()
		probe.done, probe.native = done, native
		probe.mu.Unlock()
	})
}

// TestNativeProbeOwned: a probe whose table name another socket owns
// tries the next name, and answers as a probe that met no such table: the
// refusal is not taken for the lack of the expression.
func TestNativeProbeOwned(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nfpo")
	resetProbe(t)
	var want bool
	if err := ns.Do(func() (err error) { want, err = nativeQueue(); return err }); err != nil {
		t.Fatal(err)
	}
	probe.mu.Lock()
	probe.done = false
	probe.mu.Unlock()
	names := nextNames("divert_probe", 1)
	listings, closeOwned := ownNames(t, ns, names)
	countDials(t, 10)
	var got bool
	if err := ns.Do(func() (err error) { got, err = nativeQueue(); return err }); err != nil {
		t.Fatalf("probe with %s another socket's: %v", names[0], err)
	}
	probe.mu.Lock()
	done := probe.done
	probe.mu.Unlock()
	if got != want || !done {
		t.Errorf("probe with %s another socket's: %v (decided: %v), want %v, decided", names[0], got, done, want)
	}
	if got := tables(t, ns); !slices.Equal(got, names) {
		t.Errorf("tables %v, want only the other socket's %v", got, names)
	}
	requireUntouched(t, ns, names, listings, "after the probe")
	closeOwned()
	requireGone(t, ns, "after the other socket closed")
}

// TestNativeProbeOwnedExhausted: when another socket owns every name the
// probe tries, the probe has no answer, caches none, and Install of a
// queue rule set fails with the probe's error (wrapping ErrTableOwned)
// rather than take the native queue expression for missing and fall back
// on the xt target.
func TestNativeProbeOwnedExhausted(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nfpx")
	resetProbe(t)
	defer func(n int) { maxNameTries = n }(maxNameTries)
	maxNameTries = 2
	names := nextNames("divert_probe", maxNameTries)
	listings, closeOwned := ownNames(t, ns, names)
	countDials(t, 10)
	var err error
	ns.Do(func() error {
		r, ierr := Install(Config{Hooks: []Hook{HookInput}, IPv4: true, Action: ActionQueue, QueueNum: 7, QueueCount: 1, Bypass: true})
		if ierr == nil {
			r.Close()
		}
		err = ierr
		return nil
	})
	t.Logf("Install: %v", err)
	if err == nil || !errors.Is(err, ErrTableOwned) || !errors.Is(err, os.ErrPermission) || !strings.Contains(err.Error(), "native queue") || !strings.Contains(err.Error(), names[1]) {
		t.Fatalf("Install: %v, want the probe's error for %s, another socket's", err, names[1])
	}
	probe.mu.Lock()
	done := probe.done
	probe.mu.Unlock()
	if done {
		t.Error("the probe cached an answer it did not have")
	}
	if got := tables(t, ns); !slices.Equal(got, names) {
		t.Errorf("tables %v, want only the other socket's %v", got, names)
	}
	requireUntouched(t, ns, names, listings, "after Install")
	closeOwned()
	requireGone(t, ns, "after the other socket closed")
}

// TestNativeProbe: the probe answers consistently and leaves no table.
func TestNativeProbe(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nftn")
	var a, b bool
	ns.Do(func() error { a = HasNativeQueue(); b = HasNativeQueue(); return nil })
	if a != b {
		t.Fatal("probe not stable")
	}
	t.Logf("native queue expression: %v", a)
	if rs := listRuleset(t, ns); strings.Contains(rs, "divert_probe") {
		t.Fatalf("probe table left behind:\n%s", rs)
	}
}

// TestInstallManyRules: filters that lower to many rules install, at
// every hook at once. The kernel echoes every rule added into the socket's
// receive buffer before the library reads any; with the default buffers a
// filter of some 40 rules failed with ENOBUFS, and larger batches with
// EMSGSIZE. A long conjunction (the over-approximation of 100 port tests
// is one term of 35 "!=" tests) made a rule of more expressions than the
// kernel takes (EINVAL): such a Cond is left out.
func TestInstallManyRules(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nftm")
	hooks := []Hook{HookPrerouting, HookInput, HookForward, HookOutput, HookPostrouting}
	for _, n := range []int{40, 100, 256} {
		var terms []string
		for p := 1; p <= n; p++ {
			terms = append(terms, fmt.Sprintf("tcp.DstPort == %d", p))
		}
		f, err := filter.Compile(strings.Join(terms, " or "), filter.LayerNetwork)
		if err != nil {
			t.Fatal(err)
		}
		lw := f.Lower()
		for _, a := range []Action{ActionDrop, ActionQueue} {
			var r *Ruleset
			if err := ns.Do(func() (err error) {
				r, err = Install(Config{Hooks: hooks, IPv4: true, IPv6: true, Lowered: lw, Action: a, QueueNum: 5, QueueCount: 1})
				return err
			}); err != nil {
				t.Fatalf("%d port tests (%d terms), action %v: %v", n, len(lw.Terms), a, err)
			}
			if r.Exact() != lw.Exact {
				t.Errorf("%d port tests, action %v: exact %v, the filter's lowering %v", n, a, r.Exact(), lw.Exact)
			}
			r.Close()
		}
	}
}

// TestCreateTableAnswerBounded: openOwned waits for the answer to its
// NEWTABLE no longer than ackTimeout. The socket here is a netlink socket
// whose kernel side never answers the batch: NETLINK_FIB_LOOKUP's
// (nl_fib_input, net/ipv4/fib_frontend.c) drops a datagram whose first
// message is shorter than struct fib_result_nl, as the batch's
// NFNL_MSG_BATCH_BEGIN is. openOwned fails with an error wrapping
// os.ErrDeadlineExceeded, and closes the socket.
func TestCreateTableAnswerBounded(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nfdl")
	defer func(d func() (*netlink.Conn, error), to time.Duration) { dialNetfilter, ackTimeout = d, to }(dialNetfilter, ackTimeout)
	var silent *netlink.Conn
	dialNetfilter = func() (*netlink.Conn, error) {
		c, err := netlink.Dial(unix.NETLINK_FIB_LOOKUP, nil)
		silent = c
		return c, err
	}
	ackTimeout = 100 * time.Millisecond
	done := make(chan error, 1)
	go func() {
		done <- ns.Do(func() error {
			c, err := openOwned("divert_test_silent", nftables.TableFamilyINet)
			if err == nil {
				c.CloseLasting()
				return errors.New("openOwned succeeded on a socket that never answers")
			}
			return err
		})
	}()
	var err error
	select {
	case err = <-done:
	case <-time.After(20 * time.Second): // a guard against a hang, far past ackTimeout
		t.Fatal("openOwned still waits for an answer that never comes")
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) || !strings.Contains(err.Error(), "divert_test_silent") || !strings.Contains(err.Error(), "no answer") {
		t.Fatalf("openOwned: %v, want an error about the missing answer wrapping os.ErrDeadlineExceeded", err)
	}
	t.Logf("openOwned: %v", err)
	raw, rerr := silent.SyscallConn()
	if rerr == nil {
		rerr = raw.Control(func(uintptr) {})
	}
	if rerr == nil {
		t.Error("openOwned left the socket open")
	}
}

// TestTableErrOnlyEPERM: only EPERM can mean a table another socket owns
// (nft_table_lookup answers nothing else for it); an EACCES, such as a
// Linux security module's refusal of the netlink message, wraps
// os.ErrPermission too but is not reported as ErrTableOwned, even to a
// caller with CAP_NET_ADMIN.
func TestTableErrOnlyEPERM(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nfep")
	var sock *netlink.Conn
	if err := ns.Do(func() (err error) {
		sock, err = netlink.Dial(unix.NETLINK_NETFILTER, nil)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	if !netAdminOver(sock) {
		t.Fatal("root has no CAP_NET_ADMIN over a namespace of its own: the test cannot tell an owned table's EPERM")
	}
	for _, c := range []struct {
		err   error
		owned bool
	}{
		{unix.EPERM, true},
		{fmt.Errorf("netlink receive: %w", unix.EPERM), true},
		{unix.EACCES, false},
		{fmt.Errorf("netlink send: %w", unix.EACCES), false},
	} {
		got := mapTableErr("create table t", "t", sock, c.err)
		if !errors.Is(got, os.ErrPermission) || errors.Is(got, ErrTableOwned) != c.owned {
			t.Errorf("mapTableErr(%v) = %q: want os.ErrPermission, ErrTableOwned %v", c.err, got, c.owned)
		}
	}
}
