// Package ipfw turns a lowered filter (filter.Lowered) into FreeBSD ipfw(8)
// rules that divert, tee or deny what the filter can match, and parses the
// parts of ipfw's output that the divert backend needs to clean up after
// itself. It is pure Go with no build tags: the rule text is tested on every
// OS; only the backend runs /sbin/ipfw.
//
// The rules over-approximate the filter: every packet the filter matches is
// matched by some rule, and Result.Exact says whether the reverse holds too.
// When it does not, user space finishes the match with (*filter.Filter).Match
// and writes non-matching packets straight back.
//
// Rule shape, one rule (or two) per Term and direction:
//
//	add NUM set SET divert|tee PORT|deny PROTO from SRC to DST [ip4|ip6]
//	    [not proto P ...] [src-port P] [dst-port P] [tcpflags F]
//	    [icmptypes T] [icmp6types T] [not ext6hdr H] in|out
//	    [not recv *|recv *] [recv IF] // TAG
//
// followed by the fragment companions and the IPv6 unclear rules described
// below.
//
// The syntax was checked against FreeBSD 14's ipfw(8) manual page and its
// parser (sbin/ipfw/ipfw2.c, ipv6.c, main.c); the comments below name the
// manual section that defines each construct. Every word is its own argv
// element: ipfw(8) run with more than one argument does not split them
// again (main.c only glues an argument ending in "," to the next one), so
// "{", "or", "}" and "not" must be separate arguments.
//
// Every rule of a handle has the same number, so that a packet written back
// with the sockaddr it was read with resumes after all of the handle's rules
// (ipfw skips every rule sharing the diverting rule's number) and is seen by
// rules with higher numbers only: lower-priority handles, as in WinDivert,
// and handles of equal priority opened later, which PlanNumber puts above.
//
// Fragments: ipfw port and flag options never match a non-first fragment
// (ipfw(8) PACKET SELECTION, "ports"; RULE OPTIONS, tcpflags), while the
// divert action reassembles the datagram. A term that tests transport
// fields therefore gets companion rules that take every fragment of every
// datagram of its protocol and addresses, so that the datagram reaches the
// socket whole, and its rules are not exact: user space judges the whole
// datagram and writes back the ones the filter does not match. Were only
// the later fragments taken, an IPv4 datagram whose first fragment fails the
// port test would go on without them and die in divert's reassembly queue.
// ipfw(8) RULE OPTIONS, "frag spec": since FreeBSD 13 frag takes an optional
// list (df, mf, rf, offset) that tests IPv4 only, and an empty list keeps the
// old meaning, a non-zero fragment offset, "both IPv4 and IPv6". The parser
// takes the next argument as that list only if every comma-separated word of
// it is one of those flags, so the "in"/"out" that follows here is never
// swallowed. "frag" takes the IPv4 fragments at a non-zero offset, "frag mf"
// the IPv4 ones with more to come (the first among them). For IPv6, bare
// frag takes the fragments at a non-zero offset only (ipfw_chk, O_FRAG:
// "cmd->arg1 == 0x1 && offset != 0", where the IPv6 offset is ip6f_offlg &
// IP6F_OFF_MASK, without the more-fragments bit), and "frag mf" none; the
// IPv6 fragments, the first among them, are taken by the unclear rules'
// "ext6hdr frag" instead (divert reassembles IPv6 too, with frag6_input,
// when the Fragment header follows the IPv6 header). A tee does not
// reassemble, and would copy a first fragment that the transport rule teed
// twice: tee rules get no companions.
//
// IPv6 extension headers: ipfw_chk walks them itself (the IPv6 branch before
// the rules, "Search extension headers to find upper layer protocols"), and
// its proto, ports and types are not always WinDivert's (internal/packet
// Parse):
//   - Mobility (135) is unknown to ipfw. With
//     net.inet6.ip6.fw.deny_unknown_exthdrs=1, the default (vnet_ipfw_init),
//     ipfw_chk drops the packet before any rule, as it does any unknown
//     next header; with 0 its walk ends there with proto 135, while
//     WinDivert walks past it to, say, UDP;
//   - a second Fragment header ends WinDivert's walk (protocol 44), not
//     ipfw's;
//   - with net.inet6.ip6.fw.permit_single_frag6=0 (and deny_unknown_exthdrs
//     0), an atomic fragment (offset 0, no more fragments) ends ipfw's walk
//     at its Fragment header, with the next header for proto and no ports;
//   - a hop-by-hop, routing, destination options or authentication header
//     that WinDivert finds cut short ends its walk with that header's
//     number; ipfw adds the header's length without checking it and walks
//     on: to "no next header" (59), which needs no more bytes, or, at the
//     inbound hook, which ip6_input runs before it trims the mbuf to the
//     IPv6 length, into whatever bytes trail the datagram. (Headers cut
//     short otherwise make a PULLUP fail, and ipfw_chk drops the packet
//     before any rule: nothing bypasses.)
//
// Hop-by-hop, routing, destination options, AH, ESP, non-first fragments
// and other protocols are otherwise walked alike. A term whose rule tests
// what the walk finds (a protocol, a port, a TCP flag, an ICMPv6 type) and
// that can match IPv6 therefore gets, like the Linux backend's v6Unclear
// rules, rules that take those packets whatever the filter, for user space
// to judge: "135 ... ip6" unless its protocols take 135 already, and
// "ip ... ip6 ext6hdr frag", to which hopopt, route, dstopt and ah are added
// when the term's protocols hold 0, 43, 60 or 51 (the numbers WinDivert
// gives a packet whose such header is cut short). ipfw has no ext6hdr bit
// for Mobility (ipv6.c ext6hdrcodes: frag, hopopt, route, dstopt, ah, esp,
// rthdr0, rthdr2), and ipfw_chk sets a header's bit whenever it walks the
// header, so these rules take every packet of the classes above. The rules
// are then inexact. Tee rules must not overlap: the term's other rules get
// "not ext6hdr ...".
package ipfw

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/netdivert/divert/filter"
)

