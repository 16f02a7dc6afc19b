package filter

import (
	"encoding/binary"

	"github.com/netdivert/divert/internal/packet"
)

// This file is the interpreter (WinDivertExecuteFilter).

var be = binary.BigEndian

// evalCtx is the state of one evaluation: the parsed packet and the metadata.
type evalCtx struct {
	b      []byte
	info   packet.Info
	meta   *Meta
	layer  Layer
	random uint64 // the hash, once computed (never 0 then)
}

func (c *evalCtx) parse(b []byte) error {
	c.b = b
	return packet.Parse(b, &c.info)
}

// run executes the program: 1 accept, 0 reject, -1 error.
func (c *evalCtx) run(f *Filter) int {
	prog := f.prog
	ip := 0
	for ttl := maxTests + 1; ttl > 0; ttl-- {
		in := &prog[ip]
		var res bool
		if in.load != loadNone {
			res = c.fast(in)
		} else {
			v, neg, st := c.value(in)
			if st < 0 {
				return -1
			}
			if st > 0 {
				res = in.op.Holds(cmp128(neg, &v, in.neg, &in.val, in.big))
			}
		}
		next := in.fail
		if res {
			next = in.succ
		}
		switch next {
		case resAccept:
			return 1
		case resReject:
			return 0
		}
		if int(next) >= len(prog) {
			return -1
		}
		ip = int(next)
	}
	return -1
}

// fast evaluates a header-field test (in.load != loadNone).
func (c *evalCtx) fast(in *insn) bool {
	var o int
	var x uint32
	switch in.load {
	case loadPresent:
		switch in.field {
		case fIP:
			x = b2u(c.info.Version == 4)
		case fIPv6:
			x = b2u(c.info.Version == 6)
		default:
			x = b2u(c.info.TransOff >= 0 && c.info.Protocol == in.proto)
		}
		return in.cmp32(x)
	case loadPayLen:
		if c.info.TransOff < 0 || c.info.Protocol != in.proto {
			return false
		}
		return in.cmp32(uint32(c.info.PayloadLen))
	case loadAddr6:
		if c.info.Version != 6 {
			return false
		}
		if in.neg {
			return in.op.Holds(1)
		}
		b := c.b[in.off:]
		hi, lo := be.Uint64(b), be.Uint64(b[8:])
		ahi := uint64(in.val[3])<<32 | uint64(in.val[2])
		alo := uint64(in.val[1])<<32 | uint64(in.val[0])
		cmp := 0
		switch {
		case hi < ahi || (hi == ahi && lo < alo):
			cmp = -1
		case hi != ahi || lo != alo:
			cmp = 1
		}
		return in.op.Holds(cmp)
	case loadIP4:
		if c.info.Version != 4 {
			return false
		}
	case loadIP6:
		if c.info.Version != 6 {
			return false
		}
	default:
		if c.info.TransOff < 0 || c.info.Protocol != in.proto {
			return false
		}
		o = c.info.TransOff
	}
	o += int(in.off)
	switch in.width {
	case 1:
		x = uint32(c.b[o])
	case 2:
		x = uint32(be.Uint16(c.b[o:]))
	default:
		x = be.Uint32(c.b[o:])
	}
	return in.cmp32(x >> in.shift & in.mask)
}

// cmp32 compares a non-negative 32-bit field value with the constant.
func (in *insn) cmp32(x uint32) bool {
	if in.neg {
		return in.op.Holds(1) // any value is above a negative constant
	}
	a := in.val[0]
	switch in.op {
	case OpEq:
		return x == a
	case OpNe:
		return x != a
	case OpLt:
		return x < a
	case OpLe:
		return x <= a
	case OpGt:
		return x > a
	default:
		return x >= a
	}
}

// Holds reports whether a comparison whose left side compares to the right
// side as cmp (negative: less, zero: equal, positive: greater) holds under o.
func (o Op) Holds(cmp int) bool {
	switch o {
	case OpEq:
		return cmp == 0
	case OpNe:
		return cmp != 0
	case OpLt:
		return cmp < 0
	case OpLe:
		return cmp <= 0
	case OpGt:
		return cmp > 0
	default:
		return cmp >= 0
	}
}

