package divert

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"

	"github.com/netdivert/divert/internal/packet"
)

// This file holds the setters of Packet: each rewrites one field in place
// and updates the checksums that cover it incrementally (RFC 1624 eqn. 3,
// HC' = ~(~HC + ~m + m')), without reading the rest of the packet and
// without allocating. Every check is done before the first byte is written:
// on error the packet is unchanged.

// SetSrcAddr sets the IP source address to a, in place, and updates the
// checksums that cover it: the IPv4 header checksum, and the TCP, UDP or
// ICMPv6 checksum through the pseudo-header (ICMP's does not cover it;
// UDP-Lite, DCCP and other protocols are left as they are). a must be of
// the packet's family (an IPv4-mapped address is IPv6: Unmap it for an
// IPv4 packet); else the error wraps os.ErrInvalid. On any error the
// packet is unchanged.
//
// A checksum CalcChecksums would compute stays the one it computes, byte
// for byte; a wrong one stays wrong by as much. A UDP checksum of 0 (none)
// stays 0, and one that becomes 0 is written 0xFFFF. The update works
// where CalcChecksums cannot, in a first fragment or a truncated buffer
// that holds the transport checksum, even when it ends inside the
// transport header: a TCP header cut after its checksum (18 or 19 of its
// 20 bytes) or an ICMPv6 one (4 to 7 of 8), which ParsePacket does not
// report (WinDivert's rules want the whole header: Packet.TCP and
// Packet.ICMPv6 are nil, and the bytes are Payload's first). A buffer that
// ends before the transport checksum is an error wrapping ErrTruncated. A
// non-first fragment has no transport header: only its IPv4 header
// checksum is updated, and the datagram's first fragment needs the same
// change.
//
// The update assumes finished checksums. When the received Address has a
// checksum bit clear (the field may hold a partial sum that the stack or
// the network card completes later), call CalcChecksums(b, &addr, 0) after
// the setters, which recomputes every checksum. On Linux and Windows Send
// itself does so for a changed packet (except a fragment's transport
// checksum); on FreeBSD it does not.
func (p *Packet) SetSrcAddr(a netip.Addr) error { return p.setAddr(a, false) }

// SetDstAddr sets the IP destination address to a, in place, and updates
// the checksums that cover it, as SetSrcAddr does. For IPv6 it is the
// header's destination (see DstAddr): when a Routing header names another
// final destination, the one the transport pseudo-header holds (see
// CalcChecksums), the transport checksum is left as it is.
func (p *Packet) SetDstAddr(a netip.Addr) error { return p.setAddr(a, true) }

// SetSrcPort sets the TCP or UDP source port, in place, and updates the
// TCP or UDP checksum (see SetSrcAddr: a UDP checksum of 0 stays 0, and
// checksum offload). A TCP header that a truncated buffer cuts after its
// checksum (18 or 19 bytes, which ParsePacket does not report: see
// SetSrcAddr) is updated too, and SrcPort and DstPort read it. A packet
// without a TCP or UDP header (another protocol, a non-first fragment, a
// TCP data offset below 5) is an error wrapping os.ErrInvalid; a truncated
// buffer that ends before the checksum (or, in IPv6, in the extension
// headers before the header), one wrapping ErrTruncated.
func (p *Packet) SetSrcPort(port uint16) error { return p.setPort(port, 0) }

// SetDstPort sets the TCP or UDP destination port, in place, and updates
// the TCP or UDP checksum, as SetSrcPort does.
func (p *Packet) SetDstPort(port uint16) error { return p.setPort(port, 2) }

// SetTTL sets the IPv4 TTL or the IPv6 hop limit, in place, and updates the
// IPv4 header checksum (see SetSrcAddr). Any value is taken, 0 included;
// DecrementTTL is the forwarding step. A Packet without an IP header is an
// error wrapping os.ErrInvalid.
func (p *Packet) SetTTL(ttl uint8) error {
	switch {
	case len(p.IPv4) >= packet.IPv4HdrLen:
		h := p.IPv4
		old := binary.BigEndian.Uint16(h[8:])
		h[8] = ttl
		updateSum(h[10:12], wordDiff(old, binary.BigEndian.Uint16(h[8:])))
	case len(p.IPv6) >= packet.IPv6HdrLen:
		p.IPv6[7] = ttl
	default:
		return fmt.Errorf("divert: set TTL: no IPv4 or IPv6 header: %w", os.ErrInvalid)
	}
	return nil
}

