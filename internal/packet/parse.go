package packet

import (
	"encoding/binary"
	"errors"
)

// IP protocol numbers the parser knows.
const (
	ProtoHopOpts  = 0   // IPv6 Hop-by-Hop Options
	ProtoICMP     = 1   // ICMP (IPv4 only)
	ProtoTCP      = 6   // TCP
	ProtoUDP      = 17  // UDP
	ProtoRouting  = 43  // IPv6 Routing header
	ProtoFragment = 44  // IPv6 Fragment header
	ProtoAH       = 51  // Authentication Header
	ProtoICMPv6   = 58  // ICMPv6 (IPv6 only)
	ProtoDstOpts  = 60  // IPv6 Destination Options
	ProtoMobility = 135 // IPv6 Mobility header
)

// Header sizes.
const (
	IPv4HdrLen   = 20 // minimal IPv4 header
	IPv6HdrLen   = 40 // fixed IPv6 header
	TCPHdrLen    = 20 // minimal TCP header
	UDPHdrLen    = 8  // UDP header
	ICMPHdrLen   = 8  // ICMP and ICMPv6 header (type, code, checksum, body)
	fragExtLen   = 8  // IPv6 Fragment header
	minExtHdrLen = 2  // next header + length bytes
)

// Errors returned by Parse. Each is returned as is, so callers may compare
// with errors.Is.
var (
	// ErrShort reports a buffer too short for the IP header it starts with.
	ErrShort = errors.New("packet: buffer too short for IP header")
	// ErrVersion reports an IP version other than 4 or 6.
	ErrVersion = errors.New("packet: not an IPv4 or IPv6 packet")
	// ErrHeader reports an inconsistent IPv4 header: IHL < 5 or total
	// length smaller than the header.
	ErrHeader = errors.New("packet: malformed IPv4 header")
)

// Info locates the headers of one IP packet by offsets into the buffer
// that was parsed. Offsets are from the start of the buffer.
type Info struct {
	Version    uint8 // 4 or 6
	IPHdrLen   int   // IPv4: IHL*4; IPv6: 40
	IPLen      int   // datagram length per the header (IPv4 total length; IPv6 40+payload length)
	Protocol   uint8 // final transport protocol after IPv6 extension headers (IPv4: protocol byte)
	NextHdrOff int   // offset just past the IP header and any IPv6 extension headers walked
	FragHdrOff int   // IPv6: offset of the Fragment extension header, else -1
	Fragment   bool  // IPv4: MF set or offset != 0; IPv6: a Fragment header is present
	TransOff   int   // offset of the ICMP/ICMPv6/TCP/UDP header when present, else -1
	TransLen   int   // its header length (TCP: data offset*4 clipped to the data, UDP 8, ICMP(v6) 8)
	PayloadOff int   // offset of the payload (after the transport header when present)
	PayloadLen int   // payload length, clipped to IPLen and len(b)

	// MF is the More Fragments bit (IPv4 header or IPv6 Fragment header).
	MF bool
	// FragOff is the fragment offset in 8-byte units (IPv4 header or IPv6
	// Fragment header); non-zero means a non-first fragment.
	FragOff uint16
	// Truncated is set when the buffer is shorter than IPLen.
	Truncated bool
	// RoutingHdrOff is the offset of the first IPv6 Routing header walked,
	// else -1.
	RoutingHdrOff int
}

// DataEnd returns the end of the datagram in the buffer: min(IPLen, len(b)).
func (p *Info) DataEnd() int { return p.PayloadOff + p.PayloadLen }

