//go:build freebsd || linux

package divert

import "testing"

// TestDivertChecksums: an outbound IPv6 packet's transport checksum may be
// partial before FreeBSD 14 (divert_packet finishes only IPv4's delayed
// checksums there), so its bits are clear; IPv4's are set on every
// release; inbound and forwarded ones are never checked before ipfw. The
// IPv4 header checksum is known valid inbound only, and not on a loopback
// interface, whose packets' headers ip_output leaves unfinished.
func TestDivertChecksums(t *testing.T) {
	for _, tc := range []struct {
		out, fwd, lo, ipv6 bool
		major              uint64
		ip, l4             bool
	}{
		{true, false, false, false, 13, false, true},
		{true, false, false, false, 0, false, true},
		{true, false, false, true, 13, false, false},
		{true, false, false, true, 0, false, false}, // release unknown
		{true, false, false, true, 14, false, true},
		{true, false, false, true, 15, false, true},
		{false, false, false, false, 14, true, false},
		{false, false, false, true, 14, false, false},
		// Forwarded: the transport checksums are as they came in.
		{true, true, false, false, 14, false, false},
		{true, true, false, true, 14, false, false},
		// Inbound on lo0: the header checksum was never computed.
		{false, false, true, false, 14, false, false},
	} {
		ip, l4 := divertChecksums(tc.out, tc.fwd, tc.lo, tc.ipv6, tc.major)
		if ip != tc.ip || l4 != tc.l4 {
			t.Errorf("divertChecksums(outbound %v, forwarded %v, loopback %v, ipv6 %v, %d) = %v, %v; want %v, %v",
				tc.out, tc.fwd, tc.lo, tc.ipv6, tc.major, ip, l4, tc.ip, tc.l4)
		}
	}
}
