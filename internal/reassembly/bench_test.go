package reassembly

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/ip4defrag"
	"github.com/gopacket/gopacket/layers"
)

// benchFragments returns the 1500-byte-MTU fragments (1480 data bytes) of
// an IPv4 UDP datagram of size bytes, in order or reversed.
func benchFragments(size int, reversed bool) [][]byte {
	rng := rand.New(rand.NewPCG(51, 52))
	d := makeV4(rng, protoUDP, size-20, false)
	fs, err := Fragment(nil, nil, d.b, 1500, 0)
	if err != nil {
		panic(err)
	}
	if reversed {
		slices.Reverse(fs)
	}
	return fs
}

// BenchmarkReassemble compares Add with gopacket's ip4defrag on the same
// fragments; one op is one whole datagram. ip4defrag is given its input
// decoded into reused layers.IPv4 values (decoding included, as it cannot
// take bytes) and its output is not serialized, which favours it.
func BenchmarkReassemble(b *testing.B) {
	for _, size := range []int{3000, 9000} {
		for _, rev := range []bool{false, true} {
			order := "inorder"
			if rev {
				order = "reversed"
			}
			fs := benchFragments(size, rev)
			b.Run(fmt.Sprintf("divert/%d/%s", size, order), func(b *testing.B) {
				r := New(Config{})
				dst := make([]byte, 0, 65536)
				b.SetBytes(int64(size))
				b.ReportAllocs()
				defer cpuMeter(b)()
				for b.Loop() {
					for _, f := range fs {
						if _, _, err := r.Add(dst, f, t0); err != nil {
							b.Fatal(err)
						}
					}
				}
				if s := r.Stats(); s.Completed == 0 || s.Pending != 0 {
					b.Fatalf("%+v", s)
				}
			})
			b.Run(fmt.Sprintf("ip4defrag/%d/%s", size, order), func(b *testing.B) {
				g := ip4defrag.NewIPv4Defragmenter()
				ips := make([]layers.IPv4, len(fs))
				b.SetBytes(int64(size))
				b.ReportAllocs()
				defer cpuMeter(b)()
				for b.Loop() {
					var out *layers.IPv4
					for i, f := range fs {
						if err := ips[i].DecodeFromBytes(f, gopacket.NilDecodeFeedback); err != nil {
							b.Fatal(err)
						}
						var err error
						if out, err = g.DefragIPv4WithTimestamp(&ips[i], t0); err != nil {
							b.Fatal(err)
						}
					}
					if out == nil || int(out.Length) != size {
						b.Fatal("ip4defrag did not complete")
					}
				}
			})
		}
	}
}

// BenchmarkFragment measures splitting a 9000-byte datagram for a 1500 MTU.
func BenchmarkFragment(b *testing.B) {
	rng := rand.New(rand.NewPCG(53, 54))
	for _, v6 := range []bool{false, true} {
		d := makeV4(rng, protoUDP, 8980, false)
		name := "ipv4"
		if v6 {
			d = makeV6(rng, protoUDP, 8960, false, false, false)
			name = "ipv6"
		}
		b.Run(name, func(b *testing.B) {
			dst := make([]byte, 0, 16384)
			frags := make([][]byte, 0, 16)
			b.SetBytes(int64(len(d.b)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Fragment(dst, frags, d.b, 1500, 1); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
