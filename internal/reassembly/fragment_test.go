package reassembly

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/ip4defrag"
	"github.com/gopacket/gopacket/layers"

	"github.com/netdivert/divert/internal/packet"
)

// checkFragments verifies fragments of d with gopacket's decoders: each at
// most mtu bytes, valid IPv4 checksums, the offsets/flags and IPv6 Fragment
// header where RFC 8200 puts them, and the data reassembling to d.
func checkFragments(t *testing.T, d dgram, fs [][]byte, mtu int, id uint32) {
	t.Helper()
	var data []byte
	for i, f := range fs {
		if len(f) > mtu {
			t.Fatalf("fragment %d: %d bytes > mtu %d", i, len(f), mtu)
		}
		last := i == len(fs)-1
		if !d.v6 {
			var ip layers.IPv4
			if err := ip.DecodeFromBytes(f, gopacket.NilDecodeFeedback); err != nil {
				t.Fatalf("fragment %d: gopacket: %v", i, err)
			}
			if packet.Checksum(f[:ip.IHL*4], 0) != 0xFFFF {
				t.Fatalf("fragment %d: bad header checksum", i)
			}
			if int(ip.FragOffset)*8 != len(data) || (ip.Flags&layers.IPv4MoreFragments != 0) == last || ip.Id != uint16(d.id) {
				t.Fatalf("fragment %d: offset %d flags %v id %#x", i, ip.FragOffset, ip.Flags, ip.Id)
			}
			if i > 0 && int(ip.IHL)*4 > d.hl {
				t.Fatalf("fragment %d: header %d bytes", i, ip.IHL*4)
			}
			if i == 0 && !bytes.Equal(f[20:d.hl], d.b[20:d.hl]) {
				t.Fatalf("first fragment lost options")
			}
			if len(ip.Payload)%8 != 0 && !last {
				t.Fatalf("fragment %d: %d data bytes", i, len(ip.Payload))
			}
			data = append(data, ip.Payload...)
			continue
		}
		p := gopacket.NewPacket(f, layers.LayerTypeIPv6, gopacket.Default)
		fl, ok := p.Layer(layers.LayerTypeIPv6Fragment).(*layers.IPv6Fragment)
		if !ok {
			t.Fatalf("fragment %d: no fragment header: %v", i, p)
		}
		hdr := append([]byte(nil), f[:d.hl]...)
		hdr[d.nhOff] = d.b[d.nhOff]
		hdr[4], hdr[5] = d.b[4], d.b[5]
		if !bytes.Equal(hdr, d.b[:d.hl]) || f[d.nhOff] != 44 {
			t.Fatalf("fragment %d: per-fragment headers differ", i)
		}
		if int(fl.FragmentOffset)*8 != len(data) || fl.MoreFragments == last || fl.Identification != id || fl.NextHeader != layers.IPProtocol(d.b[d.nhOff]) {
			t.Fatalf("fragment %d: %+v", i, fl)
		}
		if int(binary.BigEndian.Uint16(f[4:6]))+40 != len(f) {
			t.Fatalf("fragment %d: payload length", i)
		}
		data = append(data, f[d.hl+8:]...)
	}
	if !bytes.Equal(data, d.b[d.hl:]) {
		t.Fatalf("fragment data differ from the datagram's")
	}
}

func TestFragmentRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(31, 32))
	r := New(Config{MaxFragments: 1 << 13})
	dst := make([]byte, 0, 1<<17)
	frags := make([][]byte, 0, 64)
	for iter := range 3000 {
		d := randomDgram(rng, 1<<16)
		mtu := 1280 + rng.IntN(8000)
		if rng.IntN(4) == 0 {
			mtu = 200 + rng.IntN(1000)
		}
		fs, err := Fragment(dst, frags, d.b, mtu, d.id)
		if err != nil {
			t.Fatalf("iter %d: %v", iter, err)
		}
		if len(d.b) <= mtu {
			if len(fs) != 1 || &fs[0][0] != &d.b[0] {
				t.Fatalf("iter %d: fitting datagram not returned as is", iter)
			}
			continue
		}
		checkFragments(t, d, fs, mtu, d.id)
		// Add in random order gives back the original; Fragment with the
		// Info gives back the same fragments.
		var info Info
		var got []byte
		for k, i := range rng.Perm(len(fs)) {
			var done bool
			got, done, err = r.AddInfo(nil, fs[i], t0, &info)
			if err != nil || done != (k == len(fs)-1) {
				t.Fatalf("iter %d: Add: done=%v err=%v", iter, done, err)
			}
		}
		if !bytes.Equal(got, d.b) {
			t.Fatalf("iter %d: round trip differs", iter)
		}
		var again [][]byte
		again, err = Fragment(nil, nil, got, info.MaxFragLen, info.ID)
		if err != nil || len(again) != len(fs) {
			t.Fatalf("iter %d: refragment: %v, %d vs %d", iter, err, len(again), len(fs))
		}
		for i := range fs {
			if !bytes.Equal(again[i], fs[i]) {
				t.Fatalf("iter %d: refragmented fragment %d differs", iter, i)
			}
		}
	}
}

