package nftrules

// A reference evaluator of filter.Lowered on raw packets, written from
// WinDivert's semantics (windivert.md §3.5), independent of the lowering, so
// that the kernel's decisions can be checked against it. It covers the
// fields the lowering handles.

import (
	"encoding/binary"

	"github.com/netdivert/divert/filter"
)

type pinfo struct {
	pkt            []byte
	v4, v6         bool
	proto          byte // final protocol
	frag, nonFirst bool
	th             []byte // transport header onwards, nil for non-first fragments
	tcp, udp       bool
	icmp, icmpv6   bool
}

func parse(p []byte) (pi pinfo, ok bool) {
	pi.pkt = p
	if len(p) < 20 {
		return pi, false
	}
	switch p[0] >> 4 {
	case 4:
		ihl := int(p[0]&0xf) * 4
		tot := int(binary.BigEndian.Uint16(p[2:]))
		if ihl < 20 || len(p) < ihl || tot < ihl {
			return pi, false
		}
		pi.v4 = true
		pi.proto = p[9]
		fo := binary.BigEndian.Uint16(p[6:])
		pi.frag = fo&0x3fff != 0
		pi.nonFirst = fo&0x1fff != 0
		end := min(tot, len(p))
		if !pi.nonFirst {
			pi.th = p[ihl:end]
		}
	case 6:
		if len(p) < 40 {
			return pi, false
		}
		pi.v6 = true
		nh, off := p[6], 40
		end := min(40+int(binary.BigEndian.Uint16(p[4:])), len(p))
	walk:
		for {
			switch nh {
			case 0, 43, 60:
				if off+8 > end {
					break walk
				}
				nh, off = p[off], off+int(p[off+1]+1)*8
			case 44:
				if off+8 > end {
					break walk
				}
				pi.frag = true
				if binary.BigEndian.Uint16(p[off+2:])&0xfff8 != 0 {
					pi.nonFirst = true
				}
				nh, off = p[off], off+8
			default:
				break walk
			}
		}
		pi.proto = nh
		if !pi.nonFirst && off <= end {
			pi.th = p[off:end]
		}
	default:
		return pi, false
	}
	pi.tcp = pi.proto == 6 && len(pi.th) >= 20 && pi.th[12]>>4 >= 5
	pi.udp = pi.proto == 17 && len(pi.th) >= 8
	pi.icmp = pi.v4 && pi.proto == 1 && len(pi.th) >= 8
	pi.icmpv6 = pi.v6 && pi.proto == 58 && len(pi.th) >= 8
	return pi, true
}

// env is what the packet bytes do not say.
type env struct {
	hook  Hook
	ifIdx uint32
	lo    bool
}

func b2v(b bool) u128 {
	if b {
		return u128{0, 1}
	}
	return u128{}
}

func be(b []byte) u128 {
	var v u128
	for _, x := range b {
		v.hi = v.hi<<8 | v.lo>>56
		v.lo = v.lo<<8 | uint64(x)
	}
	return v
}