func b2u(b bool) uint32 {
	if b {
		return 1
	}
	return 0
}

func addr128(a []byte) u128 {
	return u128{be.Uint32(a[12:]), be.Uint32(a[8:]), be.Uint32(a[4:]), be.Uint32(a[0:])}
}

// Header presence at the network layers.
func (c *evalCtx) hasIP() bool   { return c.info.Version == 4 }
func (c *evalCtx) hasIPv6() bool { return c.info.Version == 6 }
func (c *evalCtx) hasTrans(proto uint8) bool {
	return c.info.TransOff >= 0 && c.info.Protocol == proto
}

// getData is WinDivertGetData: the size-byte big-endian word at idx in
// [lo, hi) (idx < 0 counts from hi).
func (c *evalCtx) getData(lo, hi int, idx int32, size int) (uint32, bool) {
	i := int(idx)
	if i < 0 {
		i += hi
	} else {
		i += lo
	}
	if i < lo || i > hi-size {
		return 0, false
	}
	switch size {
	case 1:
		return uint32(c.b[i]), true
	case 2:
		return uint32(be.Uint16(c.b[i:])), true
	}
	return be.Uint32(c.b[i:]), true
}

// value returns the value of in's field: st is 1 when present, 0 when
// absent (the test is false), -1 when the field cannot be evaluated here.
func (c *evalCtx) value(in *insn) (v u128, neg bool, st int) {
	m := c.meta
	net := c.layer <= LayerNetworkForward
	if !validField(c.layer, in.field) {
		return v, false, -1
	}
	b := c.b
	t := c.info.TransOff
	switch in.field {
	case fZero:
	case fEvent:
		v[0] = uint32(m.Event)
	case fLength:
		v[0] = uint32(len(b))
	case fTimestamp:
		ts := uint64(m.Timestamp)
		if m.Timestamp < 0 {
			neg = true
			ts = -ts
		}
		v[0], v[1] = uint32(ts), uint32(ts>>32)
	case fRandom8, fRandom16, fRandom32:
		if c.random == 0 {
			c.random = packet.HashInfo(b, &c.info, uint64(m.Timestamp)) | 0xFF00000000000000
		}
		switch in.field {
		case fRandom8:
			v[0] = uint32(c.random>>48) & 0xFF
		case fRandom16:
			v[0] = uint32(c.random>>32) & 0xFFFF
		default:
			v[0] = uint32(c.random)
		}
	case fPacket, fPacket16, fPacket32:
		x, ok := c.getData(0, len(b), in.idx, fields[in.field].size)
		if !ok {
			return v, false, 0
		}
		v[0] = x
	case fTCPPayload, fTCPPayload16, fTCPPayload32, fUDPPayload, fUDPPayload16, fUDPPayload32:
		if !c.hasTrans(uint8(proto(in.field))) {
			return v, false, 0
		}
		lo := c.info.PayloadOff
		x, ok := c.getData(lo, lo+c.info.PayloadLen, in.idx, fields[in.field].size)
		if !ok {
			return v, false, 0
		}
		v[0] = x
	case fInbound:
		v[0] = b2u(!m.Outbound)
	case fOutbound:
		v[0] = b2u(m.Outbound)
	case fFragment:
		v[0] = b2u(c.info.Fragment)
	case fIfIdx:
		v[0] = m.IfIdx
	case fSubIfIdx:
		v[0] = m.SubIfIdx
	case fLoopback:
		v[0] = b2u(m.Loopback)
	case fImpostor:
		v[0] = b2u(m.Impostor)
	case fIP:
		if net {
			v[0] = b2u(c.hasIP())
		} else {
			v[0] = b2u(!m.IPv6)
		}
	case fIPv6:
		if net {
			v[0] = b2u(c.hasIPv6())
		} else {
			v[0] = b2u(m.IPv6)
		}
	case fICMP:
		if net {
			v[0] = b2u(c.hasTrans(packet.ProtoICMP))
		} else {
			v[0] = b2u(!m.IPv6 && m.Protocol == packet.ProtoICMP)
		}
	case fICMPv6:
		if net {
			v[0] = b2u(c.hasTrans(packet.ProtoICMPv6))
		} else {
			v[0] = b2u(m.IPv6 && m.Protocol == packet.ProtoICMPv6)
		}
	case fTCP:
		if net {
			v[0] = b2u(c.hasTrans(packet.ProtoTCP))
		} else {
			v[0] = b2u(m.Protocol == packet.ProtoTCP)
		}
	case fUDP:
		if net {
			v[0] = b2u(c.hasTrans(packet.ProtoUDP))
		} else {
			v[0] = b2u(m.Protocol == packet.ProtoUDP)
		}
	case fIPHdrLength, fIPTOS, fIPLength, fIPId, fIPDF, fIPMF, fIPFragOff, fIPTTL,
		fIPProtocol, fIPChecksum, fIPSrcAddr, fIPDstAddr:
		if !c.hasIP() {
			return v, false, 0
		}
		switch in.field {
		case fIPHdrLength:
			v[0] = uint32(b[0] & 0x0F)
		case fIPTOS:
			v[0] = uint32(b[1])
		case fIPLength:
			v[0] = uint32(be.Uint16(b[2:]))
		case fIPId:
			v[0] = uint32(be.Uint16(b[4:]))
		case fIPDF:
			v[0] = uint32(b[6]>>6) & 1
		case fIPMF:
			v[0] = uint32(b[6]>>5) & 1
		case fIPFragOff:
			v[0] = uint32(be.Uint16(b[6:]) & 0x1FFF)
		case fIPTTL:
			v[0] = uint32(b[8])
		case fIPProtocol:
			v[0] = uint32(b[9])
		case fIPChecksum:
			v[0] = uint32(be.Uint16(b[10:]))
		case fIPSrcAddr:
			v = u128{be.Uint32(b[12:]), 0xFFFF}
		default:
			v = u128{be.Uint32(b[16:]), 0xFFFF}
		}
	case fIPv6TrafficClass, fIPv6FlowLabel, fIPv6Length, fIPv6NextHdr, fIPv6HopLimit,
		fIPv6SrcAddr, fIPv6DstAddr:
		if !c.hasIPv6() {
			return v, false, 0
		}
		switch in.field {
		case fIPv6TrafficClass:
			v[0] = uint32(be.Uint16(b[0:])>>4) & 0xFF
		case fIPv6FlowLabel:
			v[0] = be.Uint32(b[0:]) & 0xFFFFF
		case fIPv6Length:
			v[0] = uint32(be.Uint16(b[4:]))
		case fIPv6NextHdr:
			v[0] = uint32(b[6])
		case fIPv6HopLimit:
			v[0] = uint32(b[7])
		case fIPv6SrcAddr:
			v = addr128(b[8:24])
		default:
			v = addr128(b[24:40])
		}
	case fICMPType, fICMPCode, fICMPChecksum, fICMPBody, fICMPv6Type, fICMPv6Code,
		fICMPv6Checksum, fICMPv6Body:
		p := uint8(packet.ProtoICMP)
		if fields[in.field].proto == fICMPv6 {
			p = packet.ProtoICMPv6
		}
		if !c.hasTrans(p) {
			return v, false, 0
		}
		switch in.field {
		case fICMPType, fICMPv6Type:
			v[0] = uint32(b[t])
		case fICMPCode, fICMPv6Code:
			v[0] = uint32(b[t+1])
		case fICMPChecksum, fICMPv6Checksum:
			v[0] = uint32(be.Uint16(b[t+2:]))
		default:
			v[0] = be.Uint32(b[t+4:])
		}
	case fTCPSrcPort, fTCPDstPort, fTCPSeqNum, fTCPAckNum, fTCPHdrLength, fTCPUrg, fTCPAck,
		fTCPPsh, fTCPRst, fTCPSyn, fTCPFin, fTCPWindow, fTCPChecksum, fTCPUrgPtr, fTCPPayloadLength:
		if !c.hasTrans(packet.ProtoTCP) {
			return v, false, 0
		}
		switch in.field {
		case fTCPSrcPort:
			v[0] = uint32(be.Uint16(b[t:]))
		case fTCPDstPort:
			v[0] = uint32(be.Uint16(b[t+2:]))
		case fTCPSeqNum:
			v[0] = be.Uint32(b[t+4:])
		case fTCPAckNum:
			v[0] = be.Uint32(b[t+8:])
		case fTCPHdrLength:
			v[0] = uint32(b[t+12] >> 4)
		case fTCPUrg:
			v[0] = uint32(b[t+13]>>5) & 1
		case fTCPAck:
			v[0] = uint32(b[t+13]>>4) & 1
		case fTCPPsh:
			v[0] = uint32(b[t+13]>>3) & 1
		case fTCPRst:
			v[0] = uint32(b[t+13]>>2) & 1
		case fTCPSyn:
			v[0] = uint32(b[t+13]>>1) & 1
		case fTCPFin:
			v[0] = uint32(b[t+13]) & 1
		case fTCPWindow:
			v[0] = uint32(be.Uint16(b[t+14:]))
		case fTCPChecksum:
			v[0] = uint32(be.Uint16(b[t+16:]))
		case fTCPUrgPtr:
			v[0] = uint32(be.Uint16(b[t+18:]))
		default:
			v[0] = uint32(c.info.PayloadLen)
		}
	case fUDPSrcPort, fUDPDstPort, fUDPLength, fUDPChecksum, fUDPPayloadLength:
		if !c.hasTrans(packet.ProtoUDP) {
			return v, false, 0
		}
		switch in.field {
		case fUDPSrcPort:
			v[0] = uint32(be.Uint16(b[t:]))
		case fUDPDstPort:
			v[0] = uint32(be.Uint16(b[t+2:]))
		case fUDPLength:
			v[0] = uint32(be.Uint16(b[t+4:]))
		case fUDPChecksum:
			v[0] = uint32(be.Uint16(b[t+6:]))
		default:
			v[0] = uint32(c.info.PayloadLen)
		}
	case fLocalAddr, fRemoteAddr:
		if !net {
			if in.field == fLocalAddr {
				v = addr128(m.LocalAddr[:])
			} else {
				v = addr128(m.RemoteAddr[:])
			}
			break
		}
		src := m.Outbound == (in.field == fLocalAddr)
		switch {
		case c.hasIP():
			off := 16
			if src {
				off = 12
			}
			v = u128{be.Uint32(b[off:]), 0xFFFF}
		case c.hasIPv6():
			off := 24
			if src {
				off = 8
			}
			v = addr128(b[off : off+16])
		}
	case fLocalPort, fRemotePort:
		if !net {
			if in.field == fLocalPort {
				v[0] = uint32(m.LocalPort)
			} else {
				v[0] = uint32(m.RemotePort)
			}
			break
		}
		src := m.Outbound == (in.field == fLocalPort)
		switch {
		case c.hasTrans(packet.ProtoTCP), c.hasTrans(packet.ProtoUDP):
			off := t + 2
			if src {
				off = t
			}
			v[0] = uint32(be.Uint16(b[off:]))
		case c.hasTrans(packet.ProtoICMP), c.hasTrans(packet.ProtoICMPv6):
			if src {
				v[0] = uint32(b[t])
			}
		}
	case fProtocol:
		if net {
			v[0] = uint32(c.info.Protocol)
		} else {
			v[0] = uint32(m.Protocol)
		}
	case fProcessID:
		v[0] = m.ProcessID
	case fEndpointID:
		v[0], v[1] = uint32(m.EndpointID), uint32(m.EndpointID>>32)
	case fParentEndpointID:
		v[0], v[1] = uint32(m.ParentEndpointID), uint32(m.ParentEndpointID>>32)
	case fLayer:
		v[0] = uint32(m.ReflectLayer)
	case fPriority:
		p := int32(m.Priority)
		if p < 0 {
			neg = true
			p = -p
		}
		v[0] = uint32(p)
	default:
		return v, false, -1
	}
	return v, neg, 1
}

// proto returns the transport protocol number a field needs.
func proto(f fid) uint8 {
	switch fields[f].proto {
	case fTCP:
		return packet.ProtoTCP
	case fUDP:
		return packet.ProtoUDP
	case fICMP:
		return packet.ProtoICMP
	case fICMPv6:
		return packet.ProtoICMPv6
	}
	return 0
}
