package nftrules

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/ti-mo/conntrack"

	"github.com/netdivert/divert/internal/netnstest"
)

// TestFlowTrack: InstallFlowTrack's table makes conntrack run in a
// namespace, labels the connections the host begins (LabelOut, with
// LabelLoop through lo) and those others begin toward it (LabelIn), lets
// every packet pass, and goes with Close.
func TestFlowTrack(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "nftf", 0)
	var r *Ruleset
	if err := l.A.NS.Do(func() (err error) { r, err = InstallFlowTrack(); return err }); err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	listing := nftList(t, l.A.NS, "table", "inet", r.Table())
	for _, s := range []string{"hook input priority filter; policy accept;", "hook output priority filter; policy accept;", "ct state new", "ct label set", `oif "lo"`, `iif != "lo"`} {
		if !strings.Contains(listing, s) {
			t.Errorf("listing lacks %q:\n%s", s, listing)
		}
	}
	if strings.Contains(listing, "drop") || strings.Contains(listing, "queue") || strings.Contains(listing, "accept\n") {
		t.Errorf("the table decides verdicts:\n%s", listing)
	}
	if n, _ := l.A.NS.Ping(l.B.V4, 1, 2*time.Second); n != 1 {
		t.Fatal("ping out unanswered")
	}
	if n, _ := l.B.NS.Ping(l.A.V6, 1, 2*time.Second); n != 1 {
		t.Fatal("ping in unanswered")
	}
	if n, _ := l.A.NS.Ping(netip.MustParseAddr("127.0.0.1"), 1, 2*time.Second); n != 1 {
		t.Fatal("ping of lo unanswered")
	}
	var flows []conntrack.Flow
	if err := l.A.NS.Do(func() error {
		c, err := conntrack.Dial(nil)
		if err != nil {
			return err
		}
		defer c.Close()
		flows, err = c.Dump(nil)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	want := map[netip.Addr]byte{l.B.V4: LabelOut, l.A.V6: LabelIn, netip.MustParseAddr("127.0.0.1"): LabelOut | LabelLoop}
	for _, f := range flows {
		dst := f.TupleOrig.IP.DestinationAddress
		w, ok := want[dst]
		if !ok {
			continue
		}
		delete(want, dst)
		if len(f.Labels) != 16 || f.Labels[LabelByte] != w {
			t.Errorf("flow to %v: labels %x, want %#x in byte %d", dst, f.Labels, w, LabelByte)
		}
	}
	if len(want) != 0 {
		t.Errorf("no conntrack entry for %v among %d", want, len(flows))
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if rs := listRuleset(t, l.A.NS); strings.Contains(rs, r.Table()) {
		t.Fatalf("table left after Close:\n%s", rs)
	}
}