// value returns the field's value and whether it is present; known is false
// for fields the evaluator does not model (the Cond is then ignored, which
// matches "dropped and inexact").
func value(pi *pinfo, e env, c filter.Cond) (v u128, present, known bool) {
	th := pi.th
	u16 := func(b []byte, o int) u128 { return u128{0, uint64(binary.BigEndian.Uint16(b[o:]))} }
	u32 := func(b []byte, o int) u128 { return u128{0, uint64(binary.BigEndian.Uint32(b[o:]))} }
	mappedv4 := func(o int) u128 { return u128{0, 0xFFFF<<32 | uint64(binary.BigEndian.Uint32(pi.pkt[o:]))} }
	out := e.hook.Outbound()
	in := e.hook.Inbound()
	switch c.Field {
	case filter.FieldZero, filter.FieldFalse, filter.FieldEvent:
		return u128{}, true, true
	case filter.FieldTrue:
		return u128{0, 1}, true, true
	case filter.FieldOutbound:
		return b2v(out), true, in || out
	case filter.FieldInbound:
		return b2v(in), true, in || out
	case filter.FieldLoopback:
		return b2v(e.lo), true, in || out
	case filter.FieldFragment:
		return b2v(pi.frag), true, true
	case filter.FieldIP:
		return b2v(pi.v4), true, true
	case filter.FieldIPv6:
		return b2v(pi.v6), true, true
	case filter.FieldTCP:
		return b2v(pi.tcp), true, true
	case filter.FieldUDP:
		return b2v(pi.udp), true, true
	case filter.FieldICMP:
		return b2v(pi.icmp), true, true
	case filter.FieldICMPv6:
		return b2v(pi.icmpv6), true, true
	case filter.FieldIfIdx:
		return u128{0, uint64(e.ifIdx)}, true, true
	case filter.FieldLength:
		return u128{0, uint64(len(pi.pkt))}, true, true
	case filter.FieldProtocol:
		return u128{0, uint64(pi.proto)}, true, true
	case filter.FieldPacket, filter.FieldPacket16, filter.FieldPacket32:
		n := map[filter.Field]int{filter.FieldPacket: 1, filter.FieldPacket16: 2, filter.FieldPacket32: 4}[c.Field]
		if c.Index < 0 {
			return u128{}, false, false
		}
		if int(c.Index)+n > len(pi.pkt) {
			return u128{}, false, true
		}
		return be(pi.pkt[c.Index : int(c.Index)+n]), true, true
	case filter.FieldLocalAddr, filter.FieldRemoteAddr:
		if !in && !out {
			return u128{}, false, false
		}
		src := (c.Field == filter.FieldLocalAddr) == out
		if pi.v4 {
			if src {
				return mappedv4(12), true, true
			}
			return mappedv4(16), true, true
		}
		if src {
			return be(pi.pkt[8:24]), true, true
		}
		return be(pi.pkt[24:40]), true, true
	case filter.FieldLocalPort, filter.FieldRemotePort:
		if !in && !out {
			return u128{}, false, false
		}
		src := (c.Field == filter.FieldLocalPort) == out
		switch {
		case pi.tcp || pi.udp:
			if src {
				return u16(th, 0), true, true
			}
			return u16(th, 2), true, true
		case pi.icmp || pi.icmpv6:
			if src {
				return u128{0, uint64(th[0])}, true, true
			}
			return u128{}, true, true
		}
		return u128{}, true, true
	}
	switch {
	case c.Field >= filter.FieldIPHdrLength && c.Field <= filter.FieldIPDstAddr:
		if !pi.v4 {
			return u128{}, false, true
		}
		p := pi.pkt
		switch c.Field {
		case filter.FieldIPHdrLength:
			return u128{0, uint64(p[0] & 0xf)}, true, true
		case filter.FieldIPTOS:
			return u128{0, uint64(p[1])}, true, true
		case filter.FieldIPLength:
			return u16(p, 2), true, true
		case filter.FieldIPId:
			return u16(p, 4), true, true
		case filter.FieldIPDF:
			return b2v(p[6]&0x40 != 0), true, true
		case filter.FieldIPMF:
			return b2v(p[6]&0x20 != 0), true, true
		case filter.FieldIPFragOff:
			return u128{0, uint64(binary.BigEndian.Uint16(p[6:]) & 0x1fff)}, true, true
		case filter.FieldIPTTL:
			return u128{0, uint64(p[8])}, true, true
		case filter.FieldIPProtocol:
			return u128{0, uint64(p[9])}, true, true
		case filter.FieldIPChecksum:
			return u16(p, 10), true, true
		case filter.FieldIPSrcAddr:
			return mappedv4(12), true, true
		case filter.FieldIPDstAddr:
			return mappedv4(16), true, true
		}
	case c.Field >= filter.FieldIPv6TrafficClass && c.Field <= filter.FieldIPv6DstAddr:
		if !pi.v6 {
			return u128{}, false, true
		}
		p := pi.pkt
		switch c.Field {
		case filter.FieldIPv6TrafficClass:
			return u128{0, uint64(binary.BigEndian.Uint16(p) >> 4 & 0xff)}, true, true
		case filter.FieldIPv6FlowLabel:
			return u128{0, uint64(binary.BigEndian.Uint32(p) & 0xfffff)}, true, true
		case filter.FieldIPv6Length:
			return u16(p, 4), true, true
		case filter.FieldIPv6NextHdr:
			return u128{0, uint64(p[6])}, true, true
		case filter.FieldIPv6HopLimit:
			return u128{0, uint64(p[7])}, true, true
		case filter.FieldIPv6SrcAddr:
			return be(p[8:24]), true, true
		case filter.FieldIPv6DstAddr:
			return be(p[24:40]), true, true
		}
	case c.Field >= filter.FieldICMPType && c.Field <= filter.FieldICMPv6Body:
		has := pi.icmp
		f := c.Field
		if f >= filter.FieldICMPv6Type {
			has, f = pi.icmpv6, f-(filter.FieldICMPv6Type-filter.FieldICMPType)
		}
		if !has {
			return u128{}, false, true
		}
		switch f {
		case filter.FieldICMPType:
			return u128{0, uint64(th[0])}, true, true
		case filter.FieldICMPCode:
			return u128{0, uint64(th[1])}, true, true
		case filter.FieldICMPChecksum:
			return u16(th, 2), true, true
		case filter.FieldICMPBody:
			return u32(th, 4), true, true
		}
	case c.Field >= filter.FieldTCPSrcPort && c.Field <= filter.FieldTCPUrgPtr:
		if !pi.tcp {
			return u128{}, false, true
		}
		switch c.Field {
		case filter.FieldTCPSrcPort:
			return u16(th, 0), true, true
		case filter.FieldTCPDstPort:
			return u16(th, 2), true, true
		case filter.FieldTCPSeqNum:
			return u32(th, 4), true, true
		case filter.FieldTCPAckNum:
			return u32(th, 8), true, true
		case filter.FieldTCPHdrLength:
			return u128{0, uint64(th[12] >> 4)}, true, true
		case filter.FieldTCPUrg, filter.FieldTCPAck, filter.FieldTCPPsh, filter.FieldTCPRst, filter.FieldTCPSyn, filter.FieldTCPFin:
			return b2v(th[13]&(1<<(filter.FieldTCPFin-c.Field)) != 0), true, true
		case filter.FieldTCPWindow:
			return u16(th, 14), true, true
		case filter.FieldTCPChecksum:
			return u16(th, 16), true, true
		case filter.FieldTCPUrgPtr:
			return u16(th, 18), true, true
		}
	case c.Field >= filter.FieldUDPSrcPort && c.Field <= filter.FieldUDPChecksum:
		if !pi.udp {
			return u128{}, false, true
		}
		return u16(th, 2*int(c.Field-filter.FieldUDPSrcPort)), true, true
	case c.Field >= filter.FieldUDPPayload && c.Field <= filter.FieldUDPPayload32:
		n := map[filter.Field]int{filter.FieldUDPPayload: 1, filter.FieldUDPPayload16: 2, filter.FieldUDPPayload32: 4}[c.Field]
		if c.Index < 0 {
			return u128{}, false, false
		}
		if !pi.udp || 8+int(c.Index)+n > len(th) {
			return u128{}, false, true
		}
		return be(th[8+c.Index : 8+int(c.Index)+n]), true, true
	}
	return u128{}, false, false
}

// evalTerm reports whether t matches, and whether every Cond was modelled.
func evalTerm(t filter.Term, pi *pinfo, e env) (match, modelled bool) {
	match, modelled = true, true
	for _, c := range t.Conds {
		v, present, known := value(pi, e, c)
		if !known {
			modelled = false
			continue
		}
		if !present || !evalConst(c.Op, c.Value, v) {
			match = false
		}
	}
	return match, modelled
}

// evalLowered is the IR's decision for the packet.
func evalLowered(l *filter.Lowered, pkt []byte, e env) bool {
	if l == nil {
		return true
	}
	pi, ok := parse(pkt)
	if !ok {
		return false
	}
	for _, t := range l.Terms {
		if m, _ := evalTerm(t, &pi, e); m {
			return true
		}
	}
	return false
}
