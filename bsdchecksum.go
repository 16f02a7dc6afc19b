//go:build freebsd || linux

package divert

// divertChecksums reports which checksums of a packet read from a divert
// socket are known valid (Address.IPChecksum, and TCPChecksum and
// UDPChecksum, which are alike). forwarded is an outbound packet that came
// in on an interface (divert_packet names it in sin_zero), loopback an
// inbound one that came in on a loopback interface; major is the FreeBSD
// major release, 0 when unknown.
//
//   - IPv4 header: ip_input verifies it before the inbound pfil hook, or
//     trusts CSUM_IP_VALID from the interface. lo0 sets that flag
//     (looutput: LO_CSUM_SET) on a header ip_output left unfinished, since
//     lo0's if_hwassist takes CSUM_IP: an inbound packet on a loopback
//     interface may carry any header checksum. An outbound packet's is
//     computed after the outbound hook (divert(4): "packets read as
//     outgoing have invalid IP header checksums").
//   - TCP and UDP: the stack leaves the checksums of the packets the host
//     sends to the card (delayed checksums); divert_packet finishes those of
//     an IPv4 packet before queueing it, and, since the step for IPv6
//     (in6_delayed_cksum) was added, those of an IPv6 packet: FreeBSD 14's
//     ip_divert.c has it, FreeBSD 12's has not, and FreeBSD 13 is taken to
//     lack it, so that a clear bit there at worst costs the program a
//     checksum it computes. A forwarded packet's are those it came with,
//     which nothing on the path checks (ip_forward and ip6_forward do not
//     read the transport header), nor are an inbound packet's checked
//     before ipfw.
func divertChecksums(outbound, forwarded, loopback, ipv6 bool, major uint64) (ip, l4 bool) {
	ip = !outbound && !ipv6 && !loopback
	l4 = outbound && !forwarded && (!ipv6 || major >= 14)
	return ip, l4
}
