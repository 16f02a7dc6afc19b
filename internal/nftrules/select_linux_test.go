package nftrules

import (
	"strings"
	"testing"

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
		{FragOnly, DestLocal, []string{"ip frag-off & 16383 == 0 accept", "exthdr frag missing accept", "fib daddr type != local accept"}},
		{FragNone, DestRemote, []string{"ip frag-off & 16383 != 0 accept", "exthdr frag exists accept", "fib daddr type local accept"}},
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
