//go:build linux

package main

import (
	"bufio"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/netdivert/divert/examples/internal/extest"
	"github.com/netdivert/divert/examples/internal/exutil"
	"github.com/netdivert/divert/internal/netnstest"
)

func binary(t *testing.T) string { return extest.Build(t) }

func TestMain(m *testing.M) { extest.Main(m) }

func TestDemo(t *testing.T) {
	netnstest.RequireRoot(t)
	bin := binary(t)
	// The demo makes and removes its own namespaces.
	out, err := exec.Command(bin, "-demo").CombinedOutput()
	if err != nil {
		t.Fatalf("demo: %v\n%s", err, out)
	}
	text := string(out)
	for _, want := range []string{"demo OK", "ICMP ", "ICMPv6 ", "UDP ", "ping IPv4 4/4 replies, IPv6 4/4 replies; UDP 8/8"} {
		if !strings.Contains(text, want) {
			t.Errorf("demo output lacks %q:\n%s", want, text)
		}
	}
	if strings.Count(text, "\n    45 ") < 8 {
		t.Errorf("demo output shows fewer than 8 IPv4 packets in hex:\n%s", text)
	}
	// -json: the same run, machine-readable.
	out, err = exec.Command(bin, "-demo", "-json", "-quiet").Output()
	if err != nil {
		t.Fatalf("demo -json: %v\n%s", err, out)
	}
	s := extest.DecodeJSON[Summary](t, string(out))
	if s.Demo == nil || !s.Demo.OK || s.Seen != 24 || s.Reinjected != 24 {
		t.Fatalf("demo summary: %+v demo %+v", s, s.Demo)
	}
	// Nothing left behind: the demo's own namespaces are gone.
	extest.NoNamespaces(t, strings.Fields(s.Demo.Sender)[0], strings.Fields(s.Demo.Receiver)[0])
}

// TestDemoBrokenPipe: the demo whose reader goes away (`-demo | head -3`)
// stops and removes its namespaces; the runtime used to end it at its next
// write, leaving them.
func TestDemoBrokenPipe(t *testing.T) {
	netnstest.RequireRoot(t)
	cmd := exec.Command(binary(t), "-demo")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// The first three lines name the two namespaces; then the reader goes.
	var names []string
	sc := bufio.NewScanner(out)
	for i := 0; i < 3 && sc.Scan(); i++ {
		if f := strings.Fields(sc.Text()); len(f) >= 2 && (f[0] == "sender" || f[0] == "receiver") {
			names = append(names, f[1])
		}
	}
	out.Close()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatal("the demo did not end within 30 s of losing its reader")
	}
	t.Logf("demo after its reader went: %v", err)
	if len(names) != 2 {
		t.Fatalf("namespaces named in the first lines: %q", names)
	}
	extest.NoNamespaces(t, names...)
}

func TestInterceptPing(t *testing.T) {
	netnstest.RequireRoot(t)
	bin := binary(t)
	l := netnstest.Pair(t, "dvint", 0)
	p := extest.Start(t, l.B.NS, 20*time.Second, bin, "-filter", "icmp", "-count", "6", "-json")
	p.WaitReady(t)
	got, err := l.A.NS.Ping(l.B.V4, 3, time.Second)
	if err != nil || got != 3 {
		p.Interrupt()
		out, errOut, perr := p.Wait()
		t.Fatalf("ping through the interceptor: %d/3 replies, %v\ninterceptor: %v\n%s\n%s", got, err, perr, out, errOut)
	}
	out, errOut, err := p.Wait()
	if err != nil {
		t.Fatalf("interceptor: %v\n%s", err, errOut)
	}
	s := extest.DecodeJSON[Summary](t, out)
	icmp := s.Protocols["ICMP"]
	if s.Seen != 6 || s.Reinjected != 6 || icmp == nil || icmp.In != 3 || icmp.Out != 3 {
		t.Fatalf("summary %+v icmp %+v", s, icmp)
	}
	// Each request is shown with its direction, interface, protocol and
	// addresses, then 40 bytes of hex.
	line := fmt.Sprintf("IN  if=%d ICMP(1) %s -> %s len=44 type=8 code=0", l.B.IfIdx, l.A.V4, l.B.V4)
	if n := strings.Count(errOut, line); n != 3 {
		t.Errorf("%d lines %q, want 3:\n%s", n, line, errOut)
	}
	if n := strings.Count(errOut, fmt.Sprintf("ICMP(1) %s -> %s len=44 type=0 code=0", l.B.V4, l.A.V4)); n != 3 {
		t.Errorf("%d reply lines, want 3:\n%s", n, errOut)
	}
	if i := strings.Index(errOut, "\n    45 00 00 2c "); i < 0 || len(strings.Fields(strings.SplitN(errOut[i+1:], "\n", 2)[0])) != 40 {
		t.Errorf("no 40-byte hex dump:\n%s", errOut)
	}
}

func TestDropAndCtrlC(t *testing.T) {
	netnstest.RequireRoot(t)
	bin := binary(t)
	l := netnstest.Pair(t, "dvdrop", 0)
	p := extest.Start(t, l.B.NS, 20*time.Second, bin, "-filter", "icmp and inbound", "-drop", "-json")
	p.WaitReady(t)
	if got, _ := l.A.NS.Ping(l.B.V4, 2, 500*time.Millisecond); got != 0 {
		t.Fatalf("%d pings answered through -drop", got)
	}
	if err := p.Interrupt(); err != nil {
		t.Fatal(err)
	}
	out, errOut, err := p.Wait()
	if err != nil {
		t.Fatalf("Ctrl-C did not end it cleanly: %v\n%s", err, errOut)
	}
	s := extest.DecodeJSON[Summary](t, out)
	if s.Dropped != 2 || s.Seen != 2 {
		t.Fatalf("summary %+v", s)
	}
	// The handle's rules left with it: pings pass again.
	if got, err := l.A.NS.Ping(l.B.V4, 2, time.Second); got != 2 {
		t.Fatalf("after exit %d/2 pings answered (%v): rules left behind", got, err)
	}
}

