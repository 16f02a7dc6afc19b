package divert

import (
	"slices"
	"testing"

	"github.com/netdivert/divert/internal/nftrules"
)

// TestFragRulesConfigs checks the fragments' tables a handle installs: at
// input IPv6 only (the kernel reassembles IPv4 before the input hook), at
// the other hooks what the main rules match, and for LayerNetworkForward
// one prerouting chain for forwarded packets.
func TestFragRulesConfigs(t *testing.T) {
	main := nftrules.Config{Hooks: []nftrules.Hook{nftrules.HookInput, nftrules.HookOutput}, IPv4: true, IPv6: true,
		Fragments: nftrules.FragNone, KeepNDP: true}
	type want struct {
		hooks      []nftrules.Hook
		ipv4, ipv6 bool
	}
	check := func(name string, got []nftrules.Config, ws []want) {
		t.Helper()
		if len(got) != len(ws) {
			t.Fatalf("%s: %d configs %+v, want %d", name, len(got), got, len(ws))
		}
		for i, c := range got {
			w := ws[i]
			if !slices.Equal(c.Hooks, w.hooks) || c.IPv4 != w.ipv4 || c.IPv6 != w.ipv6 {
				t.Errorf("%s: config %d: hooks %v, IPv4 %v, IPv6 %v; want %v, %v, %v", name, i, c.Hooks, c.IPv4, c.IPv6, w.hooks, w.ipv4, w.ipv6)
			}
			if c.Fragments != nftrules.FragOnly || c.Lowered != nil || c.KeepNDP {
				t.Errorf("%s: config %d selects %v fragments, lowered %v, KeepNDP %v: want every fragment", name, i, c.Fragments, c.Lowered, c.KeepNDP)
			}
		}
	}
	in, out := nftrules.HookInput, nftrules.HookOutput
	check("both families, input and output", fragRulesConfigs(main, LayerNetwork), []want{
		{[]nftrules.Hook{in}, false, true},
		{[]nftrules.Hook{out}, true, true},
	})
	v4 := main
	v4.IPv6 = false
	check("IPv4 only", fragRulesConfigs(v4, LayerNetwork), []want{{[]nftrules.Hook{out}, true, false}})
	v4in := v4
	v4in.Hooks = []nftrules.Hook{in}
	check("IPv4 input only", fragRulesConfigs(v4in, LayerNetwork), nil)
	v6in := main
	v6in.Hooks = []nftrules.Hook{in}
	v6in.IPv4 = false
	check("IPv6 input only", fragRulesConfigs(v6in, LayerNetwork), []want{{[]nftrules.Hook{in}, false, true}})
	fwd := main
	fwd.Hooks = []nftrules.Hook{nftrules.HookForward}
	got := fragRulesConfigs(fwd, LayerNetworkForward)
	check("forward", got, []want{{[]nftrules.Hook{nftrules.HookPrerouting}, true, true}})
	if got[0].Dest != nftrules.DestRemote {
		t.Errorf("forward: Dest %v, want DestRemote", got[0].Dest)
	}
}
