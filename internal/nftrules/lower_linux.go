package nftrules

import (
	"encoding/binary"
	"slices"

	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/filter"
)

// This file lowers filter.Lowered to nftables expressions.
//
// A Cond lowers to a disjunction of conjunctions (disj). A conjunction has
// positive expressions, which must all match, and guards: expression lists
// any of which, when it matches, excludes the packet. Guards express
// negations such as "not tcp" (= not (l4proto tcp and a whole TCP header
// present)): in the rule set they become "guard... return" rules in a regular
// chain that the base chain jumps to after the positive expressions matched.
//
// Every expression list runs through register 1 only; a payload load that
// falls outside the packet (or a transport-header load on a non-first
// fragment, where the kernel has no transport header) ends the rule without a
// match, which is exactly WinDivert's "absent field => false".

const (
	maxConjPerTerm = 32  // product bound per Term
	maxConjPerHook = 256 // rule bound per hook; beyond it the hook matches everything (inexact)
	// maxExprsPerConj bounds the expressions of one rule: the kernel refuses
	// a rule of more than NFT_RULE_MAXEXPRS (128) with EINVAL, and the base
	// chain's rule adds the family test and the jump, the action chain's
	// the skips. maxGuardsPerConj bounds the rules of an action chain. A
	// Cond that would go beyond is left out (inexact).
	maxExprsPerConj  = 96
	maxGuardsPerConj = 64
	maxPayloadOff    = 255 // payload offsets the kernel accepts (nft_payload_init: U8_MAX)
)

type conj struct {
	exprs  []expr.Any
	guards [][]expr.Any
}

type disj []conj // nil: matches nothing

var dTrue = disj{{}}

// and is the conjunction of a and b; ok is false when the result would
// exceed maxConjPerTerm.
func and(a, b disj) (disj, bool) {
	if len(a)*len(b) > maxConjPerTerm {
		return nil, false
	}
	out := make(disj, 0, len(a)*len(b))
	for _, x := range a {
		for _, y := range b {
			if len(x.exprs)+len(y.exprs) > maxExprsPerConj || len(x.guards)+len(y.guards) > maxGuardsPerConj {
				return nil, false // the kernel would refuse the rule (or the chain): leave the Cond out
			}
			c := conj{
				exprs:  append(append([]expr.Any(nil), x.exprs...), y.exprs...),
				guards: append(append([][]expr.Any(nil), x.guards...), y.guards...),
			}
			out = append(out, c)
		}
	}
	return out, true
}

func or(ds ...disj) disj {
	var out disj
	for _, d := range ds {
		out = append(out, d...)
	}
	return out
}

func pos(e ...[]expr.Any) disj {
	var c conj
	for _, x := range e {
		c.exprs = append(c.exprs, x...)
	}
	return disj{c}
}

// --- expression builders (register 1) ---

func meta(k expr.MetaKey) expr.Any { return &expr.Meta{Key: k, Register: 1} }

func load(base expr.PayloadBase, off, n uint32) expr.Any {
	return &expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: base, Offset: off, Len: n}
}

func cmp(op expr.CmpOp, data []byte) expr.Any { return &expr.Cmp{Op: op, Register: 1, Data: data} }

func mask(n uint32, m []byte) expr.Any {
	return &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: n, Mask: m, Xor: make([]byte, n)}
}

func hton(n uint32) expr.Any {
	return &expr.Byteorder{SourceRegister: 1, DestRegister: 1, Op: expr.ByteorderHton, Len: n, Size: n}
}

var (
	isV4  = []expr.Any{meta(expr.MetaKeyNFPROTO), cmp(expr.CmpOpEq, []byte{unix.NFPROTO_IPV4})}
	isV6  = []expr.Any{meta(expr.MetaKeyNFPROTO), cmp(expr.CmpOpEq, []byte{unix.NFPROTO_IPV6})}
	notV4 = []expr.Any{meta(expr.MetaKeyNFPROTO), cmp(expr.CmpOpNeq, []byte{unix.NFPROTO_IPV4})}
	notV6 = []expr.Any{meta(expr.MetaKeyNFPROTO), cmp(expr.CmpOpNeq, []byte{unix.NFPROTO_IPV6})}

	th = expr.PayloadBaseTransportHeader
	nh = expr.PayloadBaseNetworkHeader
)

