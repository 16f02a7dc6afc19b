package reassembly

import (
	"encoding/binary"

	"github.com/netdivert/divert/internal/packet"
)

// Fragment splits the IP datagram pkt into fragments of at most mtu bytes
// (whole IP packets), written back to back into dst, and returns them
// appended to frags[:0]. dst is grown only when its capacity is too small;
// pass buffers with room for the fragments' headers to stay allocation-free.
// A datagram that fits in mtu is returned as the only fragment, pkt itself,
// without copying.
//
// IPv4: a datagram larger than mtu with DF set gives ErrDontFragment (one
// reassembled from fragments whose largest carried DF has it: FragmentDF
// refragments it as Linux does). Options whose copied flag is set go
// into every fragment (NOPs too, padded with end-of-options), the others into
// the first only, as BSD's ip_optcopy; the identification is the datagram's
// own and id is ignored. A datagram that is itself a fragment is split
// further (offsets added, the last piece keeps its MF). Each header gets its
// checksum recomputed. The first fragment of a TCP datagram holds at least 24
// data bytes, so that Add's tiny-fragment rules accept the result.
//
// IPv6: a Fragment header with identification id is inserted after the
// per-fragment headers (RFC 8200 §4.5: the IPv6 header, Hop-by-Hop,
// and every header up to and including the last Routing header, i.e.
// Destination Options before a Routing header too). The first fragment must
// hold the whole header chain through the upper-layer header (RFC 7112),
// else ErrMTU. A packet that already has a Fragment header gives
// ErrFragmented; a jumbogram (payload length 0) gives ErrMalformed.
//
// To refragment a datagram Add reassembled the way it came, pass the Info
// from AddInfo: Fragment(dst, frags, datagram, info.MaxFragLen, info.ID).
func Fragment(dst []byte, frags [][]byte, pkt []byte, mtu int, id uint32) ([][]byte, error) {
	frags = frags[:0]
	if len(pkt) == 0 {
		return frags, ErrMalformed
	}
	switch pkt[0] >> 4 {
	case 4:
		return fragment4(dst, frags, pkt, mtu, false)
	case 6:
		return fragment6(dst, frags, pkt, mtu, id)
	}
	return frags, ErrMalformed
}

// FragmentDF is Fragment for a datagram that came as fragments with DF set
// (Info.DF): an IPv4 datagram with DF set is fragmented too, and every
// fragment keeps DF, as Linux refragments a datagram it reassembled from DF
// fragments when it forwards it (IPSKB_FRAG_PMTU). Pass the Info's
// MaxFragLen, or less only when a router would: Linux refuses to cut such
// a datagram smaller than its largest fragment, and so should the caller
// (use Fragment, which gives ErrDontFragment). Otherwise it is Fragment.
func FragmentDF(dst []byte, frags [][]byte, pkt []byte, mtu int, id uint32) ([][]byte, error) {
	if len(pkt) > 0 && pkt[0]>>4 == 4 {
		return fragment4(dst, frags[:0], pkt, mtu, true)
	}
	return Fragment(dst, frags, pkt, mtu, id)
}

