package divert

import (
	"slices"
	"testing"

	"github.com/netdivert/divert/filter"
	"github.com/netdivert/divert/internal/nftrules"
)

// TestFragRulesConfigs checks where a reassembling handle's fragments are
// taken: at LayerNetwork by its own rules (QueueFragments), with no table
// of their own; at LayerNetworkForward by one prerouting chain for
// forwarded packets that selects every fragment.
func TestFragRulesConfigs(t *testing.T) {
	in, out := nftrules.HookInput, nftrules.HookOutput
	cfg := &openConfig{filter: filter.MustCompile("udp.DstPort == 9999", filter.LayerNetwork), layer: LayerNetwork}
	rc, reasm, ok := rulesConfig(cfg, 7, 1)
	if !ok || !reasm {
		t.Fatalf("rulesConfig: reasm %v, ok %v", reasm, ok)
	}
	if !slices.Equal(rc.Hooks, []nftrules.Hook{in, out}) || rc.Fragments != nftrules.FragNone || !rc.QueueFragments {
		t.Errorf("LayerNetwork rules: hooks %v, fragments %v, QueueFragments %v; want input and output, FragNone, true", rc.Hooks, rc.Fragments, rc.QueueFragments)
	}
	if got, ok := fragRulesConfig(rc, LayerNetwork); ok {
		t.Errorf("LayerNetwork: fragments' table %+v, want none", got)
	}
	cfg.layer, cfg.flags = LayerNetworkForward, FlagReassemble // forwarded traffic: reassembled only when asked
	cfg.filter = filter.MustCompile("udp.DstPort == 9999", filter.LayerNetworkForward)
	rc, reasm, ok = rulesConfig(cfg, 7, 1)
	if !ok || !reasm || rc.QueueFragments || rc.Fragments != nftrules.FragNone {
		t.Fatalf("LayerNetworkForward rules: reasm %v, ok %v, QueueFragments %v, fragments %v", reasm, ok, rc.QueueFragments, rc.Fragments)
	}
	c, ok := fragRulesConfig(rc, LayerNetworkForward)
	if !ok {
		t.Fatal("forward: no fragments' table, want one")
	}
	if !slices.Equal(c.Hooks, []nftrules.Hook{nftrules.HookPrerouting}) || !c.IPv4 || !c.IPv6 || c.Dest != nftrules.DestRemote {
		t.Errorf("forward: hooks %v, IPv4 %v, IPv6 %v, Dest %v; want prerouting, both, DestRemote", c.Hooks, c.IPv4, c.IPv6, c.Dest)
	}
	if c.Fragments != nftrules.FragOnly || c.Lowered != nil || c.KeepNDP || c.QueueFragments {
		t.Errorf("forward: selects %v fragments, lowered %v, KeepNDP %v, QueueFragments %v: want every fragment", c.Fragments, c.Lowered, c.KeepNDP, c.QueueFragments)
	}
}
