package main

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// spec describes the packet to build.
type spec struct {
	proto   string // "icmp", "udp" or "tcp"
	src     netip.Addr
	dst     netip.Addr
	sport   uint16
	dport   uint16
	ttl     uint8
	id      uint16 // ICMP echo identifier
	ipid    uint16 // IPv4 identification
	seq     uint32 // ICMP echo sequence number; TCP sequence number
	payload []byte
}

const (
	protoICMP   = 1
	protoTCP    = 6
	protoUDP    = 17
	protoICMPv6 = 58
)

// transport builds the transport header and payload, its checksum zero.
func (s *spec) transport() (proto uint8, b []byte, err error) {
	switch s.proto {
	case "icmp":
		typ, proto := uint8(8), uint8(protoICMP) // echo request
		if s.dst.Is6() {
			typ, proto = 128, protoICMPv6
		}
		b = append(b, typ, 0, 0, 0)
		b = binary.BigEndian.AppendUint16(b, s.id)
		b = binary.BigEndian.AppendUint16(b, uint16(s.seq))
		return proto, append(b, s.payload...), nil
	case "udp":
		b = binary.BigEndian.AppendUint16(b, s.sport)
		b = binary.BigEndian.AppendUint16(b, s.dport)
		b = binary.BigEndian.AppendUint16(b, uint16(8+len(s.payload)))
		b = binary.BigEndian.AppendUint16(b, 0)
		return protoUDP, append(b, s.payload...), nil
	case "tcp":
		b = binary.BigEndian.AppendUint16(b, s.sport)
		b = binary.BigEndian.AppendUint16(b, s.dport)
		b = binary.BigEndian.AppendUint32(b, s.seq)
		b = binary.BigEndian.AppendUint32(b, 0) // ack
		b = append(b, 6<<4, 0x02)               // data offset 6 words (MSS option), SYN
		b = binary.BigEndian.AppendUint16(b, 64240)
		b = append(b, 0, 0, 0, 0) // checksum, urgent pointer
		mss := uint16(1460)
		if s.dst.Is6() {
			mss = 1440
		}
		b = append(b, 2, 4) // MSS option
		b = binary.BigEndian.AppendUint16(b, mss)
		return protoTCP, append(b, s.payload...), nil
	}
	return 0, nil, fmt.Errorf("unknown protocol %q (want icmp, udp or tcp)", s.proto)
}

// build returns the whole IP packet; checksums are left zero for
// divert.CalcChecksums.
func (s *spec) build() ([]byte, error) {
	if !s.src.IsValid() || !s.dst.IsValid() {
		return nil, fmt.Errorf("source and destination addresses are needed")
	}
	if s.src.Is4() != s.dst.Is4() {
		return nil, fmt.Errorf("source %v and destination %v are not of one address family", s.src, s.dst)
	}
	proto, l4, err := s.transport()
	if err != nil {
		return nil, err
	}
	var b []byte
	if s.dst.Is4() {
		total := 20 + len(l4)
		if total > 0xffff {
			return nil, fmt.Errorf("packet of %d bytes is too long for IPv4", total)
		}
		b = append(b, 0x45, 0)
		b = binary.BigEndian.AppendUint16(b, uint16(total))
		b = binary.BigEndian.AppendUint16(b, s.ipid)
		b = binary.BigEndian.AppendUint16(b, 0x4000) // DF
		b = append(b, s.ttl, proto, 0, 0)
		b = append(b, s.src.AsSlice()...)
		b = append(b, s.dst.AsSlice()...)
	} else {
		if len(l4) > 0xffff {
			return nil, fmt.Errorf("payload of %d bytes is too long for IPv6", len(l4))
		}
		b = append(b, 0x60, 0, 0, 0)
		b = binary.BigEndian.AppendUint16(b, uint16(len(l4)))
		b = append(b, proto, s.ttl)
		b = append(b, s.src.AsSlice()...)
		b = append(b, s.dst.AsSlice()...)
	}
	return append(b, l4...), nil
}
