package reassembly

import "encoding/binary"

// ipv4HeaderSum returns the ones' complement sum of an IPv4 header (len(h)
// is a multiple of 4). A header with a valid checksum sums to 0xFFFF; the
// checksum to store is the complement of the sum with the field zeroed.
func ipv4HeaderSum(h []byte) uint16 {
	var s uint64
	for len(h) >= 4 {
		s += uint64(binary.BigEndian.Uint32(h))
		h = h[4:]
	}
	s = (s >> 32) + (s & 0xFFFFFFFF)
	s = (s >> 16) + (s & 0xFFFF)
	s = (s >> 16) + (s & 0xFFFF)
	s = (s >> 16) + (s & 0xFFFF)
	return uint16(s)
}
