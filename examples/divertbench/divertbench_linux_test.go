package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/netdivert/divert/internal/netnstest"
)

// TestMain lets the test binary play the tool's child roles: the bench
// re-executes its own binary inside the namespaces.
func TestMain(m *testing.M) {
	if role := os.Getenv(envRole); role != "" {
		os.Exit(childMain(role))
	}
	os.Exit(m.Run())
}

// TestBenchShort runs every mode once with tiny durations and checks that
// the numbers are sane (not that they are fast): traffic flowed, the loops
// were on the path and reinjected everything handed to them, the narrow
// filter kept the bulk traffic in the kernel, latencies were measured, and
// the namespaces are gone afterwards.
func TestBenchShort(t *testing.T) {
	netnstest.RequireRoot(t)
	cfg := DefaultConfig()
	cfg.Runs = 1
	cfg.Dur = 400 * time.Millisecond
	cfg.Pings = 50
	cfg.ProbeHz = 100
	cfg.PPS = 50000 // bounded and light: the test checks sanity, not speed
	cfg.QuietMax = 0
	var logBuf bytes.Buffer
	cfg.Log = &logBuf
	if _, err := exec.LookPath("iperf3"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("iperf3 is missing and CI is set: the TCP modes must run")
		}
		t.Log("iperf3 not found: TCP modes not run")
		cfg.TCP = false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	s, err := Run(ctx, cfg)
	t.Log("\n" + logBuf.String())
	if err != nil {
		t.Fatal(err)
	}
	if left := leftoverNamespaces(t); len(left) > 0 {
		t.Errorf("namespaces left behind: %v", left)
	}

	got := map[string]RunResult{}
	for _, r := range s.Runs {
		if r.Err != "" {
			t.Errorf("%s: %s", r.Mode, r.Err)
			continue
		}
		got[r.Mode] = r
		if r.Sent <= 0 || r.Recv <= 0 || r.Recv > r.Sent || !(r.PPS > 0) || r.Elapsed <= 0 {
			t.Errorf("%s: sent %d, received %d, %.0f pps in %.3f s", r.Mode, r.Sent, r.Recv, r.PPS, r.Elapsed)
		}
		if l := float64(r.LossPct); math.IsNaN(l) || l < 0 || l > 100 {
			t.Errorf("%s: loss %v%%", r.Mode, l)
		}
		for name, l := range map[string]Latency{"idle": r.Idle, "loaded": r.Loaded} {
			if l.N == 0 || !(l.P50 > 0) || l.P99 < l.P50 || l.Max < l.P99 {
				t.Errorf("%s: %s RTT %+v", r.Mode, name, l)
			}
		}
		switch r.Mode {
		case modeNone:
			if r.Handed != 0 || r.Verdicts != 0 {
				t.Errorf("none: handed %d, verdicts %d with no consumer", r.Handed, r.Verdicts)
			}
		case modeRecv, modeBatch:
			// runUDP already rejects Handed < Recv and Verdicts < Handed.
			if r.Handed < uint64(r.Recv) || r.Verdicts < r.Handed || r.ConsumerCPU < 0 {
				t.Errorf("%s: handed %d, delivered %d, verdicts %d, cpu %v", r.Mode, r.Handed, r.Recv, r.Verdicts, r.ConsumerCPU)
			}
			if c := float64(r.CPUPerPkt); math.IsNaN(c) || c < 0 {
				t.Errorf("%s: consumer CPU per packet %v", r.Mode, c)
			}
		case modeNarrow:
			// Only the probes (about ProbeHz × Dur) match; the bulk must
			// not reach the consumer at all.
			probes := uint64(r.Loaded.N + r.Loaded.Lost)
			if r.Handed == 0 || r.Handed > probes+10 {
				t.Errorf("narrow: consumer got %d packets during the blast, want 1..%d (the probes only; %d bulk sent)", r.Handed, probes+10, r.Sent)
			}
		}
	}
	for _, m := range cfg.Modes {
		if _, ok := got[m]; !ok {
			t.Errorf("mode %s: no good run", m)
		}
	}
	if cfg.TCP {
		for _, r := range s.TCP {
			if r.Err != "" {
				t.Errorf("%s: %s", r.Mode, r.Err)
				continue
			}
			if !(r.Gbps > 0) {
				t.Errorf("%s: %v Gbit/s", r.Mode, r.Gbps)
			}
			if r.Mode == modeTCPBatch && r.Handed == 0 {
				t.Errorf("tcp-batch: no packet handed to the consumer")
			}
			if r.Mode == modeTCPNarrow && r.Handed != 0 {
				t.Errorf("tcp-narrow: %d packets of the transfer handed to the consumer, want 0", r.Handed)
			}
		}
		if len(s.TCP) != len(tcpModes) {
			t.Errorf("%d TCP results, want %d", len(s.TCP), len(tcpModes))
		}
	}

	var text bytes.Buffer
	s.WriteText(&text)
	for _, m := range cfg.Modes {
		if !regexp.MustCompile(`(?m)^ *` + m + ` +[0-9]`).MatchString(text.String()) {
			t.Errorf("text report lacks a result line for mode %s:\n%s", m, text.String())
		}
	}
	var js bytes.Buffer
	if err := s.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var back Suite
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatalf("JSON does not decode: %v", err)
	}
	if len(back.Runs) != len(s.Runs) || back.Runs[0].Sent != s.Runs[0].Sent {
		t.Fatalf("JSON round trip lost runs")
	}
	t.Log("\n" + text.String())
}

// TestCancel checks that a cancelled suite returns promptly and removes
// its namespaces.
func TestCancel(t *testing.T) {
	netnstest.RequireRoot(t)
	cfg := DefaultConfig()
	cfg.Modes = []string{modeNone}
	cfg.TCP = false
	cfg.Runs = 5
	cfg.Dur = 5 * time.Second
	cfg.Pings = 10
	cfg.PPS = 10000
	cfg.QuietMax = 0
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(1500*time.Millisecond, cancel)
	start := time.Now()
	_, err := Run(ctx, cfg)
	if err == nil {
		t.Fatal("cancelled suite returned no error")
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("cancelled suite took %v to return", d)
	}
	if left := leftoverNamespaces(t); len(left) > 0 {
		t.Errorf("namespaces left behind: %v", left)
	}
}

// leftoverNamespaces lists this process's bench namespaces still present.
func leftoverNamespaces(t *testing.T) []string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatalf("ip netns list: %v", err)
	}
	var left []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && strings.HasPrefix(f[0], "dvb") && strings.Contains(f[0], fmt.Sprintf("-%d-", os.Getpid())) {
			left = append(left, f[0])
		}
	}
	return left
}

// TestSteerInput checks -rps: the receiver's veth steers its input path to
// CPU 1 (mask 2) afterwards, read back in the namespace's own sysfs; with
// one CPU it refuses.
func TestSteerInput(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dvr", 0)
	ctx := context.Background()
	err := steerInput(ctx, l.B.NS, l.B.If)
	if runtime.NumCPU() < 2 {
		if err == nil {
			t.Fatal("steerInput with one CPU: no error")
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	out, err := l.B.NS.Run(ctx, "cat", "/sys/class/net/"+l.B.If+"/queues/rx-0/rps_cpus")
	if err != nil {
		t.Fatal(err)
	}
	mask, err := strconv.ParseUint(strings.ReplaceAll(strings.TrimSpace(string(out)), ",", ""), 16, 64)
	if err != nil || mask != 2 {
		t.Fatalf("rps_cpus %q (%v), want mask 2", out, err)
	}
}