func l4(p byte) []expr.Any {
	return []expr.Any{meta(expr.MetaKeyL4PROTO), cmp(expr.CmpOpEq, []byte{p})}
}

// presenceLoads holds the presence loads of the header tests below: loads
// whose value no expression uses, which only end the rule when the header
// is absent or cut short.
var presenceLoads = map[expr.Any]bool{}

// presence is the 3-byte presence load of a transport header that ends at
// off+3.
func presence(off uint32) expr.Any {
	e := load(th, off, 3)
	presenceLoads[e] = true
	return e
}

// presenceLast moves the presence loads of a rule's expressions behind all
// its other expressions, keeping one of each. The rule matches the same
// packets: its expressions have no effect but on register 1, and no
// expression reads what a presence load leaves there, so the order of the
// tests only decides which one ends a failing rule, and at what cost.
// Transport-header loads of 1, 2 or 4 aligned bytes placed before the
// presence load may read a non-first fragment's payload as a header; the
// presence load then ends the rule.
func presenceLast(es []expr.Any) []expr.Any {
	var tail []expr.Any
	out := es[:0:0]
	for _, e := range es {
		if !presenceLoads[e] {
			out = append(out, e)
		} else if !slices.Contains(tail, e) {
			tail = append(tail, e)
		}
	}
	return append(out, tail...)
}

// Header presence, as WinDivert parses: the transport header exists (not a
// non-first fragment) and is whole.
//
// The presence load is 3 bytes long on purpose: loads of 1, 2 or 4 aligned
// bytes take the kernel's fast path (nft_payload_fast_eval), which reads the
// transport header of non-first fragments too (measured on 6.18); other
// lengths take nft_payload_eval, which fails on any packet with a fragment
// offset and on a header cut short. That slow path costs: it is a call and
// an skb_copy_bits, for every packet of the protocol that reaches the
// rule. So lower moves the presence loads behind a rule's other tests
// (presenceLast): a packet the filter does not match leaves at its first
// failing compare, and only a match pays for the presence load.
var (
	tcpHdr = concat(l4(unix.IPPROTO_TCP), []expr.Any{
		presence(17),
		load(th, 12, 1), mask(1, []byte{0xf0}), cmp(expr.CmpOpGte, []byte{0x50}),
	})
	udpHdr    = concat(l4(unix.IPPROTO_UDP), []expr.Any{presence(5)})
	icmpHdr   = concat(isV4, l4(unix.IPPROTO_ICMP), []expr.Any{presence(5)})
	icmpv6Hdr = concat(isV6, l4(unix.IPPROTO_ICMPV6), []expr.Any{presence(5)})

	// fragment: IPv4 with MF or an offset; IPv6 with a fragment header.
	v4Frag    = concat(isV4, []expr.Any{load(nh, 6, 2), mask(2, []byte{0x3f, 0xff}), cmp(expr.CmpOpNeq, []byte{0, 0})})
	v4NotFrag = concat(isV4, []expr.Any{load(nh, 6, 2), mask(2, []byte{0x3f, 0xff}), cmp(expr.CmpOpEq, []byte{0, 0})})
	v6Frag    = concat(isV6, v6HasFrag)
	v6HasFrag = []expr.Any{fragHdr(), cmp(expr.CmpOpEq, []byte{1})} // an IPv6 packet with a Fragment header
	v6NotFrag = concat(isV6, []expr.Any{fragHdr(), cmp(expr.CmpOpEq, []byte{0})})
)

