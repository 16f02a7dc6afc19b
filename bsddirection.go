//go:build freebsd || linux

package divert

// The direction of a packet read from a divert socket (FreeBSD backend),
// kept free of FreeBSD system calls so that it is unit-tested on Linux too.

import (
	"net/netip"

	"github.com/netdivert/divert/internal/bsdaddr"
)

// divertInbound reports whether a packet read with sockaddr sa came in.
// divert_packet (ip_divert.c) sets sin_addr, for an incoming packet only,
// to the first IPv4 address of the receiving interface, and names that
// interface in sin_zero whenever the packet has one, the outgoing packets
// the host forwards too. So a non-zero sin_addr is inbound and a sockaddr
// without a name outbound (made by the host), but a zero sin_addr with a
// name is inbound on an interface without an IPv4 address (an IPv6-only
// one) or outbound and forwarded:
//
//   - ownNamed: the handle's own rules divert outbound only the packets
//     the host made ("out not recv *"), so a name is inbound;
//   - ifV4 says whether the named interface has an IPv4 address (known
//     false when it cannot tell, as for a cut name that stands for
//     interfaces with and without one): then the packet is outbound, since
//     inbound it would carry that address;
//   - otherwise the packet is inbound when its destination is one of the
//     host's addresses (local), a link-local unicast or interface- or
//     link-local multicast one, or the IPv4 limited broadcast: ip_input
//     and ip6_input deliver those and do not forward them (ip_input: "Do
//     not forward packets to or from IN_LINKLOCAL", limited broadcast and
//     multicast go to "ours"; ip6_forward refuses multicast, and the
//     multicast routers leave link-scoped groups alone). Anything else is
//     taken for forwarded (outbound): an inbound packet to be forwarded
//     then goes back outbound, to ip_output or ip6_output, rather than an
//     outbound one in again, which the forwarding path would bring back to
//     the handle.
func divertInbound(sa *bsdaddr.Sockaddr, pkt []byte, ownNamed bool,
	ifV4 func(name []byte) (has, known bool), local func(netip.Addr) bool) bool {
	if !sa.Outbound() {
		return true
	}
	name := sa.Name()
	if len(name) == 0 {
		return false
	}
	if ownNamed {
		return true
	}
	if has, known := ifV4(name); known && has {
		return false
	}
	dst, ok := packetDst(pkt)
	if !ok {
		return false
	}
	if dst.IsLinkLocalUnicast() || dst.IsInterfaceLocalMulticast() || dst.IsLinkLocalMulticast() ||
		dst == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
		return true
	}
	return local(dst)
}

// recvOutbound reports whether a packet read with sa is outbound, as it
// is reported and written back (not divertInbound), and, for an OpenPort
// handle (seen not nil), notes rule, the sin_port it came with, as the
// rule that feeds the handle in that direction (resumePoints): a packet
// that came in on an interface without an IPv4 address has a zero
// sin_addr, like an outbound one, yet the ruleset's inbound pass diverted
// it, and a new inbound packet is to resume after that rule.
func recvOutbound(sa *bsdaddr.Sockaddr, pkt []byte, rule uint16, ownNamed bool,
	ifV4 func(name []byte) (has, known bool), local func(netip.Addr) bool, seen *resumePoints) bool {
	out := !divertInbound(sa, pkt, ownNamed, ifV4, local)
	if seen != nil {
		seen.note(out, rule)
	}
	return out
}

// packetDst returns an IPv4 or IPv6 packet's destination address.
func packetDst(pkt []byte) (netip.Addr, bool) {
	switch {
	case len(pkt) >= 20 && pkt[0]>>4 == 4:
		return netip.AddrFrom4([4]byte(pkt[16:20])), true
	case len(pkt) >= 40 && pkt[0]>>4 == 6:
		return netip.AddrFrom16([16]byte(pkt[24:40])), true
	}
	return netip.Addr{}, false
}
