//go:build freebsd || linux

package divert

// divertL4Valid reports whether the TCP and UDP checksums of a packet read
// from a divert socket are known valid (Address.TCPChecksum and
// UDPChecksum). The stack leaves the checksums of the packets the host
// sends to the card (delayed checksums); divert_packet finishes those of
// an IPv4 packet before queueing it, and, since the step for IPv6
// (in6_delayed_cksum) was added, those of an IPv6 packet: FreeBSD 14's
// ip_divert.c has it, FreeBSD 12's has not, and FreeBSD 13 is taken to
// lack it, so that a clear bit there at worst costs the program a checksum
// it computes. major is the FreeBSD major release, 0 when unknown.
// Inbound packets' transport checksums are not checked before ipfw.
func divertL4Valid(outbound, ipv6 bool, major uint64) bool {
	return outbound && (!ipv6 || major >= 14)
}
