package filter

import "strconv"

// This file is WinDivertHelperFormatFilter: the program is decompiled into
// tests, the jump graph is coalesced back into and/or/?: expressions, and the
// result is printed.

// format returns the normalized text of a program.
func format(prog []insn, layer Layer) string {
	exprs := make([]*node, len(prog))
	for i := len(prog) - 1; i >= 0; i-- {
		in := &prog[i]
		n := &node{kind: eTest, field: in.field, op: in.op, idx: in.idx, val: in.val,
			neg: in.neg, succ: int(in.succ), fail: int(in.fail)}
		if fields[in.field].size > 0 {
			n.val = u128{in.val[0]}
		}
		exprs[i] = n
		if !isResult(n.succ) {
			exprs[n.succ].count++
		}
		if !isResult(n.fail) {
			exprs[n.fail].count++
		}
	}
	exprs[0].count++
	for i := len(prog) - 1; i >= 0; i-- {
		coalesceAndOr(exprs, i)
	}
	e := coalesce(exprs, 0)
	if e == nil {
		// Not reachable for programs this package makes.
		return "false"
	}
	var w fmtWriter
	w.expr(e, layer, true, false)
	return string(w.b)
}

func isResult(l int) bool { return l == resAccept || l == resReject }

var (
	trueNode  = &node{kind: eTrue}
	falseNode = &node{kind: eFalse}
)

func deref(exprs []*node, i int) {
	if isResult(i) {
		return
	}
	exprs[i].count--
	if exprs[i].count == 0 {
		exprs[i] = nil
	}
}

func simplifyAndOr(exprs []*node, e *node, and bool, next, other int) *node {
	ne := exprs[next]
	k := eOr
	if and {
		k = eAnd
	}
	n := &node{kind: k, a: e, b: ne, succ: ne.succ, fail: ne.fail, count: e.count}
	deref(exprs, next)
	deref(exprs, other)
	return n
}

// coalesceAndOr is WinDivertCoalesceAndOr.
func coalesceAndOr(exprs []*node, i int) {
	e := exprs[i]
	for {
		if e == nil || e.count == 0 {
			return
		}
		singleton := false
		if !isResult(e.succ) {
			next := exprs[e.succ]
			if next != nil && next.count == 1 {
				singleton = true
				if next.fail == e.fail {
					e = simplifyAndOr(exprs, e, true, e.succ, e.fail)
					continue
				} else if next.succ == e.fail {
					n := &node{kind: eIf, a: e, b: next, c: trueNode,
						succ: next.succ, fail: next.fail, count: e.count}
					deref(exprs, e.succ)
					deref(exprs, e.fail)
					e = n
					continue
				}
			}
		}
		if isResult(e.fail) {
			singleton = false
		} else {
			next := exprs[e.fail]
			if next == nil || next.count != 1 {
				singleton = false
			} else if next.succ == e.succ {
				e = simplifyAndOr(exprs, e, false, e.fail, e.succ)
				continue
			} else if next.fail == e.succ {
				n := &node{kind: eIf, a: e, b: falseNode, c: next,
					succ: next.succ, fail: next.fail, count: e.count}
				deref(exprs, e.succ)
				deref(exprs, e.fail)
				e = n
				continue
			}
		}
		if singleton {
			se, fe := exprs[e.succ], exprs[e.fail]
			if se.succ != fe.succ || se.fail != fe.fail {
				break
			}
			n := &node{kind: eIf, a: e, b: se, c: fe, succ: se.succ, fail: fe.fail, count: e.count}
			deref(exprs, e.succ)
			deref(exprs, e.fail)
			deref(exprs, n.succ)
			deref(exprs, n.fail)
			e = n
			continue
		}
		break
	}
	exprs[i] = e
}

// coalesce is WinDivertCoalesceExpr.
func coalesce(exprs []*node, i int) *node {
	switch i {
	case resAccept:
		return trueNode
	case resReject:
		return falseNode
	}
	e := exprs[i]
	if e == nil {
		return nil
	}
	if e.succ == e.fail {
		return coalesce(exprs, e.succ)
	}
	s := coalesce(exprs, e.succ)
	f := coalesce(exprs, e.fail)
	if s == nil || f == nil {
		return nil
	}
	if s.kind == eTrue && f.kind == eFalse {
		return e
	}
	return &node{kind: eIf, a: e, b: s, c: f}
}

type fmtWriter struct{ b []byte }

func (w *fmtWriter) s(s string) { w.b = append(w.b, s...) }

// expr is WinDivertFormatExpr.
func (w *fmtWriter) expr(e *node, layer Layer, top, and bool) {
	switch e.kind {
	case eAnd:
		if !top && !and {
			w.s("(")
		}
		w.expr(e.a, layer, false, true)
		w.s(" and ")
		w.expr(e.b, layer, false, true)
		if !top && !and {
			w.s(")")
		}
	case eOr:
		if !top && and {
			w.s("(")
		}
		w.expr(e.a, layer, false, false)
		w.s(" or ")
		w.expr(e.b, layer, false, false)
		if !top && and {
			w.s(")")
		}
	case eIf:
		w.s("(")
		w.expr(e.a, layer, true, false)
		w.s("? ")
		w.expr(e.b, layer, true, false)
		w.s(": ")
		w.expr(e.c, layer, true, false)
		w.s(")")
	case eTrue:
		w.s("true")
	case eFalse:
		w.s("false")
	default:
		w.test(e, layer)
	}
}

