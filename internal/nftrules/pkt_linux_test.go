package nftrules

import (
	"encoding/binary"
	"net/netip"
)

// Packet builders for the tests. Checksums of IP headers are filled; L4
// checksums are left zero (netfilter hooks before local delivery do not
// check them).

type v4opts struct {
	tos    byte
	id     uint16
	flags  uint16 // DF 0x4000, MF 0x2000 | offset in 8-byte units
	ttl    byte
	proto  byte
	src    netip.Addr
	dst    netip.Addr
	ihlOpt int // extra option words (NOPs)
}

func csum(b []byte) uint16 {
	var s uint32
	for len(b) >= 2 {
		s += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) > 0 {
		s += uint32(b[0]) << 8
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return ^uint16(s)
}

func ipv4(o v4opts, payload []byte) []byte {
	ihl := 20 + 4*o.ihlOpt
	p := make([]byte, ihl+len(payload))
	p[0] = 0x40 | byte(ihl/4)
	p[1] = o.tos
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	binary.BigEndian.PutUint16(p[4:], o.id)
	binary.BigEndian.PutUint16(p[6:], o.flags)
	p[8] = o.ttl
	p[9] = o.proto
	s, d := o.src.As4(), o.dst.As4()
	copy(p[12:], s[:])
	copy(p[16:], d[:])
	for i := 20; i < ihl; i++ {
		p[i] = 1 // NOP
	}
	binary.BigEndian.PutUint16(p[10:], csum(p[:ihl]))
	copy(p[ihl:], payload)
	return p
}

type v6opts struct {
	tc    byte
	flow  uint32
	next  byte
	hop   byte
	src   netip.Addr
	dst   netip.Addr
	hbh   bool   // prepend a hop-by-hop header (PadN)
	frag  bool   // prepend a fragment header
	fragO uint16 // fragment offset in 8-byte units
	more  bool
}

func ipv6(o v6opts, payload []byte) []byte {
	var ext []byte
	next := o.next
	if o.frag {
		f := make([]byte, 8)
		f[0] = next
		binary.BigEndian.PutUint16(f[2:], o.fragO<<3|b16(o.more))
		binary.BigEndian.PutUint32(f[4:], 0xabcdef01)
		ext = append(f, ext...)
		next = 44
	}
	if o.hbh {
		h := []byte{next, 0, 1, 4, 0, 0, 0, 0} // PadN of 4
		ext = append(h, ext...)
		next = 0
	}
	p := make([]byte, 40+len(ext)+len(payload))
	binary.BigEndian.PutUint32(p, 6<<28|uint32(o.tc)<<20|o.flow&0xfffff)
	binary.BigEndian.PutUint16(p[4:], uint16(len(ext)+len(payload)))
	p[6] = next
	p[7] = o.hop
	s, d := o.src.As16(), o.dst.As16()
	copy(p[8:], s[:])
	copy(p[24:], d[:])
	copy(p[40:], ext)
	copy(p[40+len(ext):], payload)
	return p
}

func b16(b bool) uint16 {
	if b {
		return 1
	}
	return 0
}

func tcp(sport, dport uint16, flags byte, doff byte, payload []byte) []byte {
	h := make([]byte, 20+len(payload))
	binary.BigEndian.PutUint16(h[0:], sport)
	binary.BigEndian.PutUint16(h[2:], dport)
	binary.BigEndian.PutUint32(h[4:], 0x01020304)
	binary.BigEndian.PutUint32(h[8:], 0x0a0b0c0d)
	h[12] = doff << 4
	h[13] = flags
	binary.BigEndian.PutUint16(h[14:], 64240)
	copy(h[20:], payload)
	return h
}

func udp(sport, dport uint16, payload []byte) []byte {
	h := make([]byte, 8+len(payload))
	binary.BigEndian.PutUint16(h[0:], sport)
	binary.BigEndian.PutUint16(h[2:], dport)
	binary.BigEndian.PutUint16(h[4:], uint16(len(h)))
	copy(h[8:], payload)
	return h
}

func icmpEcho(typ byte, id, seq uint16) []byte {
	h := make([]byte, 16)
	h[0] = typ
	binary.BigEndian.PutUint16(h[4:], id)
	binary.BigEndian.PutUint16(h[6:], seq)
	copy(h[8:], "pingdata")
	binary.BigEndian.PutUint16(h[2:], csum(h))
	return h
}
