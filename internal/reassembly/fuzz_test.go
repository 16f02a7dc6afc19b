package reassembly

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/netdivert/divert/internal/packet"
)

// encodePackets frames packets for FuzzAdd: per packet a 2-byte length, a
// 1-byte clock step (seconds) and the bytes.
func encodePackets(ps [][]byte, step byte) []byte {
	var b []byte
	for _, p := range ps {
		b = binary.BigEndian.AppendUint16(b, uint16(len(p)))
		b = append(b, step)
		b = append(b, p...)
	}
	return b
}

func fuzzSeeds() [][]byte {
	rng := rand.New(rand.NewPCG(41, 42))
	var seeds [][]byte
	for i := range 8 {
		var d dgram
		switch i % 4 {
		case 0:
			d = makeV4(rng, protoUDP, 300, false)
		case 1:
			d = makeV4(rng, protoTCP, 300, true)
		case 2:
			d = makeV6(rng, protoUDP, 300, true, true, true)
		default:
			d = makeV6(rng, protoTCP, 300, false, false, false)
		}
		fs := split(d, cuts(rng, len(d.b)-d.hl, d.chainMin, 4))
		if i >= 4 {
			rng.Shuffle(len(fs), func(a, b int) { fs[a], fs[b] = fs[b], fs[a] })
			fs = append(fs, piece(d, 8, 64, true), fs[0])
		}
		seeds = append(seeds, encodePackets(fs, byte(i%3)))
	}
	return seeds
}

// FuzzAdd feeds any sequence of packets: Add never panics, the bounds and
// the internal bookkeeping hold after every packet, and what comes out is a
// well-formed datagram.
func FuzzAdd(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s, uint8(0))
		f.Add(s, uint8(1))
	}
	f.Fuzz(func(t *testing.T, in []byte, mode uint8) {
		cfg := Config{
			MaxBytes:     64<<10 + int(mode&4)<<16,
			MaxDatagrams: 4,
			MaxFragments: 8,
			Timeout:      5 * time.Second,
			IPv4Overlap:  OverlapPolicy(mode & 1),
		}
		if mode&2 != 0 {
			cfg.SkipIPv4Checksum = true
		}
		r := New(cfg)
		now := t0
		dst := make([]byte, 0, 128)
		for len(in) >= 3 {
			n := int(binary.BigEndian.Uint16(in))
			now = now.Add(time.Duration(in[2]) * time.Second)
			in = in[3:]
			n = min(n, len(in))
			pkt := in[:n]
			in = in[n:]
			orig := append([]byte(nil), pkt...)
			got, done, err := r.Add(dst, pkt, now)
			if !bytes.Equal(pkt, orig) {
				t.Fatal("Add modified its input")
			}
			switch {
			case err != nil:
				if done || got != nil {
					t.Fatalf("error with a datagram: %v", err)
				}
			case done && len(got) > 0 && &got[0] == &pkt[0]:
				// as is
			case done:
				checkDatagram(t, got)
			}
			if err := r.checkInvariants(); err != nil {
				t.Fatal(err)
			}
		}
		r.Expire(now.Add(time.Minute))
		if s := r.Stats(); s.Pending != 0 || s.HeldBytes != 0 {
			t.Fatalf("not empty after Expire: %+v", s)
		}
	})
}

// checkDatagram checks a reassembled datagram's header.
func checkDatagram(t *testing.T, b []byte) {
	t.Helper()
	switch b[0] >> 4 {
	case 4:
		hl := int(b[0]&0xF) * 4
		if int(binary.BigEndian.Uint16(b[2:4])) != len(b) || packet.Checksum(b[:hl], 0) != 0xFFFF || binary.BigEndian.Uint16(b[6:8])&0x3FFF != 0 {
			t.Fatalf("bad reassembled IPv4 header %x", b[:hl])
		}
	case 6:
		if int(binary.BigEndian.Uint16(b[4:6]))+40 != len(b) {
			t.Fatalf("bad reassembled IPv6 length")
		}
	default:
		t.Fatalf("reassembled datagram version %d", b[0]>>4)
	}
}

