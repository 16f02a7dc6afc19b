package nftrules

import (
	"encoding/binary"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/netdivert/divert/filter"
)

// TestQueueFragmentsLikeTwoTables checks that one QueueFragments rule set
// selects, packet for packet, what the two tables it replaces selected
// together: the filter's rules with FragNone, and a FragOnly table without
// a filter at the same hook (IPv6 only at input), for random filters over
// random packets, fragments among them, at the three hooks Open uses or
// tests. It also checks that every fragment is selected whatever the filter.
func TestQueueFragmentsLikeTwoTables(t *testing.T) {
	seed := uint64(0xf4a9_0001)
	if s := os.Getenv("DIVERT_DIFF_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 0, 64)
	}
	nfilters := 24
	if s := os.Getenv("DIVERT_DIFF_FILTERS"); s != "" {
		nfilters, _ = strconv.Atoi(s)
	}
	for _, hook := range []Hook{HookPrerouting, HookInput, HookOutput} {
		t.Run(hook.String(), func(t *testing.T) {
			fragQueueRun(t, hook, seed+uint64(hook), nfilters)
		})
	}
}

func fragQueueRun(t *testing.T, hook Hook, seed uint64, nfilters int) {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	d := newDiffBed(t, hook)
	pkts := d.reaching(t, diffPackets(r))
	var raw [][]byte
	frag := make([]bool, len(pkts))
	var frags4, frags6 int
	for i, p := range pkts {
		raw = append(raw, p.b)
		if p.b[0]>>4 == 4 {
			frag[i] = len(p.b) >= 8 && binary.BigEndian.Uint16(p.b[6:])&0x3fff != 0
			frags4 += b2i(frag[i])
		} else {
			// By the generator's name (a mutated packet's headers may no
			// longer say it).
			frag[i] = strings.Contains(p.name, "frag(") && !strings.HasPrefix(p.name, "mutated")
			frags6 += b2i(frag[i])
		}
	}
	t.Logf("seed %#x: %d packets reach %s, %d IPv4 and %d IPv6 fragments", seed, len(pkts), hook, frags4, frags6)
	// The kernel reassembles IPv4 before input; everywhere else both
	// families' fragments must be there for the comparison to mean much.
	if frags6 == 0 || frags4 == 0 && hook != HookInput {
		t.Fatalf("too few fragments reach %s: %d IPv4, %d IPv6", hook, frags4, frags6)
	}

	installed := func(cfgs ...Config) (sel []bool) {
		t.Helper()
		var rs []*Ruleset
		defer func() {
			for _, r := range rs {
				r.Close()
			}
		}()
		for _, c := range cfgs {
			var r *Ruleset
			if err := d.ns.Do(func() (err error) { r, err = Install(c); return }); err != nil {
				t.Fatalf("install %+v: %v", c, err)
			}
			rs = append(rs, r)
		}
		arrived, passed := d.round(t, raw)
		sel = make([]bool, len(raw))
		for i := range raw {
			if !arrived[i] {
				t.Fatalf("%s: did not reach %s this time", pkts[i].name, hook)
			}
			sel[i] = !passed[i]
		}
		return sel
	}

	g := &fgen{r: r, pkts: pkts, hook: hook}
	checked, addedSome := 0, 0
	for i := 0; i < nfilters; i++ {
		text := g.expr(1 + g.n(3)).String()
		if i == 0 {
			text = "udp.DstPort == 9999" // a narrow filter, and one that walks no header
		}
		f, err := filter.Compile(text, filter.LayerNetwork)
		if err != nil {
			continue
		}
		an := f.Analyze()
		if an.None || len(f.Lower().Terms) == 0 || !an.IPv4 && !an.IPv6 {
			continue
		}
		main := Config{Hooks: []Hook{hook}, IPv4: an.IPv4, IPv6: an.IPv6, Lowered: f.Lower(),
			Action: ActionQueue, QueueNum: diffQueue, QueueCount: 1, KeepNDP: true, Fragments: FragNone}
		if hook == HookPrerouting && i%3 == 2 {
			// A destination selection, which both layouts apply to
			// fragments too (the bed's packets are all to local
			// addresses: DestRemote leaves them all out).
			main.Dest = DestRemote
		}
		frags := main
		frags.Lowered, frags.Fragments, frags.KeepNDP = nil, FragOnly, false
		frags.IPv4 = frags.IPv4 && hook != HookInput
		pair := []Config{main}
		if frags.IPv4 || frags.IPv6 {
			pair = append(pair, frags)
		}
		merged := main
		merged.QueueFragments = true

		want := installed(pair...)
		got := installed(merged)
		alone := installed(main)
		checked++
		added := false
		for k := range raw {
			if got[k] != want[k] {
				t.Errorf("filter %q: %s: one table selects %v, the two tables %v\n% x", text, pkts[k].name, got[k], want[k], raw[k])
			}
			isV6 := raw[k][0]>>4 == 6
			if frag[k] && (isV6 && an.IPv6 || !isV6 && an.IPv4) && main.Dest == DestAny && !got[k] {
				t.Errorf("filter %q: fragment %s not selected", text, pkts[k].name)
			}
			added = added || got[k] && !alone[k]
		}
		addedSome += b2i(added)
	}
	t.Logf("%s: %d filters compared, %d of them select fragments the filter's rules alone leave", hook, checked, addedSome)
	if checked < nfilters/2 || addedSome == 0 {
		t.Fatalf("%s: %d of %d filters compared, %d add fragments: the comparison proves too little", hook, checked, nfilters, addedSome)
	}
}
