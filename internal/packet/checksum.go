package packet

import (
	"encoding/binary"
	"errors"
	"math/bits"
)

// Errors returned by FixTransportChecksum.
var (
	// ErrNoTransport reports a packet without a transport header that
	// carries a checksum (TCP, UDP, ICMP or ICMPv6).
	ErrNoTransport = errors.New("packet: no TCP, UDP, ICMP or ICMPv6 header")
	// ErrIncomplete reports a transport checksum that cannot be computed
	// because the buffer does not hold the whole datagram (truncated) or the
	// datagram is a fragment: the checksum covers the reassembled payload.
	ErrIncomplete = errors.New("packet: transport checksum needs the whole datagram (truncated or fragment)")
)

// Checksum returns the Internet checksum sum (RFC 1071) of b added to
// initial: the 16-bit one's complement sum of b's big-endian 16-bit words (an
// odd last byte is padded with a zero byte) and initial, folded to 16 bits.
// It is the sum, not its complement: a checksum field gets
// ^Checksum(...), and a region that includes a correct checksum field sums
// to 0xFFFF. initial is usually PseudoHeaderSum or an earlier Checksum.
//
// The loop adds 64-bit words with carry, 32 bytes per iteration.
func Checksum(b []byte, initial uint32) uint16 {
	s := uint64(bits.ReverseBytes16(sumLE(b))) + uint64(initial)
	return fold64(s)
}

