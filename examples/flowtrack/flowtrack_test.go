//go:build linux

package main

import (
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/netdivert/divert/examples/internal/extest"
	"github.com/netdivert/divert/internal/netnstest"
)

func TestMain(m *testing.M) { extest.Main(m) }

func TestDemo(t *testing.T) {
	netnstest.RequireRoot(t)
	bin := extest.Build(t)
	out, err := exec.Command(bin, "-demo").CombinedOutput()
	if err != nil {
		t.Fatalf("demo: %v\n%s", err, out)
	}
	text := string(out)
	// The demo's own sockets: TCP and UDP flows show its PID (not known
	// here), ICMP ones none.
	for _, want := range []string{"demo OK", "7 established, 7 deleted", "ESTABLISHED TCP ", "DELETED     TCP ", " IN  loopback pid=", "ICMPv6 type=128 code=0 fd00:", " OUT pid=?", "UDP "} {
		if !strings.Contains(text, want) {
			t.Errorf("demo output lacks %q:\n%s", want, text)
		}
	}
	out, err = exec.Command(bin, "-demo", "-json").Output()
	if err != nil {
		t.Fatalf("demo -json: %v\n%s", err, out)
	}
	s := extest.DecodeJSON[Summary](t, string(out))
	if s.Demo == nil || !s.Demo.OK || s.Established != 7 || s.Deleted != 7 || s.Overflows != 0 {
		t.Fatalf("demo summary: %+v demo %+v", s, s.Demo)
	}
	extest.NoNamespaces(t, strings.Fields(s.Demo.Host)[0], strings.Fields(s.Demo.Peer)[0])
}

// TestFilterCount: -filter narrows the events, -count ends the program.
func TestFilterCount(t *testing.T) {
	netnstest.RequireRoot(t)
	bin := extest.Build(t)
	l := netnstest.Pair(t, "dvft", 0)
	p := extest.Start(t, l.A.NS, 20*time.Second, bin, "-filter", "tcp and remotePort == 8102", "-count", "1", "-json")
	p.WaitReady(t)
	ln, err := l.B.NS.ListenTCP(":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ln2, err := l.B.NS.ListenTCP(netip.AddrPortFrom(l.B.V4, 8102).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln2.Close()
	go func() {
		for _, x := range []net.Listener{ln, ln2} {
			if c, err := x.Accept(); err == nil {
				c.Close()
			}
		}
	}()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	for _, dst := range []netip.AddrPort{netip.AddrPortFrom(l.B.V4, port), netip.AddrPortFrom(l.B.V4, 8102)} {
		// Open until the end: the process of a flow is that of its socket.
		if err := l.A.NS.Do(func() error {
			c, err := net.DialTimeout("tcp", dst.String(), 2*time.Second)
			if err == nil {
				t.Cleanup(func() { c.Close() })
			}
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	out, errOut, err := p.Wait()
	if err != nil {
		t.Fatalf("flowtrack: %v\n%s", err, errOut)
	}
	s := extest.DecodeJSON[Summary](t, out)
	if s.Established != 1 || s.Deleted != 0 {
		t.Fatalf("summary %+v", s)
	}
	want := " -> " + netip.AddrPortFrom(l.B.V4, 8102).String() + " OUT pid=" + strconv.Itoa(os.Getpid())
	if strings.Count(errOut, "ESTABLISHED TCP ") != 1 || !strings.Contains(errOut, want) || strings.Contains(errOut, "pid=?") {
		t.Fatalf("event lines lack %q:\n%s", want, errOut)
	}
}