func TestFragmentIPv4Options(t *testing.T) {
	rng := rand.New(rand.NewPCG(33, 34))
	d := makeV4(rng, protoUDP, 3000, true)
	fs, err := Fragment(nil, nil, d.b, 1500, 0)
	if err != nil {
		t.Fatal(err)
	}
	// NOP, the copied 11-byte option, NOP: 13 bytes, padded to 16.
	want := []byte{1, 0x82, 11, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 0, 0, 0}
	for i, f := range fs[1:] {
		if f[0] != 0x49 || !bytes.Equal(f[20:36], want) {
			t.Fatalf("fragment %d header %x", i+1, f[:36])
		}
	}
	checkFragments(t, d, fs, 1500, 0)
}

func TestFragmentAFragment(t *testing.T) {
	rng := rand.New(rand.NewPCG(35, 36))
	d := makeV4(rng, protoUDP, 6000, false)
	// The middle fragment [1480, 4440) with MF, split again at 1000.
	mid := piece(d, 1480, 4440, true)
	fs, err := Fragment(nil, nil, mid, 1000, 0)
	if err != nil {
		t.Fatal(err)
	}
	r := New(Config{})
	all := append([][]byte{piece(d, 0, 1480, true), piece(d, 4440, 6000, false)}, fs...)
	var got []byte
	for _, f := range all {
		if got, _, err = r.Add(nil, f, t0); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, d.b) {
		t.Fatal("refragmented fragment does not reassemble")
	}
}

func TestFragmentErrors(t *testing.T) {
	rng := rand.New(rand.NewPCG(37, 38))
	v4 := makeV4(rng, protoUDP, 3000, false)
	df := append([]byte(nil), v4.b...)
	df[6] |= 0x40
	setSum4(df[:20])
	tcp := makeV4(rng, protoTCP, 3000, false)
	v6 := makeV6(rng, protoTCP, 3000, false, false, true)
	fr6 := split(v6, []int{1400})[0]
	jumbo := append([]byte(nil), v6.b...)
	jumbo[4], jumbo[5] = 0, 0
	for _, c := range []struct {
		name string
		pkt  []byte
		mtu  int
		want error
	}{
		{"empty", nil, 1500, ErrMalformed},
		{"DF", df, 1500, ErrDontFragment},
		{"DF fits", df, 4000, nil},
		{"v4 mtu too small", v4.b, 27, ErrMTU},
		{"v4 tcp first too small", tcp.b, 20 + 16, ErrMTU},
		{"v4 tcp first 24", tcp.b, 20 + 24, nil},
		{"v4 truncated", v4.b[:100], 68, ErrMalformed},
		{"v6 fragment", fr6, 1280, ErrFragmented},
		{"v6 jumbo", jumbo, 1280, ErrMalformed},
		{"v6 chain does not fit", v6.b, 40 + 8 + 24, ErrMTU},
		{"v6 chain fits", v6.b, 40 + 8 + 32, nil},
	} {
		fs, err := Fragment(nil, nil, c.pkt, c.mtu, 7)
		if !errors.Is(err, c.want) || (c.want == nil) != (err == nil) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
		if err == nil {
			r := New(Config{MaxFragments: 1000})
			var got []byte
			for _, f := range fs {
				if got, _, err = r.Add(nil, f, t0); err != nil {
					t.Fatalf("%s: Add: %v", c.name, err)
				}
			}
			if !bytes.Equal(got, c.pkt) {
				t.Fatalf("%s: round trip differs", c.name)
			}
		}
	}
}

// TestAgainstIP4Defrag checks IPv4 reassembly against gopacket's ip4defrag
// on shuffled fragments.
func TestAgainstIP4Defrag(t *testing.T) {
	rng := rand.New(rand.NewPCG(39, 40))
	r := New(Config{MaxFragments: 1 << 13})
	for iter := range 300 {
		d := makeV4(rng, protoUDP, 100+rng.IntN(30000), false)
		fs := split(d, cuts(rng, len(d.b)-d.hl, 8, 2+rng.IntN(20)))
		if len(fs) < 2 {
			continue
		}
		rng.Shuffle(len(fs), func(i, j int) { fs[i], fs[j] = fs[j], fs[i] })
		g := ip4defrag.NewIPv4Defragmenter()
		var ours []byte
		var theirs *layers.IPv4
		for _, f := range fs {
			var err error
			if ours, _, err = r.Add(nil, f, t0); err != nil {
				t.Fatal(err)
			}
			ip := new(layers.IPv4)
			if err := ip.DecodeFromBytes(f, gopacket.NilDecodeFeedback); err != nil {
				t.Fatal(err)
			}
			if theirs, err = g.DefragIPv4WithTimestamp(ip, t0); err != nil {
				t.Fatal(err)
			}
		}
		if theirs == nil || ours == nil {
			t.Fatalf("iter %d: incomplete (ours %v, theirs %v)", iter, ours != nil, theirs != nil)
		}
		if !bytes.Equal(ours[20:], theirs.Payload) || int(theirs.Length) != len(ours) || !bytes.Equal(ours, d.b) {
			t.Fatalf("iter %d: differs from ip4defrag", iter)
		}
	}
}

