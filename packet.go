package divert

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"

	"github.com/netdivert/divert/internal/packet"
)

// This file holds WinDivert's packet helpers: pure Go, any OS, no driver or
// privilege needed, and no allocation for a packet that parses (an error
// is built when it is returned).

// Packet is a parsed view of one IP packet: every slice aliases the buffer
// given to ParsePacket. Headers that are absent are nil. The setters
// (SetSrcAddr, SetDstAddr, SetSrcPort, SetDstPort, SetTTL) write a field
// through the views and update the checksums that cover it.
type Packet struct {
	// IPv4 is the IPv4 header with its options (IHL*4 bytes); nil for IPv6.
	IPv4 []byte
	// IPv6 is the fixed 40-byte IPv6 header; nil for IPv4.
	IPv6 []byte
	// Ext holds the IPv6 extension headers that were walked (Hop-by-Hop,
	// Routing, Fragment, AH, Destination Options, Mobility); nil if none.
	Ext []byte
	// ICMP, ICMPv6, UDP are the 8-byte headers; TCP is the TCP header with
	// its options (data offset*4 bytes, clipped to the data present).
	ICMP, ICMPv6, TCP, UDP []byte
	// Payload is what follows the last header found, up to the IP length.
	// It is nil when empty.
	Payload []byte
	// Protocol is the transport protocol: the IPv4 protocol, or the IPv6
	// next header after the extension headers.
	Protocol uint8
	// Fragment is set for an IPv4 packet with MF or a fragment offset, and
	// for an IPv6 packet with a Fragment header.
	Fragment bool
	// MF is the More Fragments bit.
	MF bool
	// FragOff is the fragment offset in 8-byte units. Non-first fragments
	// have no transport header.
	FragOff uint16
	// Truncated is set when the buffer ends before the IP length.
	Truncated bool
}

// ParsePacket parses the IP packet at the start of b with
// WinDivertHelperParsePacket's rules: a buffer shorter than 20 bytes, an IP
// version other than 4 or 6, an IPv4 header length below 20 or above the
// total length, or a buffer shorter than the IP header is an error. Bytes
// after the IP length belong to the next packet (see NextPacket). IPv6
// extension headers 0, 43, 44, 51, 60 and 135 are walked; non-first
// fragments have no transport header.
//
// A buffer that ends before the IP length (a packet received into a short
// buffer) is an error wrapping ErrTruncated, as in WinDivert, but the
// returned Packet still holds the headers that fit and Truncated is set.
func ParsePacket(b []byte) (Packet, error) {
	var p packet.Info
	if err := packet.Parse(b, &p); err != nil {
		return Packet{}, fmt.Errorf("divert: %w", err)
	}
	var pk Packet
	if p.Version == 4 {
		pk.IPv4 = b[:p.IPHdrLen:p.IPHdrLen]
	} else {
		pk.IPv6 = b[:packet.IPv6HdrLen:packet.IPv6HdrLen]
		if p.NextHdrOff > packet.IPv6HdrLen {
			pk.Ext = b[packet.IPv6HdrLen:p.NextHdrOff:p.NextHdrOff]
		}
	}
	if t := p.TransOff; t >= 0 {
		h := b[t : t+p.TransLen : t+p.TransLen]
		switch p.Protocol {
		case packet.ProtoTCP:
			pk.TCP = h
		case packet.ProtoUDP:
			pk.UDP = h
		case packet.ProtoICMP:
			pk.ICMP = h
		case packet.ProtoICMPv6:
			pk.ICMPv6 = h
		}
	}
	if p.PayloadLen > 0 {
		end := p.DataEnd()
		pk.Payload = b[p.PayloadOff:end:end]
	}
	pk.Protocol = p.Protocol
	pk.Fragment = p.Fragment
	pk.MF = p.MF
	pk.FragOff = p.FragOff
	pk.Truncated = p.Truncated
	if p.Truncated {
		return pk, fmt.Errorf("%w: %d-byte buffer ends inside a %d-byte packet", ErrTruncated, len(b), p.IPLen)
	}
	return pk, nil
}

// NextPacket splits the first IP packet off b, a buffer of packets packed
// back to back as RecvBatch's messages or WinDivert's batch buffers hold
// them: pkt is b[:n] where n is the packet's IP length, rest is b[n:]. It
// returns an error when the packet does not parse (see ParsePacket) and one
// wrapping ErrTruncated when b ends before the IP length.
//
//	for len(buf) > 0 {
//		pkt, rest, err := divert.NextPacket(buf)
//		if err != nil {
//			return err
//		}
//		// use pkt
//		buf = rest
//	}
func NextPacket(b []byte) (pkt, rest []byte, err error) {
	var p packet.Info
	if err := packet.Parse(b, &p); err != nil {
		return nil, b, fmt.Errorf("divert: %w", err)
	}
	if p.Truncated {
		return nil, b, fmt.Errorf("%w: %d-byte buffer ends inside a %d-byte packet", ErrTruncated, len(b), p.IPLen)
	}
	return b[:p.IPLen:p.IPLen], b[p.IPLen:], nil
}

