package ipfw

import (
	"encoding/binary"
	"strings"
	"testing"

	"github.com/netdivert/divert/filter"
)

func c(f filter.Field, op filter.Op, v uint64) filter.Cond {
	return filter.Cond{Field: f, Op: op, Value: filter.Value{Lo: v}}
}

func neg(f filter.Field, op filter.Op, v uint64) filter.Cond {
	return filter.Cond{Field: f, Op: op, Value: filter.Value{Lo: v, Neg: true}}
}

func v4(a, b, cc, d byte) uint64 {
	return 0xFFFF_0000_0000 | uint64(a)<<24 | uint64(b)<<16 | uint64(cc)<<8 | uint64(d)
}

func v6(f filter.Field, op filter.Op, hi, lo uint64) filter.Cond {
	return filter.Cond{Field: f, Op: op, Value: filter.Value{Hi: hi, Lo: lo}}
}

func terms(ts ...[]filter.Cond) *filter.Lowered {
	l := &filter.Lowered{Exact: true}
	for _, t := range ts {
		l.Terms = append(l.Terms, filter.Term{Conds: t})
	}
	return l
}

func conds(cs ...filter.Cond) []filter.Cond { return cs }

var (
	yes = func(f filter.Field) filter.Cond { return c(f, filter.OpEq, 1) }
	no  = func(f filter.Field) filter.Cond { return c(f, filter.OpEq, 0) }
)

const tag = "netdivert pid=42 port=40000"

