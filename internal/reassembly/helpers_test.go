package reassembly

import (
	"encoding/binary"
	"math/rand/v2"

	"github.com/netdivert/divert/internal/packet"
)

// dgram is a test datagram with what the test fragmenter needs to know.
type dgram struct {
	b        []byte
	v6       bool
	hl       int // IPv4: header length; IPv6: per-fragment part length
	nhOff    int // IPv6: offset of the next-header byte the Fragment header follows
	chainMin int // bytes the first fragment's data must hold
	id       uint32
}

func setSum4(h []byte) {
	h[10], h[11] = 0, 0
	binary.BigEndian.PutUint16(h[10:12], ^packet.Checksum(h, 0))
}

// makeV4 builds an IPv4 datagram with n payload bytes of protocol proto and
// optional options (some copied, some not).
func makeV4(rng *rand.Rand, proto uint8, n int, opts bool) dgram {
	hl := 20
	var o []byte
	if opts {
		// NOP, security-like copied option (type 0x82, len 11), record route (type 7, not copied, len 7), padding.
		o = []byte{1, 0x82, 11, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 7, 7, 4, 0, 0, 0, 0}
		for len(o)%4 != 0 {
			o = append(o, 0)
		}
		hl += len(o)
	}
	b := make([]byte, hl+n)
	b[0] = 0x40 | byte(hl/4)
	b[1] = byte(rng.IntN(256))
	binary.BigEndian.PutUint16(b[2:4], uint16(hl+n))
	id := uint16(rng.Uint32())
	binary.BigEndian.PutUint16(b[4:6], id)
	b[8] = 64
	b[9] = proto
	copy(b[12:16], []byte{10, 1, byte(rng.IntN(4)), 1})
	copy(b[16:20], []byte{10, 2, 0, byte(rng.IntN(4))})
	copy(b[20:hl], o)
	for i := hl; i < len(b); i++ {
		b[i] = byte(rng.Uint32())
	}
	setSum4(b[:hl])
	min := 1
	if proto == protoTCP {
		min = 24
	}
	return dgram{b: b, hl: hl, chainMin: min, id: uint32(id)}
}

// makeV6 builds an IPv6 datagram: optional Hop-by-Hop, optional Destination
// Options + Routing (per-fragment), optional Destination Options after them
// (fragmentable), then the upper layer proto with n bytes in all after the
// extension headers.
func makeV6(rng *rand.Rand, proto uint8, n int, hbh, rt, dst2 bool) dgram {
	b := make([]byte, 40, 40+64+n)
	b[0] = 0x60
	b[7] = 64
	copy(b[8:24], []byte{0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, byte(1 + rng.IntN(3))})
	copy(b[24:40], []byte{0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, byte(5 + rng.IntN(3))})
	nhOff := 6
	var chain []uint8
	if hbh {
		chain = append(chain, 0)
	}
	if rt {
		chain = append(chain, 60, 43)
	}
	if dst2 {
		chain = append(chain, 60)
	}
	chain = append(chain, proto)
	b[6] = chain[0]
	unfrag := 40
	for i, h := range chain[:len(chain)-1] {
		off := len(b)
		ext := []byte{chain[i+1], 0, 1, 4, 0, 0, 0, 0} // PadN
		if h == 43 {
			ext = []byte{chain[i+1], 0, 4, 0, 0, 0, 0, 0}
		}
		b = append(b, ext...)
		if h == 0 || h == 43 || (h == 60 && rt && !(dst2 && i == len(chain)-2)) {
			unfrag = len(b)
			nhOff = off
		}
	}
	chainMin := len(b) - unfrag
	switch proto {
	case protoTCP:
		chainMin += 20
	case protoUDP, protoICMP6:
		chainMin += 8
	case 59:
	case 132:
		chainMin += 12
	default:
		chainMin++
	}
	chainMin = max(chainMin, 1)
	for range n {
		b = append(b, byte(rng.Uint32()))
	}
	binary.BigEndian.PutUint16(b[4:6], uint16(len(b)-40))
	return dgram{b: b, v6: true, hl: unfrag, nhOff: nhOff, chainMin: chainMin, id: rng.Uint32()}
}

// cuts returns fragment boundaries (data offsets, 8-aligned, strictly
// increasing, the first at least min) splitting dataLen bytes into at most
// pieces parts.
func cuts(rng *rand.Rand, dataLen, minFirst, pieces int) []int {
	var cs []int
	for range pieces - 1 {
		c := (rng.IntN(dataLen) + 7) &^ 7
		if c >= minFirst && c < dataLen {
			cs = append(cs, c)
		}
	}
	// sort and dedupe
	for i := 1; i < len(cs); i++ {
		for j := i; j > 0 && cs[j] < cs[j-1]; j-- {
			cs[j], cs[j-1] = cs[j-1], cs[j]
		}
	}
	out := cs[:0]
	for i, c := range cs {
		if i == 0 || c != cs[i-1] {
			out = append(out, c)
		}
	}
	return out
}

// piece builds one fragment of d carrying data [lo, hi) with the given more
// flag, independently of the package's Fragment.
func piece(d dgram, lo, hi int, more bool) []byte {
	if !d.v6 {
		f := make([]byte, d.hl+hi-lo)
		copy(f, d.b[:d.hl])
		copy(f[d.hl:], d.b[d.hl+lo:d.hl+hi])
		binary.BigEndian.PutUint16(f[2:4], uint16(len(f)))
		fo := uint16(lo / 8)
		if more {
			fo |= 0x2000
		}
		binary.BigEndian.PutUint16(f[6:8], fo)
		setSum4(f[:d.hl])
		return f
	}
	f := make([]byte, d.hl+8+hi-lo)
	copy(f, d.b[:d.hl])
	f[d.nhOff] = 44
	binary.BigEndian.PutUint16(f[4:6], uint16(len(f)-40))
	f[d.hl] = d.b[d.nhOff]
	fo := uint16(lo)
	if more {
		fo |= 1
	}
	binary.BigEndian.PutUint16(f[d.hl+2:d.hl+4], fo)
	binary.BigEndian.PutUint32(f[d.hl+4:d.hl+8], d.id)
	copy(f[d.hl+8:], d.b[d.hl+lo:d.hl+hi])
	return f
}

// split fragments d at cs.
func split(d dgram, cs []int) [][]byte {
	n := len(d.b) - d.hl
	var out [][]byte
	lo := 0
	for _, c := range append(cs, n) {
		out = append(out, piece(d, lo, c, c < n))
		lo = c
	}
	return out
}

// randomDgram returns a random datagram of up to maxLen payload bytes.
func randomDgram(rng *rand.Rand, maxLen int) dgram {
	n := 64 + rng.IntN(maxLen-64)
	protos := []uint8{protoTCP, protoUDP, protoICMP6, 59, 132}
	if rng.IntN(2) == 0 {
		p := protos[rng.IntN(2)]
		return makeV4(rng, p, min(n, 65535-60), rng.IntN(3) == 0)
	}
	p := protos[rng.IntN(len(protos))]
	return makeV6(rng, p, min(n, 65535-64), rng.IntN(2) == 0, rng.IntN(3) == 0, rng.IntN(3) == 0)
}