// v6Unclear matches (each rule evaluated for IPv6 packets only) the IPv6
// packets whose extension headers the kernel walks otherwise than
// WinDivert, so that its protocol and transport header (meta l4proto, th)
// are not what the filter means:
//   - a Mobility header (135), which WinDivert walks past and the kernel
//     takes for the transport header;
//   - an Authentication Header (51), likewise;
//   - a Fragment header after another one, where WinDivert stops and the
//     kernel goes on;
//   - a non-first fragment: WinDivert names the protocol after the
//     Fragment header, and the kernel none when that is an extension
//     header, or one with its transport header at the IPv6 header's offset;
//   - protocol 0: the kernel's answer when it cannot walk the headers (an
//     extension header cut short), with the transport header at offset 0.
//
// v6NoTransport then covers the packets whose transport header lies past
// their end: an extension header that claims more bytes than are left, of
// which the kernel takes the next-header byte for the protocol. Such
// packets are rare and mostly malformed, but a forwarded one reaches the
// hooks, and an exact rule could miss it: a filter bypass.
//
// A queueing rule set selects them whatever the filter, and the backend
// checks every IPv6 packet with extension headers with the filter in user
// space; a drop rule set queues them too, for its handle to judge.
func v6Unclear() [][]expr.Any {
	return [][]expr.Any{
		l4(unix.IPPROTO_MH),
		l4(unix.IPPROTO_AH),
		{
			&expr.Exthdr{DestRegister: 1, Type: unix.IPPROTO_FRAGMENT, Offset: 0, Len: 1, Op: expr.ExthdrOpIpv6},
			cmp(expr.CmpOpEq, []byte{unix.IPPROTO_FRAGMENT}),
		},
		{
			&expr.Exthdr{DestRegister: 1, Type: unix.IPPROTO_FRAGMENT, Offset: 2, Len: 2, Op: expr.ExthdrOpIpv6},
			mask(2, []byte{0xff, 0xf8}),
			cmp(expr.CmpOpNeq, []byte{0, 0}),
		},
		l4(0),
	}
}

// v6Plain matches the common IPv6 packets that none of v6Unclear's rules
// and v6NoTransport's test would send to user space: no extension header
// (the fixed header's next header is TCP, UDP or ICMPv6, which the kernel
// then takes for the protocol, with the transport header right after the
// fixed one) and a transport header the kernel can load. Such a packet
// leaves the chain after two fast one-byte loads, where v6Unclear's rules
// would walk its headers twice (the fragment header tests); the others go
// on to v6Unclear as before.
func v6Plain() [][]expr.Any {
	var out [][]expr.Any
	for _, h := range v6NoExt() {
		out = append(out, concat(h, v6NoTransport()))
	}
	return out
}

// v6NoExt matches the packets with no extension header whose fixed header
// names TCP, UDP or ICMPv6: a fast one-byte load, where a test for a given
// extension header (exthdr) walks the headers. The lists do not test the
// family: they belong after a test for IPv6, or in a chain only IPv6
// packets reach (byte 6 of an IPv4 header is its fragment field).
func v6NoExt() [][]expr.Any {
	var out [][]expr.Any
	for _, p := range []byte{unix.IPPROTO_TCP, unix.IPPROTO_UDP, unix.IPPROTO_ICMPV6} {
		out = append(out, []expr.Any{load(nh, 6, 1), cmp(expr.CmpOpEq, []byte{p})})
	}
	return out
}

// v6NoTransport is the test that a packet's transport header can be
// loaded (a byte of it, compared with >= 0: always true when the load
// works); the kernel breaks the rule when it cannot (no protocol found, a
// non-first fragment, an offset past the end). The v6Unclear chain returns
// on it, and queues what is left.
func v6NoTransport() []expr.Any {
	return []expr.Any{load(th, 0, 1), cmp(expr.CmpOpGte, []byte{0})}
}

func fragHdr() expr.Any {
	return &expr.Exthdr{DestRegister: 1, Type: unix.IPPROTO_FRAGMENT, Offset: 0, Len: 1,
		Flags: unix.NFT_EXTHDR_F_PRESENT, Op: expr.ExthdrOpIpv6}
}

func concat(ls ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, l := range ls {
		out = append(out, l...)
	}
	return out
}

func absent(hdr []expr.Any) disj { return disj{{guards: [][]expr.Any{hdr}}} }

// --- value folding ---

// u128 is an unsigned 128-bit number.
type u128 struct{ hi, lo uint64 }