// TestDFFragments: a datagram whose largest fragment carried DF is
// reassembled with DF set and Info.DF, as Linux's ip_frag_reasm marks it;
// one whose DF fragment is not the largest gets DF cleared, whatever the
// first fragment had. FragmentDF cuts a DF datagram to the size it came in,
// DF on every fragment, as Linux refragments such a datagram it forwards;
// Fragment still refuses it.
func TestDFFragments(t *testing.T) {
	rng := rand.New(rand.NewPCG(43, 44))
	d := makeV4(rng, protoUDP, 3000, true)
	withDF := func(p []byte, df bool) []byte {
		p = bytes.Clone(p)
		p[6] &^= 0x40
		if df {
			p[6] |= 0x40
		}
		setSum4(p[:d.hl])
		return p
	}
	fs := split(d, []int{1456, 2912}) // two full fragments and a short last one
	cases := []struct {
		name string
		df   [3]bool
		want bool
	}{
		{"all DF", [3]bool{true, true, true}, true},
		{"the largest DF, the last not", [3]bool{false, true, false}, true},
		{"only the first DF", [3]bool{true, false, false}, true},
		{"only the short last DF", [3]bool{false, false, true}, false},
		{"none", [3]bool{}, false},
	}
	for _, c := range cases {
		r := New(Config{})
		var got []byte
		var info Info
		var err error
		for i, f := range fs {
			if got, _, err = r.AddInfo(nil, withDF(f, c.df[i]), t0, &info); err != nil {
				t.Fatalf("%s: %v", c.name, err)
			}
		}
		want := withDF(d.b, c.want)
		if !bytes.Equal(got, want) || info.DF != c.want || info.MaxFragLen != len(fs[0]) {
			t.Errorf("%s: header %x, info %+v; want DF %v, header %x", c.name, got[:d.hl], info, c.want, want[:d.hl])
		}
	}
	// A first fragment with DF smaller than the others: DF cleared.
	fs2 := split(d, []int{1000, 2456})
	r := New(Config{})
	var got []byte
	var info Info
	for i, f := range fs2 {
		var err error
		if got, _, err = r.AddInfo(nil, withDF(f, i == 0), t0, &info); err != nil {
			t.Fatal(err)
		}
	}
	if got[6]&0x40 != 0 || info.DF {
		t.Errorf("a small first fragment's DF kept: %x %+v", got[6], info)
	}

	dfd := withDF(d.b, true)
	if _, err := Fragment(nil, nil, dfd, len(fs[0]), 0); !errors.Is(err, ErrDontFragment) {
		t.Fatalf("Fragment of a DF datagram: %v, want ErrDontFragment", err)
	}
	out, err := FragmentDF(nil, nil, dfd, len(fs[0]), 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 3 {
		t.Fatalf("FragmentDF: %d fragments, want 3", len(out))
	}
	for i, f := range out {
		if f[6]&0x40 == 0 {
			t.Errorf("fragment %d lost DF", i)
		}
		if i == 0 && !bytes.Equal(f, withDF(fs[0], true)) {
			t.Errorf("first fragment %x, want %x", f[:d.hl], fs[0][:d.hl])
		}
	}
	checkFragments(t, d, out, len(fs[0]), d.id)
	// They reassemble to the DF datagram.
	r = New(Config{})
	for _, f := range out {
		if got, _, err = r.AddInfo(nil, f, t0, &info); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, dfd) || !info.DF {
		t.Errorf("FragmentDF's fragments reassemble to %x, info %+v", got[:d.hl], info)
	}
	// IPv6 has no DF: FragmentDF is Fragment.
	d6 := makeV6(rng, protoUDP, 3000, false, false, false)
	a, err1 := Fragment(nil, nil, d6.b, 1280, 7)
	b, err2 := FragmentDF(nil, nil, d6.b, 1280, 7)
	if err1 != nil || err2 != nil || len(a) != len(b) {
		t.Fatalf("IPv6: %v %v", err1, err2)
	}
	for i := range a {
		if !bytes.Equal(a[i], b[i]) {
			t.Errorf("IPv6 fragment %d differs", i)
		}
	}
}