// Parse fills p from b with WinDivert's WinDivertHelperParsePacket
// semantics (the WinDivertHelperParsePacketEx function of
// windivert_shared.c):
//
//   - a buffer shorter than 20 bytes, a version other than 4 or 6, an IPv4
//     IHL below 5, an IPv4 total length below IHL*4, an IPv4 buffer shorter
//     than IHL*4 or an IPv6 buffer shorter than 40 bytes is an error;
//   - a truncated datagram (len(b) < IPLen) still parses: the headers that
//     fit are used and the payload is clipped (Truncated is set);
//   - bytes past IPLen are not part of the packet (a batch buffer holds the
//     next packet there);
//   - IPv6 extension headers 0, 43, 44, 51 (length (n+2)*4), 60 and 135 are
//     walked while they fit; the walk stops at a second Fragment header, and
//     after a Fragment header with a non-zero offset;
//   - non-first fragments (offset != 0) have no transport header; first
//     fragments do;
//   - a TCP header needs 20 bytes and a data offset >= 5; a data offset
//     beyond the data is clipped to the data (empty payload); UDP, ICMP and
//     ICMPv6 need 8 bytes; ICMP only in IPv4, ICMPv6 only in IPv6.
//
// Parse never allocates. On error p is left in an unspecified state.
func Parse(b []byte, p *Info) error {
	if len(b) < IPv4HdrLen {
		return ErrShort
	}
	*p = Info{FragHdrOff: -1, TransOff: -1, RoutingHdrOff: -1}
	var end int // min(IPLen, len(b))
	var off int // current offset
	switch b[0] >> 4 {
	case 4:
		hl := int(b[0]&0x0F) * 4
		if hl < IPv4HdrLen {
			return ErrHeader
		}
		tl := int(binary.BigEndian.Uint16(b[2:]))
		if tl < hl {
			return ErrHeader
		}
		if len(b) < hl {
			return ErrShort
		}
		ff := binary.BigEndian.Uint16(b[6:])
		p.Version = 4
		p.IPHdrLen = hl
		p.IPLen = tl
		p.Protocol = b[9]
		p.FragOff = ff & 0x1FFF
		p.MF = ff&0x2000 != 0
		p.Fragment = p.MF || p.FragOff != 0
		end = min(tl, len(b))
		off = hl
	case 6:
		if len(b) < IPv6HdrLen {
			return ErrShort
		}
		p.Version = 6
		p.IPHdrLen = IPv6HdrLen
		p.IPLen = IPv6HdrLen + int(binary.BigEndian.Uint16(b[4:]))
		p.Protocol = b[6]
		end = min(p.IPLen, len(b))
		off = walkExt(b, p, IPv6HdrLen, end)
	default:
		return ErrVersion
	}
	p.Truncated = p.IPLen > len(b)
	p.NextHdrOff = off
	if p.FragOff == 0 {
		th := 0
		switch p.Protocol {
		case ProtoTCP:
			if end-off >= TCPHdrLen && b[off+12]>>4 >= 5 {
				th = min(int(b[off+12]>>4)*4, end-off)
			}
		case ProtoUDP:
			if end-off >= UDPHdrLen {
				th = UDPHdrLen
			}
		case ProtoICMP:
			if p.Version == 4 && end-off >= ICMPHdrLen {
				th = ICMPHdrLen
			}
		case ProtoICMPv6:
			if p.Version == 6 && end-off >= ICMPHdrLen {
				th = ICMPHdrLen
			}
		}
		if th > 0 {
			p.TransOff = off
			p.TransLen = th
			off += th
		}
	}
	p.PayloadOff = off
	p.PayloadLen = end - off
	return nil
}

// walkExt walks IPv6 extension headers from off exactly as WinDivert does and
// returns the offset past the last one walked. It updates p.Protocol and the
// fragment and routing fields.
func walkExt(b []byte, p *Info, off, end int) int {
	for p.FragOff == 0 && end-off >= minExtHdrLen {
		hl := int(b[off+1])
		switch p.Protocol {
		case ProtoFragment:
			hl = fragExtLen
			if p.Fragment || end-off < hl {
				return off
			}
			ff := binary.BigEndian.Uint16(b[off+2:])
			p.FragOff = ff >> 3
			p.MF = ff&1 != 0
			p.Fragment = true
			p.FragHdrOff = off
		case ProtoAH:
			hl = (hl + 2) * 4
		case ProtoHopOpts, ProtoDstOpts, ProtoRouting, ProtoMobility:
			hl = (hl + 1) * 8
		default:
			return off
		}
		if end-off < hl {
			return off
		}
		if p.Protocol == ProtoRouting && p.RoutingHdrOff < 0 {
			p.RoutingHdrOff = off
		}
		p.Protocol = b[off]
		off += hl
	}
	return off
}