func (a u128) less(b u128) bool { return a.hi < b.hi || a.hi == b.hi && a.lo < b.lo }

// fold decides "x op v" for every x in [lo, hi] when it can: it returns +1
// (always true), -1 (always false) or 0 (depends on x).
func fold(op filter.Op, v filter.Value, lo, hi u128) int {
	val := u128{v.Hi, v.Lo}
	// Position of v relative to the range: -1 below, +1 above, 0 inside.
	pos := 0
	switch {
	case v.Neg || val.less(lo):
		pos = -1
	case hi.less(val):
		pos = 1
	}
	if pos != 0 {
		res := false
		switch op {
		case filter.OpNe:
			res = true
		case filter.OpGt, filter.OpGe:
			res = pos < 0
		case filter.OpLt, filter.OpLe:
			res = pos > 0
		}
		if res {
			return 1
		}
		return -1
	}
	switch {
	case op == filter.OpGe && val == lo, op == filter.OpLe && val == hi:
		return 1
	case op == filter.OpLt && val == lo, op == filter.OpGt && val == hi:
		return -1
	case lo == hi:
		if evalConst(op, v, lo) {
			return 1
		}
		return -1
	}
	return 0
}

// evalConst is "x op v" for a known x.
func evalConst(op filter.Op, v filter.Value, x u128) bool {
	c := 0 // sign of x - v
	switch val := (u128{v.Hi, v.Lo}); {
	case v.Neg || val.less(x):
		c = 1
	case x.less(val):
		c = -1
	}
	return op.Holds(c)
}

func constDisj(b bool) disj {
	if b {
		return dTrue
	}
	return nil
}

var cmpOps = [...]expr.CmpOp{
	filter.OpEq: expr.CmpOpEq, filter.OpNe: expr.CmpOpNeq,
	filter.OpLt: expr.CmpOpLt, filter.OpLe: expr.CmpOpLte,
	filter.OpGt: expr.CmpOpGt, filter.OpGe: expr.CmpOpGte,
}

// beBytes is v (which fits) as n big-endian bytes.
func beBytes(v u128, n int) []byte {
	b := make([]byte, 16)
	binary.BigEndian.PutUint64(b, v.hi)
	binary.BigEndian.PutUint64(b[8:], v.lo)
	return b[16-n:]
}

// field describes how to load a numeric field into register 1 as n
// big-endian bytes whose value is the field's value shifted left by shift.
type field struct {
	loads []expr.Any
	n     int
	shift uint
	max   uint64 // largest field value (before the shift)
	// bounded: the load is from the packet, and ends the rule when the
	// packet is too short for it (nft payload loads do), which is the
	// field's presence test for packet[i] and its kin.
	bounded bool
}

// compare lowers "field op v" given that the field's header is present.
// A comparison true for every value still loads a bounded field: packet32
// [32b] >= -1 is false for a packet shorter than 36 bytes.
func (f field) compare(op filter.Op, v filter.Value) disj {
	switch fold(op, v, u128{}, u128{0, f.max}) {
	case 1:
		if f.bounded {
			return pos(f.loads, []expr.Any{cmp(expr.CmpOpGte, make([]byte, f.n))})
		}
		return dTrue
	case -1:
		return nil
	}
	c := cmp(cmpOps[op], beBytes(u128{0, v.Lo << f.shift}, f.n))
	return pos(f.loads, []expr.Any{c})
}

func payloadField(base expr.PayloadBase, off uint32, n int, m uint64, shift uint, max uint64) field {
	loads := []expr.Any{load(base, off, uint32(n))}
	if m != 0 {
		loads = append(loads, mask(uint32(n), beBytes(u128{0, m}, n)))
	}
	return field{loads: loads, n: n, shift: shift, max: max, bounded: true}
}

// metaField loads a host-endian meta value of n bytes and converts it to
// big-endian so that ordered comparisons work.
func metaField(k expr.MetaKey, n int, max uint64) field {
	return field{loads: []expr.Any{meta(k), hton(uint32(n))}, n: n, max: max}
}

