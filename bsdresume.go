//go:build freebsd || linux

package divert

// Where the new packets of an OpenPort handle resume in the ruleset (FreeBSD
// backend), kept free of FreeBSD system calls so that it is unit-tested on
// Linux too.

import "sync/atomic"

// resumePoints records, per direction, the highest sin_port of the packets
// an OpenPort handle received: the number of the administrator's rule that
// diverted each (ipfw), or the direction pf's divert-to took it in (1 in,
// 2 out). A new packet the handle sends carries it, so that it resumes
// after the rule that feeds the handle in that direction, as a new packet
// of an Open handle resumes after the handle's own rules: written with
// sin_port 0 it would run the whole ruleset, and the administrator's rule
// would divert it back to the handle, which WinDivert never shows a
// handle's own packets (pf reads sin_port as the direction it must not
// divert the packet again in).
//
// A direction of which no packet has come yet takes the other direction's
// point (with one rule for both directions, the usual natd setup, that is
// the same rule); before the first packet a new packet gets 0 and runs the
// whole ruleset, so the administrator's rule may divert it back to the
// handle.
type resumePoints struct {
	in, out atomic.Uint32 // 0: none seen yet (ipfw has no rule 0; pf's directions are 1 and 2)
}

// note records the sin_port of a received packet, received outbound or not
// (as the packet is reported: recvOutbound; sin_addr alone would take one
// that came in on an interface without an IPv4 address for outbound).
func (r *resumePoints) note(outbound bool, port uint16) {
	p := &r.in
	if outbound {
		p = &r.out
	}
	for {
		old := p.Load()
		if uint32(port) <= old || p.CompareAndSwap(old, uint32(port)) {
			return
		}
	}
}

// resume returns the sin_port for a new packet sent outbound or not.
func (r *resumePoints) resume(outbound bool) uint16 {
	own, other := &r.in, &r.out
	if outbound {
		own, other = other, own
	}
	if v := own.Load(); v != 0 {
		return uint16(v)
	}
	return uint16(other.Load())
}

// newPacketRule is the rule after which a packet Send does not send back as
// received resumes: an Open handle's own rule number, an OpenPort handle's
// point for the direction (resumePoints).
func newPacketRule(openPort bool, own uint16, seen *resumePoints, outbound bool) uint16 {
	if openPort {
		return seen.resume(outbound)
	}
	return own
}