// FuzzFragment splits any packet: Fragment never panics, fragments respect
// the MTU, and when it succeeds Add puts the fragments back together.
func FuzzFragment(f *testing.F) {
	rng := rand.New(rand.NewPCG(43, 44))
	f.Add(makeV4(rng, protoUDP, 1000, false).b, uint16(600), uint32(1))
	f.Add(makeV4(rng, protoTCP, 1000, true).b, uint16(300), uint32(1))
	f.Add(makeV6(rng, protoUDP, 1000, true, true, true).b, uint16(500), uint32(7))
	f.Add(makeV6(rng, protoTCP, 1500, false, false, false).b, uint16(700), uint32(7))
	f.Add(makeV6(rng, 59, 100, false, true, false).b, uint16(100), uint32(7))
	f.Fuzz(func(t *testing.T, pkt []byte, mtu uint16, id uint32) {
		orig := append([]byte(nil), pkt...)
		fs, err := Fragment(nil, nil, pkt, int(mtu), id)
		if !bytes.Equal(pkt, orig) {
			t.Fatal("Fragment modified its input")
		}
		if err != nil {
			return
		}
		if len(fs) == 1 && &fs[0][0] == &pkt[0] {
			return // fits
		}
		r := New(Config{MaxFragments: 1 << 13, SkipIPv4Checksum: true})
		var got []byte
		for i, fr := range fs {
			if len(fr) > int(mtu) {
				t.Fatalf("fragment %d: %d > mtu %d", i, len(fr), mtu)
			}
			var done bool
			got, done, err = r.Add(nil, fr, t0)
			if pkt[0]>>4 == 4 && binary.BigEndian.Uint16(pkt[6:8])&0x3FFF != 0 {
				return // a fragment split further: not a whole datagram
			}
			if err != nil || done != (i == len(fs)-1) {
				t.Fatalf("fragment %d/%d: done=%v err=%v", i, len(fs), done, err)
			}
		}
		want := append([]byte(nil), pkt...)
		if want[0]>>4 == 4 {
			hl := int(want[0]&0xF) * 4
			want = want[:binary.BigEndian.Uint16(want[2:4])]
			want[10], want[11] = 0, 0
			binary.BigEndian.PutUint16(want[10:12], ^packet.Checksum(want[:hl], 0))
		} else {
			want = want[:40+int(binary.BigEndian.Uint16(want[4:6]))]
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("round trip differs")
		}
	})
}

// FuzzAddModel delivers pieces of one datagram chosen by the fuzzer (any
// bounds, duplicates, overlaps, changed bytes, wrong flags, timeouts) and
// checks every result against the test model.
func FuzzAddModel(f *testing.F) {
	f.Add(uint64(1), []byte{0, 2, 0, 3, 0, 0, 1, 5, 0, 1})
	f.Add(uint64(2), []byte{9, 0, 0, 1, 3, 2, 0, 7, 5, 1, 4, 1})
	f.Add(uint64(3), []byte{5, 2, 0x10, 1, 3, 0x21, 0, 6, 0x40, 2, 0x80})
	f.Fuzz(func(t *testing.T, seed uint64, ops []byte) {
		rng := rand.New(rand.NewPCG(seed, 99))
		policy := OverlapPolicy(seed >> 63)
		var d dgram
		if seed&1 == 0 {
			d = makeV4(rng, protoUDP, 64+rng.IntN(2000), seed&2 != 0)
		} else {
			d = makeV6(rng, protoUDP, 64+rng.IntN(2000), seed&2 != 0, seed&4 != 0, false)
		}
		n := len(d.b) - d.hl
		r := New(Config{IPv4Overlap: policy, MaxFragments: 1 << 13})
		m := model{policy: policy, v6: d.v6}
		now := t0
		hl := d.hl
		if d.v6 {
			hl += 8
		}
		for ; len(ops) >= 3; ops = ops[3:] {
			a, b, fl := int(ops[0]), int(ops[1]), ops[2]
			if fl&0x80 != 0 { // let every pending datagram time out
				now = now.Add(DefaultTimeoutIPv6 + time.Second)
				m.present, m.dead = false, false
			}
			lo := (a * 8) % ((n + 7) &^ 7)
			hi := min(n, lo+8*(1+b%32))
			more := hi < n
			if fl&1 != 0 {
				more = !more // a wrong flag
			}
			p := piece(d, lo, hi, more)
			if fl&2 != 0 && len(p) > hl {
				p[hl+int(fl>>2)%(len(p)-hl)] ^= 0x5A // different bytes
			}
			got, done, err := r.Add(nil, p, now)
			if testing.Verbose() {
				t.Logf("[%d,%d) more=%v flip=%v -> done=%v err=%v", lo, hi, more, fl&2 != 0, done, err)
			}
			if lo == 0 && !more {
				if err != nil || !done || !bytes.Equal(got, p) {
					t.Fatalf("whole piece: done=%v err=%v", done, err)
				}
				continue
			}
			var wantDone bool
			var wantErr error
			switch {
			case m.dead:
				wantErr = ErrDiscarded
			case more && (hi-lo)%8 != 0:
				wantErr = ErrBadLength
				m.dead = m.present && len(m.frags) > 0
				m.present = false
			default:
				wantDone, wantErr = m.add(lo, hi, p[hl:], !more)
			}
			if !errors.Is(err, wantErr) || (wantErr == nil) != (err == nil) || done != wantDone {
				t.Fatalf("[%d,%d) more=%v: got done=%v err=%v, want done=%v err=%v", lo, hi, more, done, err, wantDone, wantErr)
			}
			if done {
				want := append(append([]byte(nil), d.b[:d.hl]...), m.data[:m.lastTotal]...)
				if d.v6 {
					binary.BigEndian.PutUint16(want[4:6], uint16(len(want)-40))
				} else {
					binary.BigEndian.PutUint16(want[2:4], uint16(len(want)))
					setSum4(want[:d.hl])
				}
				if !bytes.Equal(got, want) {
					for i := range got {
						if i >= len(want) || got[i] != want[i] {
							t.Fatalf("datagram differs from the model at %d of %d/%d (hl %d, v6 %v)", i, len(got), len(want), d.hl, d.v6)
						}
					}
					t.Fatalf("datagram differs from the model")
				}
			}
			if err := r.checkInvariants(); err != nil {
				t.Fatal(err)
			}
		}
	})
}