// mapped lowers "x op v" for an IPv4 address x loaded (4 bytes) by loads,
// where the filter compares the IPv4-mapped value ::ffff:x.
func mapped(loads []expr.Any, op filter.Op, v filter.Value) disj {
	const pfx = 0xFFFF << 32
	switch fold(op, v, u128{0, pfx}, u128{0, pfx | 0xFFFFFFFF}) {
	case 1:
		return dTrue
	case -1:
		return nil
	}
	return pos(loads, []expr.Any{cmp(cmpOps[op], beBytes(u128{0, v.Lo & 0xFFFFFFFF}, 4))})
}

// addr16 lowers "x op v" for the 16-byte address at network-header offset
// off. An equality compares four aligned 32-bit words: such loads take the
// kernel's inlined fast path, where one 16-byte load is a call and an
// skb_copy_bits for every IPv6 packet that reaches the rule, and a packet
// with another address mostly leaves at the first word that differs. The
// other comparisons order the addresses as 128-bit numbers and need the
// whole load.
func addr16(off uint32, op filter.Op, v filter.Value) disj {
	switch fold(op, v, u128{}, u128{^uint64(0), ^uint64(0)}) {
	case 1:
		return dTrue
	case -1:
		return nil
	}
	b := beBytes(u128{v.Hi, v.Lo}, 16)
	if op == filter.OpEq {
		var es []expr.Any
		for i := uint32(0); i < 16; i += 4 {
			es = append(es, load(nh, off+i, 4), cmp(expr.CmpOpEq, b[i:i+4]))
		}
		return pos(es)
	}
	return pos([]expr.Any{load(nh, off, 16), cmp(cmpOps[op], b)})
}

// boolField lowers a Cond on a 0/1 field given what "1" and "0" are.
func boolField(op filter.Op, v filter.Value, one, zero func() disj) disj {
	t1 := evalConst(op, v, u128{0, 1})
	t0 := evalConst(op, v, u128{0, 0})
	switch {
	case t1 && t0:
		return dTrue
	case t1:
		return one()
	case t0:
		return zero()
	}
	return nil
}

// lowerer lowers the Terms for one hook.
type lowerer struct {
	hook    Hook
	inexact bool
}

func (l *lowerer) lower(lw *filter.Lowered) disj {
	if lw == nil {
		return dTrue
	}
	if !lw.Exact {
		l.inexact = true
	}
	var out disj
	for _, t := range lw.Terms {
		out = append(out, l.term(t)...)
		if len(out) > maxConjPerHook {
			l.inexact = true
			return dTrue
		}
	}
	for i := range out {
		out[i].exprs = presenceLast(out[i].exprs)
	}
	return out
}

func (l *lowerer) term(t filter.Term) disj {
	d := dTrue
	for _, c := range t.Conds {
		cd, ok := l.cond(c)
		if !ok {
			l.inexact = true // dropping a Cond only widens the Term
			continue
		}
		nd, ok := and(d, cd)
		if !ok {
			l.inexact = true
			continue
		}
		if d = nd; len(d) == 0 {
			return nil
		}
	}
	return d
}

