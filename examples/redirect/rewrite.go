package main

import (
	"errors"
	"fmt"

	"github.com/netdivert/divert"
)

// IP protocol numbers of the two protocols redirect handles.
const (
	protoTCP = 6
	protoUDP = 17
)

// redirect is one port redirection: proto's packets coming in to local port
// from go to local port to, and the replies leaving from port to leave from
// port from again, so that the client only ever sees port from.
type redirect struct {
	proto    uint8  // protoTCP or protoUDP
	from, to uint16 // the port clients use; the port the server listens on
}

// protoName is the protocol's name in the filter language and in output.
func (r *redirect) protoName() string {
	if r.proto == protoUDP {
		return "udp"
	}
	return "tcp"
}

// filter returns the WinDivert filter that selects exactly the packets the
// redirection rewrites: inbound to port from and outbound from port to, on
// the network, not on loopback (see the README: a loopback client is not
// supported; leaving its packets alone keeps local clients that use port to
// directly working). A non-empty extra narrows it further; it applies to
// both directions, so it must match the replies too (ip.SrcAddr == C or
// ip.DstAddr == C for one client C).
func (r *redirect) filter(extra string) string {
	p := r.protoName()
	f := fmt.Sprintf("not loopback and ((inbound and %s.DstPort == %d) or (outbound and %s.SrcPort == %d))", p, r.from, p, r.to)
	if extra != "" {
		f = "(" + extra + ") and " + f
	}
	return f
}

// kind is what rewrite did with a packet.
type kind uint8

const (
	rewroteIn  kind = iota // inbound: destination port from → to
	rewroteOut             // outbound: source port to → from
	malformed              // ParsePacket refused it (or it was cut): left unchanged
	unexpected             // parsed, but not a packet of the redirection: left unchanged
)

// result is rewrite's report on one packet.
type result struct {
	kind kind
	// pkt is the parsed packet (views of the buffer, after the rewrite);
	// zero when malformed.
	pkt divert.Packet
	// oldPort is the port rewritten (rewroteIn, rewroteOut).
	oldPort uint16
	// recomputed is set when the Address said a checksum the packet needs
	// was not finished and CalcChecksums recomputed them all.
	recomputed bool
	// err says why a packet is malformed or unexpected; for a rewritten one
	// it is CalcChecksums' error when it could not finish the checksums.
	err error
}

// errLoopback is rewrite's reason for a loopback packet.
var errLoopback = errors.New("a loopback packet (loopback clients are not supported)")

// rewrite applies the redirection to the packet b that arrived with
// Address a, in place: an inbound packet to port r.from gets destination
// port r.to, an outbound packet from port r.to gets source port r.from.
// Every other packet, and one that does not parse, is left byte for byte as
// it was, to be reinjected unchanged. The setters update the TCP or UDP
// checksum incrementally, which is exact when the checksum field holds a
// finished checksum.
//
// Checksum offload: when a's bit for a checksum the packet carries
// (TCPChecksum or UDPChecksum; IPChecksum for IPv4 too, as the Packet
// setters' documentation says, though a port does not touch the IPv4
// header) is clear, that field may hold an unfinished sum, so rewrite then
// recomputes every checksum with CalcChecksums(b, a, 0), which also sets the
// bits. What the backends hand over: Linux sets IPChecksum always
// and clears TCPChecksum and UDPChecksum for the packets the kernel marks
// CHECKSUM_PARTIAL, whose field holds only the pseudo-header sum the network
// card would finish: the host's own outbound TCP segments (TCP always
// leaves the sum to the device, or to the stack's fallback past the queue),
// its UDP datagrams on a device that offloads, and inbound packets from a
// veth peer that offloads. A changed packet's bytes are then final for the
// kernel (NFQUEUE marks them CHECKSUM_NONE); Linux's Send and WinDivert's
// driver would compute the checksums whose bits are clear for a changed
// packet anyway, but FreeBSD's Send sends the bytes as given (its outbound
// IPv6 packets come with the bits clear before FreeBSD 14), so the
// recomputation here is what makes the example right everywhere.
func (r *redirect) rewrite(b []byte, a *divert.Address) result {
	p, err := divert.ParsePacket(b)
	if err != nil {
		// Also a packet the kernel handed over cut (ErrTruncated): a
		// changed one could not be reinjected.
		return result{kind: malformed, err: err}
	}
	res := result{kind: unexpected, pkt: p}
	hdr := p.TCP
	if r.proto == protoUDP {
		hdr = p.UDP
	}
	switch {
	case hdr == nil && p.FragOff != 0:
		res.err = fmt.Errorf("a non-first fragment (no %s header)", r.protoName())
		return res
	case hdr == nil:
		res.err = fmt.Errorf("not a %s packet (protocol %d)", r.protoName(), p.Protocol)
		return res
	case a.Loopback:
		res.err = errLoopback
		return res
	case !a.Outbound && p.DstPort() == r.from:
		res.kind, res.oldPort = rewroteIn, r.from
		err = p.SetDstPort(r.to)
	case a.Outbound && p.SrcPort() == r.to:
		res.kind, res.oldPort = rewroteOut, r.to
		err = p.SetSrcPort(r.from)
	default:
		res.err = fmt.Errorf("%s port %d -> %d, direction %s: not one the redirection rewrites", r.protoName(), p.SrcPort(), p.DstPort(), dirName(a))
		return res
	}
	if err != nil {
		// A setter that fails leaves the packet unchanged.
		return result{kind: unexpected, pkt: p, err: err}
	}
	if needsRecompute(&p, a) {
		res.recomputed = true
		res.err = divert.CalcChecksums(b, a, 0)
	}
	return res
}

// needsRecompute reports whether a's bits leave a checksum of p that the
// rewrite's incremental update relies on unfinished.
func needsRecompute(p *divert.Packet, a *divert.Address) bool {
	switch {
	case p.IPv4 != nil && !a.IPChecksum:
		return true
	case p.TCP != nil:
		return !a.TCPChecksum
	case p.UDP != nil:
		return !a.UDPChecksum
	}
	return false
}

// dirName is "inbound" or "outbound".
func dirName(a *divert.Address) string {
	if a.Outbound {
		return "outbound"
	}
	return "inbound"
}
