package nftrules

import (
	"context"
	"encoding/binary"
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

// TestFragOnlySelectsFragments: a FragOnly rule set selects exactly the
// fragments, whatever comes before the IPv6 fragment header, and lets every
// other packet through, IPv6 packets with no extension header first among
// them (they leave after a one-byte load, see v6NoExt).
func TestFragOnlySelectsFragments(t *testing.T) {
	b := newBed(t)
	v6 := func(o v6opts, p []byte) []byte {
		o.src, o.dst, o.hop = remote6, local6, 64
		return ipv6(o, p)
	}
	pkts := append(testPackets(),
		namedPkt{"v6 hbh, udp first frag", v6(v6opts{hbh: true, frag: true, more: true, next: 17}, udp(1, 2, make([]byte, 16)))},
		namedPkt{"v6 hbh, udp later frag", v6(v6opts{hbh: true, frag: true, fragO: 3, next: 17}, make([]byte, 16))},
		namedPkt{"v6 atomic frag, tcp", v6(v6opts{frag: true, next: 6}, tcp(1, 2, 0x02, 5, nil))},
		namedPkt{"v6 udp, no payload", v6(v6opts{next: 17}, nil)},
		namedPkt{"v6 icmpv6 echo", v6(v6opts{next: 58}, icmpEcho(128, 1, 1))},
		// Byte 6 of an IPv4 header is where IPv6 names the next header:
		// 0x11 (UDP) here, in a later fragment.
		namedPkt{"v4 later frag, byte 6 0x11", ipv4(v4opts{proto: 17, flags: 0x1100, ttl: 64, id: 7, src: remote4, dst: local4}, make([]byte, 16))},
	)
	r := install(t, b.ns, Config{Hooks: []Hook{HookPrerouting}, IPv4: true, IPv6: true,
		Fragments: FragOnly, Action: ActionDrop})
	defer r.Close()
	for _, p := range pkts {
		var frag bool
		if p.b[0]>>4 == 4 {
			frag = binary.BigEndian.Uint16(p.b[6:])&0x3fff != 0
		} else {
			frag = strings.Contains(p.name, "frag")
		}
		if selected := !b.passes(t, p.b); selected != frag {
			t.Errorf("%s: selected %v, want %v", p.name, selected, frag)
		}
	}
}