func (w *fmtWriter) field(e *node) {
	fi := &fields[e.field]
	w.s(fi.name)
	if fi.size > 0 {
		w.s("[")
		idx := int64(e.idx)
		if idx < 0 {
			w.s("-")
			idx = -idx
		}
		w.b = strconv.AppendInt(w.b, idx, 10)
		w.s("b]")
	}
}

var opText = [...]string{OpEq: " = ", OpNe: " != ", OpLt: " < ", OpLe: " <= ", OpGt: " > ", OpGe: " >= "}

var layerNames = [...]string{"NETWORK", "NETWORK_FORWARD", "FLOW", "SOCKET", "REFLECT"}

// eventName is the symbolic name the formatter gives an event value.
func eventName(layer Layer, v uint32) string {
	switch layer {
	case LayerNetwork, LayerNetworkForward:
		if v == EventPacket {
			return "PACKET"
		}
	case LayerFlow:
		switch v {
		case EventEstablished:
			return "ESTABLISHED"
		case EventDeleted:
			return "DELETED"
		}
	case LayerSocket:
		switch v {
		case EventBind:
			return "BIND"
		case EventConnect:
			return "CONNECT"
		case EventListen:
			return "LISTEN"
		case EventAccept:
			return "ACCEPT"
		case EventSocketClose:
			return "CLOSE"
		}
	case LayerReflect:
		switch v {
		case EventOpen:
			return "OPEN"
		case EventReflectClose:
			return "CLOSE"
		}
	}
	return strconv.FormatUint(uint64(v), 10)
}

// test is WinDivertFormatTestExpr.
func (w *fmtWriter) test(e *node, layer Layer) {
	fi := &fields[e.field]
	v := &e.val
	if fi.boolf || e.field == fZero {
		// WinDivert ignores the sign here; objects (never the compiler) can
		// hold "inbound != -1", which must not print as "not inbound".
		if !e.neg && v[1] == 0 && v[2] == 0 && v[3] == 0 && v[0] <= 1 {
			switch e.op {
			case OpEq:
				if v[0] == 0 {
					w.s("not ")
				}
				w.s(fi.name)
				return
			case OpNe:
				if v[0] != 0 {
					w.s("not ")
				}
				w.s(fi.name)
				return
			}
		}
	}
	w.field(e)
	w.s(opText[e.op])
	if e.neg {
		w.s("-")
	}
	switch {
	case e.field == fIPSrcAddr || e.field == fIPDstAddr:
		w.ipv4(v[0])
	case e.field == fIPv6SrcAddr || e.field == fIPv6DstAddr || e.field == fLocalAddr || e.field == fRemoteAddr:
		w.ipv6(v)
	case e.field == fLayer:
		if v[0] < uint32(len(layerNames)) {
			w.s(layerNames[v[0]])
		} else {
			w.b = strconv.AppendUint(w.b, uint64(v[0]), 10)
		}
	case e.field == fEvent:
		w.s(eventName(layer, v[0]))
	case fi.hex:
		w.s("0x")
		w.hex(v)
	default:
		w.dec(v)
	}
}

func (w *fmtWriter) ipv4(a uint32) {
	w.b = strconv.AppendUint(w.b, uint64(a>>24), 10)
	w.s(".")
	w.b = strconv.AppendUint(w.b, uint64(a>>16&0xFF), 10)
	w.s(".")
	w.b = strconv.AppendUint(w.b, uint64(a>>8&0xFF), 10)
	w.s(".")
	w.b = strconv.AppendUint(w.b, uint64(a&0xFF), 10)
}

// ipv6 is WinDivertFormatIPv6Addr (note: it compresses even a single zero
// group, the leftmost longest run).
func (w *fmtWriter) ipv6(a *u128) {
	if a[3] == 0 && a[2] == 0 && a[1] == 0xFFFF {
		w.ipv4(a[0])
		return
	}
	var g [8]uint16 // g[7] is the first group
	for k := 0; k < 4; k++ {
		g[2*k] = uint16(a[k])
		g[2*k+1] = uint16(a[k] >> 16)
	}
	zCurr, zCount, zStart, zMax := 7, 0, -1, -1
	for i := 7; i >= 0; i-- {
		if g[i] == 0 {
			zCount++
			if zCount > zMax {
				zStart, zMax = zCurr, zCount
			}
		} else {
			zCurr = i - 1
			zCount = 0
		}
	}
	for i := 7; i >= 0; i-- {
		if i == zStart {
			if i == 7 {
				w.s("::")
			} else {
				w.s(":")
			}
			i -= zMax - 1
			continue
		}
		w.b = strconv.AppendUint(w.b, uint64(g[i]), 16)
		if i != 0 {
			w.s(":")
		}
	}
}

func (w *fmtWriter) hex(v *u128) {
	i := 3
	for i >= 1 && v[i] == 0 {
		i--
	}
	w.b = strconv.AppendUint(w.b, uint64(v[i]), 16)
	for i--; i >= 0; i-- {
		x := strconv.FormatUint(uint64(v[i]), 16)
		for k := len(x); k < 8; k++ {
			w.s("0")
		}
		w.s(x)
	}
}

func (w *fmtWriter) dec(v *u128) {
	if v[2] == 0 && v[3] == 0 {
		w.b = strconv.AppendUint(w.b, uint64(v[1])<<32|uint64(v[0]), 10)
		return
	}
	// 128-bit: repeated division by 10.
	var buf [40]byte
	n := len(buf)
	x := *v
	for !x.isZero() {
		var r uint64
		for k := 3; k >= 0; k-- {
			cur := r<<32 | uint64(x[k])
			x[k] = uint32(cur / 10)
			r = cur % 10
		}
		n--
		buf[n] = byte('0' + r)
	}
	w.b = append(w.b, buf[n:]...)
}