// Action is what a rule does with a matching packet.
type Action uint8

// Actions.
const (
	// Divert takes the packet out of the stack to the divert socket.
	Divert Action = iota
	// Tee sends a copy to the divert socket; the packet continues.
	Tee
	// Deny drops the packet.
	Deny
)

// Rule numbers and sets that ipfw accepts for user rules (ipfw(8) RULE
// FORMAT, rule_number and set set_number; SETS OF RULES).
const (
	MaxRule = 65534 // 65535 is the default rule
	MaxSet  = 30    // set 31 holds the default rule
	// MaxTag is the longest rule comment ipfw accepts (ipfw2.c fill_comment:
	// "comment too long (max 80 chars)").
	MaxTag = 80
)

// Config says where and how the rules go.
type Config struct {
	Number  uint16 // rule number, 1..MaxRule; every rule of the handle has it
	Set     uint8  // rule set, 0..MaxSet
	Port    uint16 // divert or tee port (ignored for Deny)
	Action  Action
	Forward bool // LayerNetworkForward instead of LayerNetwork
	// IfName maps an interface index to its name, for ifIdx tests. Nil, or
	// a false result, leaves the test to user space.
	IfName func(idx uint32) (string, bool)
	// Tag is written as the rule's comment (after "//", ipfw(8) RULE
	// OPTIONS "// this is a comment"); it must be at most MaxTag bytes of
	// printable ASCII without "//", must not start with "/" (ipfw takes a
	// last argument starting with "/" as a file of commands) and must not
	// end with "," (ipfw glues such an argument to the next one).
	Tag string
}

// Rule is one ipfw rule as the arguments that follow "ipfw" on a command
// line (no shell quoting needed: run it with exec, not a shell).
type Rule []string

// String returns the rule as one line.
func (r Rule) String() string { return strings.Join(r, " ") }

// Result is the lowering of a filter.
type Result struct {
	Rules []Rule
	// Exact is set when the rules match exactly the packets the filter
	// matches, so user space need not evaluate the filter again.
	Exact bool
}

// RuleNumber maps a handle priority (-30000..30000, higher first) to an
// ipfw rule number (lower first): 1000 for the highest priority, 31000 for
// priority 0, 61000 for the lowest.
func RuleNumber(priority int16) uint16 {
	p := int(priority)
	if p > 30000 {
		p = 30000
	}
	if p < -30000 {
		p = -30000
	}
	return uint16(1000 + 30000 - p)
}

