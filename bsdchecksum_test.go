//go:build freebsd || linux

package divert

import "testing"

// TestDivertL4Valid: an outbound IPv6 packet's transport checksum may be
// partial before FreeBSD 14 (divert_packet finishes only IPv4's delayed
// checksums there), so its bits are clear; IPv4's are set on every
// release; inbound ones are never checked before ipfw.
func TestDivertL4Valid(t *testing.T) {
	for _, tc := range []struct {
		out, ipv6 bool
		major     uint64
		want      bool
	}{
		{true, false, 13, true},
		{true, false, 0, true},
		{true, true, 13, false},
		{true, true, 0, false}, // release unknown
		{true, true, 14, true},
		{true, true, 15, true},
		{false, false, 14, false},
		{false, true, 14, false},
	} {
		if got := divertL4Valid(tc.out, tc.ipv6, tc.major); got != tc.want {
			t.Errorf("divertL4Valid(outbound %v, ipv6 %v, %d) = %v, want %v", tc.out, tc.ipv6, tc.major, got, tc.want)
		}
	}
}