func fragment4(dst []byte, frags [][]byte, pkt []byte, mtu int, keepDF bool) ([][]byte, error) {
	if len(pkt) < 20 {
		return frags, ErrMalformed
	}
	hl := int(pkt[0]&0x0F) * 4
	tl := int(binary.BigEndian.Uint16(pkt[2:4]))
	if hl < 20 || tl < hl || tl > len(pkt) {
		return frags, ErrMalformed
	}
	pkt = pkt[:tl]
	if tl <= mtu {
		return append(frags, pkt), nil
	}
	fo := binary.BigEndian.Uint16(pkt[6:8])
	if fo&0x4000 != 0 && !keepDF {
		return frags, ErrDontFragment
	}
	base := int(fo&0x1FFF) * 8
	lastMF := fo&0x2000 != 0
	// The header for fragments after the first: copied options only.
	var h2 [60]byte
	copy(h2[:20], pkt[:20])
	n2 := 20
	for i := 20; i < hl; {
		t := pkt[i]
		if t == 0 { // end of options
			break
		}
		if t == 1 { // NOP
			h2[n2] = 1
			n2++
			i++
			continue
		}
		if i+1 >= hl || pkt[i+1] < 2 || i+int(pkt[i+1]) > hl {
			return frags, ErrMalformed
		}
		l := int(pkt[i+1])
		if t&0x80 != 0 {
			copy(h2[n2:], pkt[i:i+l])
			n2 += l
		}
		i += l
	}
	for n2%4 != 0 {
		h2[n2] = 0
		n2++
	}
	h2[0] = 0x40 | byte(n2/4)
	h1 := pkt[:hl]
	if base != 0 {
		h1 = h2[:n2] // not the first fragment of the datagram: no first-only options
	}
	p1 := (mtu - len(h1)) &^ 7
	pn := (mtu - n2) &^ 7
	if p1 < 8 || pn < 8 || (base == 0 && pkt[9] == protoTCP && p1 < 24) {
		return frags, ErrMTU
	}
	data := pkt[hl:]
	// Size everything first so dst grows once.
	need := len(h1) + min(p1, len(data))
	for rest := len(data) - min(p1, len(data)); rest > 0; rest -= min(pn, rest) {
		need += n2 + min(pn, rest)
	}
	if cap(dst) < need {
		dst = make([]byte, need)
	}
	dst = dst[:need]
	w, off := 0, 0
	for off < len(data) {
		h := h2[:n2]
		p := pn
		if off == 0 {
			h, p = h1, p1
		}
		p = min(p, len(data)-off)
		fo := base + off
		if fo/8 > 0x1FFF {
			return frags[:0], ErrTooBig
		}
		out := dst[w : w+len(h)+p]
		copy(out, h)
		copy(out[len(h):], data[off:off+p])
		binary.BigEndian.PutUint16(out[2:4], uint16(len(out)))
		flags := uint16(fo/8) | uint16(pkt[6]&0xC0)<<8 // keep the reserved bit, and DF (only keepDF lets it here)
		if off+p < len(data) || lastMF {
			flags |= 0x2000
		}
		binary.BigEndian.PutUint16(out[6:8], flags)
		out[10], out[11] = 0, 0
		binary.BigEndian.PutUint16(out[10:12], ^packet.Checksum(out[:len(h)], 0))
		frags = append(frags, out)
		w += len(out)
		off += p
	}
	return frags, nil
}

func fragment6(dst []byte, frags [][]byte, pkt []byte, mtu int, id uint32) ([][]byte, error) {
	if len(pkt) < 40 {
		return frags, ErrMalformed
	}
	plen := int(binary.BigEndian.Uint16(pkt[4:6]))
	if plen == 0 || 40+plen > len(pkt) {
		return frags, ErrMalformed
	}
	pkt = pkt[:40+plen]
	if len(pkt) <= mtu {
		return append(frags, pkt), nil
	}
	// Per-fragment part: through the last Routing header, else Hop-by-Hop.
	nh, off := pkt[6], 40
	unfrag, unfragNH := 40, 6
	for {
		if nh == protoFrag6 {
			return frags, ErrFragmented
		}
		if !(nh == 0 && off == 40) && nh != 43 && nh != 60 {
			break
		}
		if off+2 > len(pkt) {
			return frags, ErrMalformed
		}
		l := (int(pkt[off+1]) + 1) * 8
		if off+l > len(pkt) {
			return frags, ErrMalformed
		}
		if nh != 60 {
			unfrag, unfragNH = off+l, off
		}
		nh = pkt[off]
		off += l
	}
	data := pkt[unfrag:]
	next := pkt[unfragNH]
	if !headerChainComplete(next, data) {
		return frags, ErrMalformed
	}
	p := (mtu - unfrag - 8) &^ 7
	if p < 8 || !headerChainComplete(next, data[:p]) {
		return frags, ErrMTU
	}
	count := (len(data) + p - 1) / p
	need := count*(unfrag+8) + len(data)
	if cap(dst) < need {
		dst = make([]byte, need)
	}
	dst = dst[:need]
	w := 0
	for o := 0; o < len(data); o += p {
		n := min(p, len(data)-o)
		out := dst[w : w+unfrag+8+n]
		copy(out, pkt[:unfrag])
		binary.BigEndian.PutUint16(out[4:6], uint16(len(out)-40))
		out[unfragNH] = protoFrag6
		fh := out[unfrag : unfrag+8]
		fh[0], fh[1] = next, 0
		m := uint16(0)
		if o+n < len(data) {
			m = 1
		}
		binary.BigEndian.PutUint16(fh[2:4], uint16(o)|m)
		binary.BigEndian.PutUint32(fh[4:8], id)
		copy(out[unfrag+8:], data[o:o+n])
		frags = append(frags, out)
		w += len(out)
	}
	return frags, nil
}