// Lower turns l into rules. A nil or empty l gives no rules: the filter
// matches nothing.
func Lower(l *filter.Lowered, cfg Config) (Result, error) {
	if cfg.Number == 0 || cfg.Number > MaxRule {
		return Result{}, fmt.Errorf("ipfw: rule number %d out of range [1, %d]", cfg.Number, MaxRule)
	}
	if cfg.Set > MaxSet {
		return Result{}, fmt.Errorf("ipfw: set %d out of range [0, %d]", cfg.Set, MaxSet)
	}
	if !validTag(cfg.Tag) {
		return Result{}, fmt.Errorf("ipfw: bad rule tag %q", cfg.Tag)
	}
	if cfg.Action != Divert && cfg.Action != Tee && cfg.Action != Deny {
		return Result{}, fmt.Errorf("ipfw: unknown action %d", cfg.Action)
	}
	if cfg.Action != Deny && cfg.Port == 0 {
		// ipfw(8) RULE ACTIONS, divert port / tee port: ipfw2.c rejects
		// port 0 ("illegal divert/tee port").
		return Result{}, errors.New("ipfw: divert/tee port 0")
	}
	res, terms, err := lower(l, cfg)
	if err != nil {
		return Result{}, err
	}
	if cfg.Action == Tee && terms > 1 {
		// ipfw(8) RULE ACTIONS, tee: the packet continues with the next
		// rule, so rules of two Terms that both match would send two
		// copies (the rules of one Term are disjoint). The rules of the
		// match-all Term instead; user space discards the copies the filter
		// does not match.
		all, _, err := lower(&filter.Lowered{Terms: []filter.Term{{}}}, cfg)
		if err != nil {
			return Result{}, err
		}
		all.Exact = false
		return all, nil
	}
	return res, nil
}

// lower turns the Terms into rules, one or more per Term, and counts the
// Terms that gave rules.
func lower(l *filter.Lowered, cfg Config) (res Result, terms int, err error) {
	res = Result{Exact: true}
	if l == nil {
		return res, 0, nil
	}
	res.Exact = l.Exact
	seen := map[string]bool{}
	for i := range l.Terms {
		t := newTerm()
		for _, c := range l.Terms[i].Conds {
			t.cond(c)
		}
		t.endpoints(l.Terms[i].Conds)
		if t.unsat() {
			continue // this term matches nothing
		}
		rules, exact := t.rules(&cfg)
		if !exact {
			res.Exact = false
		}
		added := false
		for _, r := range rules {
			if k := r.String(); !seen[k] {
				seen[k] = true
				res.Rules = append(res.Rules, r)
				added = true
			}
		}
		if added {
			terms++
		}
	}
	return res, terms, nil
}

func validTag(tag string) bool {
	if tag == "" {
		return true
	}
	if len(tag) > MaxTag || strings.Contains(tag, "//") || tag[0] == '/' || tag[len(tag)-1] == ',' ||
		strings.TrimSpace(tag) != tag {
		return false
	}
	for i := 0; i < len(tag); i++ {
		if tag[i] < 0x20 || tag[i] > 0x7e {
			return false
		}
	}
	return true
}

// Protocol numbers.
const (
	protoHopOpts  = 0
	protoICMP     = 1
	protoTCP      = 6
	protoUDP      = 17
	protoRouting  = 43
	protoAH       = 51
	protoICMPv6   = 58
	protoDstOpts  = 60
	protoMobility = 135
)

// TCP flags in ipfw's spelling, in the order ipfw prints them.
var tcpFlagNames = [...]string{"fin", "syn", "rst", "psh", "ack", "urg"}

var (
	v4Lo = u128{0, 0xFFFF_0000_0000}
	v4Hi = u128{0, 0xFFFF_FFFF_FFFF}
)

// term collects what one Term allows.
type term struct {
	in, out    bool
	v4, v6     bool
	proto      set // 0..255
	src4, dst4 set // IPv4-mapped values
	src6, dst6 set
	sport      set
	dport      set
	icmp       set // ICMP type (IPv4)
	icmp6      set // ICMPv6 type
	ifIdx      set
	flags      [6][2]bool // allowed values per TCP flag
	never      bool       // a constant test is false
	inexact    bool
	l4         bool // a transport field is tested (needs the fragment companion)
}

func newTerm() *term {
	t := &term{
		in: true, out: true, v4: true, v6: true,
		proto: fullSet(u128{}, u64(255)),
		src4:  fullSet(v4Lo, v4Hi), dst4: fullSet(v4Lo, v4Hi),
		src6: fullSet(u128{}, maxU128), dst6: fullSet(u128{}, maxU128),
		sport: fullSet(u128{}, u64(65535)), dport: fullSet(u128{}, u64(65535)),
		icmp: fullSet(u128{}, u64(255)), icmp6: fullSet(u128{}, u64(255)),
		ifIdx: fullSet(u128{}, u64(0xFFFFFFFF)),
	}
	for i := range t.flags {
		t.flags[i] = [2]bool{true, true}
	}
	return t
}

// boolean returns which of 0 and 1 satisfy "x op v".
func boolean(op filter.Op, v filter.Value) (zero, one bool) {
	s := fullSet(u128{}, u64(1))
	s.apply(op, v)
	return s.has(u128{}), s.has(u64(1))
}

func (t *term) onlyV4()         { t.v6 = false }
func (t *term) onlyV6()         { t.v4 = false }
func (t *term) onlyProto(p int) { t.proto.intersect(u64(uint64(p)), u64(uint64(p))) }