// setAddr is SetSrcAddr (dst false) and SetDstAddr (dst true).
func (p *Packet) setAddr(a netip.Addr, dst bool) error {
	var field, ipSum []byte // the address in the header; the IPv4 header checksum
	var a16 [16]byte
	var newAddr []byte
	v6 := false
	switch {
	case len(p.IPv4) >= packet.IPv4HdrLen:
		if !a.Is4() {
			return p.familyError(a)
		}
		a4 := a.As4()
		newAddr = a16[:copy(a16[:], a4[:])]
		field, ipSum = p.IPv4[12:16], p.IPv4[10:12]
		if dst {
			field = p.IPv4[16:20]
		}
	case len(p.IPv6) >= packet.IPv6HdrLen:
		if !a.Is6() {
			return p.familyError(a)
		}
		a16 = a.As16()
		newAddr, v6 = a16[:], true
		field = p.IPv6[8:24]
		if dst {
			field = p.IPv6[24:40]
		}
	default:
		return fmt.Errorf("divert: set address: no IPv4 or IPv6 header: %w", os.ErrInvalid)
	}
	sum, udp, err := p.pseudoSum()
	if err != nil {
		return err
	}
	if dst && v6 && routedDst(p.IPv6, p.Ext) {
		sum = nil // the pseudo-header holds the routing header's address
	}
	var d uint32
	for i := 0; i < len(field); i += 2 {
		d += wordDiff(binary.BigEndian.Uint16(field[i:]), binary.BigEndian.Uint16(newAddr[i:]))
	}
	copy(field, newAddr)
	if ipSum != nil {
		updateSum(ipSum, d)
	}
	if sum != nil {
		updateTransportSum(sum, udp, d)
	}
	return nil
}

// familyError is setAddr's error for an address p cannot hold.
func (p *Packet) familyError(a netip.Addr) error {
	v := "IPv4"
	if p.IPv4 == nil {
		v = "IPv6"
	}
	if !a.IsValid() {
		return fmt.Errorf("divert: set address: invalid address for an %s packet: %w", v, os.ErrInvalid)
	}
	return fmt.Errorf("divert: set address: %v is not an %s address: %w", a, v, os.ErrInvalid)
}

// pseudoSum returns the checksum field of p's transport header when its
// checksum covers the pseudo-header (TCP, UDP, ICMPv6), or nil (no such
// header, ICMP, a non-first fragment, another protocol); udp tells a UDP
// one. The header may be cut short (cutHeader). It is an error when the
// buffer ends before that field.
func (p *Packet) pseudoSum() (sum []byte, udp bool, err error) {
	switch {
	case p.TCP != nil:
		if len(p.TCP) >= 18 {
			return p.TCP[16:18], false, nil
		}
	case p.UDP != nil:
		if len(p.UDP) >= 8 {
			return p.UDP[6:8], true, nil
		}
	case p.ICMPv6 != nil:
		if len(p.ICMPv6) >= 4 {
			return p.ICMPv6[2:4], false, nil
		}
	case p.ICMP != nil:
		return nil, false, nil
	default:
		h, ok := p.cutHeader()
		switch {
		case ok && p.Protocol == packet.ProtoTCP && len(h) >= 18:
			return h[16:18], false, nil
		case ok && p.Protocol == packet.ProtoICMPv6 && len(h) >= 4:
			return h[2:4], false, nil
		case !ok && !p.cutExt():
			return nil, false, nil
		}
	}
	return nil, false, fmt.Errorf("%w: the buffer ends before the %s checksum, which covers the addresses", ErrTruncated, protoName(p.Protocol))
}

// cutHeader returns the bytes of p's transport header, Payload's first,
// when ParsePacket found none because the buffer ends before the header's
// fixed part does (20 bytes for TCP, 8 for UDP and ICMPv6); ok is false
// otherwise (the header whole, a non-first fragment, another protocol). A
// TCP header whose data offset is below 5 is not one (ParsePacket does not
// take it in a whole buffer either): ok is false.
func (p *Packet) cutHeader() (h []byte, ok bool) {
	if !p.Truncated || p.FragOff != 0 || p.TCP != nil || p.UDP != nil || p.ICMP != nil || p.ICMPv6 != nil {
		return nil, false
	}
	h = p.Payload
	switch p.Protocol {
	case packet.ProtoTCP:
		ok = len(h) < packet.TCPHdrLen && (len(h) <= 12 || h[12]>>4 >= 5)
	case packet.ProtoUDP:
		ok = len(h) < packet.UDPHdrLen
	case packet.ProtoICMPv6:
		ok = p.IPv4 == nil && len(h) < packet.ICMPHdrLen
	}
	if !ok {
		return nil, false
	}
	return h, true
}

// cutTCP returns the TCP header that a truncated buffer cuts after its
// checksum (cutHeader, 18 or 19 bytes), or nil.
func (p *Packet) cutTCP() []byte {
	if h, ok := p.cutHeader(); ok && p.Protocol == packet.ProtoTCP && len(h) >= 18 {
		return h
	}
	return nil
}

