package divert

import (
	"encoding/binary"
	"fmt"
	"sync"

	"golang.org/x/net/bpf"

	"github.com/netdivert/divert/internal/nftrules"
)

// LayerFlow on Linux: a socket filter that drops, in the kernel, the NEW
// events of connections that are not the handle's.
//
// The kernel sends a flow handle every connection's events; on a router
// most are forwarded connections', which ctSkip skips undecoded, but each
// still costs a receive. The event socket's classic BPF filter
// (SO_ATTACH_FILTER, which netlink runs on each broadcast message before
// queueing it) drops the NEW events ctSkip would skip for their labels;
// UPDATE and DESTROY events, which ctSkip judges by the flows the tracker
// remembers, all pass.
//
// It walks the message's top-level attributes as ctScan does (lengths
// and types in the host's byte order, a type told by its low byte, the
// last CTA_LABELS taken), unrolled: classic BPF has no backward jumps.
// It drops a message only when ctSkip would skip it, and keeps it when it
// cannot tell: not one NEW message filling the datagram, a malformed
// attribute, a CTA_ID of the wrong size, or more attributes than it
// walks. The kernel's SKF_AD_NLATTR, which finds an attribute by its full
// type, cannot do the same exactly: it takes the first match, not the
// last, and stops quietly at a malformed attribute.

// ctFilterAttrs is how many top-level attributes the filter walks; a NEW
// event has about a dozen.
const ctFilterAttrs = 32

// Scratch memory of the filter.
const (
	mEnd    = iota // the message's length: its end
	mLabels        // offset of the last CTA_LABELS attribute, 0: none
	mRem           // bytes left from the current attribute
	mTmp           // for loadU16
	mX             // the current attribute's offset, while X is used
	mLen           // the current attribute's length
	mLabLen        // the length of the last CTA_LABELS attribute
	mNext          // the next attribute's offset
	mSkbLen        // the datagram's length
	mSlots
)

// bpfAsm assembles classic BPF with named jump targets.
type bpfAsm struct {
	ins    []bpf.Instruction
	labels map[string]int
	jumps  map[int][2]string // instruction: its true and false targets ("": the next)
}

func (a *bpfAsm) emit(ins ...bpf.Instruction) { a.ins = append(a.ins, ins...) }

func (a *bpfAsm) label(name string) { a.labels[name] = len(a.ins) }

// jif compares A with val; jifx (val unused) A with X.
func (a *bpfAsm) jif(cond bpf.JumpTest, val uint32, t, f string) {
	a.jumps[len(a.ins)] = [2]string{t, f}
	a.emit(bpf.JumpIf{Cond: cond, Val: val})
}

func (a *bpfAsm) jifx(cond bpf.JumpTest, t, f string) {
	a.jumps[len(a.ins)] = [2]string{t, f}
	a.emit(bpf.JumpIfX{Cond: cond})
}

func (a *bpfAsm) ja(target string) {
	a.jumps[len(a.ins)] = [2]string{target, ""}
	a.emit(bpf.Jump{})
}

// resolve sets the jumps' offsets.
func (a *bpfAsm) resolve() ([]bpf.Instruction, error) {
	skip := func(i int, name string) (uint32, error) {
		if name == "" {
			return 0, nil
		}
		t, ok := a.labels[name]
		if !ok || t <= i {
			return 0, fmt.Errorf("divert: BPF: jump from %d to %q (%d)", i, name, t)
		}
		return uint32(t - i - 1), nil
	}
	for i, j := range a.jumps {
		st, err := skip(i, j[0])
		if err != nil {
			return nil, err
		}
		sf, err := skip(i, j[1])
		if err != nil {
			return nil, err
		}
		switch ins := a.ins[i].(type) {
		case bpf.Jump:
			ins.Skip = st
			a.ins[i] = ins
		case bpf.JumpIf:
			if st > 255 || sf > 255 {
				return nil, fmt.Errorf("divert: BPF: conditional jump from %d too long", i)
			}
			ins.SkipTrue, ins.SkipFalse = uint8(st), uint8(sf)
			a.ins[i] = ins
		case bpf.JumpIfX:
			if st > 255 || sf > 255 {
				return nil, fmt.Errorf("divert: BPF: conditional jump from %d too long", i)
			}
			ins.SkipTrue, ins.SkipFalse = uint8(st), uint8(sf)
			a.ins[i] = ins
		}
	}
	return a.ins, nil
}