func TestLowerGolden(t *testing.T) {
	ifName := func(idx uint32) (string, bool) {
		if idx == 2 {
			return "vtnet0", true
		}
		return "", false
	}
	base := Config{Number: 31000, Set: 5, Port: 40000, Action: Divert, IfName: ifName, Tag: tag}
	for _, tc := range []struct {
		name  string
		cfg   func(*Config)
		l     *filter.Lowered
		want  []string
		exact bool
	}{
		{
			name: "nothing",
			l:    terms(),
			want: nil, exact: true,
		},
		{
			name: "true",
			l:    terms(conds()),
			want: []string{
				"add 31000 set 5 divert 40000 ip from any to any in // " + tag,
				"add 31000 set 5 divert 40000 ip from any to any out not recv * // " + tag,
			},
		},
		{
			name: "outbound tcp dst port 80",
			l:    terms(conds(yes(filter.FieldOutbound), yes(filter.FieldTCP), c(filter.FieldTCPDstPort, filter.OpEq, 80))),
			want: []string{
				"add 31000 set 5 divert 40000 tcp from any to any dst-port 80 out not recv * // " + tag,
				"add 31000 set 5 divert 40000 tcp from any to any frag out not recv * // " + tag,
				"add 31000 set 5 divert 40000 tcp from any to any frag mf out not recv * // " + tag,
				// IPv6 packets whose headers ipfw walks otherwise than WinDivert
				"add 31000 set 5 divert 40000 135 from any to any ip6 out not recv * // " + tag,
				"add 31000 set 5 divert 40000 ip from any to any ip6 ext6hdr frag out not recv * // " + tag,
			},
		},
		{
			name: "inbound udp port range and exclusion, ipv4 source cidr",
			l: terms(conds(yes(filter.FieldInbound),
				c(filter.FieldUDPDstPort, filter.OpGe, 1000), c(filter.FieldUDPDstPort, filter.OpLe, 2000),
				c(filter.FieldUDPDstPort, filter.OpNe, 1500),
				c(filter.FieldIPSrcAddr, filter.OpGe, v4(10, 1, 0, 0)), c(filter.FieldIPSrcAddr, filter.OpLe, v4(10, 1, 255, 255)))),
			want: []string{
				"add 31000 set 5 divert 40000 udp from 10.1.0.0/16 to any ip4 dst-port 1000-1499,1501-2000 in // " + tag,
				"add 31000 set 5 divert 40000 udp from 10.1.0.0/16 to any ip4 frag in // " + tag,
				"add 31000 set 5 divert 40000 udp from 10.1.0.0/16 to any ip4 frag mf in // " + tag,
			},
		},
		{
			name: "not one address",
			l:    terms(conds(yes(filter.FieldOutbound), c(filter.FieldIPDstAddr, filter.OpNe, v4(192, 0, 2, 1)))),
			want: []string{
				"add 31000 set 5 divert 40000 ip from any to not 192.0.2.1 ip4 out not recv * // " + tag,
			},
			exact: false, // direction layer approximation only applies inbound, but ipv4 "ip" presence is exact; outbound rules are still marked inexact by the layer
		},
		{
			name: "address range as a cidr list",
			l: terms(conds(yes(filter.FieldInbound),
				c(filter.FieldIPDstAddr, filter.OpGe, v4(10, 0, 0, 1)), c(filter.FieldIPDstAddr, filter.OpLe, v4(10, 0, 0, 6)))),
			want: []string{
				"add 31000 set 5 divert 40000 ip from any to 10.0.0.1,10.0.0.2/31,10.0.0.4/31,10.0.0.6 ip4 in // " + tag,
			},
		},
		{
			name: "ipv6 prefix and icmpv6 types",
			l: terms(conds(yes(filter.FieldIPv6), yes(filter.FieldICMPv6),
				c(filter.FieldICMPv6Type, filter.OpGe, 133), c(filter.FieldICMPv6Type, filter.OpLe, 136),
				v6(filter.FieldIPv6SrcAddr, filter.OpGe, 0xfd00_0000_0000_0000, 0), v6(filter.FieldIPv6SrcAddr, filter.OpLe, 0xfd00_0000_0000_00ff, ^uint64(0)))),
			want: []string{
				"add 31000 set 5 divert 40000 ipv6-icmp from fd00::/56 to any ip6 icmp6types 133,134,135,136 in // " + tag,
				// ipfw's bare frag takes no first IPv6 fragment: ext6hdr frag
				// takes every one
				"add 31000 set 5 divert 40000 135 from fd00::/56 to any ip6 in // " + tag,
				"add 31000 set 5 divert 40000 ip from fd00::/56 to any ip6 ext6hdr frag in // " + tag,
				"add 31000 set 5 divert 40000 ipv6-icmp from fd00::/56 to any ip6 icmp6types 133,134,135,136 out not recv * // " + tag,
				"add 31000 set 5 divert 40000 135 from fd00::/56 to any ip6 out not recv * // " + tag,
				"add 31000 set 5 divert 40000 ip from fd00::/56 to any ip6 ext6hdr frag out not recv * // " + tag,
			},
		},
		{
			name: "icmp echo request types",
			l:    terms(conds(yes(filter.FieldICMP), c(filter.FieldICMPType, filter.OpEq, 8), yes(filter.FieldInbound))),
			want: []string{
				"add 31000 set 5 divert 40000 icmp from any to any ip4 icmptypes 8 in // " + tag,
				// icmptypes never matches a non-first fragment either
				"add 31000 set 5 divert 40000 icmp from any to any ip4 frag in // " + tag,
				"add 31000 set 5 divert 40000 icmp from any to any ip4 frag mf in // " + tag,
			},
		},
		{
			name: "tcp syn without ack, two terms, duplicates merged",
			l: terms(
				conds(yes(filter.FieldTCP), yes(filter.FieldTCPSyn), no(filter.FieldTCPAck), yes(filter.FieldOutbound)),
				conds(yes(filter.FieldTCP), yes(filter.FieldTCPSyn), no(filter.FieldTCPAck), yes(filter.FieldOutbound)),
			),
			want: []string{
				"add 31000 set 5 divert 40000 tcp from any to any tcpflags syn,!ack out not recv * // " + tag,
				"add 31000 set 5 divert 40000 tcp from any to any frag out not recv * // " + tag,
				"add 31000 set 5 divert 40000 tcp from any to any frag mf out not recv * // " + tag,
				"add 31000 set 5 divert 40000 135 from any to any ip6 out not recv * // " + tag,
				"add 31000 set 5 divert 40000 ip from any to any ip6 ext6hdr frag out not recv * // " + tag,
			},
		},
		{
			name: "tcp or udp by protocol",
			l: terms(conds(yes(filter.FieldInbound),
				c(filter.FieldProtocol, filter.OpGe, 6), c(filter.FieldProtocol, filter.OpLe, 17),
				c(filter.FieldProtocol, filter.OpNe, 7), c(filter.FieldProtocol, filter.OpNe, 8),
				c(filter.FieldProtocol, filter.OpLe, 8))),
			want: []string{
				"add 31000 set 5 divert 40000 tcp from any to any in // " + tag,
				"add 31000 set 5 divert 40000 135 from any to any ip6 in // " + tag,
				"add 31000 set 5 divert 40000 ip from any to any ip6 ext6hdr frag in // " + tag,
			},
		},
		{
			name: "protocol list as an or-block",
			l: terms(conds(yes(filter.FieldInbound), c(filter.FieldProtocol, filter.OpGe, 6), c(filter.FieldProtocol, filter.OpLe, 17),
				c(filter.FieldProtocol, filter.OpNe, 7), c(filter.FieldProtocol, filter.OpNe, 8), c(filter.FieldProtocol, filter.OpNe, 9),
				c(filter.FieldProtocol, filter.OpNe, 10), c(filter.FieldProtocol, filter.OpNe, 11), c(filter.FieldProtocol, filter.OpNe, 12),
				c(filter.FieldProtocol, filter.OpNe, 13), c(filter.FieldProtocol, filter.OpNe, 14), c(filter.FieldProtocol, filter.OpNe, 15),
				c(filter.FieldProtocol, filter.OpNe, 16))),
			want: []string{
				"add 31000 set 5 divert 40000 { tcp or udp } from any to any in // " + tag,
				"add 31000 set 5 divert 40000 135 from any to any ip6 in // " + tag,
				"add 31000 set 5 divert 40000 ip from any to any ip6 ext6hdr frag in // " + tag,
			},
		},
		{
			name: "protocol 0 cannot be named: widened",
			l:    terms(conds(yes(filter.FieldInbound), c(filter.FieldProtocol, filter.OpLe, 1))),
			want: []string{
				"add 31000 set 5 divert 40000 ip from any to any in // " + tag,
			},
		},
		{
			name: "protocol 0 cannot be excluded: left to user space",
			l:    terms(conds(yes(filter.FieldInbound), c(filter.FieldProtocol, filter.OpNe, 0), c(filter.FieldProtocol, filter.OpNe, 6))),
			want: []string{
				"add 31000 set 5 divert 40000 ip from any to any not proto tcp in // " + tag,
				// the protocols take Mobility; 43, 51 and 60 are WinDivert's
				// protocol for a header cut short, which ipfw walks past
				"add 31000 set 5 divert 40000 ip from any to any ip6 ext6hdr frag,hopopt,route,dstopt,ah in // " + tag,
			},
		},
		{
			name: "icmp6 types above ICMP6_MAXTYPE are left to user space",
			l:    terms(conds(yes(filter.FieldInbound), yes(filter.FieldICMPv6), c(filter.FieldICMPv6Type, filter.OpGe, 200))),
			want: []string{
				"add 31000 set 5 divert 40000 ipv6-icmp from any to any ip6 in // " + tag,
				"add 31000 set 5 divert 40000 135 from any to any ip6 in // " + tag,
				"add 31000 set 5 divert 40000 ip from any to any ip6 ext6hdr frag in // " + tag,
			},
		},
		{
			name: "ipv6 lists stop at seven entries",
			l: terms(conds(yes(filter.FieldInbound),
				v6(filter.FieldIPv6DstAddr, filter.OpGe, 0xfd00_0000_0000_0000, 1), v6(filter.FieldIPv6DstAddr, filter.OpLe, 0xfd00_0000_0000_0000, 15))),
			// 1, 2/127, 4/126, 8/125: four entries fit
			want: []string{
				"add 31000 set 5 divert 40000 ip from any to fd00::1,fd00::2/127,fd00::4/126,fd00::8/125 ip6 in // " + tag,
			},
			exact: false,
		},
		{
			name: "ipv6 eight entries widen to a cover",
			l: terms(conds(yes(filter.FieldInbound),
				v6(filter.FieldIPv6DstAddr, filter.OpGe, 0xfd00_0000_0000_0000, 1), v6(filter.FieldIPv6DstAddr, filter.OpLe, 0xfd00_0000_0000_0000, 0xff))),
			// 1, 2/127, ..., 128/121 is eight entries: too long for ipfw
			want: []string{
				"add 31000 set 5 divert 40000 ip from any to fd00::/120 ip6 in // " + tag,
			},
		},
		{
			name: "ipv4 eight entries fit",
			l: terms(conds(yes(filter.FieldInbound),
				c(filter.FieldIPDstAddr, filter.OpGe, v4(10, 0, 0, 1)), c(filter.FieldIPDstAddr, filter.OpLe, v4(10, 0, 0, 255)))),
			want: []string{
				"add 31000 set 5 divert 40000 ip from any to 10.0.0.1,10.0.0.2/31,10.0.0.4/30,10.0.0.8/29,10.0.0.16/28,10.0.0.32/27,10.0.0.64/26,10.0.0.128/25 ip4 in // " + tag,
			},
		},
		{
			name: "protocol exclusions",
			l:    terms(conds(yes(filter.FieldInbound), c(filter.FieldProtocol, filter.OpNe, 6), c(filter.FieldProtocol, filter.OpNe, 17))),
			want: []string{
				"add 31000 set 5 divert 40000 ip from any to any not proto tcp not proto udp in // " + tag,
				"add 31000 set 5 divert 40000 ip from any to any ip6 ext6hdr frag,hopopt,route,dstopt,ah in // " + tag,
			},
		},
		{
			name: "ifIdx inbound",
			l:    terms(conds(yes(filter.FieldInbound), c(filter.FieldIfIdx, filter.OpEq, 2))),
			want: []string{
				"add 31000 set 5 divert 40000 ip from any to any in recv vtnet0 // " + tag,
			},
		},
		{
			name: "ifIdx unknown is left to user space",
			l:    terms(conds(yes(filter.FieldInbound), c(filter.FieldIfIdx, filter.OpEq, 9))),
			want: []string{
				"add 31000 set 5 divert 40000 ip from any to any in // " + tag,
			},
		},
		{
			name: "local and remote endpoints by direction",
			l: terms(conds(yes(filter.FieldOutbound), yes(filter.FieldIP), yes(filter.FieldTCP),
				c(filter.FieldLocalAddr, filter.OpEq, v4(10, 0, 0, 2)), c(filter.FieldRemotePort, filter.OpEq, 443))),
			want: []string{
				"add 31000 set 5 divert 40000 tcp from 10.0.0.2 to any ip4 dst-port 443 out not recv * // " + tag,
				"add 31000 set 5 divert 40000 tcp from 10.0.0.2 to any ip4 frag out not recv * // " + tag,
				"add 31000 set 5 divert 40000 tcp from 10.0.0.2 to any ip4 frag mf out not recv * // " + tag,
			},
		},
		{
			name: "contradictions drop terms",
			l: terms(
				conds(yes(filter.FieldTCP), yes(filter.FieldUDP)),
				conds(c(filter.FieldTCPDstPort, filter.OpLt, 0)),
				conds(neg(filter.FieldTCPDstPort, filter.OpEq, 0)),
				conds(yes(filter.FieldInbound), yes(filter.FieldOutbound)),
				conds(c(filter.FieldFalse, filter.OpEq, 1)),
				conds(c(filter.FieldIPSrcAddr, filter.OpEq, 5)), // not an IPv4-mapped value
			),
			want: nil, exact: true, // no term can match: no rules is exact
		},
		{
			name: "negative constant compares below everything",
			l:    terms(conds(yes(filter.FieldInbound), neg(filter.FieldTCPDstPort, filter.OpGe, 0))),
			// no port option is emitted, so fragments match and need no companion
			want: []string{
				"add 31000 set 5 divert 40000 tcp from any to any in // " + tag,
				"add 31000 set 5 divert 40000 135 from any to any ip6 in // " + tag,
				"add 31000 set 5 divert 40000 ip from any to any ip6 ext6hdr frag in // " + tag,
			},
		},
		{
			name: "unlowerable fields keep their presence",
			l:    terms(conds(yes(filter.FieldOutbound), c(filter.FieldIPTTL, filter.OpEq, 64), c(filter.FieldTCPPayload, filter.OpEq, 0x47))),
			want: []string{
				"add 31000 set 5 divert 40000 tcp from any to any ip4 out not recv * // " + tag,
			},
		},
		{
			name: "forward layer tee",
			cfg:  func(c *Config) { c.Forward = true; c.Action = Tee },
			l:    terms(conds(yes(filter.FieldUDP), c(filter.FieldUDPDstPort, filter.OpEq, 53))),
			want: []string{
				// a tee does not reassemble: no companion; tee rules do not
				// overlap, so the ext6hdr rule's packets are its own
				"add 31000 set 5 tee 40000 udp from any to any dst-port 53 not ext6hdr frag out recv * // " + tag,
				"add 31000 set 5 tee 40000 135 from any to any ip6 not ext6hdr frag out recv * // " + tag,
				"add 31000 set 5 tee 40000 ip from any to any ip6 ext6hdr frag out recv * // " + tag,
			},
		},
		{
			name: "deny, untagged",
			cfg:  func(c *Config) { c.Action = Deny; c.Tag = "" },
			l:    terms(conds(yes(filter.FieldInbound), yes(filter.FieldIPv6))),
			want: []string{
				"add 31000 set 5 deny ip from any to any ip6 in",
			},
		},
		{
			name: "ipv6 port: the unclear rules take every fragment, no frag companion",
			l:    terms(conds(yes(filter.FieldInbound), yes(filter.FieldIPv6), c(filter.FieldUDPDstPort, filter.OpEq, 53))),
			want: []string{
				"add 31000 set 5 divert 40000 udp from any to any ip6 dst-port 53 in // " + tag,
				// ipfw ends its walk at a Mobility header (with
				// deny_unknown_exthdrs=0), WinDivert walks on
				"add 31000 set 5 divert 40000 135 from any to any ip6 in // " + tag,
				// a second Fragment header (WinDivert stops), an atomic one
				// with permit_single_frag6=0 (ipfw stops), and the first
				// fragment, which bare frag does not take
				"add 31000 set 5 divert 40000 ip from any to any ip6 ext6hdr frag in // " + tag,
			},
		},
		{
			name: "protocol of an extension header: every header ipfw walks",
			l:    terms(conds(yes(filter.FieldOutbound), c(filter.FieldProtocol, filter.OpEq, 43))),
			want: []string{
				"add 31000 set 5 divert 40000 43 from any to any out not recv * // " + tag,
				"add 31000 set 5 divert 40000 135 from any to any ip6 out not recv * // " + tag,
				// WinDivert's protocol is 43 when a routing header is cut
				// short; ipfw walks past it
				"add 31000 set 5 divert 40000 ip from any to any ip6 ext6hdr frag,hopopt,route,dstopt,ah out not recv * // " + tag,
			},
		},
		{
			name: "protocol 135 takes the mobility packets itself",
			l:    terms(conds(yes(filter.FieldInbound), yes(filter.FieldIPv6), c(filter.FieldProtocol, filter.OpEq, 135))),
			want: []string{
				"add 31000 set 5 divert 40000 135 from any to any ip6 in // " + tag,
				"add 31000 set 5 divert 40000 ip from any to any ip6 ext6hdr frag in // " + tag,
			},
		},
		{
			name: "ipv6 addresses only: no unclear rules, exact at the forward layer",
			cfg:  func(c *Config) { c.Forward = true },
			l:    terms(conds(v6(filter.FieldIPv6DstAddr, filter.OpEq, 0xfd00_0000_0000_0000, 2))),
			want: []string{
				"add 31000 set 5 divert 40000 ip from any to fd00::2 ip6 out recv * // " + tag,
			},
			exact: true,
		},
		{
			name: "ipv4 only: no unclear rules",
			l:    terms(conds(yes(filter.FieldInbound), yes(filter.FieldIP), c(filter.FieldUDPDstPort, filter.OpEq, 53))),
			want: []string{
				"add 31000 set 5 divert 40000 udp from any to any ip4 dst-port 53 in // " + tag,
				"add 31000 set 5 divert 40000 udp from any to any ip4 frag in // " + tag,
				"add 31000 set 5 divert 40000 udp from any to any ip4 frag mf in // " + tag,
			},
		},
		{
			name: "tee with protocol exclusions: the unclear rule's packets are its own",
			cfg:  func(c *Config) { c.Action = Tee },
			l:    terms(conds(yes(filter.FieldInbound), c(filter.FieldProtocol, filter.OpNe, 17))),
			want: []string{
				"add 31000 set 5 tee 40000 ip from any to any not proto udp not ext6hdr frag,hopopt,route,dstopt,ah in // " + tag,
				"add 31000 set 5 tee 40000 ip from any to any ip6 ext6hdr frag,hopopt,route,dstopt,ah in // " + tag,
			},
		},
		{
			name: "too many port ranges widen to the hull",
			l: terms(conds(yes(filter.FieldInbound), c(filter.FieldTCPDstPort, filter.OpGe, 10), c(filter.FieldTCPDstPort, filter.OpLe, 30),
				c(filter.FieldTCPDstPort, filter.OpNe, 12), c(filter.FieldTCPDstPort, filter.OpNe, 14), c(filter.FieldTCPDstPort, filter.OpNe, 16),
				c(filter.FieldTCPDstPort, filter.OpNe, 18), c(filter.FieldTCPDstPort, filter.OpNe, 20), c(filter.FieldTCPDstPort, filter.OpNe, 22),
				c(filter.FieldTCPDstPort, filter.OpNe, 24), c(filter.FieldTCPDstPort, filter.OpNe, 26))),
			want: []string{
				"add 31000 set 5 divert 40000 tcp from any to any dst-port 10-30 in // " + tag,
				"add 31000 set 5 divert 40000 tcp from any to any frag in // " + tag,
				"add 31000 set 5 divert 40000 tcp from any to any frag mf in // " + tag,
				"add 31000 set 5 divert 40000 135 from any to any ip6 in // " + tag,
				"add 31000 set 5 divert 40000 ip from any to any ip6 ext6hdr frag in // " + tag,
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := base
			if tc.cfg != nil {
				tc.cfg(&cfg)
			}
			res, err := Lower(tc.l, cfg)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, r := range res.Rules {
				checkWords(t, r)
				got = append(got, r.String())
			}
			if strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
				t.Fatalf("rules:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
			if res.Exact != tc.exact {
				t.Errorf("Exact = %v, want %v", res.Exact, tc.exact)
			}
		})
	}
}

// checkWords fails unless every argv element of r is one ipfw word: ipfw(8)
// run with several arguments does not split them, so only the comment after
// "//" may hold spaces.
func checkWords(t *testing.T, r Rule) {
	t.Helper()
	for i, w := range r {
		if i > 0 && r[i-1] == "//" {
			if i != len(r)-1 {
				t.Fatalf("comment is not last in %q", r)
			}
			continue
		}
		if w == "" || strings.ContainsAny(w, " \t\n") {
			t.Fatalf("argument %d %q of %q is not one word", i, w, r.String())
		}
	}
}

func TestLowerWords(t *testing.T) {
	cfg := Config{Number: 100, Set: 1, Port: 8668, Action: Tee, Tag: tag}
	l := terms(
		conds(yes(filter.FieldOutbound), yes(filter.FieldIP), c(filter.FieldIPDstAddr, filter.OpNe, v4(192, 0, 2, 1)),
			c(filter.FieldProtocol, filter.OpGe, 6), c(filter.FieldProtocol, filter.OpLe, 17),
			c(filter.FieldProtocol, filter.OpNe, 7), c(filter.FieldProtocol, filter.OpNe, 8), c(filter.FieldProtocol, filter.OpNe, 9),
			c(filter.FieldProtocol, filter.OpNe, 10), c(filter.FieldProtocol, filter.OpNe, 11), c(filter.FieldProtocol, filter.OpNe, 12),
			c(filter.FieldProtocol, filter.OpNe, 13), c(filter.FieldProtocol, filter.OpNe, 14), c(filter.FieldProtocol, filter.OpNe, 15),
			c(filter.FieldProtocol, filter.OpNe, 16)),
	)
	res, err := Lower(l, cfg)
	if err != nil {
		t.Fatal(err)
	}
	want := Rule{"add", "100", "set", "1", "tee", "8668", "{", "tcp", "or", "udp", "}", "from", "any", "to", "not", "192.0.2.1",
		"ip4", "out", "not", "recv", "*", "//", tag}
	if len(res.Rules) != 1 || strings.Join(res.Rules[0], "|") != strings.Join(want, "|") {
		t.Fatalf("rules = %q, want %q", res.Rules, want)
	}
}

// TestLowerContradictoryProtocol: a term whose protocol conditions leave
// no protocol (here "not ICMP" and an ICMP field, which fixes the protocol
// after the exclusion) matches nothing and gets no rule. The exclusion used
// to survive the narrowing as a set with no member that did not know it was
// empty, and rendering it panicked (found by FuzzLower).
func TestLowerContradictoryProtocol(t *testing.T) {
	cfg := Config{Number: 100, Set: 1, Port: 8668, Tag: tag}
	ls := []*filter.Lowered{
		terms(conds(c(filter.FieldIPProtocol, filter.OpNe, 1), c(filter.FieldICMPCode, filter.OpEq, 0))),
		terms(conds(c(filter.FieldProtocol, filter.OpNe, 6), c(filter.FieldTCPDstPort, filter.OpEq, 80))),
	}
	// Compiled filters whose terms come in that order (these panicked).
	for _, text := range []string{"icmp.Code == 0 and ip.Protocol != 1", "icmp and ip.Protocol != 1", "tcp.DstPort == 80 and ip.Protocol != 6"} {
		ls = append(ls, filter.MustCompile(text, filter.LayerNetwork).Lower())
	}
	for _, l := range ls {
		res, err := Lower(l, cfg)
		if err != nil {
			t.Fatal(err)
		}
		if len(res.Rules) != 0 {
			t.Errorf("%+v: rules %q, want none", l.Terms, res.Rules)
		}
	}
	s := fullSet(u128{}, u64(255))
	s.apply(filter.OpNe, filter.Value{Lo: 1})
	s.intersect(u64(1), u64(1))
	if !s.empty || s.has(u64(1)) || len(s.ranges()) != 0 {
		t.Errorf("{0..255} \\ {1} narrowed to [1, 1]: %+v, want empty", s)
	}
}

func TestLowerIfNames(t *testing.T) {
	for _, name := range []string{"", "any", "1abc", "table(t)", "em*", "e?", "e[0]", "a b", "interfacenamelong", "/x", "em0,"} {
		res, err := Lower(terms(conds(yes(filter.FieldInbound), c(filter.FieldIfIdx, filter.OpEq, 3))),
			Config{Number: 1, Port: 1, IfName: func(uint32) (string, bool) { return name, true }})
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range res.Rules {
			if strings.Contains(r.String(), " recv "+name) && name != "" {
				t.Errorf("interface %q used: %q", name, r.String())
			}
		}
		if res.Exact {
			t.Errorf("interface %q: exact", name)
		}
	}
	res, _ := Lower(terms(conds(yes(filter.FieldInbound), c(filter.FieldIfIdx, filter.OpEq, 3))),
		Config{Number: 1, Port: 1, IfName: func(uint32) (string, bool) { return "epair0b", true }})
	if len(res.Rules) != 1 || !strings.HasSuffix(res.Rules[0].String(), " in recv epair0b") {
		t.Fatalf("rules = %q", res.Rules)
	}
}

func TestLowerExactForward(t *testing.T) {
	// At the forward layer an address test is exact.
	res, err := Lower(terms(conds(c(filter.FieldIPDstAddr, filter.OpEq, v4(192, 0, 2, 1)))), Config{Number: 1, Port: 1, Forward: true})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Exact {
		t.Fatalf("address test at the forward layer should be exact: %q", res.Rules)
	}
	// A port test is not: its companions take every fragmented datagram,
	// whatever its ports, and user space judges it whole.
	for _, a := range []Action{Divert, Deny} {
		res, err = Lower(terms(conds(c(filter.FieldUDPDstPort, filter.OpEq, 53))), Config{Number: 1, Port: 1, Forward: true, Action: a})
		if err != nil {
			t.Fatal(err)
		}
		if res.Exact || len(res.Rules) != 5 {
			t.Fatalf("action %v: exact %v, rules %q: want the port rule, two companions and two unclear rules, inexact", a, res.Exact, res.Rules)
		}
	}
	// A tee has no companions, but a TCP header with a data offset below 5
	// has ports for ipfw and none for WinDivert.
	res, err = Lower(terms(conds(yes(filter.FieldIP), c(filter.FieldTCPDstPort, filter.OpEq, 80))), Config{Number: 1, Port: 1, Forward: true, Action: Tee})
	if err != nil {
		t.Fatal(err)
	}
	if res.Exact || len(res.Rules) != 1 {
		t.Fatalf("tee tcp port: exact %v, rules %q: want one rule, inexact", res.Exact, res.Rules)
	}
	res, err = Lower(terms(conds(yes(filter.FieldIP), c(filter.FieldUDPDstPort, filter.OpEq, 53))), Config{Number: 1, Port: 1, Forward: true, Action: Tee})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Exact || len(res.Rules) != 1 {
		t.Fatalf("tee ipv4 udp port: exact %v, rules %q: want one rule, exact", res.Exact, res.Rules)
	}
	res, _ = Lower(&filter.Lowered{Terms: []filter.Term{{}}}, Config{Number: 1, Port: 1, Forward: true})
	if res.Exact {
		t.Fatal("an inexact Lowered stays inexact")
	}
}

func TestLowerConfigErrors(t *testing.T) {
	for _, cfg := range []Config{
		{Number: 0},
		{Number: 65535},
		{Number: 1, Set: 31},
		{Number: 1, Port: 1, Tag: "a // b"},
		{Number: 1, Port: 1, Action: 9},
		{Number: 1, Port: 0, Action: Divert},
		{Number: 1, Port: 0, Action: Tee},
		{Number: 1, Port: 1, Tag: strings.Repeat("x", MaxTag+1)},
		{Number: 1, Port: 1, Tag: "/etc/rules"},
		{Number: 1, Port: 1, Tag: "a,"},
		{Number: 1, Port: 1, Tag: "a\tb"},
		{Number: 1, Port: 1, Tag: " a"},
		{Number: 1, Port: 1, Tag: "caf\u00e9"},
	} {
		if _, err := Lower(terms(), cfg); err == nil {
			t.Errorf("Lower(%+v) accepted", cfg)
		}
	}
}

func TestRuleNumber(t *testing.T) {
	for _, tc := range []struct {
		p    int16
		want uint16
	}{{30000, 1000}, {0, 31000}, {-30000, 61000}, {1, 30999}, {32767, 1000}, {-32768, 61000}} {
		if got := RuleNumber(tc.p); got != tc.want {
			t.Errorf("RuleNumber(%d) = %d, want %d", tc.p, got, tc.want)
		}
	}
	// higher priority, lower number
	for p := int16(-30000); p < 30000; p += 97 {
		if RuleNumber(p) <= RuleNumber(p+1) {
			t.Fatalf("RuleNumber not decreasing at %d", p)
		}
	}
}

func TestCIDRs(t *testing.T) {
	cs, ok := cidrs(v4Lo, v4Hi, 32, 8)
	if !ok || len(cs) != 1 || cidrText(cs[0], 32) != "0.0.0.0/0" {
		t.Fatalf("full range: %v %v", cs, ok)
	}
	cs, ok = cidrs(u128{}, maxU128, 128, 8)
	if !ok || len(cs) != 1 || cidrText(cs[0], 128) != "::/0" {
		t.Fatalf("full v6 range: %v %v", cs, ok)
	}
	if c := cover(u64(v4(10, 0, 0, 1)), u64(v4(10, 0, 1, 0)), 32); cidrText(c, 32) != "10.0.0.0/23" {
		t.Fatalf("cover = %s", cidrText(c, 32))
	}
}

// TestParseListDivert: the port of a rule's divert or tee action is read
// whoever wrote the rule, past the modifiers ipfw lists with the action,
// and only from the action: not from the body or the comment.
func TestParseListDivert(t *testing.T) {
	out := `08000 set 0 divert 8668 ip from any to any via em0
08001 set 0 prob 0.500000 tee 8669 udp from any to any dst-port 53
08002 set 0 divert 8670 log ip from any to any in
08003 set 0 divert tablearg ip from table(1) to any
08004 set 0 allow ip from any to any // divert 8671
08005 set 0 skipto 9000 tcp from any to any dst-port 8672
08006 set 2 count log ip from any to any
`
	want := []uint16{8668, 8669, 8670, 0, 0, 0, 0}
	got := ParseList(out)
	if len(got) != len(want) {
		t.Fatalf("got %d rules: %+v", len(got), got)
	}
	for i, r := range got {
		if r.Divert != want[i] || r.Owned {
			t.Errorf("rule %d: %+v, want Divert %d, not ours", r.Number, r, want[i])
		}
	}
}

func TestParseList(t *testing.T) {
	out := `00100 set 0 allow ip from any to any via lo0
31000 set 5 divert 40000 ip from any to any in // netdivert pid=42 port=40000
31000 set 5 divert 40000 ip from any to any out not recv * // netdivert pid=42 port=40000
01000 set 6 tee 40001 udp from any to any dst-port 53 in // netdivert pid=77 port=40001
31001 set 9 divert 40002 ip from any to any in // netdivert pid=77 port=40002 prio=0
02000 set 7 allow ip from any to any // someone else's comment
02001 set 7 allow ip from any to any // netdivert pid=77 port=40003 prio=99999
garbage
# DISABLED 31002 set 10 divert 40004 ip from any to any in // netdivert pid=42 port=40004 prio=0
100000 set 8 count ip from any to any
65535 set 31 deny ip from any to any
`
	got := ParseList(out)
	want := []Listed{
		{Number: 100, Set: 0},
		{Number: 31000, Set: 5, Owned: true, PID: 42, Port: 40000, Divert: 40000},
		{Number: 31000, Set: 5, Owned: true, PID: 42, Port: 40000, Divert: 40000},
		{Number: 1000, Set: 6, Owned: true, PID: 77, Port: 40001, Prio: 30000, Divert: 40001}, // from the number
		{Number: 31001, Set: 9, Owned: true, PID: 77, Port: 40002, Divert: 40002},
		{Number: 2000, Set: 7},
		{Number: 2001, Set: 7}, // a priority out of range: not ours
		{Number: 31002, Set: 10, Owned: true, PID: 42, Port: 40004, Divert: 40004}, // in a disabled set
		{Number: 100000, Set: 8},
		{Number: 65535, Set: 31},
	}
	if len(got) != len(want) {
		t.Fatalf("got %d rules: %+v", len(got), got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("rule %d = %+v, want %+v", i, got[i], want[i])
		}
	}
	alive := func(r Listed) bool { return r.PID == 77 && r.Start == 0 }
	plan := PlanSets(got, 1<<1|1<<10, 1, alive)
	// set 1 disabled, 2 free, 5 and 10 (disabled) stale (pid 42 dead), 6
	// and 9 live, 7 foreign
	if plan.Free != 2 || len(plan.Stale) != 2 || plan.Stale[0] != 5 || plan.Stale[1] != 10 {
		t.Fatalf("plan = %+v", plan)
	}
	// all sets taken: a stale one is reused
	var full []Listed
	for s := uint8(1); s <= MaxSet; s++ {
		full = append(full, Listed{Number: 1, Set: s, Owned: true, PID: 77})
	}
	full[3].PID = 42
	plan = PlanSets(full, 0, 1, alive)
	if plan.Free != 4 || len(plan.Stale) != 1 {
		t.Fatalf("plan = %+v", plan)
	}
}

// TestSetOwners: Close deletes its set only when the set holds its rules
// and no one else's (after "ipfw flush" another handle may have it).
func TestSetOwners(t *testing.T) {
	rules := ParseList(`31000 set 5 divert 40000 ip from any to any in // netdivert pid=42 port=40000 prio=0
31000 set 5 divert 40000 ip from any to any out not recv * // netdivert pid=42 port=40000 prio=0
# DISABLED 31000 set 6 divert 40001 ip from any to any in // netdivert pid=42 port=40001 prio=0
31000 set 7 divert 40002 ip from any to any in // netdivert pid=43 port=40002 prio=0
31000 set 7 count ip from any to any
65535 set 31 deny ip from any to any
`)
	for _, c := range []struct {
		set          uint8
		pid          int
		port         uint16
		ours, others int
	}{
		{5, 42, 40000, 2, 0},
		{6, 42, 40001, 1, 0}, // disabled by someone: still ours to delete
		{5, 42, 40001, 0, 2}, // another handle of the process
		{5, 43, 40000, 0, 2}, // another process
		{7, 43, 40002, 1, 1},
		{8, 42, 40000, 0, 0}, // flushed
	} {
		ours, others := SetOwners(rules, c.set, c.pid, c.port)
		if ours != c.ours || others != c.others {
			t.Errorf("SetOwners(set %d, pid %d, port %d) = %d, %d; want %d, %d", c.set, c.pid, c.port, ours, others, c.ours, c.others)
		}
	}
}

func TestParseSetShow(t *testing.T) {
	d, err := ParseSetShow("disable 3 4 enable 0 1 2 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31\n")
	if err != nil || d != 1<<3|1<<4 {
		t.Fatalf("disabled = %b, %v", d, err)
	}
	d, err = ParseSetShow("enable 0 1 2 31")
	if err != nil || d != 0 {
		t.Fatalf("disabled = %b, %v", d, err)
	}
	if _, err := ParseSetShow("0 1 2"); err == nil {
		t.Fatal("no mode accepted")
	}
}

// FuzzLower checks, on random terms, that Lower never fails for a valid
// config and that every rule is well formed.
func FuzzLower(f *testing.F) {
	f.Add([]byte{byte(filter.FieldTCPDstPort), byte(filter.OpEq), 0, 80})
	f.Add([]byte{byte(filter.FieldIPSrcAddr), byte(filter.OpGe), 1, 5, byte(filter.FieldOutbound), 0, 0, 1})
	f.Add([]byte{byte(filter.FieldIPv6DstAddr), byte(filter.OpLt), 0, 9, 0xff, byte(filter.OpNe), 0, 2})
	f.Fuzz(func(t *testing.T, b []byte) {
		var l filter.Lowered
		term := filter.Term{}
		for len(b) >= 4 {
			field := filter.Field(b[0] % 88)
			op := filter.Op(b[1] % 6)
			v := filter.Value{Lo: uint64(binary.BigEndian.Uint16(b[2:4]))}
			if b[2]&0x80 != 0 {
				v.Lo |= 0xFFFF_0000_0000
			}
			if b[1]&0x80 != 0 {
				v.Neg = true
			}
			if b[1]&0x40 != 0 {
				v.Hi = uint64(b[3])
			}
			term.Conds = append(term.Conds, filter.Cond{Field: field, Op: op, Value: v})
			if b[1]&0x20 != 0 {
				l.Terms = append(l.Terms, term)
				term = filter.Term{}
			}
			b = b[4:]
		}
		l.Terms = append(l.Terms, term)
		res, err := Lower(&l, Config{Number: 31000, Set: 3, Port: 9, Tag: tag, IfName: func(uint32) (string, bool) { return "em0", true }})
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range res.Rules {
			checkWords(t, r)
			s := r.String()
			if !strings.HasPrefix(s, "add 31000 set 3 divert 9 ") || !strings.HasSuffix(s, "// "+tag) {
				t.Fatalf("malformed rule %q", s)
			}
			for _, a := range r {
				if a == "" {
					t.Fatalf("empty argument in %q", s)
				}
			}
			if !strings.Contains(s, " from ") || !strings.Contains(s, " to ") {
				t.Fatalf("no from/to in %q", s)
			}
		}
	})
}

// TestTeeOneRule: tee rules of one handle must not overlap, or a packet
// matching two of them is copied twice; several terms collapse to one rule.
func TestTeeOneRule(t *testing.T) {
	f, err := filter.Compile("tcp.DstPort == 80 or udp.DstPort == 53 or icmp", filter.LayerNetwork)
	if err != nil {
		t.Fatal(err)
	}
	div, err := Lower(f.Lower(), Config{Number: 31000, Set: 3, Port: 5000, Action: Divert})
	if err != nil {
		t.Fatal(err)
	}
	if len(div.Rules) < 2 {
		t.Fatalf("divert: want several rules, got %v", div.Rules)
	}
	tee, err := Lower(f.Lower(), Config{Number: 31000, Set: 3, Port: 5000, Action: Tee})
	if err != nil {
		t.Fatal(err)
	}
	all, err := Lower(&filter.Lowered{Terms: []filter.Term{{}}, Exact: true}, Config{Number: 31000, Set: 3, Port: 5000, Action: Tee})
	if err != nil {
		t.Fatal(err)
	}
	if tee.Exact || len(tee.Rules) != len(all.Rules) {
		t.Fatalf("tee: want the match-all rules, inexact; got %v exact=%v", tee.Rules, tee.Exact)
	}
	for i := range tee.Rules {
		if tee.Rules[i].String() != all.Rules[i].String() || strings.Contains(tee.Rules[i].String(), "tcp") {
			t.Fatalf("tee rule %q, want %q", tee.Rules[i], all.Rules[i])
		}
	}
}

// TestPlanNumber: a handle's rule number puts it after every live handle
// of higher or equal priority and before every one of lower priority.
func TestPlanNumber(t *testing.T) {
	alive := func(r Listed) bool { return r.PID != 13 }
	h := func(n uint32, prio int16, pid int) Listed {
		return Listed{Number: n, Set: 1, Owned: true, PID: pid, Port: 40000, Prio: prio}
	}
	for _, tc := range []struct {
		name  string
		rules []Listed
		prio  int16
		want  uint16
	}{
		{"alone", nil, 0, 31000},
		{"others elsewhere", []Listed{h(1000, 30000, 1), h(61000, -30000, 2)}, 0, 31000},
		{"one of equal priority", []Listed{h(31000, 0, 1)}, 0, 31001},
		{"two of equal priority", []Listed{h(31000, 0, 1), h(31001, 0, 2)}, 0, 31002},
		{"equal, with the next priority's handle above", []Listed{h(31000, 0, 1), h(31005, -5, 2)}, 0, 31001},
		{"no room: shared", []Listed{h(31000, 0, 1), h(31001, -1, 2)}, 0, 31000},
		{"a dead process's rules do not count", []Listed{h(31000, 0, 13)}, 0, 31000},
		{"foreign rules do not count", []Listed{{Number: 31000, Set: 1}}, 0, 31000},
		{"pushed above a higher priority pushed up", []Listed{h(30999, 1, 1), h(31000, 1, 2)}, 0, 31001},
		{"lowest priority, taken", []Listed{h(61000, -30000, 1)}, -30000, 61001},
		{"packed: shared with a higher priority, never before it", []Listed{h(30999, 1, 1), h(31000, 1, 2), h(31001, 1, 3), h(31002, -1, 4)}, 0, 31001},
	} {
		if got := PlanNumber(tc.rules, tc.prio, alive); got != tc.want {
			t.Errorf("%s: PlanNumber = %d, want %d", tc.name, got, tc.want)
		}
	}
}

// TestTagStart: a tag carries the process's start, so that a later process
// given the same PID is told apart; tags written before starts were (no
// start, or no priority either) still parse, with Start 0.
func TestTagStart(t *testing.T) {
	tag := Tag(42, 123456789, 40000, -5)
	if len(tag) > MaxTag || !validTag(tag) {
		t.Fatalf("tag %q invalid", tag)
	}
	longest := Tag(2147483647, 9223372036854775807, 65535, -30000)
	if len(longest) > MaxTag || !validTag(longest) {
		t.Fatalf("tag %q invalid (%d bytes)", longest, len(longest))
	}
	got := ParseList("31005 set 3 divert 40000 ip from any to any in // " + tag + "\n" +
		"31006 set 4 divert 40001 ip from any to any in // netdivert pid=42 port=40001 prio=0\n" +
		"31007 set 5 divert 40002 ip from any to any in // netdivert pid=42 port=40002 prio=0 start=0\n" +
		"31008 set 6 divert 40003 ip from any to any in // netdivert pid=42 port=40003 prio=0 begin=7\n")
	want := []Listed{
		{Number: 31005, Set: 3, Owned: true, PID: 42, Start: 123456789, Port: 40000, Prio: -5, Divert: 40000},
		{Number: 31006, Set: 4, Owned: true, PID: 42, Port: 40001, Divert: 40001},
		{Number: 31007, Set: 5, Divert: 40002}, // start=0 is never written: not ours
		{Number: 31008, Set: 6, Divert: 40003},
	}
	if len(got) != len(want) {
		t.Fatalf("got %+v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("rule %d = %+v, want %+v", i, got[i], want[i])
		}
	}
	if Tag(42, 0, 40000, 0) != "netdivert pid=42 port=40000 prio=0" {
		t.Errorf("no start: %q", Tag(42, 0, 40000, 0))
	}
	// The set of a process whose PID now runs a later process is stale,
	// and is deleted at Open.
	alive := func(r Listed) bool { return r.PID == 42 && r.Start == 999 }
	plan := PlanSets(got[:1], 0, 3, alive)
	if plan.Free != 4 || len(plan.Stale) != 1 || plan.Stale[0] != 3 {
		t.Fatalf("plan = %+v", plan)
	}
	if n := PlanNumber(got[:1], -5, alive); n != RuleNumber(-5) {
		t.Fatalf("PlanNumber = %d: a dead handle's number counted", n)
	}
}

// TestPlanRemoval: a handle's rules go with their set when the set holds
// nothing else, by set and number when the set's other rules have other
// numbers, and not at all when another rule of the set has their number:
// ipfw deletes by set and number only, and would delete it too.
func TestPlanRemoval(t *testing.T) {
	rules := ParseList(`31000 set 5 divert 40000 ip from any to any in // netdivert pid=42 port=40000 prio=0
31000 set 5 divert 40000 ip from any to any out not recv * // netdivert pid=42 port=40000 prio=0
31000 set 6 divert 40001 ip from any to any in // netdivert pid=42 port=40001 prio=0
31500 set 6 count ip from any to any
31000 set 7 divert 40002 ip from any to any in // netdivert pid=42 port=40002 prio=0
31000 set 7 count ip from any to any
31000 set 8 divert 40003 ip from any to any in // netdivert pid=42 port=40003 prio=0
31000 set 8 divert 40009 ip from any to any in // netdivert pid=43 port=40009 prio=0
31000 set 9 divert 40004 ip from any to any in // netdivert pid=42 port=40004 prio=0
31000 set 10 count ip from any to any
65535 set 31 deny ip from any to any
`)
	for _, c := range []struct {
		set  uint8
		port uint16
		want Removal
	}{
		{5, 40000, RemoveSet},
		{6, 40001, RemoveNumber}, // another number in the set
		{7, 40002, RemoveShared}, // a foreign rule with the number
		{8, 40003, RemoveShared}, // another handle's rule with the number
		{9, 40004, RemoveSet},    // the number shared across sets only
		{10, 40005, RemoveNone},  // flushed, the set someone else's now
		{11, 40006, RemoveNone},
	} {
		if got := PlanRemoval(rules, c.set, 31000, 42, c.port); got != c.want {
			t.Errorf("PlanRemoval(set %d, port %d) = %d, want %d", c.set, c.port, got, c.want)
		}
	}
}

// TestPlanSetsStaleRulesBesideOthers: a dead process's rules in a set that
// also holds another program's rule, or a live handle's, are deleted by
// number (the set is not), unless another program's rule of that set has
// their number; a set of dead rules only is deleted whole, and sets out of
// range are never touched.
func TestPlanSetsStaleRulesBesideOthers(t *testing.T) {
	rules := ParseList(`00500 set 3 allow ip from any to any // an administrator's
31000 set 3 divert 40000 ip from any to any in // netdivert pid=42 port=40000 prio=0
31000 set 3 divert 40000 ip from any to any out not recv * // netdivert pid=42 port=40000 prio=0
31000 set 4 allow ip from any to any // an administrator's, with the dead rule's number
31000 set 4 divert 40001 ip from any to any in // netdivert pid=42 port=40001 prio=0
31005 set 4 divert 40001 ip from any to any in // netdivert pid=42 port=40001 prio=-5
31001 set 5 divert 40002 ip from any to any in // netdivert pid=77 port=40002 prio=0
31000 set 5 divert 40003 ip from any to any in // netdivert pid=42 port=40003 prio=0
31000 set 6 divert 40004 ip from any to any in // netdivert pid=42 port=40004 prio=0
31002 set 7 divert 40005 ip from any to any in // netdivert pid=77 port=40005 prio=0
31000 set 0 divert 40006 ip from any to any in // netdivert pid=42 port=40006 prio=0
00600 set 0 allow ip from any to any
`)
	alive := func(r Listed) bool { return r.PID == 77 }
	plan := PlanSets(rules, 0, 1, alive)
	want := []SetNumber{{3, 31000}, {4, 31005}, {5, 31000}}
	if len(plan.StaleRules) != len(want) {
		t.Fatalf("StaleRules = %v, want %v", plan.StaleRules, want)
	}
	for i := range want {
		if plan.StaleRules[i] != want[i] {
			t.Errorf("StaleRules = %v, want %v", plan.StaleRules, want)
		}
	}
	if len(plan.Stale) != 1 || plan.Stale[0] != 6 || plan.Free != 1 {
		t.Errorf("plan = %+v; want set 6 stale, set 1 free", plan)
	}
}