// cutExt reports whether p is an IPv6 packet whose buffer ends inside an
// extension header (ParsePacket stopped at it: its protocol is p's).
func (p *Packet) cutExt() bool {
	if !p.Truncated || p.FragOff != 0 || p.IPv4 != nil {
		return false
	}
	switch p.Protocol {
	case packet.ProtoHopOpts, packet.ProtoRouting, packet.ProtoFragment,
		packet.ProtoAH, packet.ProtoDstOpts, packet.ProtoMobility:
		return true
	}
	return false
}

// protoName names the transport protocol proto for an error.
func protoName(proto uint8) string {
	switch proto {
	case packet.ProtoTCP:
		return "TCP"
	case packet.ProtoUDP:
		return "UDP"
	case packet.ProtoICMPv6:
		return "ICMPv6"
	}
	return "transport"
}

// setPort is SetSrcPort (off 0) and SetDstPort (off 2).
func (p *Packet) setPort(port uint16, off int) error {
	var h, sum []byte
	udp := false
	cut, isCut := p.cutHeader()
	switch {
	case len(p.TCP) >= 18:
		h, sum = p.TCP, p.TCP[16:18]
	case len(p.UDP) >= 8:
		h, sum, udp = p.UDP, p.UDP[6:8], true
	case isCut && p.Protocol == packet.ProtoTCP && len(cut) >= 18:
		h, sum = cut, cut[16:18] // cut after its checksum
	case p.TCP != nil || p.UDP != nil || isCut && p.Protocol != packet.ProtoICMPv6 || p.cutExt():
		return fmt.Errorf("%w: the buffer ends before the %s header's checksum", ErrTruncated, protoName(p.Protocol))
	case p.FragOff != 0:
		return fmt.Errorf("divert: set port: a non-first fragment has no TCP or UDP header: %w", os.ErrInvalid)
	default:
		return fmt.Errorf("divert: set port: no TCP or UDP header (protocol %d): %w", p.Protocol, os.ErrInvalid)
	}
	old := binary.BigEndian.Uint16(h[off:])
	binary.BigEndian.PutUint16(h[off:], port)
	updateTransportSum(sum, udp, wordDiff(old, port))
	return nil
}

// routedDst reports whether the IPv6 transport pseudo-header's destination
// is not the header's own but an address of a Routing header (see
// packet.PseudoDst): the first Routing header of ext, the extension headers
// ParsePacket walked after ip6, has Segments Left not 0 and is of type 0,
// 2 or 4 with at least one address.
func routedDst(ip6, ext []byte) bool {
	nh := ip6[6]
	for len(ext) >= 2 {
		hl := int(ext[1])
		switch nh {
		case packet.ProtoFragment:
			hl = 8
		case packet.ProtoAH:
			hl = (hl + 2) * 4
		case packet.ProtoHopOpts, packet.ProtoDstOpts, packet.ProtoRouting, packet.ProtoMobility:
			hl = (hl + 1) * 8
		default:
			return false
		}
		if len(ext) < hl {
			return false
		}
		if nh == packet.ProtoRouting {
			_, routed := packet.RoutingFinal(ext[:hl])
			return routed
		}
		nh = ext[0]
		ext = ext[hl:]
	}
	return false
}

// wordDiff returns ~m + m' for one 16-bit word changing from old to new,
// the part of RFC 1624 eqn. 3 a change adds to a sum.
func wordDiff(old, new uint16) uint32 { return uint32(^old) + uint32(new) }

// updateSum updates checksum field f by d, a sum of wordDiff results (at
// most 2^16 of them): HC' = ~(~HC + d).
func updateSum(f []byte, d uint32) {
	binary.BigEndian.PutUint16(f, ^addSum(^binary.BigEndian.Uint16(f), d))
}

// addSum returns the one's complement sum of s and d, folded to 16 bits.
func addSum(s uint16, d uint32) uint16 {
	t := uint64(s) + uint64(d)
	t = t&0xFFFF + t>>16
	t = t&0xFFFF + t>>16
	t = t&0xFFFF + t>>16
	return uint16(t)
}

// updateTransportSum updates the TCP, UDP or ICMPv6 checksum field f by d.
// A UDP checksum of 0 means none and stays 0; a UDP checksum that becomes 0
// is written 0xFFFF, as a sender writes it (RFC 768).
func updateTransportSum(f []byte, udp bool, d uint32) {
	if udp && f[0] == 0 && f[1] == 0 {
		return
	}
	updateSum(f, d)
	if udp && f[0] == 0 && f[1] == 0 {
		f[0], f[1] = 0xFF, 0xFF
	}
}
