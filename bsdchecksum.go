//go:build freebsd || linux

package divert

import "github.com/netdivert/divert/internal/packet"

// divertChecksums reports which checksums of pkt, a packet read from a
// divert socket, are known valid (Address.IPChecksum, and TCPChecksum and
// UDPChecksum, which are alike). forwarded is an outbound packet that came
// in on an interface (divert_packet names it in sin_zero), loopback an
// inbound one that came in on a loopback interface; major is the FreeBSD
// major release, 0 when unknown.
//
//   - IPv4 header: ip_input verifies it before the inbound pfil hook, or
//     trusts CSUM_IP_VALID from the interface. lo0 sets that flag
//     (looutput: LO_CSUM_SET) on a header ip_output left unfinished, since
//     lo0's if_hwassist takes CSUM_IP: an inbound packet on a loopback
//     interface may carry any header checksum. So may the copy of a
//     broadcast the host sent that it loops back, inbound on the sending
//     Ethernet interface (IFF_SIMPLEX): ip_output
//     leaves the header checksum 0 for a card that computes it (CSUM_IP in
//     if_hwassist), and ether_output marks the copy it loops back (or a
//     packet to its own Ethernet address) CSUM_IP_CHECKED|CSUM_IP_VALID
//     (update_mbuf_csumflags) without computing it; nor does
//     divert_packet. An inbound packet's header is therefore checked here
//     again (ipv4HeaderOK: a sum over 20 to 60 bytes). An outbound
//     packet's is computed after the outbound hook (divert(4):
//     "packets read as outgoing have invalid IP header checksums").
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
func divertChecksums(pkt []byte, outbound, forwarded, loopback bool, major uint64) (ip, l4 bool) {
	ipv6 := len(pkt) > 0 && pkt[0]>>4 == 6
	ip = !outbound && !ipv6 && !loopback && ipv4HeaderOK(pkt)
	l4 = outbound && !forwarded && (!ipv6 || major >= 14)
	return ip, l4
}

// ipv4HeaderOK reports whether pkt starts with a whole IPv4 header whose
// checksum is right.
func ipv4HeaderOK(pkt []byte) bool {
	if len(pkt) < packet.IPv4HdrLen || pkt[0]>>4 != 4 {
		return false
	}
	hl := int(pkt[0]&0x0f) * 4
	if hl < packet.IPv4HdrLen || len(pkt) < hl {
		return false
	}
	return packet.Checksum(pkt[:hl], 0) == 0xffff
}
