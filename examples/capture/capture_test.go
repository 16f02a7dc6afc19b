//go:build linux

package main

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/netdivert/divert/examples/internal/extest"
	"github.com/netdivert/divert/internal/netnstest"
)

func TestMain(m *testing.M) { extest.Main(m) }

// TestCaptureTshark captures pings in a namespace and reads the file back
// with tshark: packet count, addresses, direction and interface.
func TestCaptureTshark(t *testing.T) {
	netnstest.RequireRoot(t)
	tshark, err := exec.LookPath("tshark")
	if err != nil {
		t.Fatalf("tshark is needed (apt-get install -y tshark): %v", err)
	}
	bin := extest.Build(t)
	l := netnstest.Pair(t, "dvcap", 0)
	file := filepath.Join(t.TempDir(), "ping.pcapng")
	p := extest.Start(t, l.B.NS, 20*time.Second, bin, "-filter", "icmp or icmpv6.Type == 128 or icmpv6.Type == 129", "-o", file, "-count", "8", "-quiet")
	p.WaitReady(t)
	if got, err := l.A.NS.Ping(l.B.V4, 2, time.Second); got != 2 {
		t.Fatalf("%d/2 pings answered while capturing: %v", got, err)
	}
	if got, err := l.A.NS.Ping(l.B.V6, 2, time.Second); got != 2 {
		t.Fatalf("%d/2 IPv6 pings answered while capturing: %v", got, err)
	}
	_, errOut, err := p.Wait()
	if err != nil {
		t.Fatalf("capture: %v\n%s", err, errOut)
	}
	if !strings.Contains(errOut, "8 packets written to "+file) {
		t.Errorf("no final line:\n%s", errOut)
	}
	out, err := exec.Command(tshark, "-r", file, "-T", "fields", "-E", "separator=,",
		"-e", "ip.src", "-e", "ip.dst", "-e", "ipv6.src", "-e", "ipv6.dst",
		"-e", "frame.packet_flags_direction", "-e", "frame.interface_name", "-e", "icmp.type", "-e", "icmpv6.type").Output()
	if err != nil {
		t.Fatalf("tshark: %v", err)
	}
	rows := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(rows) != 8 {
		t.Fatalf("tshark read %d packets, want 8:\n%s", len(rows), out)
	}
	a4, b4, a6, b6 := l.A.V4.String(), l.B.V4.String(), l.A.V6.String(), l.B.V6.String()
	want := map[string]int{
		strings.Join([]string{a4, b4, "", "", "0x00000001", l.B.If, "8", ""}, ","):   2, // requests in
		strings.Join([]string{b4, a4, "", "", "0x00000002", l.B.If, "0", ""}, ","):   2, // replies out
		strings.Join([]string{"", "", a6, b6, "0x00000001", l.B.If, "", "128"}, ","): 2,
		strings.Join([]string{"", "", b6, a6, "0x00000002", l.B.If, "", "129"}, ","): 2,
	}
	for _, r := range rows {
		want[r]--
	}
	for row, n := range want {
		if n != 0 {
			t.Errorf("row %q: %d more than expected", row, -n)
		}
	}
	if t.Failed() {
		t.Logf("tshark:\n%s", out)
	}
}
