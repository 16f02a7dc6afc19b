//go:build linux

package main

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"testing"
	"time"

	"github.com/netdivert/divert/examples/internal/extest"
	"github.com/netdivert/divert/internal/netnstest"
)

func TestMain(m *testing.M) { extest.Main(m) }

// startNetem runs netem in the link's B namespace and waits until it is ready.
func startNetem(t *testing.T, bin string, l *netnstest.Link, args ...string) *extest.Proc {
	t.Helper()
	p := extest.Start(t, l.B.NS, 30*time.Second, bin, append([]string{"-json", "-quiet", "-seed", "1"}, args...)...)
	p.WaitReady(t)
	return p
}

// stop interrupts netem (Ctrl-C), checks it exits cleanly and returns its summary.
func stop(t *testing.T, p *extest.Proc) Summary {
	t.Helper()
	if err := p.Interrupt(); err != nil {
		t.Fatal(err)
	}
	out, errOut, err := p.Wait()
	if err != nil {
		t.Fatalf("netem did not exit cleanly on Ctrl-C: %v\n%s", err, errOut)
	}
	var s Summary
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("%v\n%s\n%s", err, out, errOut)
	}
	return s
}

// pingTimed pings once and returns the round trip, or -1 without a reply.
func pingTimed(l *netnstest.Link) time.Duration {
	start := time.Now()
	if n, _ := l.A.NS.Ping(l.B.V4, 1, 3*time.Second); n != 1 {
		return -1
	}
	return time.Since(start)
}

func TestNetem(t *testing.T) {
	netnstest.RequireRoot(t)
	bin := extest.Build(t)

	t.Run("delay", func(t *testing.T) {
		l := netnstest.Pair(t, "dvnd", 0)
		p := startNetem(t, bin, l, "-filter", "icmp and inbound", "-delay", "300ms", "-jitter", "50ms")
		for i := range 3 {
			if rtt := pingTimed(l); rtt < 250*time.Millisecond || rtt > 2*time.Second {
				t.Errorf("ping %d: round trip %v, want 250ms..2s", i, rtt)
			}
		}
		s := stop(t, p)
		if s.Packets != 3 || s.Delayed != 3 || s.Sent != 3 || s.LatencyMin < 250 || s.LatencyMax > 400 {
			t.Fatalf("summary %+v", s)
		}
		// Rules gone with the process.
		if rtt := pingTimed(l); rtt < 0 || rtt > 200*time.Millisecond {
			t.Fatalf("after exit the round trip is %v", rtt)
		}
	})

	t.Run("loss", func(t *testing.T) {
		l := netnstest.Pair(t, "dvnl", 0)
		p := startNetem(t, bin, l, "-filter", "icmp and inbound", "-loss", "100")
		if n, _ := l.A.NS.Ping(l.B.V4, 3, 300*time.Millisecond); n != 0 {
			t.Errorf("%d pings answered with 100%% loss", n)
		}
		if s := stop(t, p); s.Packets != 3 || s.Dropped != 3 || s.Sent != 0 {
			t.Fatalf("summary %+v", s)
		}
	})

	udp := func(t *testing.T, l *netnstest.Link, payload []byte, count int, want int, wait time.Duration) [][]byte {
		t.Helper()
		u, err := l.B.NS.ListenUDP(netip.AddrPortFrom(l.B.V4, 7100).String())
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		if err := l.A.NS.SendUDP(netip.AddrPortFrom(l.B.V4, 7100), payload, count, 5*time.Millisecond); err != nil {
			t.Fatal(err)
		}
		got, err := netnstest.RecvUDP(u, want+1, wait)
		if err != nil {
			t.Fatal(err)
		}
		return got
	}

	t.Run("duplicate", func(t *testing.T) {
		l := netnstest.Pair(t, "dvndup", 0)
		p := startNetem(t, bin, l, "-filter", "udp.DstPort == 7100", "-dup", "100", "-dup-count", "2")
		got := udp(t, l, []byte("dup me"), 4, 12, 2*time.Second)
		s := stop(t, p)
		if len(got) != 12 || s.Packets != 4 || s.Duplicated != 8 || s.SendErrors != 0 {
			t.Fatalf("received %d datagrams, want 4 x 3; summary %+v", len(got), s)
		}
	})

	t.Run("tamper", func(t *testing.T) {
		l := netnstest.Pair(t, "dvnt", 0)
		p := startNetem(t, bin, l, "-filter", "udp.DstPort == 7100", "-tamper", "100")
		payload := []byte("0123456789abcdef")
		got := udp(t, l, payload, 5, 5, 2*time.Second)
		if len(got) != 5 {
			t.Fatalf("received %d tampered datagrams, want 5 (checksums must be fixed)", len(got))
		}
		for _, g := range got {
			if len(g) != len(payload) || bytes.Equal(g, payload) {
				t.Errorf("datagram %q not tampered", g)
			}
		}
		if s := stop(t, p); s.Tampered != 5 {
			t.Fatalf("summary %+v", s)
		}
	})

	t.Run("reorder", func(t *testing.T) {
		l := netnstest.Pair(t, "dvnr", 0)
		p := startNetem(t, bin, l, "-filter", "udp.DstPort == 7100", "-reorder", "50", "-reorder-gap", "100ms")
		u, err := l.B.NS.ListenUDP(netip.AddrPortFrom(l.B.V4, 7100).String())
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		c, err := l.A.NS.DialUDP(netip.AddrPortFrom(l.B.V4, 7100))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		for i := range 10 {
			c.Write([]byte{byte(i)})
			time.Sleep(5 * time.Millisecond)
		}
		got, _ := netnstest.RecvUDP(u, 10, 3*time.Second)
		order := make([]byte, 0, len(got))
		for _, g := range got {
			order = append(order, g[0])
		}
		s := stop(t, p)
		if len(order) != 10 {
			t.Fatalf("received %v", order)
		}
		inOrder := true
		for i := range order {
			inOrder = inOrder && order[i] == byte(i)
		}
		if inOrder || s.Reordered == 0 || s.Reordered == 10 {
			t.Fatalf("order %v, summary %+v", order, s)
		}
	})

	t.Run("rate", func(t *testing.T) {
		l := netnstest.Pair(t, "dvnrate", 0)
		// 80 kbit/s = 10 kB/s; 20 datagrams of 1028 bytes on the wire need
		// about 2 s beyond the 1500-byte burst.
		p := startNetem(t, bin, l, "-filter", "udp.DstPort == 7100", "-rate", "80kbit")
		u, err := l.B.NS.ListenUDP(netip.AddrPortFrom(l.B.V4, 7100).String())
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		start := time.Now()
		if err := l.A.NS.SendUDP(netip.AddrPortFrom(l.B.V4, 7100), make([]byte, 1000), 20, 0); err != nil {
			t.Fatal(err)
		}
		got, err := netnstest.RecvUDP(u, 20, 6*time.Second)
		took := time.Since(start)
		if len(got) != 20 || took < 1500*time.Millisecond {
			t.Fatalf("%d datagrams in %v (%v), want 20 in at least 1.5s", len(got), took, err)
		}
		if s := stop(t, p); s.RateLimited < 15 || s.Sent != 20 {
			t.Fatalf("summary %+v", s)
		}
	})
}