// IsIPv6 reports whether p is an IPv6 packet.
func (p *Packet) IsIPv6() bool { return p.IPv6 != nil }

// SrcAddr returns the IP source address (invalid for a zero Packet).
func (p *Packet) SrcAddr() netip.Addr {
	switch {
	case p.IPv4 != nil:
		return netip.AddrFrom4([4]byte(p.IPv4[12:16]))
	case p.IPv6 != nil:
		return netip.AddrFrom16([16]byte(p.IPv6[8:24]))
	}
	return netip.Addr{}
}

// DstAddr returns the IP destination address (invalid for a zero Packet).
// For IPv6 it is the header's destination, not a routing header's final
// destination.
func (p *Packet) DstAddr() netip.Addr {
	switch {
	case p.IPv4 != nil:
		return netip.AddrFrom4([4]byte(p.IPv4[16:20]))
	case p.IPv6 != nil:
		return netip.AddrFrom16([16]byte(p.IPv6[24:40]))
	}
	return netip.Addr{}
}

// TTL returns the IPv4 TTL or the IPv6 hop limit.
func (p *Packet) TTL() uint8 {
	switch {
	case p.IPv4 != nil:
		return p.IPv4[8]
	case p.IPv6 != nil:
		return p.IPv6[7]
	}
	return 0
}

// SrcPort returns the TCP or UDP source port, or 0. A TCP header that a
// truncated buffer cuts after its checksum, which ParsePacket does not
// report, is read too, as SetSrcPort writes it.
func (p *Packet) SrcPort() uint16 {
	switch {
	case p.TCP != nil:
		return binary.BigEndian.Uint16(p.TCP)
	case p.UDP != nil:
		return binary.BigEndian.Uint16(p.UDP)
	}
	if h := p.cutTCP(); h != nil {
		return binary.BigEndian.Uint16(h)
	}
	return 0
}

// DstPort returns the TCP or UDP destination port, or 0 (see SrcPort).
func (p *Packet) DstPort() uint16 {
	switch {
	case p.TCP != nil:
		return binary.BigEndian.Uint16(p.TCP[2:])
	case p.UDP != nil:
		return binary.BigEndian.Uint16(p.UDP[2:])
	}
	if h := p.cutTCP(); h != nil {
		return binary.BigEndian.Uint16(h[2:])
	}
	return 0
}

// ChecksumFlag tells CalcChecksums which checksums to leave alone.
type ChecksumFlag uint64

// Checksum flags, with WinDivert's values.
const (
	NoIPChecksum     ChecksumFlag = 1  // leave the IPv4 header checksum
	NoICMPChecksum   ChecksumFlag = 2  // leave the ICMP checksum
	NoICMPv6Checksum ChecksumFlag = 4  // leave the ICMPv6 checksum
	NoTCPChecksum    ChecksumFlag = 8  // leave the TCP checksum
	NoUDPChecksum    ChecksumFlag = 16 // leave the UDP checksum

	checksumFlagsAll = NoIPChecksum | NoICMPChecksum | NoICMPv6Checksum | NoTCPChecksum | NoUDPChecksum
)

// CalcChecksums recomputes from scratch, in place, the IPv4 header checksum
// and the ICMP, ICMPv6, TCP or UDP checksum of the packet at the start of b,
// as WinDivertHelperCalcChecksums does; flags skip some of them. When a is
// not nil it sets a.IPChecksum (IPv4), a.TCPChecksum or a.UDPChecksum for
// the checksums it computed, so Send knows them to be valid.
//
// The transport checksum covers the whole segment per the IP length and,
// except for ICMP, the pseudo-header. IPv6 extension headers are skipped;
// the IPv6 pseudo-header uses the final destination: with a Routing header
// whose Segments Left is not 0 that is its last address (types 0 and 2) or
// Segment List[0] (type 4); other routing types use the IPv6 destination.
// (WinDivert always uses the IPv6 destination: it differs only for a packet
// still on its source route.) A UDP checksum that computes to 0 is stored as
// 0xFFFF.
//
// A packet that does not parse is an error (see ParsePacket). When the
// buffer ends before the IP length (an error wrapping ErrTruncated) or the
// packet is a first fragment, whose checksum covers data the buffer does
// not hold, the IPv4 header checksum is still fixed but the transport
// checksum is left alone and an error is returned (wrapping ErrTruncated or
// ErrFragment), unless flags skip that
// checksum (then there is nothing left undone, and no error). Non-first
// fragments have no transport header: only the IPv4 header checksum is
// computed.
func CalcChecksums(b []byte, a *Address, flags ChecksumFlag) error {
	if flags&^checksumFlagsAll != 0 {
		return fmt.Errorf("divert: unknown checksum flag bits %#x: %w", uint64(flags&^checksumFlagsAll), os.ErrInvalid)
	}
	var p packet.Info
	if err := packet.Parse(b, &p); err != nil {
		return fmt.Errorf("divert: %w", err)
	}
	if p.Version == 4 && flags&NoIPChecksum == 0 {
		packet.FixIPv4Checksum(b, &p)
		if a != nil {
			a.IPChecksum = true
		}
	}
	var skip ChecksumFlag
	switch p.Protocol {
	case packet.ProtoICMP:
		skip = NoICMPChecksum
	case packet.ProtoICMPv6:
		skip = NoICMPv6Checksum
	case packet.ProtoTCP:
		skip = NoTCPChecksum
	case packet.ProtoUDP:
		skip = NoUDPChecksum
	}
	if p.TransOff < 0 {
		if p.Truncated && skip != 0 && flags&skip == 0 {
			// The buffer ends inside the transport header.
			return fmt.Errorf("%w: %d-byte buffer ends inside a %d-byte packet, in its transport header", ErrTruncated, len(b), p.IPLen)
		}
		return nil // a non-first fragment, or no checksum this helper computes
	}
	if flags&skip != 0 {
		return nil
	}
	if p.Truncated {
		return fmt.Errorf("%w: %d-byte buffer ends inside a %d-byte packet", ErrTruncated, len(b), p.IPLen)
	}
	if err := packet.FixTransportChecksum(b, &p); err != nil {
		if errors.Is(err, packet.ErrIncomplete) {
			return fmt.Errorf("%w: its transport checksum is left alone", ErrFragment)
		}
		return fmt.Errorf("divert: %w", err)
	}
	if a != nil {
		switch p.Protocol {
		case packet.ProtoTCP:
			a.TCPChecksum = true
		case packet.ProtoUDP:
			a.UDPChecksum = true
		}
	}
	return nil
}

