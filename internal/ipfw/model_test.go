package ipfw

// A model of FreeBSD's ipfw_chk (sys/netpfil/ipfw/ip_fw2.c, FreeBSD 14):
// the header walk that fills proto, offset, ports, ext_hd and ulp before
// any rule is looked at (a PULLUP_TO that fails returns IP_FW_DENY from the
// pullup_failed label: the packet is dropped), and the opcodes of the rule
// words Lower emits. The tests run WinDivert's filter (filter.Match, which
// parses like internal/packet) and the model on the same packets and check
// that the rules never under-approximate: a packet the filter matches is
// taken by a rule or dropped by ipfw before the rules; and that exact rules
// take no packet the filter does not match, and tee rules take no packet
// twice.

import (
	"encoding/binary"
	"math/rand"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/netdivert/divert/filter"
)

// ipfw's ext_hd bits (netinet/ip_fw.h EXT_*), by ext6hdr keyword.
var ext6Bits = map[string]uint16{
	"frag": 0x01, "hopopt": 0x02, "route": 0x04, "ah": 0x08, "esp": 0x10, "dstopt": 0x20, "rthdr0": 0x40, "rthdr2": 0x80,
}

// sysctls that change ipfw_chk's IPv6 walk.
type sysctls struct {
	denyUnknownExthdrs bool // net.inet6.ip6.fw.deny_unknown_exthdrs (default 1, vnet_ipfw_init)
	noSingleFrag6      bool // net.inet6.ip6.fw.permit_single_frag6 = 0 (default 1)
}

// fwPkt is what ipfw_chk knows of a packet when it starts on the rules.
type fwPkt struct {
	drop           bool // pullup_failed or an early IP_FW_DENY
	b              []byte
	v4, v6         bool
	proto          uint8
	offset         uint16 // IPv4: ip_off & IP_OFFMASK; IPv6: ip6f_offlg & IP6F_OFF_MASK (MF excluded)
	ipOff          uint16 // IPv4 ip_off
	ulp            int    // offset of ulp, -1 for NULL
	sport, dport   uint16
	icmp6Type      uint8
	extHd          uint16
	src, dst       netip.Addr
	in, recvIfaceK bool // the hook direction; an out packet with a receive interface (forwarded)
}

