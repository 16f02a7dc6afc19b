// Package bsdaddr encodes and decodes the struct sockaddr_in that a FreeBSD
// divert(4) socket attaches to every packet, and maps it to and from the
// direction / interface view of divert.Address.
//
// The kernel contract (sys/netinet/ip_divert.c, ip_divert.h):
//
//   - sin_len is 16 and sin_family AF_INET, also for IPv6 packets.
//   - sin_port is the number of the ipfw rule that diverted the packet, in
//     host byte order. Writing the packet back with it resumes the ruleset at
//     the first rule numbered higher; 0 runs the whole ruleset (ipfw has no
//     rule 0). (A packet pf's divert-to diverted carries its direction
//     there instead, 1 in and 2 out, which on sendto tells pf not to divert
//     it again in that direction.)
//   - sin_addr is INADDR_ANY for outbound packets and the first IPv4 address
//     of the receiving interface for inbound ones. On sendto, the kernel
//     decides the direction from sin_addr alone: zero sends out (ip_output),
//     anything else delivers in (netisr, as if received).
//   - sin_zero holds the receiving interface's name, NUL-terminated within
//     its 8 bytes (strlcpy: at most 7 characters survive). On sendto a
//     non-empty name is looked up with ifunit, an exact match: the
//     interface found is the packet's receiving interface (outbound too,
//     for ipfw's recv option); when none is found, an inbound packet's is
//     the interface owning sin_addr (ifa_ifwithaddr), or the send fails
//     with EADDRNOTAVAIL (div_output_inbound). So a cut name written back
//     may pick another interface ("bridge1" for "bridge10"): ResolveRecv.
//
// The package is pure Go with no build tags so that it is tested on every OS.
package bsdaddr

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Size is the size of struct sockaddr_in on FreeBSD.
const Size = 16

// AFInet is FreeBSD's AF_INET.
const AFInet = 2

// NameLen is the room for an interface name in sin_zero, including the NUL.
const NameLen = 8

// Sockaddr is a raw FreeBSD struct sockaddr_in:
// sin_len, sin_family, sin_port[2], sin_addr[4], sin_zero[8].
type Sockaddr [Size]byte

// Errors.
var (
	// ErrBadSockaddr reports a sockaddr that is not a 16-byte AF_INET one.
	ErrBadSockaddr = errors.New("bsdaddr: not a 16-byte AF_INET sockaddr")
	// ErrNoInterface reports an inbound packet without an interface.
	ErrNoInterface = errors.New("bsdaddr: an inbound packet needs an interface index")
)

// Rule returns sin_port, the ipfw rule number, read in byte order order
// (the kernel writes it in host order: pass binary.NativeEndian).
func (s *Sockaddr) Rule(order binary.ByteOrder) uint16 { return order.Uint16(s[2:4]) }

// Addr returns sin_addr.
func (s *Sockaddr) Addr() [4]byte { return [4]byte(s[4:8]) }

// Name returns the interface name in sin_zero (up to the first NUL); it
// aliases s.
func (s *Sockaddr) Name() []byte {
	z := s[8:16]
	for i, c := range z {
		if c == 0 {
			return z[:i]
		}
	}
	// Not NUL-terminated: the kernel ignores such a name on sendto.
	return nil
}

// Outbound reports whether the kernel treats s as outbound: sin_addr is zero.
func (s *Sockaddr) Outbound() bool { return s[4]|s[5]|s[6]|s[7] == 0 }

// MarkInbound gives s a non-zero sin_addr if it has none, so that the
// kernel delivers the packet in on the interface s names. The kernel leaves
// sin_addr zero for a packet received on an interface without an IPv4
// address (an IPv6-only one), which written back as it came would be sent
// out instead.
func (s *Sockaddr) MarkInbound() {
	if s.Outbound() {
		copy(s[4:8], placeholder[:])
	}
}

// Valid reports whether s has the length and family the kernel requires.
func (s *Sockaddr) Valid() bool { return s[0] == Size && s[1] == AFInet }

// Set fills s with a 16-byte AF_INET sockaddr. name must be shorter than
// NameLen; an empty name leaves sin_zero zero.
func (s *Sockaddr) Set(order binary.ByteOrder, rule uint16, addr [4]byte, name []byte) error {
	if len(name) >= NameLen {
		return fmt.Errorf("bsdaddr: interface name %q longer than %d bytes", name, NameLen-1)
	}
	*s = Sockaddr{}
	s[0] = Size
	s[1] = AFInet
	order.PutUint16(s[2:4], rule)
	copy(s[4:8], addr[:])
	copy(s[8:], name)
	return nil
}

// Received is what a received sockaddr says about its packet.
type Received struct {
	Outbound bool   // sin_addr was zero
	IfIdx    uint32 // index of the interface named in sin_zero, 0 if none or unknown
	Rule     uint16 // the diverting ipfw rule
}

