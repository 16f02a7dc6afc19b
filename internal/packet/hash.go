package packet

import (
	"encoding/binary"
	"math/bits"
)

// xxHash64 primes.
const (
	prime64x1 = 11400714785074694791
	prime64x2 = 14029467366897019727
	prime64x3 = 1609587929392839161
	prime64x4 = 9650029242287828579
)

// hashPad is WinDivert's padding: the SHA-2 initial values.
var hashPad = [9]uint64{
	0x428A2F9871374491, 0xB5C0FBCFE9B5DBA5, 0x3956C25B59F111F1,
	0x923F82A4AB1C5ED5, 0xD807AA9812835B01, 0x243185BE550C7DC3,
	0x72BE5D7480DEB1FE, 0x9BDC06A7C19BF174, 0xE49B69C1EFBE4786,
}

// Hash is WinDivertHelperHashPacket, bit-exact: a 64-bit hash of the IP
// header and the start of the transport header of the packet in b, seeded
// with seed. It returns 0 when the packet does not parse or is truncated
// (len(b) < the IP length), as WinDivert does.
func Hash(b []byte, seed uint64) uint64 {
	var p Info
	if Parse(b, &p) != nil || p.Truncated {
		return 0
	}
	return HashInfo(b, &p, seed)
}

// HashInfo is WinDivert's packet hash of b as parsed into p, without
// Hash's truncation check: the filter language's random8/16/32 fields use it
// on whatever Parse accepted (WinDivertExecuteFilter), with the timestamp as
// seed, as h|0xFF00000000000000.
//
// The hash is xxHash64 specialized to one 32-byte round: the seed and the
// header words (read little-endian, as WinDivert reads memory on x86) are
// mixed with the SHA-2 initial values.
func HashInfo(b []byte, p *Info, seed uint64) uint64 {
	var v1, v2, v3, v4 uint64
	var v [4]uint64
	var i int
	le := binary.LittleEndian
	v1 = seed ^ hashPad[0]
	switch p.Version {
	case 4:
		v2 = le.Uint64(b[0:]) ^ hashPad[1]
		v3 = le.Uint64(b[8:]) ^ hashPad[2]
		v4 = uint64(le.Uint32(b[16:])) ^ hashPad[3]
		i = 0
	case 6:
		v2 = le.Uint64(b[0:]) ^ hashPad[1]
		v3 = le.Uint64(b[8:]) ^ hashPad[2]
		v4 = le.Uint64(b[16:]) ^ hashPad[3]
		v[0] = le.Uint64(b[24:]) ^ hashPad[4]
		v[1] = le.Uint64(b[32:]) ^ hashPad[5]
		i = 2
	default:
		return 0
	}
	if t := p.TransOff; t >= 0 {
		if p.Protocol == ProtoTCP {
			v[i] = le.Uint64(b[t:]) ^ hashPad[i+4]
			i++
			v[i] = le.Uint64(b[t+8:]) ^ hashPad[i+4]
			i++
			w := uint64(le.Uint32(b[t+16:]))
			if i <= 3 {
				v[i] = w ^ hashPad[i+4]
				i++
			} else {
				v2 ^= w << 32
			}
		} else { // UDP, ICMP, ICMPv6: the 8-byte header
			v[i] = le.Uint64(b[t:]) ^ hashPad[i+4]
			i++
		}
	}
	for ; i <= 3; i++ {
		v[i] = seed ^ hashPad[i+4]
	}
	v1 = xxhRound(v[0], v1)
	v2 = xxhRound(v[1], v2)
	v3 = xxhRound(v[2], v3)
	v4 = xxhRound(v[3], v4)
	h := bits.RotateLeft64(v1, 1) + bits.RotateLeft64(v2, 7) +
		bits.RotateLeft64(v3, 12) + bits.RotateLeft64(v4, 18)
	h = xxhMerge(h, v1)
	h = xxhMerge(h, v2)
	h = xxhMerge(h, v3)
	h = xxhMerge(h, v4)
	h += 32 // the "length"
	h ^= h >> 33
	h *= prime64x2
	h ^= h >> 29
	h *= prime64x3
	h ^= h >> 32
	return h
}

func xxhRound(acc, in uint64) uint64 {
	acc += in * prime64x2
	acc = bits.RotateLeft64(acc, 31)
	return acc * prime64x1
}

func xxhMerge(acc, v uint64) uint64 {
	acc ^= xxhRound(0, v)
	return acc*prime64x1 + prime64x4
}