// cond lowers one Cond; ok is false when nft cannot express it here.
func (l *lowerer) cond(c filter.Cond) (d disj, ok bool) {
	op, v := c.Op, c.Value
	if op > filter.OpGe {
		return nil, false
	}
	in, out := l.hook.Inbound(), l.hook.Outbound()
	direct := func(f field, hdr ...[]expr.Any) (disj, bool) {
		d := f.compare(op, v)
		if d == nil {
			return nil, true
		}
		return and2(pos(hdr...), d), true
	}
	switch c.Field {
	case filter.FieldZero, filter.FieldEvent: // the event of a packet is 0
		return constDisj(evalConst(op, v, u128{})), true
	case filter.FieldFalse:
		return constDisj(evalConst(op, v, u128{})), true
	case filter.FieldTrue:
		return constDisj(evalConst(op, v, u128{0, 1})), true
	case filter.FieldOutbound, filter.FieldInbound:
		if !in && !out {
			return nil, false
		}
		isOut := out == (c.Field == filter.FieldOutbound)
		b := u128{}
		if isOut {
			b.lo = 1
		}
		return constDisj(evalConst(op, v, b)), true
	case filter.FieldLoopback:
		key := expr.MetaKeyIIFTYPE
		if out {
			key = expr.MetaKeyOIFTYPE
		} else if !in {
			return nil, false
		}
		lo := make([]byte, 2)
		binary.NativeEndian.PutUint16(lo, unix.ARPHRD_LOOPBACK)
		return boolField(op, v,
			func() disj { return pos([]expr.Any{meta(key), cmp(expr.CmpOpEq, lo)}) },
			func() disj { return pos([]expr.Any{meta(key), cmp(expr.CmpOpNeq, lo)}) }), true
	case filter.FieldFragment:
		return boolField(op, v,
			func() disj { return or(pos(v4Frag), pos(v6Frag)) },
			func() disj { return or(pos(v4NotFrag), pos(v6NotFrag)) }), true
	case filter.FieldIP:
		return boolField(op, v, func() disj { return pos(isV4) }, func() disj { return pos(notV4) }), true
	case filter.FieldIPv6:
		return boolField(op, v, func() disj { return pos(isV6) }, func() disj { return pos(notV6) }), true
	case filter.FieldTCP:
		return boolField(op, v, func() disj { return pos(tcpHdr) }, func() disj { return absent(tcpHdr) }), true
	case filter.FieldUDP:
		return boolField(op, v, func() disj { return pos(udpHdr) }, func() disj { return absent(udpHdr) }), true
	case filter.FieldICMP:
		return boolField(op, v, func() disj { return pos(icmpHdr) }, func() disj { return absent(icmpHdr) }), true
	case filter.FieldICMPv6:
		return boolField(op, v, func() disj { return pos(icmpv6Hdr) }, func() disj { return absent(icmpv6Hdr) }), true

	case filter.FieldIfIdx:
		// Forwarded packets report the interface they leave by, as
		// WinDivert's forward layer does (its destination interface).
		key := expr.MetaKeyIIF
		if out || l.hook == HookForward {
			key = expr.MetaKeyOIF
		}
		return direct(metaField(key, 4, 0xFFFFFFFF))
	case filter.FieldLength:
		return direct(metaField(expr.MetaKeyLEN, 4, 0xFFFFFFFF))
	case filter.FieldProtocol:
		return direct(field{loads: []expr.Any{meta(expr.MetaKeyL4PROTO)}, n: 1, max: 0xFF})
	case filter.FieldPacket, filter.FieldPacket16, filter.FieldPacket32:
		n := map[filter.Field]int{filter.FieldPacket: 1, filter.FieldPacket16: 2, filter.FieldPacket32: 4}[c.Field]
		if c.Index < 0 || c.Index > maxPayloadOff {
			return nil, false
		}
		return direct(payloadField(nh, uint32(c.Index), n, 0, 0, uint64(1)<<(8*n)-1))

	case filter.FieldLocalAddr, filter.FieldRemoteAddr:
		if !in && !out {
			return nil, false
		}
		src := (c.Field == filter.FieldLocalAddr) == out
		off4, off6 := uint32(16), uint32(24)
		if src {
			off4, off6 = 12, 8
		}
		return or(
			and2(pos(isV4), mapped([]expr.Any{load(nh, off4, 4)}, op, v)),
			and2(pos(isV6), addr16(off6, op, v)),
		), true
	case filter.FieldLocalPort, filter.FieldRemotePort:
		if !in && !out {
			return nil, false
		}
		src := (c.Field == filter.FieldLocalPort) == out
		off := uint32(2)
		if src {
			off = 0
		}
		port := payloadField(th, off, 2, 0, 0, 0xFFFF)
		// ICMP: the local port is the type when outbound, the remote port
		// the type when inbound; otherwise 0.
		var icmp disj
		if (c.Field == filter.FieldLocalPort) == out {
			t := payloadField(th, 0, 1, 0, 0, 0xFF)
			icmp = or(and2(pos(icmpHdr), t.compare(op, v)), and2(pos(icmpv6Hdr), t.compare(op, v)))
		} else if evalConst(op, v, u128{}) {
			icmp = or(pos(icmpHdr), pos(icmpv6Hdr))
		}
		var other disj
		if evalConst(op, v, u128{}) {
			other = disj{{guards: [][]expr.Any{tcpHdr, udpHdr, icmpHdr, icmpv6Hdr}}}
		}
		return or(and2(pos(tcpHdr), port.compare(op, v)), and2(pos(udpHdr), port.compare(op, v)), icmp, other), true

	case filter.FieldIPHdrLength:
		return direct(payloadField(nh, 0, 1, 0x0F, 0, 0xF), isV4)
	case filter.FieldIPTOS:
		return direct(payloadField(nh, 1, 1, 0, 0, 0xFF), isV4)
	case filter.FieldIPLength:
		return direct(payloadField(nh, 2, 2, 0, 0, 0xFFFF), isV4)
	case filter.FieldIPId:
		return direct(payloadField(nh, 4, 2, 0, 0, 0xFFFF), isV4)
	case filter.FieldIPDF:
		return direct(payloadField(nh, 6, 1, 0x40, 6, 1), isV4)
	case filter.FieldIPMF:
		return direct(payloadField(nh, 6, 1, 0x20, 5, 1), isV4)
	case filter.FieldIPFragOff:
		return direct(payloadField(nh, 6, 2, 0x1FFF, 0, 0x1FFF), isV4)
	case filter.FieldIPTTL:
		return direct(payloadField(nh, 8, 1, 0, 0, 0xFF), isV4)
	case filter.FieldIPProtocol:
		return direct(payloadField(nh, 9, 1, 0, 0, 0xFF), isV4)
	case filter.FieldIPChecksum:
		return direct(payloadField(nh, 10, 2, 0, 0, 0xFFFF), isV4)
	case filter.FieldIPSrcAddr, filter.FieldIPDstAddr:
		off := uint32(12)
		if c.Field == filter.FieldIPDstAddr {
			off = 16
		}
		return and2(pos(isV4), mapped([]expr.Any{load(nh, off, 4)}, op, v)), true

	case filter.FieldIPv6TrafficClass:
		return direct(payloadField(nh, 0, 2, 0x0FF0, 4, 0xFF), isV6)
	case filter.FieldIPv6FlowLabel:
		return direct(payloadField(nh, 0, 4, 0x000FFFFF, 0, 0xFFFFF), isV6)
	case filter.FieldIPv6Length:
		return direct(payloadField(nh, 4, 2, 0, 0, 0xFFFF), isV6)
	case filter.FieldIPv6NextHdr:
		return direct(payloadField(nh, 6, 1, 0, 0, 0xFF), isV6)
	case filter.FieldIPv6HopLimit:
		return direct(payloadField(nh, 7, 1, 0, 0, 0xFF), isV6)
	case filter.FieldIPv6SrcAddr, filter.FieldIPv6DstAddr:
		off := uint32(8)
		if c.Field == filter.FieldIPv6DstAddr {
			off = 24
		}
		return and2(pos(isV6), addr16(off, op, v)), true

	case filter.FieldICMPType, filter.FieldICMPv6Type:
		return direct(payloadField(th, 0, 1, 0, 0, 0xFF), icmpOf(c.Field))
	case filter.FieldICMPCode, filter.FieldICMPv6Code:
		return direct(payloadField(th, 1, 1, 0, 0, 0xFF), icmpOf(c.Field))
	case filter.FieldICMPChecksum, filter.FieldICMPv6Checksum:
		return direct(payloadField(th, 2, 2, 0, 0, 0xFFFF), icmpOf(c.Field))
	case filter.FieldICMPBody, filter.FieldICMPv6Body:
		return direct(payloadField(th, 4, 4, 0, 0, 0xFFFFFFFF), icmpOf(c.Field))

	case filter.FieldTCPSrcPort:
		return direct(payloadField(th, 0, 2, 0, 0, 0xFFFF), tcpHdr)
	case filter.FieldTCPDstPort:
		return direct(payloadField(th, 2, 2, 0, 0, 0xFFFF), tcpHdr)
	case filter.FieldTCPSeqNum:
		return direct(payloadField(th, 4, 4, 0, 0, 0xFFFFFFFF), tcpHdr)
	case filter.FieldTCPAckNum:
		return direct(payloadField(th, 8, 4, 0, 0, 0xFFFFFFFF), tcpHdr)
	case filter.FieldTCPHdrLength:
		return direct(payloadField(th, 12, 1, 0xF0, 4, 0xF), tcpHdr)
	case filter.FieldTCPUrg, filter.FieldTCPAck, filter.FieldTCPPsh, filter.FieldTCPRst, filter.FieldTCPSyn, filter.FieldTCPFin:
		bit := uint(filter.FieldTCPFin - c.Field) // Fin is bit 0 ... Urg bit 5
		return direct(payloadField(th, 13, 1, 1<<bit, bit, 1), tcpHdr)
	case filter.FieldTCPWindow:
		return direct(payloadField(th, 14, 2, 0, 0, 0xFFFF), tcpHdr)
	case filter.FieldTCPChecksum:
		return direct(payloadField(th, 16, 2, 0, 0, 0xFFFF), tcpHdr)
	case filter.FieldTCPUrgPtr:
		return direct(payloadField(th, 18, 2, 0, 0, 0xFFFF), tcpHdr)

	case filter.FieldUDPSrcPort:
		return direct(payloadField(th, 0, 2, 0, 0, 0xFFFF), udpHdr)
	case filter.FieldUDPDstPort:
		return direct(payloadField(th, 2, 2, 0, 0, 0xFFFF), udpHdr)
	case filter.FieldUDPLength:
		return direct(payloadField(th, 4, 2, 0, 0, 0xFFFF), udpHdr)
	case filter.FieldUDPChecksum:
		return direct(payloadField(th, 6, 2, 0, 0, 0xFFFF), udpHdr)
	case filter.FieldUDPPayload, filter.FieldUDPPayload16, filter.FieldUDPPayload32:
		n := map[filter.Field]int{filter.FieldUDPPayload: 1, filter.FieldUDPPayload16: 2, filter.FieldUDPPayload32: 4}[c.Field]
		if c.Index < 0 || 8+int(c.Index) > maxPayloadOff {
			return nil, false
		}
		return direct(payloadField(th, 8+uint32(c.Index), n, 0, 0, uint64(1)<<(8*n)-1), udpHdr)
	}
	// Timestamp, impostor, subIfIdx, random*, payload lengths, TCP payload
	// bytes, negative indexes and the flow/socket/reflect fields.
	return nil, false
}

