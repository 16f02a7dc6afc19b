package divert

import (
	"errors"
	"testing"
	"time"
)

// statsUDP4 builds an IPv4 UDP packet to dport with valid checksums.
func statsUDP4(t testing.TB, dport uint16, payload string) []byte {
	t.Helper()
	pkt := []byte{
		0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
		0x30, 0x39, byte(dport >> 8), byte(dport), 0, 0, 0, 0,
	}
	pkt = append(pkt, payload...)
	pkt[2], pkt[3] = byte(len(pkt)>>8), byte(len(pkt))
	pkt[24], pkt[25] = byte((len(pkt)-20)>>8), byte(len(pkt)-20)
	if err := CalcChecksums(pkt, nil, 0); err != nil {
		t.Fatal(err)
	}
	return pkt
}

func TestStatsPipe(t *testing.T) {
	h, p, err := NewPipe("udp.DstPort == 53", LayerNetwork, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if err := h.SetParam(ParamQueueLength, QueueLengthMin); err != nil {
		t.Fatal(err)
	}
	deliver := func(port uint16, want bool) {
		t.Helper()
		taken, err := p.Deliver(statsUDP4(t, port, "x"), Address{Outbound: true})
		if err != nil || taken != want {
			t.Fatalf("Deliver to %d: %v, %v; want taken %v", port, taken, err, want)
		}
	}
	for range 3 {
		deliver(80, false) // passed
	}
	for range QueueLengthMin + 2 {
		deliver(53, true) // two push the oldest out
	}
	buf := make([]byte, MTUMax)
	ms := make([]Message, 3)
	for i := range ms {
		ms[i].Buf = make([]byte, MTUMax)
	}
	k, err := h.RecvBatch(ms)
	if err != nil || k != 3 {
		t.Fatalf("RecvBatch: %d, %v", k, err)
	}
	if n, err := h.SendBatch(ms[:2]); n != 2 || err != nil {
		t.Fatalf("SendBatch: %d, %v", n, err)
	}
	if err := h.Drop(&ms[2].Addr); err != nil {
		t.Fatal(err)
	}
	if err := h.Drop(&ms[2].Addr); err != nil { // no longer held: not counted
		t.Fatal(err)
	}
	if _, err := h.Send(statsUDP4(t, 9, "new"), &Address{}); err != nil {
		t.Fatal(err)
	}
	want := Stats{Received: 3, Sent: 3, Injected: 1, Dropped: 1, Passed: 3, Overflows: 2}
	if s, err := h.Stats(); err != nil || s != want {
		t.Fatalf("Stats = %+v, %v; want %+v", s, err, want)
	}
	// Held past the queue time, and left unread that long: expired.
	if err := h.SetParam(ParamQueueTime, QueueTimeMin); err != nil {
		t.Fatal(err)
	}
	var a Address
	n, err := h.Recv(buf, &a)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Duration(QueueTimeMin)*time.Millisecond + 20*time.Millisecond)
	unread := uint64(QueueLengthMin - 4) // queued, less 2 pushed out, 4 received
	s, err := h.Stats()
	if err != nil || s.Expired != 1+unread || s.Received != 4 {
		t.Fatalf("after the queue time: %+v, %v; want %d expired", s, err, 1+unread)
	}
	if _, err := h.Send(buf[:n], &a); !errors.Is(err, ErrNotQueued) {
		t.Fatalf("Send of an expired packet: %v, want ErrNotQueued", err)
	}
	// The old PipeStats still add up its own way.
	ps := p.Stats()
	if ps.Delivered != 3+QueueLengthMin+2 || ps.Passed != 3 || ps.Sent != 3 || ps.Dropped != 2+1+1+unread {
		t.Fatalf("PipeStats %+v", ps)
	}
}

// plainBackend is a backend without counters.
type plainBackend struct{ backend }

func (plainBackend) close() error { return nil }