func (t *term) cond(c filter.Cond) {
	f := c.Field
	// Presence implied by the field (Cond holds only when it is present).
	switch {
	case f >= filter.FieldIPHdrLength && f <= filter.FieldIPDstAddr:
		t.onlyV4()
	case f >= filter.FieldIPv6TrafficClass && f <= filter.FieldIPv6DstAddr:
		t.onlyV6()
	case f >= filter.FieldICMPType && f <= filter.FieldICMPBody:
		t.onlyV4()
		t.onlyProto(protoICMP)
	case f >= filter.FieldICMPv6Type && f <= filter.FieldICMPv6Body:
		t.onlyV6()
		t.onlyProto(protoICMPv6)
	case f >= filter.FieldTCPSrcPort && f <= filter.FieldTCPPayload32:
		t.onlyProto(protoTCP)
		t.l4 = true
	case f >= filter.FieldUDPSrcPort && f <= filter.FieldUDPPayload32:
		t.onlyProto(protoUDP)
		t.l4 = true
	}
	switch f {
	case filter.FieldZero, filter.FieldFalse, filter.FieldTrue:
		var v u128
		if f == filter.FieldTrue {
			v = u64(1)
		}
		s := fullSet(u128{}, maxU128)
		s.apply(c.Op, c.Value)
		if !s.has(v) {
			t.never = true
		}
	case filter.FieldOutbound, filter.FieldInbound:
		zero, one := boolean(c.Op, c.Value)
		isOut, isIn := one, zero
		if f == filter.FieldInbound {
			isOut, isIn = zero, one
		}
		t.out = t.out && isOut
		t.in = t.in && isIn
	case filter.FieldIP, filter.FieldIPv6:
		zero, one := boolean(c.Op, c.Value)
		if f == filter.FieldIP {
			t.v4 = t.v4 && one
			t.v6 = t.v6 && zero
		} else {
			t.v6 = t.v6 && one
			t.v4 = t.v4 && zero
		}
	case filter.FieldTCP, filter.FieldUDP, filter.FieldICMP, filter.FieldICMPv6:
		zero, one := boolean(c.Op, c.Value)
		p := map[filter.Field]int{filter.FieldTCP: protoTCP, filter.FieldUDP: protoUDP, filter.FieldICMP: protoICMP, filter.FieldICMPv6: protoICMPv6}[f]
		switch {
		case !zero && !one:
			t.never = true
		case !zero:
			t.onlyProto(p)
			if f == filter.FieldICMP {
				t.onlyV4()
			}
			if f == filter.FieldICMPv6 {
				t.onlyV6()
			}
			// A datagram of that protocol whose header does not parse is
			// "not tcp" for WinDivert but "tcp" for ipfw: over-approximate.
			t.inexact = true
		case !one:
			// "not tcp" also holds for a protocol-6 datagram with a
			// malformed header: ipfw cannot say so; leave it to user space.
			t.inexact = true
		}
	case filter.FieldProtocol, filter.FieldIPProtocol:
		t.proto.apply(c.Op, c.Value)
	case filter.FieldIPSrcAddr:
		t.src4.apply(c.Op, c.Value)
	case filter.FieldIPDstAddr:
		t.dst4.apply(c.Op, c.Value)
	case filter.FieldIPv6SrcAddr:
		t.src6.apply(c.Op, c.Value)
	case filter.FieldIPv6DstAddr:
		t.dst6.apply(c.Op, c.Value)
	case filter.FieldTCPSrcPort, filter.FieldUDPSrcPort:
		t.sport.apply(c.Op, c.Value)
	case filter.FieldTCPDstPort, filter.FieldUDPDstPort:
		t.dport.apply(c.Op, c.Value)
	case filter.FieldICMPType:
		t.icmp.apply(c.Op, c.Value)
	case filter.FieldICMPv6Type:
		t.icmp6.apply(c.Op, c.Value)
	case filter.FieldTCPFin, filter.FieldTCPSyn, filter.FieldTCPRst, filter.FieldTCPPsh, filter.FieldTCPAck, filter.FieldTCPUrg:
		i := map[filter.Field]int{filter.FieldTCPFin: 0, filter.FieldTCPSyn: 1, filter.FieldTCPRst: 2, filter.FieldTCPPsh: 3, filter.FieldTCPAck: 4, filter.FieldTCPUrg: 5}[f]
		zero, one := boolean(c.Op, c.Value)
		t.flags[i][0] = t.flags[i][0] && zero
		t.flags[i][1] = t.flags[i][1] && one
	case filter.FieldIfIdx:
		t.ifIdx.apply(c.Op, c.Value)
	default:
		// Everything else (lengths, TTL, payload bytes, loopback, ...) is
		// left to user space; the presence it implies was applied above.
		t.inexact = true
	}
}