// fwParse is ipfw_chk's prologue for a packet of len(b) bytes (pktlen =
// m_pkthdr.len).
func fwParse(b []byte, s sysctls) fwPkt {
	p := fwPkt{b: b, ulp: -1}
	pktlen := len(b)
	hlen := 0
	// PULLUP_LEN: hlen + n must lie within the packet, else pullup_failed.
	pull := func(n int) bool {
		if hlen+n > pktlen {
			p.drop = true
			return false
		}
		p.ulp = hlen
		return true
	}
	switch {
	case pktlen >= 40 && b[0]>>4 == 6:
		p.v6 = true
		p.src, _ = netip.AddrFromSlice(b[8:24])
		p.dst, _ = netip.AddrFromSlice(b[24:40])
		hlen = 40
		proto := b[6]
		for p.ulp < 0 && p.offset == 0 {
			switch proto {
			case 58: // IPPROTO_ICMPV6
				if !pull(8) {
					return p
				}
				p.icmp6Type = b[hlen]
			case 6: // IPPROTO_TCP
				if !pull(20) {
					return p
				}
				p.sport, p.dport = binary.BigEndian.Uint16(b[hlen:]), binary.BigEndian.Uint16(b[hlen+2:])
			case 132: // IPPROTO_SCTP
				n := 12
				if pktlen >= hlen+12+4+4 {
					n = 20
				} else if pktlen >= hlen+12 {
					n = pktlen - hlen
				}
				if !pull(n) {
					return p
				}
				p.sport, p.dport = binary.BigEndian.Uint16(b[hlen:]), binary.BigEndian.Uint16(b[hlen+2:])
			case 17, 136: // IPPROTO_UDP, IPPROTO_UDPLITE
				if !pull(8) {
					return p
				}
				p.sport, p.dport = binary.BigEndian.Uint16(b[hlen:]), binary.BigEndian.Uint16(b[hlen+2:])
			case 0, 60: // IPPROTO_HOPOPTS, IPPROTO_DSTOPTS: struct ip6_hbh
				if !pull(2) {
					return p
				}
				if proto == 0 {
					p.extHd |= ext6Bits["hopopt"]
				} else {
					p.extHd |= ext6Bits["dstopt"]
				}
				proto = b[hlen]
				hlen += (int(b[hlen+1]) + 1) << 3
				p.ulp = -1
			case 43: // IPPROTO_ROUTING: struct ip6_rthdr
				if !pull(4) {
					return p
				}
				switch b[hlen+2] {
				case 0:
					p.extHd |= ext6Bits["rthdr0"]
				case 2:
					p.extHd |= ext6Bits["rthdr2"]
				default:
					if s.denyUnknownExthdrs {
						p.drop = true
						return p
					}
				}
				p.extHd |= ext6Bits["route"]
				proto = b[hlen]
				hlen += (int(b[hlen+1]) + 1) << 3
				p.ulp = -1
			case 44: // IPPROTO_FRAGMENT: struct ip6_frag
				if !pull(8) {
					return p
				}
				p.extHd |= ext6Bits["frag"]
				at := hlen
				hlen += 8
				proto = b[at]
				offlg := binary.BigEndian.Uint16(b[at+2:])
				p.offset = offlg & 0xfff8
				mf := offlg&1 != 0
				if s.noSingleFrag6 && p.offset == 0 && !mf {
					if s.denyUnknownExthdrs {
						p.drop = true
						return p
					}
					break // ulp stays at the Fragment header: the walk ends
				}
				p.ulp = -1
			case 51: // IPPROTO_AH: struct ip6_ext
				if !pull(2) {
					return p
				}
				p.extHd |= ext6Bits["ah"]
				proto = b[hlen]
				hlen += (int(b[hlen+1]) + 2) << 2
				p.ulp = -1
			case 50: // IPPROTO_ESP
				if !pull(4) {
					return p
				}
				p.extHd |= ext6Bits["esp"]
			case 59: // IPPROTO_NONE
				p.ulp = 0
			case 89: // IPPROTO_OSPFIGP
				if !pull(2) {
					return p
				}
			case 103, 47: // IPPROTO_PIM (struct pim), IPPROTO_GRE (struct grehdr)
				if !pull(4) {
					return p
				}
			case 112: // IPPROTO_CARP
				if !pull(8) {
					return p
				}
				if b[hlen]&0x0f != 1 { // carp_type != CARP_ADVERTISEMENT
					p.drop = true
					return p
				}
			case 41: // IPPROTO_IPV6
				if !pull(40) {
					return p
				}
			case 4: // IPPROTO_IPV4
				if !pull(20) {
					return p
				}
			default: // unknown: Mobility (135) included
				if s.denyUnknownExthdrs {
					p.drop = true
					return p
				}
				if !pull(2) {
					return p
				}
			}
		}
		p.proto = proto
	case pktlen >= 20 && b[0]>>4 == 4:
		p.v4 = true
		p.src, _ = netip.AddrFromSlice(b[12:16])
		p.dst, _ = netip.AddrFromSlice(b[16:20])
		hlen = int(b[0]&0x0f) * 4
		p.proto = b[9]
		p.ipOff = binary.BigEndian.Uint16(b[6:])
		p.offset = p.ipOff & 0x1fff
		if p.offset == 0 {
			switch p.proto {
			case 6:
				if !pull(20) {
					return p
				}
				p.sport, p.dport = binary.BigEndian.Uint16(b[hlen:]), binary.BigEndian.Uint16(b[hlen+2:])
			case 17, 136:
				if !pull(8) {
					return p
				}
				p.sport, p.dport = binary.BigEndian.Uint16(b[hlen:]), binary.BigEndian.Uint16(b[hlen+2:])
			case 1:
				if !pull(8) {
					return p
				}
			}
		} else if p.offset == 1 && p.proto == 6 {
			p.drop = true // RFC 3128
		}
	}
	return p
}

// ulpByte is a byte of the header ulp points to, as the kernel reads it
// (the pullup made ulp's struct contiguous; past it the model reads 0).
func (p *fwPkt) ulpByte(i int) uint8 {
	if p.ulp < 0 || p.ulp+i >= len(p.b) {
		return 0
	}
	return p.b[p.ulp+i]
}

// fwRule is a parsed rule: a list of opcodes, each a test on the packet.
type fwRule struct {
	action string
	tests  []func(*fwPkt) bool
}

func (r *fwRule) match(p *fwPkt) bool {
	for _, t := range r.tests {
		if !t(p) {
			return false
		}
	}
	return true
}

