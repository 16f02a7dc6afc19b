package main

import (
	"github.com/netdivert/divert"
)

// tamper flips one to three payload bytes of pkt (the bytes after the
// transport header) and fixes the checksums, as clumsy's "tamper" with
// "redo checksum" does. It reports false, leaving pkt alone, when the packet
// has no payload or is a fragment (whose transport checksum covers bytes
// this packet does not hold).
func tamper(pkt []byte, addr *divert.Address, r rng) bool {
	p, err := divert.ParsePacket(pkt)
	if err != nil || p.Fragment || len(p.Payload) == 0 {
		return false
	}
	payload := p.Payload
	// Distinct positions, each XORed with a non-zero value: every chosen
	// byte changes.
	start, n := r.r.IntN(len(payload)), 1+r.r.IntN(3)
	for k := range min(n, len(payload)) {
		payload[(start+k)%len(payload)] ^= byte(1 + r.r.IntN(255))
	}
	if err := divert.CalcChecksums(pkt, addr, 0); err != nil {
		return false
	}
	return true
}