// sumLE returns the folded one's complement sum of b read as little-endian
// 16-bit words: the byte-swapped big-endian sum (RFC 1071 §2(B)). Reading
// little-endian lets the loop use native 64-bit loads on common CPUs.
func sumLE(b []byte) uint16 {
	le := binary.LittleEndian
	var s, c uint64
	for len(b) >= 32 {
		s, c = bits.Add64(s, le.Uint64(b[0:8]), c)
		s, c = bits.Add64(s, le.Uint64(b[8:16]), c)
		s, c = bits.Add64(s, le.Uint64(b[16:24]), c)
		s, c = bits.Add64(s, le.Uint64(b[24:32]), c)
		b = b[32:]
	}
	for len(b) >= 8 {
		s, c = bits.Add64(s, le.Uint64(b[0:8]), c)
		b = b[8:]
	}
	var t uint64
	if len(b) >= 4 {
		t += uint64(le.Uint32(b))
		b = b[4:]
	}
	if len(b) >= 2 {
		t += uint64(le.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		t += uint64(b[0]) // the high byte of a big-endian word
	}
	s, c2 := bits.Add64(s, t, c)
	s, c2 = bits.Add64(s, c2, 0)
	s += c2 // cannot carry again: s is 0 when c2 is 1
	return fold64(s)
}

// fold64 folds a 64-bit one's complement sum to 16 bits.
func fold64(s uint64) uint16 {
	s = s&0xFFFFFFFF + s>>32
	s = s&0xFFFFFFFF + s>>32
	s = s&0xFFFF + s>>16
	s = s&0xFFFF + s>>16
	return uint16(s)
}

// PseudoHeaderSum returns the one's complement sum of the TCP/UDP/ICMPv6
// pseudo-header (RFC 793/768 for IPv4 with 4-byte addresses, RFC 8200 §8.1
// for IPv6 with 16-byte addresses): source and destination address, the
// protocol and the upper-layer length. Pass it as initial to Checksum.
func PseudoHeaderSum(src, dst []byte, proto uint8, length int) uint32 {
	s := uint32(proto) + uint32(length>>16)&0xFFFF + uint32(length)&0xFFFF
	for i := 0; i+1 < len(src); i += 2 {
		s += uint32(src[i])<<8 | uint32(src[i+1])
	}
	for i := 0; i+1 < len(dst); i += 2 {
		s += uint32(dst[i])<<8 | uint32(dst[i+1])
	}
	return s
}

// UpdateChecksum returns checksum field hc updated for one 16-bit word of
// the covered data changing from old to new (RFC 1624 eqn. 3:
// HC' = ~(~HC + ~m + m')).
func UpdateChecksum(hc, old, new uint16) uint16 {
	s := uint32(^hc) + uint32(^old) + uint32(new)
	s = s&0xFFFF + s>>16
	s = s&0xFFFF + s>>16
	return ^uint16(s)
}

// FixIPv4Checksum recomputes the IPv4 header checksum of b in place from
// scratch; p must describe b and be IPv4. It does nothing for IPv6, which
// has no header checksum.
func FixIPv4Checksum(b []byte, p *Info) {
	if p.Version != 4 {
		return
	}
	h := b[:p.IPHdrLen]
	h[10], h[11] = 0, 0
	binary.BigEndian.PutUint16(h[10:], ^Checksum(h, 0))
}

// IPv4ChecksumValid reports whether the IPv4 header checksum of b is
// correct; p must describe b. It is false for IPv6.
func IPv4ChecksumValid(b []byte, p *Info) bool {
	return p.Version == 4 && Checksum(b[:p.IPHdrLen], 0) == 0xFFFF
}

// ChecksumOff returns the offset of the transport checksum field in b
// (TCP +16, UDP +6, ICMP and ICMPv6 +2), or -1 when p has no transport
// header.
func ChecksumOff(p *Info) int {
	if p.TransOff < 0 {
		return -1
	}
	switch p.Protocol {
	case ProtoTCP:
		return p.TransOff + 16
	case ProtoUDP:
		return p.TransOff + 6
	case ProtoICMP, ProtoICMPv6:
		return p.TransOff + 2
	}
	return -1
}

// transportSum returns the sum of the pseudo-header (none for ICMP) and the
// transport segment b[p.TransOff:p.DataEnd()].
func transportSum(b []byte, p *Info) uint16 {
	seg := b[p.TransOff:p.DataEnd()]
	var ph uint32
	switch {
	case p.Protocol == ProtoICMP:
	case p.Version == 4:
		ph = PseudoHeaderSum(b[12:16], b[16:20], p.Protocol, len(seg))
	default:
		ph = PseudoHeaderSum(b[8:24], PseudoDst(b, p), p.Protocol, len(seg))
	}
	return Checksum(seg, ph)
}

// checkWhole returns the error FixTransportChecksum gives for a packet
// whose transport checksum cannot be computed.
func checkWhole(p *Info) error {
	if ChecksumOff(p) < 0 {
		return ErrNoTransport
	}
	if p.Truncated || p.MF || p.FragOff != 0 {
		return ErrIncomplete
	}
	return nil
}

// FixTransportChecksum recomputes from scratch, in place, the checksum of
// the TCP, UDP, ICMP or ICMPv6 header of b; p must describe b. The
// checksum covers the whole transport segment per the IP length (not the
// TCP data offset nor the UDP length field) and, except for ICMP, the
// pseudo-header; for IPv6 its destination is the final destination (see
// PseudoDst). A UDP checksum that computes to 0 is sent as 0xFFFF.
//
// It returns ErrNoTransport when p has no such header and ErrIncomplete,
// leaving b unchanged, for a truncated buffer or a fragment (as
// WinDivertHelperCalcChecksums fails for them).
func FixTransportChecksum(b []byte, p *Info) error {
	if err := checkWhole(p); err != nil {
		return err
	}
	off := ChecksumOff(p)
	b[off], b[off+1] = 0, 0
	c := ^transportSum(b, p)
	if c == 0 && p.Protocol == ProtoUDP {
		c = 0xFFFF
	}
	binary.BigEndian.PutUint16(b[off:], c)
	return nil
}

// TransportChecksumValid reports whether the transport checksum of b is
// correct; p must describe b. It is false when FixTransportChecksum would
// fail. An IPv4 UDP checksum of 0 (no checksum, RFC 768) counts as valid;
// in IPv6 it is invalid (RFC 8200 §8.1).
func TransportChecksumValid(b []byte, p *Info) bool {
	if checkWhole(p) != nil {
		return false
	}
	if p.Protocol == ProtoUDP && p.Version == 4 && b[p.TransOff+6] == 0 && b[p.TransOff+7] == 0 {
		return true
	}
	return transportSum(b, p) == 0xFFFF
}

// PseudoDst returns the IPv6 destination address the transport
// pseudo-header uses (RFC 8200 §8.1): the final destination. Without a
// Routing header, or when its Segments Left is 0, that is the IPv6
// header's destination. Otherwise it is the routing header's last address:
// for type 0 (deprecated) and type 2 (Mobile IPv6) the last address of the
// list, for type 4 (Segment Routing, RFC 8754) Segment List[0]. For other
// routing types (such as type 3, RPL, whose addresses are compressed) and
// malformed routing headers the IPv6 destination is used. WinDivert always
// uses the IPv6 destination; both agree except for a packet still on its
// source route. p must describe b and be IPv6; the result aliases b.
func PseudoDst(b []byte, p *Info) []byte {
	if r := p.RoutingHdrOff; r >= 0 {
		if a, ok := RoutingFinal(b[r:]); ok {
			return a
		}
	}
	return b[24:40]
}

// RoutingFinal returns the final destination a Routing header rh names
// (see PseudoDst) and true, or false when the pseudo-header takes the IPv6
// header's destination instead: Segments Left is 0, the type is not 0, 2
// or 4, or the header holds no address. rh starts at the Routing header
// and holds it whole; the result aliases rh.
func RoutingFinal(rh []byte) ([]byte, bool) {
	if rh[3] == 0 {
		return nil, false
	}
	n := int(rh[1]) / 2 // 16-byte addresses after the first 8 bytes
	if n < 1 {
		return nil, false
	}
	switch rh[2] {
	case 0, 2:
		a := 8 + (n-1)*16
		return rh[a : a+16], true
	case 4:
		return rh[8:24], true
	}
	return nil, false
}