// Parse decodes a sockaddr from recvfrom. lookup maps an interface name to
// its index (nil, or a false result, leaves IfIdx zero); it must not retain
// the name, which aliases s. For outbound packets the name, when present, is
// the interface a forwarded packet came in on; it is reported as IfIdx too
// (WinDivert reports the sending interface, which FreeBSD does not give).
func Parse(s *Sockaddr, order binary.ByteOrder, lookup func(name []byte) (uint32, bool)) (Received, error) {
	if !s.Valid() {
		return Received{}, ErrBadSockaddr
	}
	r := Received{Outbound: s.Outbound(), Rule: s.Rule(order)}
	if name := s.Name(); len(name) > 0 && lookup != nil {
		if idx, ok := lookup(name); ok {
			r.IfIdx = idx
		}
	}
	return r, nil
}

// Iface describes an interface for inbound injection.
type Iface struct {
	Name []byte  // interface name; used when shorter than NameLen
	Addr [4]byte // first IPv4 address, zero if none
}

// placeholder is the sin_addr used for an inbound packet on an interface
// without an IPv4 address: any non-zero value makes the kernel deliver the
// packet in, and the interface name picks the interface.
var placeholder = [4]byte{0, 0, 0, 1}

// Target computes the sockaddr for sendto.
//
//   - recv is the sockaddr the packet was received with, or nil for a new
//     packet. When the requested direction and interface equal the received
//     ones (SendsBack), recv is sent back unchanged so that ipfw resumes
//     after the diverting rule and the interface name survives.
//   - Otherwise an outbound packet gets INADDR_ANY and rule, and an inbound
//     one gets the interface's name and address (a placeholder address when
//     the interface has no IPv4 address, so that the kernel does not send it
//     out). rule is where ipfw resumes (the kernel starts at rule+1): the
//     handle's own rule number, so that its own rules skip the packet; 0
//     takes recv's rule, or, for a new packet, runs the whole ruleset.
//   - A packet received with a name but no address (inbound on an interface
//     without an IPv4 address) and sent back inbound on the interface it
//     was reported on keeps recv with a placeholder address.
//   - recvIfIdx is the IfIdx the received packet was reported with.
//   - iface resolves ifIdx for inbound packets.
func Target(dst *Sockaddr, order binary.ByteOrder, outbound bool, ifIdx uint32, rule uint16,
	recv *Sockaddr, recvIfIdx uint32, iface func(idx uint32) (Iface, error)) error {
	if SendsBack(outbound, ifIdx, recv, recvIfIdx) {
		*dst = *recv
		if !outbound {
			// Received inbound on an interface without an IPv4 address
			// (sin_addr zero, the name set): back in on that interface,
			// after the diverting rule.
			dst.MarkInbound()
		}
		return nil
	}
	if rule == 0 && recv != nil && recv.Valid() {
		rule = recv.Rule(order)
	}
	if outbound {
		return dst.Set(order, rule, [4]byte{}, nil)
	}
	if ifIdx == 0 {
		return ErrNoInterface
	}
	if iface == nil {
		return fmt.Errorf("bsdaddr: no interface resolver for index %d", ifIdx)
	}
	ifc, err := iface(ifIdx)
	if err != nil {
		return fmt.Errorf("bsdaddr: interface %d: %w", ifIdx, err)
	}
	name := ifc.Name
	if len(name) >= NameLen {
		// The kernel cannot take the name: fall back to the address, which
		// must then exist.
		name = nil
	}
	addr := ifc.Addr
	if addr == [4]byte{} {
		if name == nil {
			return fmt.Errorf("bsdaddr: interface %d (%s) has no IPv4 address and a name longer than %d bytes: the kernel cannot inject inbound on it",
				ifIdx, ifc.Name, NameLen-1)
		}
		addr = placeholder
	}
	return dst.Set(order, rule, addr, name)
}

// SendsBack reports whether Target sends recv back as it was received
// (with a placeholder address for an inbound packet that came without
// one): the direction asked for is the one recv names, or inbound for a
// zero-address sockaddr with a name, and, inbound, the interface is the
// one the packet was reported on.
func SendsBack(outbound bool, ifIdx uint32, recv *Sockaddr, recvIfIdx uint32) bool {
	if recv == nil || !recv.Valid() {
		return false
	}
	if outbound {
		return recv.Outbound()
	}
	return ifIdx == recvIfIdx && (!recv.Outbound() || len(recv.Name()) > 0)
}

// ClearName empties sin_zero: the kernel then finds an inbound packet's
// interface by sin_addr alone (div_output_inbound: ifa_ifwithaddr), and an
// outbound packet gets no receiving interface.
func (s *Sockaddr) ClearName() { clear(s[8:16]) }

// Matches reports whether interface ifName may be the one a name from
// sin_zero stands for. The kernel copies at most NameLen-1 bytes of the
// name (strlcpy into sin_zero), so a name of that length may be the start
// of a longer one ("bridge1" for "bridge10"); a shorter one is whole.
func Matches(name []byte, ifName string) bool {
	if len(name) == 0 {
		return false
	}
	if len(name) < NameLen-1 {
		return ifName == string(name)
	}
	return len(ifName) >= len(name) && ifName[:len(name)] == string(name)
}