// endpoints applies localAddr/remoteAddr/localPort/remotePort, which need
// the direction and family the other tests fixed.
func (t *term) endpoints(conds []filter.Cond) {
	for _, c := range conds {
		var local bool
		switch c.Field {
		case filter.FieldLocalAddr, filter.FieldLocalPort:
			local = true
		case filter.FieldRemoteAddr, filter.FieldRemotePort:
		default:
			continue
		}
		if t.in == t.out { // direction unknown (or impossible)
			t.inexact = true
			continue
		}
		// local is the source of an outbound packet, the destination of an
		// inbound one.
		src := local == t.out
		switch c.Field {
		case filter.FieldLocalAddr, filter.FieldRemoteAddr:
			switch {
			case t.v4 && !t.v6:
				if src {
					t.src4.apply(c.Op, c.Value)
				} else {
					t.dst4.apply(c.Op, c.Value)
				}
			case t.v6 && !t.v4:
				if src {
					t.src6.apply(c.Op, c.Value)
				} else {
					t.dst6.apply(c.Op, c.Value)
				}
			default:
				t.inexact = true
			}
		default:
			// Ports are TCP/UDP ports only when the protocol is one of them
			// (ICMP reports its type, other protocols 0).
			if t.proto.empty || t.proto.has(u64(protoICMP)) || t.proto.has(u64(protoICMPv6)) ||
				!onlyTCPUDP(&t.proto) {
				t.inexact = true
				continue
			}
			t.l4 = true
			if src {
				t.sport.apply(c.Op, c.Value)
			} else {
				t.dport.apply(c.Op, c.Value)
			}
		}
	}
}

func onlyTCPUDP(s *set) bool {
	for _, r := range s.ranges() {
		for p := r[0].lo; p <= r[1].lo; p++ {
			if p != protoTCP && p != protoUDP {
				return false
			}
		}
	}
	return true
}

func (t *term) unsat() bool {
	if t.never || (!t.in && !t.out) || (!t.v4 && !t.v6) || t.proto.empty ||
		t.sport.empty || t.dport.empty || t.icmp.empty || t.icmp6.empty || t.ifIdx.empty {
		return true
	}
	if t.v4 && !t.v6 && (t.src4.empty || t.dst4.empty) {
		return true
	}
	if t.v6 && !t.v4 && (t.src6.empty || t.dst6.empty) {
		return true
	}
	if t.src4.empty || t.dst4.empty {
		t.v4 = false
	}
	if t.src6.empty || t.dst6.empty {
		t.v6 = false
	}
	for _, f := range t.flags {
		if !f[0] && !f[1] {
			return true
		}
	}
	return !t.v4 && !t.v6
}

// Most entries in an address or port list we emit. ipfw(8) PACKET SELECTION
// allows 30 ports or ranges; an IPv4 list entry takes 2 instruction words
// and an IPv6 one 8, in an instruction of at most 63 words (ipv6.c fill_ip6:
// "address list too long"), so IPv6 lists stop at 7.
const (
	listMax   = 8
	listMaxV6 = 7
)

// icmp6MaxType is ICMP6_MAXTYPE of FreeBSD's <netinet/icmp6.h>: ipv6.c
// fill_icmp6types rejects larger types ("ICMP6 type out of range") and the
// kernel never matches them.
const icmp6MaxType = 201

