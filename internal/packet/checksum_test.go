package packet

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"testing"
)

// naiveSum is the textbook RFC 1071 loop, the reference for Checksum.
func naiveSum(b []byte, initial uint32) uint16 {
	s := uint64(initial)
	for i := 0; i+1 < len(b); i += 2 {
		s += uint64(b[i])<<8 | uint64(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint64(b[len(b)-1]) << 8
	}
	for s > 0xFFFF {
		s = s&0xFFFF + s>>16
	}
	return uint16(s)
}

func TestChecksumRFC1071(t *testing.T) {
	// RFC 1071 §3 example: the sum of 00 01 f2 03 f4 f5 f6 f7 is 0xddf2.
	b := []byte{0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7}
	if got := Checksum(b, 0); got != 0xddf2 {
		t.Fatalf("Checksum = %#04x, want 0xddf2", got)
	}
	if got := Checksum(nil, 0); got != 0 {
		t.Fatalf("Checksum(nil) = %#04x, want 0", got)
	}
	if got := Checksum([]byte{0xab}, 0); got != 0xab00 {
		t.Fatalf("Checksum(odd) = %#04x, want 0xab00", got)
	}
}

func TestChecksumMatchesNaive(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 3000)
	for i := 0; i < 20000; i++ {
		n := r.IntN(len(buf))
		off := r.IntN(8)
		if off+n > len(buf) {
			n = len(buf) - off
		}
		b := buf[off : off+n]
		switch r.IntN(3) {
		case 0:
			for j := range b {
				b[j] = byte(r.Uint32())
			}
		case 1: // carries everywhere
			for j := range b {
				b[j] = 0xFF - byte(r.IntN(2))
			}
		default:
			clear(b)
		}
		initial := r.Uint32() >> r.IntN(32)
		if got, want := Checksum(b, initial), naiveSum(b, initial); got != want {
			t.Fatalf("len %d off %d initial %#x: Checksum = %#04x, naive = %#04x", n, off, initial, got, want)
		}
	}
}

func TestChecksumAllOnes(t *testing.T) {
	// Both folds and the final carry matter here.
	for n := 0; n < 80; n++ {
		b := bytes.Repeat([]byte{0xFF}, n)
		if got, want := Checksum(b, 0xFFFF), naiveSum(b, 0xFFFF); got != want {
			t.Fatalf("len %d: %#04x, want %#04x", n, got, want)
		}
	}
}

func TestUpdateChecksum(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	h := make([]byte, 20)
	for i := 0; i < 10000; i++ {
		for j := range h {
			h[j] = byte(r.Uint32())
		}
		h[10], h[11] = 0, 0
		binary.BigEndian.PutUint16(h[10:], ^Checksum(h, 0))
		w := 2 * r.IntN(10)
		if w == 10 {
			continue
		}
		old := binary.BigEndian.Uint16(h[w:])
		nw := uint16(r.Uint32())
		binary.BigEndian.PutUint16(h[w:], nw)
		inc := UpdateChecksum(binary.BigEndian.Uint16(h[10:]), old, nw)
		binary.BigEndian.PutUint16(h[10:], inc)
		if Checksum(h, 0) != 0xFFFF {
			t.Fatalf("incremental checksum %#04x does not verify", inc)
		}
		h[10], h[11] = 0, 0
		if full := ^Checksum(h, 0); full != inc {
			t.Fatalf("incremental %#04x, full %#04x", inc, full)
		}
	}
}

