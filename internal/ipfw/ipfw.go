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
// Rule shape, one rule (or two) per Term:
//
//	add NUM set SET divert PORT PROTO from SRC to DST [src-port P] [dst-port P]
//	    [in|out] [not recv *|recv *] [recv IF] [tcpflags F] [icmptypes T]
//	    [icmp6types T] [ip4|ip6] // TAG
//
// Every rule of a handle has the same number, so that a packet written back
// with the sockaddr it was read with resumes after all of the handle's rules
// (ipfw skips every rule sharing the diverting rule's number) and is seen by
// rules with higher numbers only: lower-priority handles, as in WinDivert.
//
// Fragments: ipfw port and flag options never match a non-first fragment,
// while the divert action reassembles the datagram. A term that tests
// transport fields therefore gets a companion rule matching its non-first
// fragments ("frag"), so that the whole datagram reaches the socket instead
// of being completed by ip_input behind the handle's back.
package ipfw

import (
	"errors"
	"fmt"
	"net/netip"
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

// Rule numbers and sets that ipfw accepts for user rules.
const (
	MaxRule = 65534 // 65535 is the default rule
	MaxSet  = 30    // set 31 holds the default rule
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
	// Tag is written as the rule's comment (after "//"); it must be a few
	// words of printable ASCII without "//".
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
	if strings.Contains(cfg.Tag, "//") || strings.ContainsAny(cfg.Tag, "\n\r\x00") {
		return Result{}, errors.New("ipfw: bad rule tag")
	}
	if cfg.Action != Divert && cfg.Action != Tee && cfg.Action != Deny {
		return Result{}, fmt.Errorf("ipfw: unknown action %d", cfg.Action)
	}
	res := Result{Exact: true}
	if l == nil {
		return res, nil
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
		for _, r := range rules {
			if k := r.String(); !seen[k] {
				seen[k] = true
				res.Rules = append(res.Rules, r)
			}
		}
	}
	return res, nil
}

// Protocol numbers.
const (
	protoICMP   = 1
	protoTCP    = 6
	protoUDP    = 17
	protoICMPv6 = 58
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

const listMax = 8 // most entries in an ipfw list we emit

// rules renders the term.
func (t *term) rules(cfg *Config) ([]Rule, bool) {
	exact := !t.inexact
	var head []string // action through "to DST"
	head = append(head, "add", strconv.Itoa(int(cfg.Number)), "set", strconv.Itoa(int(cfg.Set)))
	switch cfg.Action {
	case Divert:
		head = append(head, "divert", strconv.Itoa(int(cfg.Port)))
	case Tee:
		head = append(head, "tee", strconv.Itoa(int(cfg.Port)))
	case Deny:
		head = append(head, "deny")
	}
	proto, protoOpts, ok := t.protoSpec()
	exact = exact && ok
	head = append(head, proto)

	var src, dst string
	switch {
	case t.v4 && !t.v6:
		src, ok = addrSpec(&t.src4, v4Lo, v4Hi, 32)
		exact = exact && ok
		d, ok2 := addrSpec(&t.dst4, v4Lo, v4Hi, 32)
		dst, exact = d, exact && ok2
	case t.v6 && !t.v4:
		src, ok = addrSpec(&t.src6, u128{}, maxU128, 128)
		exact = exact && ok
		d, ok2 := addrSpec(&t.dst6, u128{}, maxU128, 128)
		dst, exact = d, exact && ok2
	default:
		src, dst = "any", "any"
	}
	head = append(head, "from", src, "to", dst)

	var opts []string
	opts = append(opts, protoOpts...)
	if t.v4 != t.v6 {
		if t.v4 {
			opts = append(opts, "ip4")
		} else {
			opts = append(opts, "ip6")
		}
	}
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
	if !t.icmp.isFull(u128{}, u64(255)) {
		// ipfw's icmptypes is a 32-bit map: types above 31 cannot be listed.
		if s, ok := typeList(&t.icmp, 31); ok {
			l4 = append(l4, "icmptypes", s)
		} else {
			exact = false
		}
	}
	if !t.icmp6.isFull(u128{}, u64(255)) {
		if s, ok := typeList(&t.icmp6, 255); ok {
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
		if ok && name != "" && !strings.ContainsAny(name, " */?[") {
			iface = []string{"recv", name}
		} else {
			exact = false
		}
	}

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
		tail = append(tail, "//", cfg.Tag)
	}
	var out []Rule
	for _, d := range dirs {
		r := append(append(append(append(append(Rule{}, head...), opts...), l4...), d...), iface...)
		out = append(out, append(r, tail...))
		if len(l4) > 0 {
			// companion: the non-first fragments of the same datagrams
			c := append(append(append(append(append(Rule{}, head...), opts...), "frag"), d...), iface...)
			out = append(out, append(c, tail...))
		}
	}
	return out, exact
}

var protoNames = map[uint64]string{protoICMP: "icmp", protoTCP: "tcp", protoUDP: "udp", protoICMPv6: "ipv6-icmp"}

func protoName(p uint64) string {
	if n, ok := protoNames[p]; ok {
		return n
	}
	return strconv.FormatUint(p, 10)
}

// protoSpec renders the protocol set: the header word, and options.
func (t *term) protoSpec() (string, []string, bool) {
	if t.proto.isFull(u128{}, u64(255)) {
		return "ip", nil, true
	}
	var allowed []uint64
	for _, r := range t.proto.ranges() {
		for p := r[0].lo; p <= r[1].lo; p++ {
			allowed = append(allowed, p)
		}
	}
	switch {
	case len(allowed) == 1:
		return protoName(allowed[0]), nil, true
	case len(allowed) <= 4:
		parts := []string{"{"}
		for i, p := range allowed {
			if i > 0 {
				parts = append(parts, "or")
			}
			parts = append(parts, protoName(p))
		}
		return strings.Join(append(parts, "}"), " "), nil, true
	case 256-len(allowed) <= 4:
		var opts []string
		for p := uint64(0); p < 256; p++ {
			if !t.proto.has(u64(p)) {
				opts = append(opts, "not", "proto", protoName(p))
			}
		}
		return "ip", opts, true
	}
	return "ip", nil, false
}

// addrSpec renders an address set of a width-bit family.
func addrSpec(s *set, lo, hi u128, width int) (string, bool) {
	if s.isFull(lo, hi) {
		return "any", true
	}
	if s.lo == lo && s.hi == hi && len(s.ne) == 1 {
		return "not " + addrText(s.ne[0], width), true
	}
	var parts []string
	for _, r := range s.ranges() {
		cs, ok := cidrs(r[0], r[1], width, listMax-len(parts))
		if !ok {
			c := cover(s.lo, s.hi, width)
			return cidrText(c, width), false
		}
		for _, c := range cs {
			parts = append(parts, cidrText(c, width))
		}
	}
	return strings.Join(parts, ","), true
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
