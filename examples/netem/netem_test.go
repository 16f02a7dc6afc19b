package main

import (
	"bytes"
	"context"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/netdivert/divert"
)

func TestParseRate(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want float64 // bytes per second
		err  bool
	}{
		{"", 0, false},
		{"8", 1, false},
		{"512kbit", 64000, false},
		{"10mbit", 1.25e6, false},
		{"1Gbit", 1.25e8, false},
		{"100kB", 1e5, false},
		{"2MB/s", 2e6, false},
		{"1.5mbit", 187500, false},
		{"100bps", 100, false},
		{"0kbit", 0, true},
		{"kbit", 0, true},
		{"10 parsecs", 0, true},
		{"-5mbit", 0, true},
		{"1.2.3kbit", 0, true},
	} {
		got, err := parseRate(tc.in)
		if (err != nil) != tc.err || math.Abs(got-tc.want) > 1e-9*tc.want {
			t.Errorf("parseRate(%q) = %v, %v; want %v, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

func FuzzParseRate(f *testing.F) {
	for _, s := range []string{"", "512kbit", "1.5MB/s", "8", "1e9bit", "..", "9999999999999999999999gbit"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := parseRate(s)
		if err != nil {
			return
		}
		if strings.TrimSpace(s) == "" {
			if v != 0 {
				t.Fatalf("empty rate %q gave %v", s, v)
			}
			return
		}
		if !(v > 0) || math.IsInf(v, 0) {
			t.Fatalf("parseRate(%q) = %v without error", s, v)
		}
	})
}

func TestBucket(t *testing.T) {
	t0 := time.Unix(1000, 0)
	// 1000 bytes/s, burst 1000 bytes: a 1000-byte burst leaves at once,
	// then one 100-byte packet per 100 ms.
	b := newBucket(1000, 1000)
	var leave []time.Duration
	for range 15 {
		leave = append(leave, b.depart(t0, 100).Sub(t0))
	}
	for i, d := range leave {
		want := time.Duration(0)
		if i > 10 {
			want = time.Duration(i-10) * 100 * time.Millisecond
		}
		if d != want {
			t.Fatalf("packet %d leaves after %v, want %v (all: %v)", i, d, want, leave)
		}
	}
	// Idle for long refills to the burst, not beyond.
	t1 := t0.Add(time.Hour)
	n := 0
	for b.depart(t1, 100).Equal(t1) {
		n++
	}
	if n != 11 {
		t.Fatalf("after idling, %d packets left at once, want 11", n)
	}
	// Unlimited never waits.
	u := newBucket(0, 0)
	if !u.depart(t0, 1e6).Equal(t0) {
		t.Fatal("unlimited bucket delayed a packet")
	}
}

func TestHistogram(t *testing.T) {
	var h histogram
	for _, d := range []time.Duration{50 * time.Microsecond, 3 * time.Millisecond, 3 * time.Millisecond, 40 * time.Millisecond, 20 * time.Second} {
		h.add(d)
	}
	if h.n != 5 || h.min != 50*time.Microsecond || h.max != 20*time.Second {
		t.Fatalf("n %d min %v max %v", h.n, h.min, h.max)
	}
	if h.buckets[0] != 1 || h.buckets[4] != 2 || h.buckets[7] != 1 || h.buckets[len(h.buckets)-1] != 1 {
		t.Fatalf("buckets %v", h.buckets)
	}
	if q := h.quantile(0.5); q != 5*time.Millisecond {
		t.Fatalf("p50 %v", q)
	}
	if q := h.quantile(1); q != 20*time.Second {
		t.Fatalf("p100 %v", q)
	}
	e := &emulator{hist: h, start: time.Now()}
	s := e.summary()
	var out bytes.Buffer
	s.Sent = 5
	s.print(&out)
	text := out.String()
	for _, want := range []string{"<= 100µs", "<= 5ms", "<= 50ms", "> 10s", strings.Repeat("█", 50) + " 2"} {
		if !strings.Contains(text, want) {
			t.Errorf("report lacks %q:\n%s", want, text)
		}
	}
}

// udp4 builds an IPv4 UDP datagram with correct checksums (by gopacket).
func udp4(t testing.TB, payload []byte) []byte {
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: []byte{10, 0, 0, 1}, DstIP: []byte{10, 0, 0, 2}}
	udp := &layers.UDP{SrcPort: 1000, DstPort: 2000}
	udp.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ip, udp, gopacket.Payload(payload)); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// reserialize recomputes the checksums of pkt with gopacket.
func reserialize(t testing.TB, pkt []byte) []byte {
	p := gopacket.NewPacket(pkt, layers.LayerTypeIPv4, gopacket.Default)
	ip, _ := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
	udp, _ := p.Layer(layers.LayerTypeUDP).(*layers.UDP)
	if ip == nil || udp == nil {
		t.Fatalf("does not decode: %x", pkt)
	}
	udp.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{ComputeChecksums: true}, ip, udp, gopacket.Payload(udp.Payload)); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestTamper(t *testing.T) {
	r := newRNG(1)
	for i := range 200 {
		orig := udp4(t, []byte("the quick brown fox"))
		pkt := append([]byte(nil), orig...)
		var addr divert.Address
		if !tamper(pkt, &addr, r) {
			t.Fatal("tamper refused a packet with a payload")
		}
		if bytes.Equal(pkt[28:], orig[28:]) {
			t.Fatalf("round %d: payload unchanged", i)
		}
		if !bytes.Equal(pkt[:20], orig[:20]) || !bytes.Equal(pkt[20:24], orig[20:24]) {
			t.Fatalf("round %d: headers changed", i)
		}
		diff := 0
		for j := 28; j < len(pkt); j++ {
			if pkt[j] != orig[j] {
				diff++
			}
		}
		if diff < 1 || diff > 3 {
			t.Fatalf("round %d: %d bytes changed, want 1..3", i, diff)
		}
		if want := reserialize(t, pkt); !bytes.Equal(pkt, want) {
			t.Fatalf("round %d: checksums not fixed\n got %x\nwant %x", i, pkt, want)
		}
		if !addr.IPChecksum || !addr.UDPChecksum {
			t.Fatalf("checksum flags not set: %+v", addr)
		}
	}
	// No payload: left alone.
	empty := udp4(t, nil)
	cp := append([]byte(nil), empty...)
	if tamper(cp, &divert.Address{}, r) || !bytes.Equal(cp, empty) {
		t.Fatal("tamper changed a packet without payload")
	}
}

func TestParseFlags(t *testing.T) {
	c, err := parseFlags([]string{"-delay", "100ms", "-jitter", "20ms", "-rate", "1mbit", "-loss", "5"})
	if err != nil {
		t.Fatal(err)
	}
	if c.queueTime() != divert.QueueTimeMax {
		t.Errorf("with a rate limit the queue time is %d, want the maximum", c.queueTime())
	}
	c, err = parseFlags([]string{"-delay", "3s"})
	if err != nil {
		t.Fatal(err)
	}
	if got := c.queueTime(); got != 3000+500 {
		t.Errorf("queue time %d ms, want 3500 (delay + margin: no reordering, so no gap)", got)
	}
	c, err = parseFlags([]string{"-delay", "3s", "-reorder", "10"})
	if err != nil {
		t.Fatal(err)
	}
	if got := c.queueTime(); got != 3000+20+500 {
		t.Errorf("queue time %d ms, want 3520 (delay + reorder gap + margin)", got)
	}
	// The longest delay that fits is longer without reordering.
	if _, err := parseFlags([]string{"-delay", "15490ms"}); err != nil {
		t.Errorf("-delay 15490ms without -reorder: %v", err)
	}
	if _, err := parseFlags([]string{"-delay", "15490ms", "-reorder", "1"}); err == nil {
		t.Error("-delay 15490ms with -reorder and its 20ms gap: accepted")
	}
	c, err = parseFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.queueTime() != divert.QueueTimeDefault {
		t.Errorf("default queue time %d", c.queueTime())
	}
	for _, bad := range [][]string{
		{"-loss", "101"}, {"-dup", "-1"}, {"-delay", "16s"}, {"-rate", "fast"},
		{"-queue", "0"}, {"-dup-count", "17"}, {"-priority", "40000"}, {"extra"},
	} {
		if _, err := parseFlags(bad); err == nil {
			t.Errorf("parseFlags(%q) accepted", bad)
		}
	}
}

// TestRateDropsTakeNoShare: under sustained overload the packets the
// queue drops must not be charged to the rate limit; if they were, its
// next departure would run ever further ahead and, past the queue time,
// every later packet would be dropped too. A pipe handle plays the
// network.
func TestRateDropsTakeNoShare(t *testing.T) {
	h, _, err := divert.NewPipe("true", divert.LayerNetwork, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	c, err := parseFlags([]string{"-rate", "8kbit", "-queue", "4", "-seed", "1"}) // 1000 B/s
	if err != nil {
		t.Fatal(err)
	}
	e := newEmulator(c, h)
	pkt := make([]byte, 100)
	pkt[0], pkt[3] = 0x45, 100 // an IPv4 header that covers the packet, as Send requires
	t0 := time.Now()
	for range 1000 { // 100 s of traffic at the rate, offered at once
		addr := divert.Address{Outbound: true}
		if err := e.handle(pkt, &addr, t0); err != nil {
			t.Fatal(err)
		}
	}
	if e.cnt.queueDrops.Load() == 0 {
		t.Fatal("no packet was dropped: the test needs overload")
	}
	e.flush()
	drops := e.cnt.queueDrops.Load()
	addr := divert.Address{Outbound: true}
	if err := e.handle(pkt, &addr, t0.Add(30*time.Second)); err != nil {
		t.Fatal(err)
	}
	if e.cnt.queueDrops.Load() != drops {
		t.Fatal("a packet 30 s after the burst was dropped: the burst's dropped packets were charged to the rate")
	}
	if n := e.cnt.sendErrors.Load(); n != 0 {
		t.Fatalf("%d sends failed", n)
	}
}

// TestNoOvertaking: a packet due at once is not sent ahead of an earlier
// one that the scheduler has taken and is sending. The scheduler is paused
// inside its Send of the first packet while the second is handled; the
// second must wait for it.
func TestNoOvertaking(t *testing.T) {
	h, pipe, err := divert.NewPipe("true", divert.LayerNetwork, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	c, err := parseFlags([]string{"-queue", "4", "-seed", "1"})
	if err != nil {
		t.Fatal(err)
	}
	e := newEmulator(c, h)
	started, release := make(chan struct{}), make(chan struct{})
	e.sendPkt = func(p []byte, a *divert.Address) (int, error) {
		if p[1] == 1 {
			close(started)
			<-release
		}
		return h.Send(p, a)
	}
	pkt := func(tag byte) []byte {
		p := make([]byte, 28)
		p[0], p[1], p[3] = 0x45, tag, 28 // the tag in the TOS byte
		return p
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() { defer close(done); e.scheduler(ctx) }()
	now := time.Now()
	e.mu.Lock()
	e.hold(pkt(1), &divert.Address{Outbound: true}, false, now, now)
	e.mu.Unlock()
	e.wake <- struct{}{}
	<-started // the scheduler took packet 1 and is sending it
	addr := divert.Address{Outbound: true}
	if err := e.handle(pkt(2), &addr, time.Now()); err != nil {
		t.Fatal(err)
	}
	close(release)
	var order []byte
	for len(order) < 2 {
		p, _, ok := pipe.Next(2 * time.Second)
		if !ok {
			t.Fatalf("sent %v, then nothing", order)
		}
		order = append(order, p[1])
	}
	cancel()
	<-done
	if order[0] != 1 || order[1] != 2 {
		t.Fatalf("sent in the order %v, want 1 then 2", order)
	}
	if n := e.cnt.sendErrors.Load(); n != 0 {
		t.Fatalf("%d sends failed", n)
	}
}
