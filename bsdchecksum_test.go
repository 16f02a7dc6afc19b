//go:build freebsd || linux

package divert

import (
	"encoding/binary"
	"testing"

	"github.com/netdivert/divert/internal/packet"
)

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
		pkt := testIPv4Header()
		if tc.ipv6 {
			pkt = make([]byte, 40)
			pkt[0] = 6 << 4
		}
		ip, l4 := divertChecksums(pkt, tc.out, tc.fwd, tc.lo, tc.major)
		if ip != tc.ip || l4 != tc.l4 {
			t.Errorf("divertChecksums(outbound %v, forwarded %v, loopback %v, ipv6 %v, %d) = %v, %v; want %v, %v",
				tc.out, tc.fwd, tc.lo, tc.ipv6, tc.major, ip, l4, tc.ip, tc.l4)
		}
	}
}

// testIPv4Header returns an IPv4 header (a UDP broadcast from 192.0.2.1)
// with its checksum right.
func testIPv4Header() []byte {
	h := []byte{0x45, 0, 0, 28, 0, 1, 0, 0, 64, 17, 0, 0, 192, 0, 2, 1, 255, 255, 255, 255}
	binary.BigEndian.PutUint16(h[10:], ^packet.Checksum(h, 0))
	return h
}

// TestDivertChecksumsLoopedBroadcast: the copy of a broadcast the host
// sent that ether_output loops back comes in marked verified
// (update_mbuf_csumflags) with the header checksum ip_output left to the
// card, 0: its IPChecksum is clear. So is that of any inbound header whose
// checksum is wrong, or that the buffer does not hold whole.
func TestDivertChecksumsLoopedBroadcast(t *testing.T) {
	good := testIPv4Header()
	if ip, _ := divertChecksums(good, false, false, false, 14); !ip {
		t.Fatal("IPChecksum clear for an inbound header whose checksum is right")
	}
	looped := append([]byte(nil), good...)
	looped[10], looped[11] = 0, 0 // left to the card
	if ip, _ := divertChecksums(looped, false, false, false, 14); ip {
		t.Error("IPChecksum set for a looped-back broadcast without a header checksum")
	}
	opts := append([]byte{0x46}, good[1:]...) // 24-byte header, an option the sum does not cover
	opts = append(opts, 1, 1, 1, 0)
	binary.BigEndian.PutUint16(opts[2:], 32)
	if ip, _ := divertChecksums(opts, false, false, false, 14); ip {
		t.Error("IPChecksum set for a header whose options the checksum does not cover")
	}
	opts[10], opts[11] = 0, 0
	binary.BigEndian.PutUint16(opts[10:], ^packet.Checksum(opts[:24], 0))
	if ip, _ := divertChecksums(opts, false, false, false, 14); !ip {
		t.Error("IPChecksum clear for a header with options whose checksum is right")
	}
	for _, short := range [][]byte{good[:19], opts[:22], nil, {0x44, 0, 0, 20}} {
		if ip, _ := divertChecksums(short, false, false, false, 14); ip {
			t.Errorf("IPChecksum set for % x, no whole IPv4 header", short)
		}
	}
}
