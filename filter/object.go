package filter

// This file reads and writes WinDivert's compiled filter objects
// ("@WinDiv_..." strings, windivert.md §3.8), as passed to and from the
// REFLECT layer.

const objDigits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+="

type objReader struct {
	s   string
	pos int
}

func (r *objReader) get() byte {
	if r.pos >= len(r.s) {
		r.pos++
		return 0
	}
	c := r.s[r.pos]
	r.pos++
	return c
}

func decodeDigit(c byte) (d uint32, final, ok bool) {
	switch {
	case c >= '0' && c <= '9':
		return uint32(c - '0'), false, true
	case c >= 'A' && c <= 'V':
		return uint32(c-'A') + 10, false, true
	case c >= 'W' && c <= 'Z':
		return uint32(c - 'W'), true, true
	case c >= 'a' && c <= 'z':
		return uint32(c-'a') + 4, true, true
	case c == '+':
		return 30, true, true
	case c == '=':
		return 31, true, true
	}
	return 0, false, false
}

func (r *objReader) number(maxLen int) (uint32, bool) {
	var v uint32
	for i := 0; i < maxLen; i++ {
		if v&0xF8000000 != 0 {
			return 0, false
		}
		v <<= 5
		d, final, ok := decodeDigit(r.get())
		if !ok {
			return 0, false
		}
		v += d
		if final {
			return v, true
		}
	}
	return 0, false
}

func (r *objReader) label() (uint16, bool) {
	switch r.get() {
	case 'A':
		return resAccept, true
	case 'X':
		return resReject, true
	case 'L':
		v, ok := r.number(2)
		if !ok || v > maxTests {
			return 0, false
		}
		return uint16(v), true
	}
	return 0, false
}

// decodeObject is WinDivertDeserializeFilter, plus the checks the driver
// makes when it receives an object (fields valid for the layer, array
// indexes in range), and one of its own: array indexes the language can
// write (see Compile's doc).
func decodeObject(s string, layer Layer) ([]insn, bool) {
	r := objReader{s: s}
	for _, c := range []byte("@WinDiv_") {
		if r.get() != c {
			return nil, false
		}
	}
	if v, ok := r.number(4); !ok || v != 0 {
		return nil, false
	}
	n, ok := r.number(2)
	if !ok || n == 0 || n > maxTests {
		return nil, false
	}
	prog := make([]insn, n)
	for i := range prog {
		in := &prog[i]
		if r.get() != '_' {
			return nil, false
		}
		f, ok := r.number(2)
		if !ok || f > uint32(fMaxWD) || !validField(layer, fid(f)) {
			return nil, false
		}
		in.field = fid(f)
		in.big = fields[f].big
		t, ok := r.number(2)
		if !ok || t > uint32(OpGe) {
			return nil, false
		}
		in.op = Op(t)
		neg, ok := r.number(1)
		if !ok || neg > 1 {
			return nil, false
		}
		in.neg = neg == 1
		if in.val[0], ok = r.number(7); !ok {
			return nil, false
		}
		switch fid(f) {
		case fIPv6SrcAddr, fIPv6DstAddr, fLocalAddr, fRemoteAddr:
			for k := 1; k < 4; k++ {
				if in.val[k], ok = r.number(7); !ok {
					return nil, false
				}
			}
		case fEndpointID, fParentEndpointID, fTimestamp:
			if in.val[1], ok = r.number(7); !ok {
				return nil, false
			}
		case fIPSrcAddr, fIPDstAddr:
			in.val[1] = 0xFFFF
		case fPacket, fPacket16, fPacket32, fTCPPayload, fTCPPayload16, fTCPPayload32,
			fUDPPayload, fUDPPayload16, fUDPPayload32:
			v, ok := r.number(7)
			if !ok {
				return nil, false
			}
			idx := int64(v) - 0xFFFF
			if idx > mtuMax || idx < -mtuMax { // neg is the constant's sign, allowed (WinDivertDeserializeTest)
				return nil, false
			}
			// Not in WinDivert: an index the language cannot write
			// (see the parser), so that String always compiles.
			if size := int64(fields[f].size); idx > 0xFFFF-size || idx < -0xFFFF || (idx < 0 && -idx < size) {
				return nil, false
			}
			in.idx = int32(idx)
		}
		if in.succ, ok = r.label(); !ok {
			return nil, false
		}
		if in.fail, ok = r.label(); !ok {
			return nil, false
		}
		for _, l := range []uint16{in.succ, in.fail} {
			if l != resAccept && l != resReject && (int(l) <= i || int(l) >= len(prog)) {
				return nil, false
			}
		}
	}
	if r.get() != 0 || r.pos != len(s)+1 {
		return nil, false
	}
	return prog, true
}

func putNumber(b []byte, v uint32) []byte {
	mask := uint32(0xC0000000)
	dig := 6
	for mask&v == 0 && dig != 0 {
		if dig == 6 {
			mask = 0x3E000000
		} else {
			mask >>= 5
		}
		dig--
	}
	for {
		final := dig == 0
		d := (mask & v) >> (5 * dig)
		k := d & 0x1F
		if final {
			k += 32
		}
		b = append(b, objDigits[k])
		if final {
			return b
		}
		if dig == 6 {
			mask = 0x3E000000
		} else {
			mask >>= 5
		}
		dig--
	}
}

func putLabel(b []byte, l uint16) []byte {
	switch l {
	case resAccept:
		return append(b, 'A')
	case resReject:
		return append(b, 'X')
	}
	return putNumber(append(b, 'L'), uint32(l))
}

// Object returns the filter as a WinDivert filter object string
// (WinDivertHelperCompileFilter's output, "@WinDiv_..."), which Compile
// accepts in place of a filter text.
func (f *Filter) Object() string {
	b := append(make([]byte, 0, 16+len(f.prog)*16), "@WinDiv_"...)
	b = putNumber(b, 0)
	b = putNumber(b, uint32(len(f.prog)))
	for i := range f.prog {
		in := &f.prog[i]
		b = append(b, '_')
		b = putNumber(b, uint32(in.field))
		b = putNumber(b, uint32(in.op))
		neg := uint32(0)
		if in.neg {
			neg = 1
		}
		b = putNumber(b, neg)
		b = putNumber(b, in.val[0])
		switch in.field {
		case fIPv6SrcAddr, fIPv6DstAddr, fLocalAddr, fRemoteAddr:
			b = putNumber(b, in.val[1])
			b = putNumber(b, in.val[2])
			b = putNumber(b, in.val[3])
		case fEndpointID, fParentEndpointID, fTimestamp:
			b = putNumber(b, in.val[1])
		case fPacket, fPacket16, fPacket32, fTCPPayload, fTCPPayload16, fTCPPayload32,
			fUDPPayload, fUDPPayload16, fUDPPayload32:
			b = putNumber(b, uint32(in.idx+0xFFFF))
		}
		b = putLabel(b, in.succ)
		b = putLabel(b, in.fail)
	}
	return string(b)
}