func TestPseudoDst(t *testing.T) {
	addr := func(x byte) []byte { a := make([]byte, 16); a[0], a[15] = 0xfd, x; return a }
	rh := func(typ, left byte, addrs ...[]byte) []byte {
		b := []byte{17, byte(2 * len(addrs)), typ, left, 0, 0, 0, 0}
		for _, a := range addrs {
			b = append(b, a...)
		}
		return b
	}
	udp := make([]byte, 8)
	tests := []struct {
		name string
		rh   []byte
		want []byte
	}{
		{"type 0 segments left", rh(0, 2, addr(3), addr(4)), addr(4)},
		{"type 0 done", rh(0, 0, addr(3), addr(4)), addr(2)},
		{"type 2", rh(2, 1, addr(5)), addr(5)},
		{"type 4 SRH", rh(4, 1, addr(6), addr(7)), addr(6)},
		{"type 3 RPL unsupported", rh(3, 1, addr(8)), addr(2)},
		{"type 0 no addresses", rh(0, 1), addr(2)},
	}
	for _, tt := range tests {
		b := v6(ProtoRouting, append(append([]byte{}, tt.rh...), udp...))
		var p Info
		if err := Parse(b, &p); err != nil {
			t.Fatal(err)
		}
		if p.RoutingHdrOff != 40 || p.TransOff != 40+len(tt.rh) {
			t.Fatalf("%s: parse %+v", tt.name, p)
		}
		if got := PseudoDst(b, &p); !bytes.Equal(got, tt.want) {
			t.Errorf("%s: PseudoDst = %x, want %x", tt.name, got, tt.want)
		}
		// The transport checksum follows the final destination.
		if err := FixTransportChecksum(b, &p); err != nil {
			t.Fatal(err)
		}
		ph := PseudoHeaderSum(b[8:24], tt.want, ProtoUDP, 8)
		if Checksum(b[p.TransOff:], ph) != 0xFFFF || !TransportChecksumValid(b, &p) {
			t.Errorf("%s: checksum not over the final destination", tt.name)
		}
	}
}

func TestFixTransportChecksumErrors(t *testing.T) {
	frag0 := mustHex(t, oraclePackets["ipv6_fragment_0"])
	frag1 := mustHex(t, oraclePackets["ipv4_fragment_1"])
	echo := mustHex(t, oraclePackets["ipv4_icmp_echo_req"])
	tests := []struct {
		name string
		b    []byte
		err  error
	}{
		{"first fragment", frag0, ErrIncomplete},
		{"non-first fragment", frag1, ErrNoTransport},
		{"truncated", echo[:60], ErrIncomplete},
		{"no transport", v6(59, nil), ErrNoTransport},
	}
	for _, tt := range tests {
		var p Info
		if err := Parse(tt.b, &p); err != nil {
			t.Fatal(err)
		}
		before := append([]byte{}, tt.b...)
		if err := FixTransportChecksum(tt.b, &p); !errors.Is(err, tt.err) {
			t.Errorf("%s: err %v, want %v", tt.name, err, tt.err)
		}
		if !bytes.Equal(before, tt.b) {
			t.Errorf("%s: buffer changed", tt.name)
		}
		if TransportChecksumValid(tt.b, &p) {
			t.Errorf("%s: reported valid", tt.name)
		}
	}
}

func TestOracleChecksums(t *testing.T) {
	// WinDivert's test packets carry zero checksums; after fixing, every one
	// verifies, and ICMP's known value matches a ping's.
	for name, h := range oraclePackets {
		b := mustHex(t, h)
		var p Info
		if err := Parse(b, &p); err != nil {
			t.Fatal(err)
		}
		FixIPv4Checksum(b, &p)
		if p.Version == 4 && !IPv4ChecksumValid(b, &p) {
			t.Errorf("%s: IPv4 checksum invalid after fix", name)
		}
		err := FixTransportChecksum(b, &p)
		whole := !p.Fragment && p.TransOff >= 0
		if (err == nil) != whole {
			t.Errorf("%s: err %v", name, err)
		}
		if whole && !TransportChecksumValid(b, &p) {
			t.Errorf("%s: transport checksum invalid after fix", name)
		}
	}
}

func BenchmarkChecksum1500(b *testing.B) {
	buf := make([]byte, 1500)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	var s uint16
	for b.Loop() {
		s += Checksum(buf, 0)
	}
	_ = s
}
