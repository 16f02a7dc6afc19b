//go:build linux

package netnstest

import (
	"bytes"
	"context"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func nsInode(t *testing.T) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestNewDoClose(t *testing.T) {
	RequireRoot(t)
	n, err := New("ntt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	if _, err := os.Stat(n.Path()); err != nil {
		t.Fatalf("namespace file: %v", err)
	}
	var st unix.Stat_t
	if err := unix.Stat(n.Path(), &st); err != nil {
		t.Fatal(err)
	}
	var inside uint64
	if err := n.Do(func() error {
		var s unix.Stat_t
		if err := unix.Stat("/proc/thread-self/ns/net", &s); err != nil {
			return err
		}
		inside = s.Ino
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if inside != st.Ino {
		t.Fatalf("Do ran in namespace inode %d, want %d", inside, st.Ino)
	}
	// The caller's goroutine never moves; check the thread Do used came back
	// by running many Do calls and checking new goroutines land in the root ns.
	for i := 0; i < 20; i++ {
		if err := n.Do(func() error { return nil }); err != nil {
			t.Fatal(err)
		}
	}
	if got := nsInode(t); got == st.Ino {
		t.Fatal("caller thread left inside the namespace")
	}
	out, err := n.Run(context.Background(), "ip", "-o", "link", "show", "lo")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(out, []byte("UP")) && !bytes.Contains(out, []byte("LOOPBACK,UP")) {
		t.Fatalf("lo not up: %s", out)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := os.Stat(n.Path()); !os.IsNotExist(err) {
		t.Fatalf("namespace still there after Close: %v", err)
	}
}

func TestDoError(t *testing.T) {
	RequireRoot(t)
	n := NewT(t, "ntt")
	if err := n.Do(func() error { return os.ErrClosed }); err != os.ErrClosed {
		t.Fatalf("Do error = %v, want os.ErrClosed", err)
	}
	if err := n.Do(func() error { panic("boom") }); err == nil || !strings.Contains(err.Error(), "boom") {
		t.Fatalf("Do panic error = %v", err)
	}
}

func TestPairTraffic(t *testing.T) {
	RequireRoot(t)
	l := Pair(t, "ntp", 1400)
	if l.A.IfIdx == 0 || l.B.IfIdx == 0 {
		t.Fatalf("interface indexes %d %d", l.A.IfIdx, l.B.IfIdx)
	}
	for _, dst := range []netip.Addr{l.B.V4, l.B.V6} {
		got, err := l.A.NS.Ping(dst, 3, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if got != 3 {
			t.Errorf("ping %s: %d/3 replies", dst, got)
		}
	}
	// An address nobody has: no replies, no error.
	got, err := l.A.NS.Ping(netip.AddrFrom4([4]byte{10, 201, l.B.V4.As4()[2], 99}), 1, 300*time.Millisecond)
	if err != nil || got != 0 {
		t.Errorf("ping nobody: %d replies, %v", got, err)
	}
	for _, dst := range []netip.Addr{l.B.V4, l.B.V6} {
		c, err := l.B.NS.ListenUDP(netip.AddrPortFrom(dst, 0).String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		ap := c.LocalAddr().(interface{ AddrPort() netip.AddrPort }).AddrPort()
		if err := l.A.NS.SendUDP(ap, []byte("hello"), 5, 0); err != nil {
			t.Fatal(err)
		}
		msgs, err := RecvUDP(c, 5, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if len(msgs) != 5 || string(msgs[0]) != "hello" {
			t.Errorf("udp to %s: got %q", dst, msgs)
		}
	}
	// The MTU was applied.
	out, err := l.A.NS.Run(context.Background(), "ip", "-o", "link", "show", l.A.If)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(out, []byte("mtu 1400")) {
		t.Errorf("mtu not set: %s", out)
	}
}

func TestRouted(t *testing.T) {
	RequireRoot(t)
	r := Route(t, "ntr", 0)
	for _, dst := range []netip.Addr{r.Right.B.V4, r.Right.B.V6} {
		got, err := r.LeftHost().Ping(dst, 2, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if got != 2 {
			t.Errorf("ping %s through the router: %d/2", dst, got)
		}
	}
	// Forwarding off → nothing passes (proves the router forwards).
	if err := r.Router().Sysctl("net.ipv4.ip_forward", "0"); err != nil {
		t.Fatal(err)
	}
	got, err := r.LeftHost().Ping(r.Right.B.V4, 1, 300*time.Millisecond)
	if err != nil || got != 0 {
		t.Errorf("ping with forwarding off: %d, %v", got, err)
	}
}

func TestChecksum(t *testing.T) {
	// RFC 1071 example bytes.
	b := []byte{0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7}
	if got := Checksum(b); got != ^uint16(0xddf2) {
		t.Fatalf("Checksum = %#x, want %#x", got, ^uint16(0xddf2))
	}
	if got := Checksum([]byte{0xff}); got != 0x00ff {
		t.Fatalf("odd Checksum = %#x", got)
	}
}

func TestBounds(t *testing.T) {
	n := &NS{Name: "unused"}
	if _, err := n.Ping(netip.MustParseAddr("10.0.0.1"), MaxCount+1, time.Second); err == nil {
		t.Error("Ping accepted an unbounded count")
	}
	if _, err := RecvUDP(nil, 1, 0); err == nil {
		t.Error("RecvUDP accepted a zero wait")
	}
}