// DecrementTTL decrements the IPv4 TTL or the IPv6 hop limit of the packet
// at the start of b, fixing the IPv4 header checksum incrementally (RFC
// 1624), as WinDivertHelperDecrementTTL does. It returns false, leaving b
// unchanged, when the TTL is 0 or 1 (the result would be 0: the packet must
// not be forwarded) or b is not an IPv4 or IPv6 packet.
func DecrementTTL(b []byte) bool {
	if len(b) < packet.IPv4HdrLen {
		return false
	}
	switch b[0] >> 4 {
	case 4:
		ttl := b[8]
		if ttl <= 1 {
			return false
		}
		old := binary.BigEndian.Uint16(b[8:])
		b[8] = ttl - 1
		hc := binary.BigEndian.Uint16(b[10:])
		binary.BigEndian.PutUint16(b[10:], packet.UpdateChecksum(hc, old, old-0x100))
		return true
	case 6:
		if len(b) < packet.IPv6HdrLen || b[7] <= 1 {
			return false
		}
		b[7]--
		return true
	}
	return false
}

// HashPacket returns WinDivertHelperHashPacket's 64-bit hash of the packet
// at the start of b with seed, bit for bit: xxHash64 specialized to one
// round over the IP header and the start of the transport header. It
// returns 0 for a packet that does not parse or is truncated. The filter
// language's random8/16/32 fields derive from it.
func HashPacket(b []byte, seed uint64) uint64 {
	return packet.Hash(b, seed)
}

// sendable returns, for Send, the IPv4 or IPv6 packet b holds (see
// ipPacketLen): bytes past its length are left out, as WinDivert's driver
// ignores them. On Linux a changed packet is handed to the kernel as it
// is, and divert(4) refuses only some malformed packets, so they are
// checked here.
func sendable(b []byte) ([]byte, error) {
	l, err := ipPacketLen(b)
	if err != nil {
		return nil, fmt.Errorf("divert: send: %w: %w", err, os.ErrInvalid)
	}
	return b[:l:l], nil
}

// ipPacketLen returns the length of the IPv4 or IPv6 packet b starts with:
// a known version, a whole header, and a length field (IPv4's total
// length, IPv6's payload length plus its fixed header) that b covers. An
// IPv4 header whose total length is less than the header is refused.
func ipPacketLen(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, errors.New("empty packet")
	}
	var l int
	switch b[0] >> 4 {
	case 4:
		hl := int(b[0]&0xf) * 4
		if len(b) < 20 || hl < 20 || len(b) < hl {
			return 0, fmt.Errorf("malformed packet: an IPv4 packet of %d bytes has no whole header", len(b))
		}
		l = int(binary.BigEndian.Uint16(b[2:4]))
		if l < hl || l > len(b) {
			return 0, fmt.Errorf("malformed packet: IPv4 total length %d, but the header has %d bytes and the packet %d", l, hl, len(b))
		}
	case 6:
		if len(b) < 40 {
			return 0, fmt.Errorf("malformed packet: an IPv6 packet of %d bytes has no whole header", len(b))
		}
		l = 40 + int(binary.BigEndian.Uint16(b[4:6]))
		if l > len(b) {
			return 0, fmt.Errorf("malformed packet: IPv6 payload length %d, but the packet has %d bytes after its header", l-40, len(b)-40)
		}
	default:
		return 0, fmt.Errorf("malformed packet: IP version %d is neither 4 nor 6", b[0]>>4)
	}
	return l, nil
}