func TestStatsShared(t *testing.T) {
	_, p, err := NewPipe("true", LayerNetwork, 0)
	if err != nil {
		t.Fatal(err)
	}
	views := shareBackend(p, 2)
	h0 := &Handle{b: views[0], layer: LayerNetwork}
	h1 := &Handle{b: views[1], layer: LayerNetwork}
	if _, err := p.Deliver(statsUDP4(t, 1, "x"), Address{}); err != nil {
		t.Fatal(err)
	}
	var a Address
	if _, err := h1.Recv(make([]byte, MTUMax), &a); err != nil {
		t.Fatal(err)
	}
	s0, err0 := h0.Stats()
	s1, err1 := h1.Stats()
	if err0 != nil || err1 != nil || s0.Received != 1 || s0 != s1 {
		t.Fatalf("views disagree: %+v %v, %+v %v", s0, err0, s1, err1)
	}
	h0.Close()
	h1.Close()

	for _, b := range []backend{plainBackend{}, shareBackend(plainBackend{}, 2)[0]} {
		h := &Handle{b: b}
		if _, err := h.Stats(); !errors.Is(err, ErrNotSupported) {
			t.Fatalf("%T: Stats error %v, want ErrNotSupported", b, err)
		}
	}
}

const procSample = `    0   1234     0 2 65535     0     0       10  1
53504  -4321    32 2 65531    18     3 4294967295  1
  7      0      5 2 0     1x    2       3  1
`

func TestStatsParseNfqueueProc(t *testing.T) {
	s, ok := parseNfqueueProc([]byte(procSample), 53504)
	want := kernelQueueStats{total: 32, dropped: 18, userDropped: 3, idSeq: 4294967295}
	if !ok || s != want {
		t.Fatalf("queue 53504: %+v %v, want %+v", s, ok, want)
	}
	if s, ok := parseNfqueueProc([]byte(procSample), 0); !ok || s.idSeq != 10 || s.dropped != 0 {
		t.Fatalf("queue 0: %+v %v", s, ok)
	}
	for _, q := range []uint16{7, 1, 5350} { // a column that is not a number; absent queues
		if s, ok := parseNfqueueProc([]byte(procSample), q); ok {
			t.Fatalf("queue %d found: %+v", q, s)
		}
	}
	// Without the last newline, and with a short line.
	if _, ok := parseNfqueueProc([]byte("1 2 3\n9 1 0 2 65531 4 5 6 1"), 9); !ok {
		t.Fatal("last line without newline not found")
	}
	if n := testing.AllocsPerRun(100, func() { parseNfqueueProc([]byte(procSample), 53504) }); n != 0 {
		t.Fatalf("%v allocations", n)
	}
	for _, c := range []struct {
		in   string
		bits uint
		v    uint64
		ok   bool
	}{
		{"0", 16, 0, true}, {"65535", 16, 65535, true}, {"65536", 16, 0, false},
		{"4294967295", 32, 1<<32 - 1, true}, {"4294967296", 32, 0, false},
		{"18446744073709551615", 64, 1<<64 - 1, true}, {"18446744073709551616", 64, 0, false},
		{"", 64, 0, false}, {"-1", 64, 0, false}, {"1a", 64, 0, false},
	} {
		if v, ok := parseDec([]byte(c.in), c.bits); v != c.v || ok != c.ok {
			t.Errorf("parseDec(%q, %d) = %d, %v", c.in, c.bits, v, ok)
		}
	}
}

func FuzzParseNfqueueProc(f *testing.F) {
	f.Add([]byte(procSample), uint16(53504))
	f.Add([]byte("1 2 3 4 5 6 7 8 9"), uint16(1))
	f.Add([]byte("\n\n  \t"), uint16(0))
	f.Fuzz(func(t *testing.T, b []byte, q uint16) {
		s, ok := parseNfqueueProc(b, q)
		if !ok && s != (kernelQueueStats{}) {
			t.Fatalf("not found but %+v", s)
		}
	})
}