var protoNums = map[string]uint8{"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58}

func parseProto(t *testing.T, w string) uint8 {
	if n, ok := protoNums[w]; ok {
		return n
	}
	n, err := strconv.Atoi(w)
	if err != nil || n <= 0 || n > 255 {
		t.Fatalf("protocol %q", w)
	}
	return uint8(n)
}

// parseAddr is ipfw2.c/ipv6.c fill_ip/fill_ip6 for what addrSpec writes.
func parseAddr(t *testing.T, w string) func(netip.Addr) (bool, bool) {
	if w == "any" {
		return nil
	}
	var ps []netip.Prefix
	for _, a := range strings.Split(w, ",") {
		if !strings.Contains(a, "/") {
			ad := netip.MustParseAddr(a)
			a += "/" + strconv.Itoa(ad.BitLen())
		}
		p, err := netip.ParsePrefix(a)
		if err != nil {
			t.Fatalf("address %q: %v", w, err)
		}
		ps = append(ps, p)
	}
	// the result is (applies to this family, matches)
	return func(x netip.Addr) (bool, bool) {
		if ps[0].Addr().Is4() != x.Is4() {
			return false, false
		}
		for _, p := range ps {
			if p.Contains(x) {
				return true, true
			}
		}
		return true, false
	}
}

// parseRule reads the words Lower emits, the way ipfw2.c compile_rule does,
// into opcodes with ipfw_chk's semantics.
func parseRule(t *testing.T, r Rule) fwRule {
	t.Helper()
	w := []string(r)
	if i := slicesIndex(w, "//"); i >= 0 {
		w = w[:i]
	}
	if len(w) < 5 || w[0] != "add" || w[2] != "set" {
		t.Fatalf("rule %q", r)
	}
	w = w[4:]
	var fr fwRule
	fr.action = w[0]
	switch w[0] {
	case "divert", "tee":
		w = w[2:]
	case "deny":
		w = w[1:]
	default:
		t.Fatalf("action in %q", r)
	}
	// body protocol
	var protos []uint8
	switch {
	case w[0] == "{":
		i := 1
		for ; w[i] != "}"; i++ {
			if w[i] != "or" {
				protos = append(protos, parseProto(t, w[i]))
			}
		}
		w = w[i+1:]
	case w[0] == "ip":
		w = w[1:]
	default:
		protos = append(protos, parseProto(t, w[0]))
		w = w[1:]
	}
	if protos != nil {
		fr.tests = append(fr.tests, func(p *fwPkt) bool {
			for _, x := range protos {
				if p.proto == x {
					return true
				}
			}
			return false
		})
	}
	addr := func(src bool) {
		not := false
		if w[0] == "not" {
			not = true
			w = w[1:]
		}
		m := parseAddr(t, w[0])
		w = w[1:]
		if m == nil {
			return
		}
		fr.tests = append(fr.tests, func(p *fwPkt) bool {
			x := p.dst
			if src {
				x = p.src
			}
			if !p.v4 && !p.v6 {
				return not
			}
			fam, ok := m(x)
			return (fam && ok) != not
		})
	}
	if w[0] != "from" {
		t.Fatalf("no from in %q", r)
	}
	w = w[1:]
	addr(true)
	if w[0] != "to" {
		t.Fatalf("no to in %q", r)
	}
	w = w[1:]
	addr(false)
	for len(w) > 0 {
		not := false
		if w[0] == "not" {
			not = true
			w = w[1:]
		}
		var test func(*fwPkt) bool
		switch w[0] {
		case "ip4":
			test = func(p *fwPkt) bool { return p.v4 }
			w = w[1:]
		case "ip6":
			test = func(p *fwPkt) bool { return p.v6 }
			w = w[1:]
		case "proto":
			x := parseProto(t, w[1])
			test = func(p *fwPkt) bool { return p.proto == x }
			w = w[2:]
		case "src-port", "dst-port":
			var rs [][2]uint16
			for _, part := range strings.Split(w[1], ",") {
				lo, hi, ok := strings.Cut(part, "-")
				a, _ := strconv.Atoi(lo)
				bb := a
				if ok {
					bb, _ = strconv.Atoi(hi)
				}
				rs = append(rs, [2]uint16{uint16(a), uint16(bb)})
			}
			src := w[0] == "src-port"
			test = func(p *fwPkt) bool {
				if !(p.proto == 17 || p.proto == 136 || p.proto == 6 || p.proto == 132) || p.offset != 0 {
					return false
				}
				x := p.dport
				if src {
					x = p.sport
				}
				for _, r := range rs {
					if x >= r[0] && x <= r[1] {
						return true
					}
				}
				return false
			}
			w = w[2:]
		case "tcpflags":
			var set, clear uint8
			bits := map[string]uint8{"fin": 1, "syn": 2, "rst": 4, "psh": 8, "ack": 16, "urg": 32}
			for _, f := range strings.Split(w[1], ",") {
				if strings.HasPrefix(f, "!") {
					clear |= bits[f[1:]]
				} else {
					set |= bits[f]
				}
			}
			test = func(p *fwPkt) bool {
				fl := p.ulpByte(13) // TCP(ulp)->th_flags
				return p.proto == 6 && p.offset == 0 && fl&set == set && fl&clear == 0
			}
			w = w[2:]
		case "icmptypes", "icmp6types":
			var bm [256]bool
			for _, x := range strings.Split(w[1], ",") {
				n, _ := strconv.Atoi(x)
				bm[n] = true
			}
			if w[0] == "icmptypes" {
				test = func(p *fwPkt) bool { return p.offset == 0 && p.proto == 1 && bm[p.ulpByte(0)] }
			} else {
				test = func(p *fwPkt) bool { return p.v6 && p.offset == 0 && p.proto == 58 && bm[p.ulpByte(0)] }
			}
			w = w[2:]
		case "frag":
			mf := len(w) > 1 && w[1] == "mf"
			test = func(p *fwPkt) bool {
				if p.v4 {
					if mf {
						return p.ipOff&0x2000 != 0
					}
					return p.offset != 0
				}
				return !mf && p.offset != 0
			}
			if mf {
				w = w[2:]
			} else {
				w = w[1:]
			}
		case "ext6hdr":
			var bits uint16
			for _, k := range strings.Split(w[1], ",") {
				b, ok := ext6Bits[k]
				if !ok {
					t.Fatalf("ext6hdr %q in %q", k, r)
				}
				bits |= b
			}
			test = func(p *fwPkt) bool { return p.v6 && p.extHd&bits != 0 }
			w = w[2:]
		case "in":
			test = func(p *fwPkt) bool { return p.in }
			w = w[1:]
		case "out":
			test = func(p *fwPkt) bool { return !p.in }
			w = w[1:]
		case "recv":
			if w[1] != "*" {
				t.Fatalf("recv %q in %q: the model knows no interfaces", w[1], r)
			}
			test = func(p *fwPkt) bool { return p.in || p.recvIfaceK }
			w = w[2:]
		default:
			t.Fatalf("option %q in %q", w[0], r)
		}
		if not {
			inner := test
			test = func(p *fwPkt) bool { return !inner(p) }
		}
		fr.tests = append(fr.tests, test)
	}
	return fr
}

func slicesIndex(w []string, s string) int {
	for i := range w {
		if w[i] == s {
			return i
		}
	}
	return -1
}

// A hook event: where ipfw sees the packet.
type hook uint8

const (
	hookIn     hook = iota // ip6_input/ip_input: inbound (pktlen may exceed the IP length: IPv6 trims after the hook)
	hookOut                // ip6_output: a packet the host made
	hookFwdOut             // a forwarded packet on its way out (trimmed)
)

// modelCase checks one packet against one lowering.
type modelCase struct {
	f     *filter.Filter
	res   Result
	rules []fwRule
	cfg   Config
}

func newModelCase(t *testing.T, f *filter.Filter, cfg Config) *modelCase {
	t.Helper()
	res, err := Lower(f.Lower(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	mc := &modelCase{f: f, res: res, cfg: cfg}
	for _, r := range res.Rules {
		mc.rules = append(mc.rules, parseRule(t, r))
	}
	return mc
}

// check runs pkt (IP length from its header; extra trails it, as the mbuf
// the inbound hook sees may) through the filter and the model.
func (mc *modelCase) check(t *testing.T, pkt, extra []byte, h hook, s sysctls) {
	t.Helper()
	meta := filter.Meta{Layer: mc.f.Layer(), Outbound: h != hookIn, IPv6: len(pkt) > 0 && pkt[0]>>4 == 6}
	want := mc.f.Match(pkt, &meta)
	mbuf := append(append([]byte(nil), pkt...), extra...)
	p := fwParse(mbuf, s)
	p.in = h == hookIn
	p.recvIfaceK = h == hookFwdOut
	// Does the handle's layer see this hook at all?
	seen := (h == hookFwdOut) == mc.cfg.Forward
	if p.drop {
		return // ipfw drops it before any rule: it passes nowhere
	}
	n := 0
	for i := range mc.rules {
		if mc.rules[i].match(&p) {
			n++
		}
	}
	if want && seen && n == 0 {
		t.Fatalf("bypass: filter %q matches %x (+%x, hook %d, %+v) but no rule of\n%s\ndoes (ipfw proto %d offset %d ext %#x)",
			mc.f, pkt, extra, h, s, rulesText(mc.res.Rules), p.proto, p.offset, p.extHd)
	}
	if mc.res.Exact && seen && n > 0 && !want {
		t.Fatalf("exact rules\n%s\ntake %x (+%x, hook %d, %+v), which filter %q does not match (ipfw proto %d offset %d ext %#x)",
			rulesText(mc.res.Rules), pkt, extra, h, s, mc.f, p.proto, p.offset, p.extHd)
	}
	if mc.cfg.Action == Tee && n > 1 {
		t.Fatalf("tee rules\n%s\ncopy %x (hook %d, %+v) %d times", rulesText(mc.res.Rules), pkt, h, s, n)
	}
}

func rulesText(rs []Rule) string {
	var out []string
	for _, r := range rs {
		out = append(out, r.String())
	}
	return strings.Join(out, "\n")
}

// Packet construction.

var (
	modelSrc6 = netip.MustParseAddr("fd00::1")
	modelDst6 = netip.MustParseAddr("fd00::2")
	modelSrc4 = netip.MustParseAddr("192.0.2.1")
	modelDst4 = netip.MustParseAddr("192.0.2.2")
)

// ip6 returns an IPv6 packet with next header nh and payload pl.
func ip6(nh uint8, pl []byte) []byte {
	b := make([]byte, 40, 40+len(pl))
	b[0] = 0x60
	binary.BigEndian.PutUint16(b[4:], uint16(len(pl)))
	b[6] = nh
	b[7] = 64
	s, d := modelSrc6.As16(), modelDst6.As16()
	copy(b[8:], s[:])
	copy(b[24:], d[:])
	return append(b, pl...)
}

// ip4 returns an IPv4 packet of protocol proto, fragment field ff.
func ip4(proto uint8, ff uint16, pl []byte) []byte {
	b := make([]byte, 20, 20+len(pl))
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(20+len(pl)))
	binary.BigEndian.PutUint16(b[6:], ff)
	b[8] = 64
	b[9] = proto
	s, d := modelSrc4.As4(), modelDst4.As4()
	copy(b[12:], s[:])
	copy(b[16:], d[:])
	return append(b, pl...)
}

// ext is an extension header of type typ (8*units bytes, AH 4*units) whose
// next header is nh.
func ext(typ, nh uint8, size int) []byte {
	h := make([]byte, size)
	h[0] = nh
	switch typ {
	case 51:
		h[1] = uint8(size/4 - 2)
	case 44:
	default:
		h[1] = uint8(size/8 - 1)
	}
	return h
}

func frag6(nh uint8, off uint16, mf bool) []byte {
	h := make([]byte, 8)
	h[0] = nh
	v := off << 3
	if mf {
		v |= 1
	}
	binary.BigEndian.PutUint16(h[2:], v)
	h[4] = 0xab
	return h
}

func udpHdr(sport, dport uint16) []byte {
	h := make([]byte, 8)
	binary.BigEndian.PutUint16(h, sport)
	binary.BigEndian.PutUint16(h[2:], dport)
	binary.BigEndian.PutUint16(h[4:], 8)
	return h
}

func tcpHdr(sport, dport uint16, flags uint8, doff uint8) []byte {
	h := make([]byte, 20)
	binary.BigEndian.PutUint16(h, sport)
	binary.BigEndian.PutUint16(h[2:], dport)
	h[12] = doff << 4
	h[13] = flags
	return h
}

func icmpHdr(typ uint8) []byte { return []byte{typ, 0, 0, 0, 0, 0, 0, 0} }

func cat(bs ...[]byte) []byte {
	var out []byte
	for _, b := range bs {
		out = append(out, b...)
	}
	return out
}

// randPacket builds a packet from a random chain of headers, the shapes
// where WinDivert's parser and ipfw's walk part: extension headers of
// every kind (some cut short), Mobility, AH, ESP, one or two Fragment
// headers, first and later fragments, short and odd transport headers.
func randPacket(r *rand.Rand) (pkt, extra []byte) {
	transport := func() (uint8, []byte) {
		switch r.Intn(9) {
		case 0:
			return 17, udpHdr(uint16(r.Intn(3)+52), uint16(r.Intn(3)+52))
		case 1:
			return 6, tcpHdr(uint16(r.Intn(3)+79), uint16(r.Intn(3)+79), uint8(r.Intn(64)), uint8(4+r.Intn(3)))
		case 2:
			return 58, icmpHdr(uint8(127 + r.Intn(3)))
		case 3:
			return 1, icmpHdr(uint8(7 + r.Intn(3)))
		case 4:
			return 59, nil
		case 5:
			return 50, []byte{0, 0, 1, 0, 0, 0, 0, 1}
		case 6:
			return uint8(r.Intn(256)), make([]byte, r.Intn(12))
		case 7: // cut short
			p := []uint8{6, 17, 58}[r.Intn(3)]
			return p, make([]byte, r.Intn(8))
		default:
			return 17, udpHdr(53, 53)
		}
	}
	if r.Intn(5) == 0 {
		p, pl := transport()
		ff := uint16(0)
		switch r.Intn(4) {
		case 0:
			ff = 0x2000 // first fragment
		case 1:
			ff = uint16(1 + r.Intn(3)) // later fragment
		}
		return ip4(p, ff, pl), nil
	}
	nh, pl := transport()
	nExt := r.Intn(4)
	for i := 0; i < nExt; i++ {
		var typ uint8
		switch r.Intn(8) {
		case 0:
			typ = 0
		case 1:
			typ = 43
		case 2:
			typ = 60
		case 3:
			typ = 51
		case 4, 5:
			typ = 135
		default:
			typ = 44
		}
		var h []byte
		switch typ {
		case 44:
			off := uint16(0)
			if r.Intn(3) == 0 {
				off = uint16(1 + r.Intn(4))
			}
			h = frag6(nh, off, r.Intn(2) == 0)
		case 51:
			h = ext(typ, nh, 4*(3+r.Intn(3)))
		default:
			h = ext(typ, nh, 8*(1+r.Intn(2)))
		}
		if typ == 43 {
			h[2] = []uint8{0, 2, 4}[r.Intn(3)]
		}
		pl = append(h, pl...)
		nh = typ
	}
	pkt = ip6(nh, pl)
	switch r.Intn(6) {
	case 0: // cut the datagram short: the IP length ends inside a header
		if n := len(pkt) - 40; n > 0 {
			cut := r.Intn(n)
			binary.BigEndian.PutUint16(pkt[4:], uint16(cut))
			extra = pkt[40+cut:]
			pkt = pkt[:40+cut]
		}
	case 1: // trailing bytes past the IP length
		extra = make([]byte, r.Intn(24))
		for i := range extra {
			extra[i] = uint8(r.Intn(4)) * 17
		}
	}
	return pkt, extra
}

var modelFilters = []string{
	"true",
	"udp",
	"tcp",
	"icmpv6",
	"icmp",
	"udp.DstPort == 53",
	"udp.SrcPort == 53 or udp.DstPort == 53",
	"tcp.DstPort == 80",
	"tcp.Syn and not tcp.Ack",
	"tcp.DstPort == 80 and tcp.Syn",
	"icmpv6.Type == 128",
	"icmp.Type == 8",
	"ipv6 and udp.DstPort == 53",
	"ip and udp.DstPort == 53",
	"ip and tcp.DstPort == 80",
	"ip and tcp.Syn",
	"ipv6.SrcAddr == fd00::1 and udp",
	"ipv6.DstAddr != fd00::2",
	"not udp",
	"not tcp and ipv6",
	"ipv6",
	"protocol == 17",
	"protocol == 43",
	"protocol == 44",
	"protocol == 60",
	"protocol == 51",
	"protocol == 0",
	"protocol == 59",
	"protocol == 135",
	"protocol == 50",
	"protocol != 17",
	"protocol != 59 and protocol != 6",
	"protocol < 10",
	"protocol >= 43 and protocol <= 60",
	"ipv6 and protocol == 60",
	"inbound and udp.DstPort == 53",
	"outbound and (protocol == 43 or protocol == 17)",
	"udp.DstPort == 53 or tcp.DstPort == 80",
	"udp.PayloadLength > 0",
	"ipv6.NextHdr == 60",
}

type modelCfg struct {
	name string
	cfg  Config
}

var modelCfgs = []modelCfg{
	{"divert", Config{Number: 31000, Set: 3, Port: 9, Action: Divert}},
	{"tee", Config{Number: 31000, Set: 3, Port: 9, Action: Tee}},
	{"deny", Config{Number: 31000, Set: 3, Action: Deny}},
	{"divert-fwd", Config{Number: 31000, Set: 3, Port: 9, Action: Divert, Forward: true}},
	{"tee-fwd", Config{Number: 31000, Set: 3, Port: 9, Action: Tee, Forward: true}},
	{"deny-fwd", Config{Number: 31000, Set: 3, Action: Deny, Forward: true}},
}

var modelSysctls = []sysctls{{}, {noSingleFrag6: true}, {denyUnknownExthdrs: true}, {true, true}}

func modelCases(t *testing.T) []*modelCase {
	var mcs []*modelCase
	for _, fs := range modelFilters {
		for _, mc := range modelCfgs {
			layer := filter.LayerNetwork
			if mc.cfg.Forward {
				layer = filter.LayerNetworkForward
			}
			f, err := filter.Compile(fs, layer)
			if err != nil {
				continue // not a field of that layer
			}
			mcs = append(mcs, newModelCase(t, f, mc.cfg))
		}
	}
	return mcs
}

// TestModelNoBypass runs random packets of the shapes where the two
// parsers part through every filter and config.
func TestModelNoBypass(t *testing.T) {
	mcs := modelCases(t)
	r := rand.New(rand.NewSource(1))
	n := 4000
	if testing.Short() {
		n = 500
	}
	for i := 0; i < n; i++ {
		pkt, extra := randPacket(r)
		for _, s := range modelSysctls {
			for _, mc := range mcs {
				for _, h := range []hook{hookIn, hookOut, hookFwdOut} {
					var e []byte
					if h == hookIn {
						e = extra // only ip6_input runs the hook before trimming
					}
					mc.check(t, pkt, e, h, s)
				}
			}
		}
	}
}

// TestModelClasses: one packet of each class where ipfw's walk and
// WinDivert's part, with what ipfw makes of it, and a filter the rules must
// not let it bypass.
func TestModelClasses(t *testing.T) {
	for _, tc := range []struct {
		name   string
		pkt    []byte
		extra  []byte  // past the IPv6 length, in the mbuf the inbound hook sees
		s      sysctls // the zero value has deny_unknown_exthdrs=0, not the default
		filter string
		proto  uint8 // ipfw's
		drop   bool
	}{
		{name: "mobility header before udp, deny_unknown_exthdrs=0", pkt: ip6(135, cat(ext(135, 17, 8), udpHdr(1, 53))),
			filter: "udp.DstPort == 53", proto: 135},
		{name: "mobility header before icmpv6, deny_unknown_exthdrs=0", pkt: ip6(0, cat(ext(0, 135, 8), ext(135, 58, 16), icmpHdr(128))),
			filter: "icmpv6.Type == 128", proto: 135},
		{name: "two fragment headers", pkt: ip6(44, cat(frag6(44, 0, true), frag6(17, 0, false), udpHdr(1, 53))),
			filter: "protocol == 44", proto: 17},
		{name: "atomic fragment, permit_single_frag6=0, deny_unknown_exthdrs=0", pkt: ip6(44, cat(frag6(17, 0, false), udpHdr(1, 53))),
			s: sysctls{noSingleFrag6: true}, filter: "udp.DstPort == 53", proto: 17},
		{name: "atomic fragment before an extension header, permit_single_frag6=0, deny_unknown_exthdrs=0",
			pkt: ip6(44, cat(frag6(60, 0, false), ext(60, 58, 8), icmpHdr(128))),
			s:   sysctls{noSingleFrag6: true}, filter: "icmpv6", proto: 60},
		{name: "destination options cut short, no next header", pkt: ip6(60, ext(60, 59, 16)[:8]),
			filter: "protocol == 60", proto: 59},
		{name: "routing header cut short, no next header", pkt: ip6(43, ext(43, 59, 16)[:8]),
			filter: "protocol != 59", proto: 59},
		{name: "authentication header past the IPv6 length", pkt: ip6(51, nil), extra: cat(ext(51, 17, 12), udpHdr(1, 53)),
			filter: "protocol == 51", proto: 17},
		{name: "hop-by-hop options past the IPv6 length", pkt: ip6(0, nil), extra: cat(ext(0, 6, 8), tcpHdr(1, 80, 2, 5)),
			filter: "protocol != 6", proto: 6},
		// Classes where the two agree or ipfw drops the packet.
		{name: "later fragment after an extension header", pkt: ip6(44, frag6(60, 2, false)),
			filter: "protocol == 60", proto: 60},
		{name: "authentication header before udp", pkt: ip6(51, cat(ext(51, 17, 12), udpHdr(1, 53))),
			filter: "udp.DstPort == 53", proto: 17},
		{name: "esp", pkt: ip6(50, []byte{0, 0, 1, 0, 0, 0, 0, 1}), filter: "protocol == 50", proto: 50},
		{name: "unknown next header, deny_unknown_exthdrs=0", pkt: ip6(253, []byte{1, 2}), filter: "protocol == 253", proto: 253},
		{name: "udp cut short: dropped", pkt: ip6(17, []byte{0, 1, 0}), filter: "protocol == 17", drop: true},
		{name: "destination options cut short before udp: dropped", pkt: ip6(60, ext(60, 17, 16)[:8]),
			filter: "protocol == 60", drop: true},
		{name: "mobility header, deny_unknown_exthdrs=1 (the default): dropped", pkt: ip6(135, cat(ext(135, 17, 8), udpHdr(1, 53))),
			s: sysctls{denyUnknownExthdrs: true}, filter: "udp", drop: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := fwParse(append(append([]byte(nil), tc.pkt...), tc.extra...), tc.s)
			if p.drop != tc.drop || !p.drop && p.proto != tc.proto {
				t.Fatalf("ipfw: drop %v proto %d, want drop %v proto %d", p.drop, p.proto, tc.drop, tc.proto)
			}
			f := filter.MustCompile(tc.filter, filter.LayerNetwork)
			meta := filter.Meta{Layer: filter.LayerNetwork, IPv6: true}
			if !f.Match(tc.pkt, &meta) {
				t.Fatalf("filter %q does not match", tc.filter)
			}
			for _, c := range modelCfgs {
				if c.cfg.Forward {
					continue
				}
				mc := newModelCase(t, f, c.cfg)
				for _, h := range []hook{hookIn, hookOut} {
					var e []byte
					if h == hookIn {
						e = tc.extra
					}
					mc.check(t, tc.pkt, e, h, tc.s)
				}
			}
		})
	}
}

// TestModelFirstFragment: the first IPv6 fragment of a datagram the filter
// does not match still goes to the socket with the later ones, or divert
// would hold those for a first fragment that never comes (ipfw's bare frag
// takes IPv6 fragments at a non-zero offset only).
func TestModelFirstFragment(t *testing.T) {
	f := filter.MustCompile("udp.DstPort == 53", filter.LayerNetwork)
	first := fwParse(ip6(44, cat(frag6(17, 0, true), udpHdr(1, 54))), sysctls{})
	later := fwParse(ip6(44, cat(frag6(17, 1, false), []byte{1, 2, 3, 4})), sysctls{})
	for _, p := range []*fwPkt{&first, &later} {
		p.in = true
		mc := newModelCase(t, f, Config{Number: 1, Port: 1})
		n := 0
		for i := range mc.rules {
			if mc.rules[i].match(p) {
				n++
			}
		}
		if n == 0 {
			t.Fatalf("no rule of\n%s\ntakes %x", rulesText(mc.res.Rules), p.b)
		}
	}
}

// FuzzModel: any bytes as a packet, any filter and config of the tables.
func FuzzModel(f *testing.F) {
	// a Mobility header before UDP: ipfw's protocol is 135 (with
	// deny_unknown_exthdrs=0)
	f.Add(ip6(135, cat(ext(135, 17, 8), udpHdr(1, 53))), uint8(5), uint8(0), uint8(0))
	// two Fragment headers: WinDivert stops at the second (protocol 44)
	f.Add(ip6(44, cat(frag6(44, 0, true), frag6(17, 0, false), udpHdr(1, 53))), uint8(21), uint8(0), uint8(1))
	// a Destination Options header cut short, then "no next header":
	// WinDivert's protocol is 60, ipfw's 59
	f.Add(ip6(60, ext(60, 59, 16)[:8]), uint8(22), uint8(2), uint8(1))
	// an atomic fragment with permit_single_frag6=0: ipfw ends its walk at
	// the Fragment header
	f.Add(ip6(44, cat(frag6(17, 0, false), udpHdr(1, 53))), uint8(5), uint8(1), uint8(9))
	mcs := map[int]*modelCase{}
	f.Fuzz(func(t *testing.T, pkt []byte, fi, ci, bits uint8) {
		k := int(fi)%len(modelFilters)*len(modelCfgs) + int(ci)%len(modelCfgs)
		mc, ok := mcs[k]
		if !ok {
			c := modelCfgs[int(ci)%len(modelCfgs)]
			layer := filter.LayerNetwork
			if c.cfg.Forward {
				layer = filter.LayerNetworkForward
			}
			flt, err := filter.Compile(modelFilters[int(fi)%len(modelFilters)], layer)
			if err != nil {
				return
			}
			mc = newModelCase(t, flt, c.cfg)
			mcs[k] = mc
		}
		h := hook(bits % 3)
		s := sysctls{denyUnknownExthdrs: bits&4 != 0, noSingleFrag6: bits&8 != 0}
		var extra []byte
		if h == hookIn && bits&16 != 0 && len(pkt) >= 40 && pkt[0]>>4 == 6 {
			// the IPv6 length ends early: the rest trails it
			n := int(binary.BigEndian.Uint16(pkt[4:])) % (len(pkt) - 39)
			extra = pkt[40+n:]
			pkt = append([]byte(nil), pkt[:40+n]...)
			binary.BigEndian.PutUint16(pkt[4:], uint16(n))
		} else if len(pkt) >= 40 && pkt[0]>>4 == 6 {
			pkt = append([]byte(nil), pkt...)
			binary.BigEndian.PutUint16(pkt[4:], uint16(len(pkt)-40))
		} else if len(pkt) >= 20 && pkt[0]>>4 == 4 {
			pkt = append([]byte(nil), pkt...)
			pkt[0] = 0x45 // ip_input has checked the header and trimmed
			binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
		} else {
			return
		}
		mc.check(t, pkt, extra, h, s)
	})
}