func icmpOf(f filter.Field) []expr.Any {
	if f >= filter.FieldICMPv6Type && f <= filter.FieldICMPv6Body {
		return icmpv6Hdr
	}
	return icmpHdr
}

// and2 is and without the bound (both sides are small by construction).
func and2(a, b disj) disj {
	out := make(disj, 0, len(a)*len(b))
	for _, x := range a {
		for _, y := range b {
			out = append(out, conj{
				exprs:  append(append([]expr.Any(nil), x.exprs...), y.exprs...),
				guards: append(append([][]expr.Any(nil), x.guards...), y.guards...),
			})
		}
	}
	return out
}

// markSkip accepts packets injected by handles of priority <= p.
func markSkip(p int16) []expr.Any {
	return []expr.Any{
		meta(expr.MetaKeyMARK), hton(4),
		&expr.Range{Op: expr.CmpOpEq, Register: 1,
			FromData: binaryutil.BigEndian.PutUint32(MarkMagic),
			ToData:   binaryutil.BigEndian.PutUint32(Mark(p))},
		&expr.Verdict{Kind: expr.VerdictAccept},
	}
}

// ndpKeep accepts ICMPv6 types 133..137.
func ndpKeep() []expr.Any {
	return concat(icmpv6Hdr, []expr.Any{
		load(th, 0, 1),
		&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: []byte{133}, ToData: []byte{137}},
		&expr.Verdict{Kind: expr.VerdictAccept},
	})
}