// byAddr says what a sockaddr whose name ifunit finds no interface for
// needs, written back: outbound, nothing (the packet gets no receiving
// interface, as with no name); inbound, the kernel takes the interface
// owning sin_addr (div_output_inbound: ifa_ifwithaddr), which is found's
// only when sin_addr is non-zero (MarkInbound's placeholder is no
// interface's) and no other interface has it. An address none of the
// candidates lists (they changed since) is left to the kernel.
func byAddr(found int, addr [4]byte, inbound bool, cands []Candidate) NameFix {
	if !inbound {
		return NameKeep
	}
	if addr == ([4]byte{}) {
		return NameRefuse
	}
	for i := range cands {
		if has, unique := cands[i].has(addr); has && (i != found || !unique) {
			return NameRefuse
		}
	}
	return NameKeep
}

// Candidate is an interface of the host that a received name Matches.
type Candidate struct {
	Name     string
	Index    uint32
	Loopback bool
	// Addrs are its IPv4 addresses. They tell candidates apart, and
	// whether the kernel finds a cut name's interface by sin_addr, so
	// they may be left out only for a whole name (one shorter than
	// NameLen-1 bytes, or equal to the interface's).
	Addrs []CandidateAddr
}

// CandidateAddr is an IPv4 address of a Candidate.
type CandidateAddr struct {
	Addr   [4]byte
	Unique bool // no other interface of the host has it
}

func (c *Candidate) has(a [4]byte) (found, unique bool) {
	for _, x := range c.Addrs {
		if x.Addr == a {
			return true, x.Unique
		}
	}
	return false, false
}

// NameFix says what a received sockaddr needs before it is written back
// as received.
type NameFix uint8

const (
	// NameKeep: the kernel finds the packet's interface from the sockaddr
	// as it is.
	NameKeep NameFix = iota
	// NameClear: the name would find another interface (ifunit looks up
	// the cut name exactly); without it the kernel finds the right one by
	// sin_addr (inbound), or gives the packet no receiving interface
	// (outbound) rather than a wrong one.
	NameClear
	// NameRefuse: neither the name nor sin_addr finds the packet's
	// interface for certain; written back, the packet could enter on
	// another interface.
	NameRefuse
)

// ResolveRecv finds the interface a packet received with name (sin_zero)
// and addr (sin_addr) came in on, among cands, the host's interfaces that
// name Matches, and says what writing the sockaddr back needs (the kernel
// looks the name up with ifunit, an exact match, and, for an inbound
// packet, falls back to the interface owning sin_addr only when that finds
// none: div_output_inbound). inbound is the direction the packet is
// written back in. It returns the position of the interface in cands, or
// -1 when it cannot be told.
//
// A name shorter than NameLen-1 bytes is whole. A cut one ("bridge1" for
// "bridge10") is told apart by sin_addr, which the kernel fills with the
// first IPv4 address of the receiving interface of an inbound packet and
// leaves zero for an interface without one; when the name stands for one
// interface only, that interface is the one, whatever its addresses. When
// no interface has the cut name itself, ifunit finds none, and written
// back inbound the packet goes by sin_addr alone: NameRefuse unless that
// address is the interface's and no other's (byAddr).
func ResolveRecv(name []byte, addr [4]byte, inbound bool, cands []Candidate) (int, NameFix) {
	exact, longer := -1, 0
	for i := range cands {
		switch {
		case cands[i].Name == string(name):
			exact = i
		case Matches(name, cands[i].Name):
			longer++
		}
	}
	if longer == 0 {
		return exact, NameKeep // the name is whole
	}
	if exact < 0 && longer == 1 {
		// The one interface the cut name stands for, whatever sin_addr
		// says; written back inbound, ifunit finds no interface of the
		// cut name, and sin_addr must find this one (byAddr).
		for i := range cands {
			if Matches(name, cands[i].Name) {
				return i, byAddr(i, addr, inbound, cands)
			}
		}
	}
	// The candidates the sockaddr agrees with.
	found, n := -1, 0
	for i := range cands {
		c := &cands[i]
		if !Matches(name, c.Name) {
			continue
		}
		if inbound {
			if addr == ([4]byte{}) {
				if len(c.Addrs) > 0 {
					continue
				}
			} else if has, _ := c.has(addr); !has {
				continue
			}
		}
		if n++; n == 1 {
			found = i
		}
	}
	if n != 1 {
		found = -1
	}
	switch {
	case exact < 0:
		return found, byAddr(found, addr, inbound, cands)
	case found == exact:
		return found, NameKeep
	case !inbound:
		return found, NameClear
	case found >= 0 && addr != ([4]byte{}):
		if _, unique := cands[found].has(addr); unique {
			return found, NameClear
		}
	}
	return found, NameRefuse
}
