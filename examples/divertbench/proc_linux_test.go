package main

import (
	"bytes"
	"math"
	"os"
	"runtime"
	"testing"
	"time"
)

func TestParseStatCPU(t *testing.T) {
	line := []byte("1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 130 0 0 20 0 8 0 5 0 0\n")
	got, err := parseStatCPU(line)
	if err != nil || got != 3.8 {
		t.Fatalf("parseStatCPU = %v, %v; want 3.8", got, err)
	}
	if _, err := parseStatCPU([]byte("1 (x) S 1 2")); err == nil {
		t.Fatal("short stat line parsed")
	}
	self, err := procCPU(os.Getpid())
	if err != nil || self < 0 {
		t.Fatalf("procCPU(self) = %v, %v", self, err)
	}
}

func TestParseNFQ(t *testing.T) {
	in := []byte("    0  12345     3 2 65535     10     2      500 1\n" +
		"    1  12346     0 2 65535      0     1      100 1\n")
	s, err := parseNFQ(in)
	if err != nil {
		t.Fatal(err)
	}
	want := queueStats{Queues: 2, Total: 3, Dropped: 10, UserDrp: 3, IDSeq: 600}
	if s != want {
		t.Fatalf("parseNFQ = %+v, want %+v", s, want)
	}
	later := queueStats{Queues: 2, Dropped: 15, UserDrp: 7, IDSeq: 700}
	if h := s.handed(later); h != 96 { // 100 queued, 4 lost at the socket; queue-full drops have no id
		t.Fatalf("handed = %d, want 96", h)
	}
	if h := later.handed(s); h != 0 {
		t.Fatalf("handed backwards = %d, want 0", h)
	}
	if _, err := parseNFQ([]byte("0 1 2\n")); err == nil {
		t.Fatal("short nfnetlink_queue line parsed")
	}
	if s, err := parseNFQ(nil); err != nil || s != (queueStats{}) {
		t.Fatalf("empty: %+v %v", s, err)
	}
}

func TestParseRcvbufErrors(t *testing.T) {
	snmp := []byte("Ip: Forwarding DefaultTTL\nIp: 1 64\n" +
		"Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n" +
		"Udp: 100 0 7 50 7 0\nUdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\nUdpLite: 0 0 0 0 99\n")
	snmp6 := []byte("Udp6InDatagrams                 \t5\nUdp6RcvbufErrors                \t4\n")
	n, err := parseRcvbufErrors(snmp, snmp6)
	if err != nil || n != 11 {
		t.Fatalf("parseRcvbufErrors = %d, %v; want 11", n, err)
	}
	if _, err := parseRcvbufErrors([]byte("Ip: a\nIp: 1\n"), nil); err == nil {
		t.Fatal("missing Udp line parsed")
	}
}

func FuzzParseStatCPU(f *testing.F) {
	f.Add([]byte("1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 130 0 0 20 0 8 0 5 0 0\n"))
	f.Add([]byte("1 (x) S 1 2"))
	f.Add([]byte(")"))
	f.Fuzz(func(t *testing.T, b []byte) {
		v, err := parseStatCPU(b)
		if err == nil && (v < 0 || math.IsNaN(v)) {
			t.Fatalf("parseStatCPU(%q) = %v", b, v)
		}
	})
}

func FuzzParseNFQ(f *testing.F) {
	f.Add([]byte("    0  12345     3 2 65535     10     2      500 1\n    1  12346     0 2 65535      0     1      100 1\n"))
	f.Add([]byte("0 1 2\n"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := parseNFQ(b)
		if err != nil {
			return
		}
		if lines := bytes.Count(b, []byte("\n")) + 1; s.Queues > lines {
			t.Fatalf("parseNFQ(%q): %d queues from %d lines", b, s.Queues, lines)
		}
		if s.Queues == 0 && s != (queueStats{}) {
			t.Fatalf("parseNFQ(%q) = %+v with no queue", b, s)
		}
	})
}

func FuzzParseRcvbufErrors(f *testing.F) {
	f.Add([]byte("Udp: InDatagrams RcvbufErrors\nUdp: 1 2\n"), []byte("Udp6RcvbufErrors 3\n"))
	f.Add([]byte("Udp: RcvbufErrors\nUdp: x\n"), []byte(""))
	f.Fuzz(func(t *testing.T, snmp, snmp6 []byte) {
		n, err := parseRcvbufErrors(snmp, snmp6)
		if err == nil && !bytes.Contains(snmp, []byte("RcvbufErrors")) {
			t.Fatalf("parseRcvbufErrors(%q) = %d without the field", snmp, n)
		}
	})
}

func TestParseCPULine(t *testing.T) {
	total, idle, err := parseCPULine([]byte("cpu  10 1 5 100 4 0 2 0 0 0\ncpu0 5 0 2 50 2 0 1 0 0 0\n"))
	if err != nil || total != 122 || idle != 104 {
		t.Fatalf("parseCPULine = %d, %d, %v; want 122, 104", total, idle, err)
	}
	if _, _, err := parseCPULine([]byte("intr 1 2\n")); err == nil {
		t.Fatal("no cpu line parsed")
	}
	if b, err := busyCores(50 * time.Millisecond); err != nil || b < 0 || b > float64(runtime.NumCPU()) {
		t.Fatalf("busyCores = %v, %v", b, err)
	}
}

// TestCheckRefusesUpFront checks that what every run's consumer would
// refuse (a filter that does not compile, a parameter out of range) fails
// the suite before any run, and that Failed counts the runs that failed.
func TestCheckRefusesUpFront(t *testing.T) {
	for name, mod := range map[string]func(*Config){
		"filter":        func(c *Config) { c.FilterAll = "tcp.Bogus" },
		"filter-narrow": func(c *Config) { c.FilterNarrow = "udp.DstPort ==" },
		"filter-tcp":    func(c *Config) { c.FilterTCP = "(" },
		"qlen":          func(c *Config) { c.QLen = 99999 },
		"qsize":         func(c *Config) { c.QSize = 1 },
		"qtime":         func(c *Config) { c.QTime = 20000 },
		"batch":         func(c *Config) { c.Batch = 0 },
	} {
		cfg := DefaultConfig()
		if err := cfg.check(); err != nil {
			t.Fatalf("default config: %v", err)
		}
		mod(&cfg)
		if err := cfg.check(); err == nil {
			t.Errorf("%s: check passed", name)
		}
	}
	s := &Suite{Runs: []RunResult{{}, {Err: "x"}}, TCP: []TCPResult{{Err: "y"}, {}}}
	if n := s.Failed(); n != 2 {
		t.Errorf("Failed = %d, want 2", n)
	}
}