func TestSniff(t *testing.T) {
	netnstest.RequireRoot(t)
	bin := binary(t)
	l := netnstest.Pair(t, "dvsniff", 0)
	p := extest.Start(t, l.B.NS, 20*time.Second, bin, "-filter", "icmp", "-sniff", "-count", "4", "-json")
	p.WaitReady(t)
	if got, err := l.A.NS.Ping(l.B.V4, 2, time.Second); got != 2 {
		p.Interrupt()
		out, errOut, perr := p.Wait()
		t.Fatalf("%d/2 pings answered while sniffing: %v\ninterceptor: %v\n%s\n%s", got, err, perr, out, errOut)
	}
	out, errOut, err := p.Wait()
	if err != nil {
		t.Fatalf("%v\n%s", err, errOut)
	}
	if s := extest.DecodeJSON[Summary](t, out); s.Sniffed != 4 || s.Reinjected != 0 || !strings.Contains(errOut, " sniffed\n") {
		t.Fatalf("summary %+v\n%s", s, errOut)
	}
}

func TestPort(t *testing.T) {
	netnstest.RequireRoot(t)
	if _, err := exec.LookPath("iptables"); err != nil {
		t.Fatalf("iptables is needed for the administrator's rule: %v", err)
	}
	bin := binary(t)
	l := netnstest.Pair(t, "dvport", 0)
	// The administrator's rule, inside the namespace only (it goes with it).
	// (The README's rule; the kernel here has only the xt NFQUEUE target.)
	if out, err := l.B.NS.Run(t.Context(), "iptables", "-A", "INPUT", "-p", "icmp", "-j", "NFQUEUE", "--queue-num", "1234"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	p := extest.Start(t, l.B.NS, 20*time.Second, bin, "-port", "1234", "-count", "2", "-json")
	p.WaitReady(t)
	if got, err := l.A.NS.Ping(l.B.V4, 2, time.Second); got != 2 {
		t.Fatalf("%d/2 pings answered through the queue: %v", got, err)
	}
	out, errOut, err := p.Wait()
	if err != nil {
		t.Fatalf("%v\n%s", err, errOut)
	}
	if s := extest.DecodeJSON[Summary](t, out); s.Seen != 2 || s.Reinjected != 2 || s.Protocols["ICMP"] == nil || s.Protocols["ICMP"].In != 2 {
		t.Fatalf("summary %+v", s)
	}
}

func TestNoPrivileges(t *testing.T) {
	netnstest.RequireRoot(t)
	bin := binary(t)
	ns := netnstest.NewT(t, "dvpriv")
	// As nobody, inside a namespace of our own.
	_, errOut, err := extest.Run(t, ns, 20*time.Second, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", bin, "-filter", "icmp")
	if err == nil {
		t.Fatal("ran without privileges")
	}
	if !strings.Contains(errOut, exutil.PrivilegeHint) {
		t.Fatalf("no plain privilege message:\n%s", errOut)
	}
}

// TestRootlessContainer: root of a user namespace of its own (a rootless
// container) has every capability there but none over the network
// namespace, which the host's user namespace owns. The kernel refuses it
// NFQUEUE with EPERM, as it refuses anyone a queue number another socket
// holds. A sniffing interceptor, which opens no injection socket (that
// would fail first, wanting CAP_NET_RAW), binds its queue before anything
// else: it must say that privileges are missing, for an automatic queue
// and a given one alike, not that every queue is busy.
func TestRootlessContainer(t *testing.T) {
	netnstest.RequireRoot(t)
	bin := binary(t)
	ns := netnstest.NewT(t, "dvuser")
	for _, args := range [][]string{{"-sniff", "-filter", "icmp"}, {"-sniff", "-port", "100"}} {
		_, errOut, err := extest.Run(t, ns, 20*time.Second, "unshare", append([]string{"--user", "--map-root-user", bin}, args...)...)
		if err == nil {
			t.Fatalf("%v: ran in a user namespace without CAP_NET_ADMIN over the network namespace", args)
		}
		if !strings.Contains(errOut, exutil.PrivilegeHint) || !strings.Contains(errOut, "NFQUEUE needs CAP_NET_ADMIN") || strings.Contains(errOut, "in use") {
			t.Errorf("%v: want the privilege message for NFQUEUE, not a busy queue:\n%s", args, errOut)
		}
	}
}

func TestFlags(t *testing.T) {
	for _, bad := range [][]string{{"-sniff", "-drop"}, {"-priority", "30001"}, {"-layer", "flow"}, {"-port", "70000"}, {"x"},
		{"-demo", "-count", "3"}, {"-demo", "-sniff"}, {"-demo", "-port", "5"}} {
		if _, err := parseFlags(bad); err == nil {
			t.Errorf("parseFlags(%q) accepted", bad)
		}
	}
	c, err := parseFlags([]string{"-layer", "forward", "-priority", "-5", "-count", "3"})
	if err != nil || c.Layer != 1 || c.Priority != -5 || c.count != 3 || c.port != -1 {
		t.Fatalf("%+v %v", c, err)
	}
}
