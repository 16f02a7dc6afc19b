package nftrules

import (
	"context"
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/internal/netnstest"
)

// TestSelectRules: Fragments and Dest put their skip rules, as nft prints
// them, into every chain; unknown values are refused.
func TestSelectRules(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nfts")
	cases := []struct {
		frag FragSelect
		dest DestSelect
		want []string
	}{
		{FragOnly, DestLocal, []string{"ip frag-off & 16383 == 0 accept", "exthdr frag missing accept", "fib daddr type != 2-5 accept"}},
		{FragNone, DestRemote, []string{"ip frag-off & 16383 != 0 accept", "exthdr frag exists accept", "fib daddr type 2-5 accept"}},
	}
	for _, c := range cases {
		r := install(t, ns, Config{Hooks: []Hook{HookPrerouting}, IPv4: true, IPv6: true,
			Action: ActionQueue, QueueNum: 9, QueueCount: 1, Fragments: c.frag, Dest: c.dest})
		rs := listRuleset(t, ns)
		for _, w := range c.want {
			if !strings.Contains(rs, w) {
				t.Errorf("Fragments %d Dest %d: ruleset lacks %q:\n%s", c.frag, c.dest, w, rs)
			}
		}
		r.Close()
	}
	for _, cfg := range []Config{
		{Hooks: []Hook{HookInput}, QueueCount: 1, Fragments: FragNone + 1},
		{Hooks: []Hook{HookInput}, QueueCount: 1, Dest: DestRemote + 1},
	} {
		if err := cfg.validate(); err == nil {
			t.Errorf("validate(%+v) accepted an unknown selection", cfg)
		}
	}
}

// TestDestSelectDelivered: DestLocal selects what the host delivers to
// itself, broadcasts included (they take the input path, where WinDivert's
// inbound network layer sees them), and DestRemote none of it.
func TestDestSelectDelivered(t *testing.T) {
	b := newBed(t)
	if out, err := b.ns.Run(context.Background(), "ip", "route", "add", "broadcast", "255.255.255.255", "dev", "lo", "table", "local"); err != nil {
		t.Fatal(err, string(out))
	}
	if err := b.ns.Do(func() error {
		return unix.SetsockoptInt(b.fd4, unix.SOL_SOCKET, unix.SO_BROADCAST, 1)
	}); err != nil {
		t.Fatal(err)
	}
	uc := ipv4(v4opts{proto: 17, ttl: 64, src: remote4, dst: local4}, udp(5353, 9, []byte("x")))
	bc := ipv4(v4opts{proto: 17, ttl: 64, src: remote4, dst: netip.MustParseAddr("255.255.255.255")}, udp(5353, 9, []byte("x")))
	for _, dest := range []DestSelect{DestLocal, DestRemote} {
		r := install(t, b.ns, Config{Hooks: []Hook{HookPrerouting}, IPv4: true, IPv6: true, Dest: dest, Action: ActionDrop})
		for _, p := range []struct {
			name string
			pkt  []byte
		}{{"unicast to a local address", uc}, {"broadcast", bc}} {
			if selected := !b.passes(t, p.pkt); selected != (dest == DestLocal) {
				t.Errorf("Dest %d: %s selected: %v", dest, p.name, selected)
			}
		}
		r.Close()
	}
}