// rules renders the term.
func (t *term) rules(cfg *Config) ([]Rule, bool) {
	exact := !t.inexact
	var act []string // "add" through the action
	// ipfw(8) RULE FORMAT: [rule_number] [set set_number] action body.
	act = append(act, "add", strconv.Itoa(int(cfg.Number)), "set", strconv.Itoa(int(cfg.Set)))
	// ipfw(8) RULE ACTIONS: "divert port", "tee port", "deny".
	switch cfg.Action {
	case Divert:
		act = append(act, "divert", strconv.Itoa(int(cfg.Port)))
	case Tee:
		act = append(act, "tee", strconv.Itoa(int(cfg.Port)))
	case Deny:
		act = append(act, "deny")
	}
	proto, protoOpts, ok := t.protoSpec()
	exact = exact && ok

	// ipfw(8) PACKET SELECTION, "addr": any, [not] addr[/masklen] and
	// comma-separated lists of them (IPv4: ip-addr; IPv6: ip6-addr).
	src, dst := []string{"any"}, []string{"any"}
	switch {
	case t.v4 && !t.v6:
		var ok1, ok2 bool
		src, ok1 = addrSpec(&t.src4, v4Lo, v4Hi, 32, listMax)
		dst, ok2 = addrSpec(&t.dst4, v4Lo, v4Hi, 32, listMax)
		exact = exact && ok1 && ok2
	case t.v6 && !t.v4:
		var ok1, ok2 bool
		src, ok1 = addrSpec(&t.src6, u128{}, maxU128, 128, listMaxV6)
		dst, ok2 = addrSpec(&t.dst6, u128{}, maxU128, 128, listMaxV6)
		exact = exact && ok1 && ok2
	}
	var addrs []string // "from SRC to DST"
	addrs = append(addrs, "from")
	addrs = append(addrs, src...)
	addrs = append(addrs, "to")
	addrs = append(addrs, dst...)
	head := append(append(append([]string{}, act...), proto...), addrs...) // action through "to DST"

	var opts []string
	if t.v4 != t.v6 {
		// ipfw(8) RULE OPTIONS: "ip4 | ipv4", "ip6 | ipv6". Needed also
		// next to addresses: "not ADDR" holds for the other family.
		if t.v4 {
			opts = append(opts, "ip4")
		} else {
			opts = append(opts, "ip6")
		}
	}
	opts = append(opts, protoOpts...)
	// ipfw(8) RULE OPTIONS: "src-port ports", "dst-port ports" (ports as
	// in PACKET SELECTION: port or port-port, comma-separated),
	// "tcpflags spec" (comma-separated, "!" for absence), "icmptypes types"
	// and "icmp6types types" (comma-separated single types, no ranges).
	var l4 []string
	if p, ok := portSpec(&t.sport); p != "" {
		l4 = append(l4, "src-port", p)
		exact = exact && ok
	}
	if p, ok := portSpec(&t.dport); p != "" {
		l4 = append(l4, "dst-port", p)
		exact = exact && ok
	}
	var fl []string
	for i, f := range t.flags {
		switch {
		case f[0] && !f[1]:
			fl = append(fl, "!"+tcpFlagNames[i])
		case f[1] && !f[0]:
			fl = append(fl, tcpFlagNames[i])
		}
	}
	if len(fl) > 0 {
		l4 = append(l4, "tcpflags", strings.Join(fl, ","))
	}
	if len(l4) > 0 && t.proto.has(u64(protoTCP)) {
		// ipfw_chk reads the ports and flags of any 20 bytes of TCP header,
		// whatever its data offset; WinDivert has no TCP header below a
		// data offset of 5, so tcp.DstPort and tcp.Syn are false for it.
		exact = false
	}
	if !t.icmp.isFull(u128{}, u64(255)) {
		// ipfw's icmptypes is a 32-bit map: types above 31 cannot be listed.
		if s, ok := typeList(&t.icmp, 31); ok {
			l4 = append(l4, "icmptypes", s)
		} else {
			exact = false
		}
	}
	if !t.icmp6.isFull(u128{}, u64(255)) {
		if s, ok := typeList(&t.icmp6, icmp6MaxType); ok {
			l4 = append(l4, "icmp6types", s)
		} else {
			exact = false
		}
	}

	var iface []string
	if !t.ifIdx.isFull(u128{}, u64(0xFFFFFFFF)) {
		name, ok := "", false
		if t.in && !t.out && !cfg.Forward && t.ifIdx.lo == t.ifIdx.hi && cfg.IfName != nil {
			name, ok = cfg.IfName(uint32(t.ifIdx.lo.lo))
		}
		if ok && validIfName(name) {
			// ipfw(8) RULE OPTIONS, "recv | xmit | via {ifX | if* | ...}".
			iface = []string{"recv", name}
		} else {
			exact = false
		}
	}

	// ipfw(8) RULE OPTIONS, "in | out" and "recv ... if*": "packets
	// originating from the local host have no receive interface". The
	// pattern "*" (ipfw2.c fill_iface: a name with "*", "?" or "[" is a
	// shell pattern) matches any interface, and no interface at all fails
	// the match, so "out recv *" is a forwarded packet and "out not recv *"
	// a locally generated one. ("recv any" would not do: ipfw drops that
	// test from the rule, together with its "not".)
	var dirs [][]string
	if cfg.Forward {
		// Forwarded packets carry their receive interface on the way out;
		// locally generated ones have none. Take each forwarded packet once.
		dirs = [][]string{{"out", "recv", "*"}}
	} else {
		// Inbound: everything (packets to be forwarded cannot be told apart
		// before routing: an over-approximation). Outbound: not forwarded.
		if t.in {
			dirs = append(dirs, []string{"in"})
		}
		if t.out {
			dirs = append(dirs, []string{"out", "not", "recv", "*"})
		}
		exact = false // inbound forwarded packets, see above
	}

	tail := []string{}
	if cfg.Tag != "" {
		// ipfw(8) RULE OPTIONS, "// this is a comment": everything after
		// "//" is the comment, so it goes last.
		tail = append(tail, "//", cfg.Tag)
	}
	// Companions: the fragments of the same datagrams, which the transport
	// tests cannot judge (see the package comment): "frag" takes the IPv4
	// fragments at a non-zero offset, "frag mf" the IPv4 ones with more to
	// come, the first among them. Every fragment of a datagram then goes to
	// the socket, which reassembles it, and user space judges the whole
	// datagram: the rules are no longer exact. The IPv6 fragments, the first
	// among them, are the unclear rules' below (ipfw's bare frag takes the
	// IPv6 ones at a non-zero offset only). A tee does not reassemble and a
	// first fragment the transport rule teed would be teed twice, so it gets
	// none.
	var companions [][]string
	if len(l4) > 0 && cfg.Action != Tee {
		if t.v4 {
			companions = append(companions, []string{"frag"}, []string{"frag", "mf"})
		}
		exact = false
	}

	// The unclear rules (see the package comment): IPv6 packets whose
	// headers ipfw walks otherwise than WinDivert go to the socket whatever
	// their protocol, for user space to judge. Only a rule that tests what
	// the walk finds (a protocol, a port, a flag, a type) needs them.
	var unclear [][]string // the body from the protocol through the options
	var notExt []string    // for the term's own rule
	walked := len(proto) != 1 || proto[0] != "ip" || len(protoOpts) > 0 || len(l4) > 0
	if t.v6 && walked {
		exts := "frag"
		for _, p := range []uint64{protoHopOpts, protoRouting, protoAH, protoDstOpts} {
			if t.proto.has(u64(p)) {
				// A header WinDivert finds cut short ends its walk
				// with that header's number for the protocol; ipfw
				// walks on past the end of the datagram.
				exts = "frag,hopopt,route,dstopt,ah"
				break
			}
		}
		ext := []string{"ext6hdr", exts}
		if !t.protoAccepts(proto, protoOpts, protoMobility) {
			// ipfw ends its walk at a Mobility header (unless
			// deny_unknown_exthdrs drops the packet), WinDivert walks
			// past it.
			u := append(append([]string{protoName(protoMobility)}, addrs...), "ip6")
			if cfg.Action == Tee {
				u = append(append(u, "not"), ext...)
			}
			unclear = append(unclear, u)
		}
		unclear = append(unclear, append(append(append([]string{"ip"}, addrs...), "ip6"), ext...))
		if cfg.Action == Tee {
			// Tee rules must not overlap: the packets of the ext6hdr rule
			// are its own.
			notExt = append([]string{"not"}, ext...)
		}
		exact = false
	}

	var out []Rule
	for _, d := range dirs {
		r := append(append(append(append(append(append(Rule{}, head...), opts...), l4...), notExt...), d...), iface...)
		out = append(out, append(r, tail...))
		for _, fr := range companions {
			c := append(append(append(append(append(Rule{}, head...), opts...), fr...), d...), iface...)
			out = append(out, append(c, tail...))
		}
		for _, u := range unclear {
			c := append(append(append(append(Rule{}, act...), u...), d...), iface...)
			out = append(out, append(c, tail...))
		}
	}
	return out, exact
}