// ctFilter returns the event socket's filter for a host of byte order le
// (little-endian) or not.
func ctFilter(le bool) ([]bpf.Instruction, error) {
	const (
		keep = 0xffffffff
		// Create|Excl (0x400|0x200) in the flags' high byte.
		newFlags = 0x06
	)
	a := &bpfAsm{labels: map[string]int{}, jumps: map[int][2]string{}}
	// loadAbs loads the host-order integer of size 2 or 4 at off.
	loadAbs := func(off uint32, size int) {
		if !le {
			a.emit(bpf.LoadAbsolute{Off: off, Size: size})
			return
		}
		a.emit(bpf.LoadAbsolute{Off: off + uint32(size) - 1, Size: 1})
		for i := size - 2; i >= 0; i-- {
			a.emit(bpf.ALUOpConstant{Op: bpf.ALUOpShiftLeft, Val: 8},
				bpf.StoreScratch{Src: bpf.RegA, N: mTmp},
				bpf.LoadAbsolute{Off: off + uint32(i), Size: 1},
				bpf.LoadScratch{Dst: bpf.RegX, N: mTmp},
				bpf.ALUOpX{Op: bpf.ALUOpOr})
		}
	}
	// loadU16 loads the host-order uint16 at X+off; X is kept (from mX).
	loadU16 := func(off uint32) {
		if !le {
			a.emit(bpf.LoadIndirect{Off: off, Size: 2})
			return
		}
		a.emit(bpf.LoadIndirect{Off: off + 1, Size: 1},
			bpf.ALUOpConstant{Op: bpf.ALUOpShiftLeft, Val: 8},
			bpf.StoreScratch{Src: bpf.RegA, N: mTmp},
			bpf.LoadIndirect{Off: off, Size: 1},
			bpf.LoadScratch{Dst: bpf.RegX, N: mTmp},
			bpf.ALUOpX{Op: bpf.ALUOpOr},
			bpf.LoadScratch{Dst: bpf.RegX, N: mX})
	}
	// The low byte of a uint16 in host order at X+off.
	lowByte := func(off uint32) uint32 {
		if le {
			return off
		}
		return off + 1
	}
	highByte := func(off uint32) uint32 {
		if le {
			return off + 1
		}
		return off
	}

	// Every scratch slot written before any read (the kernel's checker
	// wants it on every path).
	a.emit(bpf.LoadConstant{Dst: bpf.RegA, Val: 0})
	for n := range mSlots {
		a.emit(bpf.StoreScratch{Src: bpf.RegA, N: n})
	}
	// One message filling the datagram, of 16 + 4 bytes at least.
	a.emit(bpf.LoadExtension{Num: bpf.ExtLen})
	a.jif(bpf.JumpGreaterOrEqual, 20, "", "ikeep")
	a.emit(bpf.StoreScratch{Src: bpf.RegA, N: mSkbLen})
	loadAbs(0, 4) // nlmsg_len
	a.emit(bpf.LoadScratch{Dst: bpf.RegX, N: mSkbLen})
	a.jifx(bpf.JumpEqual, "", "ikeep")
	a.emit(bpf.StoreScratch{Src: bpf.RegA, N: mEnd})
	// IPCTNL_MSG_CT_NEW of ctnetlink (0x0100) with NLM_F_CREATE or
	// NLM_F_EXCL: a NEW event.
	loadAbs(4, 2)
	a.jif(bpf.JumpEqual, 0x0100, "", "ikeep")
	a.emit(bpf.LoadAbsolute{Off: highByte(6), Size: 1})
	a.jif(bpf.JumpBitsSet, newFlags, "", "ikeep")
	// The attributes, after the 16-byte header and nfgenmsg.
	a.emit(bpf.LoadConstant{Dst: bpf.RegX, Val: 20})
	a.ja("it")
	a.label("ikeep")
	a.emit(bpf.RetConstant{Val: keep})
	a.label("it")
	for i := range ctFilterAttrs {
		n := func(s string) string { return fmt.Sprintf("%s%d", s, i) }
		// Fewer than 4 bytes left: the walk is done.
		a.emit(bpf.LoadScratch{Dst: bpf.RegA, N: mEnd},
			bpf.ALUOpX{Op: bpf.ALUOpSub})
		a.jif(bpf.JumpGreaterOrEqual, 4, "", n("done"))
		a.emit(bpf.StoreScratch{Src: bpf.RegA, N: mRem},
			bpf.StoreScratch{Src: bpf.RegX, N: mX})
		loadU16(0) // nla_len
		// 4 <= nla_len <= what is left, else malformed: keep.
		a.jif(bpf.JumpGreaterOrEqual, 4, "", n("keep"))
		a.emit(bpf.StoreScratch{Src: bpf.RegA, N: mLen},
			bpf.LoadScratch{Dst: bpf.RegA, N: mRem},
			bpf.LoadScratch{Dst: bpf.RegX, N: mLen})
		a.jifx(bpf.JumpGreaterOrEqual, "", n("keep"))
		a.emit(bpf.LoadScratch{Dst: bpf.RegX, N: mX},
			bpf.LoadIndirect{Off: lowByte(2), Size: 1}) // nla_type's low byte
		a.jif(bpf.JumpEqual, 12, n("id"), "") // CTA_ID
		a.jif(bpf.JumpEqual, 22, n("labels"), n("next"))
		a.label(n("id"))
		a.emit(bpf.LoadScratch{Dst: bpf.RegA, N: mLen})
		a.jif(bpf.JumpEqual, 8, n("next"), n("keep"))
		a.label(n("labels"))
		a.emit(bpf.StoreScratch{Src: bpf.RegX, N: mLabels},
			bpf.LoadScratch{Dst: bpf.RegA, N: mLen},
			bpf.StoreScratch{Src: bpf.RegA, N: mLabLen})
		// The next attribute, at the aligned length; past the end, the
		// walk is done.
		a.label(n("next"))
		a.emit(bpf.LoadScratch{Dst: bpf.RegA, N: mLen},
			bpf.ALUOpConstant{Op: bpf.ALUOpAdd, Val: 3},
			bpf.ALUOpConstant{Op: bpf.ALUOpAnd, Val: 0xfffffffc},
			bpf.ALUOpX{Op: bpf.ALUOpAdd},
			bpf.StoreScratch{Src: bpf.RegA, N: mNext},
			bpf.LoadScratch{Dst: bpf.RegX, N: mNext},
			bpf.LoadScratch{Dst: bpf.RegA, N: mEnd})
		a.jifx(bpf.JumpGreaterOrEqual, n("it"), n("done"))
		a.label(n("keep"))
		a.emit(bpf.RetConstant{Val: keep})
		a.label(n("done"))
		a.ja("final")
		a.label(n("it"))
	}
	// More attributes than walked, unless none is left: keep.
	a.emit(bpf.LoadScratch{Dst: bpf.RegA, N: mEnd},
		bpf.ALUOpX{Op: bpf.ALUOpSub})
	a.jif(bpf.JumpGreaterOrEqual, 4, "keep", "final")
	// Dropped: no CTA_LABELS, or too short to hold byte LabelByte, or
	// without LabelOut and LabelIn there.
	a.label("final")
	a.emit(bpf.LoadScratch{Dst: bpf.RegA, N: mLabels})
	a.jif(bpf.JumpEqual, 0, "drop", "")
	a.emit(bpf.LoadScratch{Dst: bpf.RegA, N: mLabLen})
	a.jif(bpf.JumpGreaterOrEqual, 4+nftrules.LabelByte+1, "", "drop")
	a.emit(bpf.LoadScratch{Dst: bpf.RegX, N: mLabels},
		bpf.LoadIndirect{Off: 4 + nftrules.LabelByte, Size: 1})
	a.jif(bpf.JumpBitsSet, uint32(nftrules.LabelOut|nftrules.LabelIn), "keep", "drop")
	a.label("drop")
	a.emit(bpf.RetConstant{Val: 0})
	a.label("keep")
	a.emit(bpf.RetConstant{Val: keep})
	return a.resolve()
}

// hostLE reports whether the host is little-endian.
func hostLE() bool {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], 1)
	return b[0] == 1
}

// ctFilterRaw is ctFilter for this host, assembled.
func ctFilterRaw() ([]bpf.RawInstruction, error) {
	prog, err := ctFilter(hostLE())
	if err != nil {
		return nil, err
	}
	return bpf.Assemble(prog)
}

// ctFilterOnce is ctFilterRaw, assembled once.
var ctFilterOnce = sync.OnceValues(ctFilterRaw)