// protoAccepts reports whether the rendered protocol words and options
// (protoSpec) take packets for which ipfw found protocol p.
func (t *term) protoAccepts(proto, opts []string, p uint64) bool {
	if len(proto) == 1 && proto[0] == "ip" {
		// "ip", perhaps with "not proto NAME" options
		return !slices.Contains(opts, protoName(p))
	}
	return t.proto.has(u64(p))
}

var protoNames = map[uint64]string{protoICMP: "icmp", protoTCP: "tcp", protoUDP: "udp", protoICMPv6: "ipv6-icmp"}

func protoName(p uint64) string {
	if n, ok := protoNames[p]; ok {
		return n
	}
	return strconv.FormatUint(p, 10)
}

// protoSpec renders the protocol set: the words of the header protocol,
// option words, and whether they match exactly the set. ipfw(8) PACKET
// SELECTION, "proto: protocol | { protocol or ... }", a name from
// /etc/protocols or a number; "ip" (or "all") is every protocol. RULE
// OPTIONS, "proto protocol", with "not" in front (RULE OPTIONS: options may
// be prefixed by "not"). ipfw2.c add_proto0 refuses protocol 0 (the kernel
// reserves an O_PROTO argument of 0), so a set that needs 0 named is
// widened instead.
func (t *term) protoSpec() ([]string, []string, bool) {
	if t.proto.isFull(u128{}, u64(255)) {
		return []string{"ip"}, nil, true
	}
	var allowed []uint64
	for _, r := range t.proto.ranges() {
		for p := r[0].lo; p <= r[1].lo; p++ {
			allowed = append(allowed, p)
		}
	}
	switch {
	case allowed[0] == 0 && 256-len(allowed) > 4:
		return []string{"ip"}, nil, false
	case len(allowed) == 1:
		return []string{protoName(allowed[0])}, nil, true
	case len(allowed) <= 4:
		words := []string{"{"}
		for i, p := range allowed {
			if i > 0 {
				words = append(words, "or")
			}
			words = append(words, protoName(p))
		}
		return append(words, "}"), nil, true
	case 256-len(allowed) <= 4:
		var opts []string
		exact := true
		for p := uint64(0); p < 256; p++ {
			if t.proto.has(u64(p)) {
				continue
			}
			if p == 0 {
				exact = false // cannot be written; leave to user space
				continue
			}
			opts = append(opts, "not", "proto", protoName(p))
		}
		return []string{"ip"}, opts, exact
	}
	return []string{"ip"}, nil, false
}

// addrSpec renders an address set of a width-bit family as the words of an
// ipfw address ("any", "not" ADDR, or a comma-separated list of at most
// max addr[/masklen]), and whether they match exactly the set.
func addrSpec(s *set, lo, hi u128, width, max int) ([]string, bool) {
	if s.isFull(lo, hi) {
		return []string{"any"}, true
	}
	if s.lo == lo && s.hi == hi && len(s.ne) == 1 {
		return []string{"not", addrText(s.ne[0], width)}, true
	}
	var parts []string
	for _, r := range s.ranges() {
		cs, ok := cidrs(r[0], r[1], width, max-len(parts))
		if !ok {
			c := cover(s.lo, s.hi, width)
			return []string{cidrText(c, width)}, false
		}
		for _, c := range cs {
			parts = append(parts, cidrText(c, width))
		}
	}
	return []string{strings.Join(parts, ",")}, true
}

// validIfName reports whether name can follow "recv" as an exact interface
// name: ipfw2.c fill_iface reads "any" as no test at all, "table(" as a
// lookup table, a leading digit as an IPv4 address and "*", "?" or "[" as a
// shell pattern, and keeps at most IFNAMSIZ-1 (15) bytes.
func validIfName(name string) bool {
	if name == "" || len(name) > 15 || name == "any" || strings.HasPrefix(name, "table(") ||
		(name[0] >= '0' && name[0] <= '9') || name[0] == '/' || name[len(name)-1] == ',' {
		return false
	}
	for i := 0; i < len(name); i++ {
		switch c := name[i]; {
		case c <= 0x20 || c >= 0x7f, c == '*', c == '?', c == '[':
			return false
		}
	}
	return true
}

func addrText(a u128, width int) string {
	if width == 32 {
		v := uint32(a.lo)
		return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}).String()
	}
	var b [16]byte
	for i := 0; i < 8; i++ {
		b[i] = byte(a.hi >> (56 - 8*i))
		b[8+i] = byte(a.lo >> (56 - 8*i))
	}
	return netip.AddrFrom16(b).String()
}

func cidrText(c cidr, width int) string {
	if c.bits == width {
		return addrText(c.base, width)
	}
	return addrText(c.base, width) + "/" + strconv.Itoa(c.bits)
}

// portSpec renders a port set, "" when it is every port.
func portSpec(s *set) (string, bool) {
	if s.isFull(u128{}, u64(65535)) {
		return "", true
	}
	rs := s.ranges()
	exact := true
	if len(rs) > listMax {
		rs = [][2]u128{{s.lo, s.hi}}
		exact = false
	}
	parts := make([]string, 0, len(rs))
	for _, r := range rs {
		if r[0] == r[1] {
			parts = append(parts, strconv.FormatUint(r[0].lo, 10))
		} else {
			parts = append(parts, strconv.FormatUint(r[0].lo, 10)+"-"+strconv.FormatUint(r[1].lo, 10))
		}
	}
	return strings.Join(parts, ","), exact
}

// typeList renders a set of ICMP types as ipfw's comma list, when every
// member is at most max.
func typeList(s *set, max uint64) (string, bool) {
	var parts []string
	for _, r := range s.ranges() {
		if r[1].lo > max {
			return "", false
		}
		for v := r[0].lo; v <= r[1].lo; v++ {
			parts = append(parts, strconv.FormatUint(v, 10))
		}
	}
	return strings.Join(parts, ","), true
}
