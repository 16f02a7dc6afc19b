package filter

// This file is the parser, the constant folder and the code generator:
// WinDivertParseFilter, WinDivertSimplifyTest, WinDivertFlattenExpr and
// WinDivertEmitFilter, with the same control flow so that the parser's
// error positions (including the overwritten ones) are WinDivert's, but for
// a 'b' suffix's token, which the tokenizer places at the 'b'.

type ekind uint8

const (
	eTest  ekind = iota // field op value
	eAnd                // a and b
	eOr                 // a or b
	eIf                 // (a ? b : c)
	eTrue               // the constant true (formatter only)
	eFalse              // the constant false (formatter only)
)

// node is an expression node.
type node struct {
	kind    ekind
	a, b, c *node
	// eTest:
	op    Op
	field fid
	idx   int32 // array index in bytes; negative counts from the end
	val   u128
	neg   bool
	// code generation and decompilation:
	succ, fail int
	count      int
}

// Jump targets.
const (
	resAccept = 0x7FFE
	resReject = 0x7FFF
)

type parser struct {
	toks []token
	i    int
	err  *Error
}

func (p *parser) tok() *token { return &p.toks[p.i] }

func (p *parser) fail(msg string) *node {
	p.err = &Error{Pos: p.tok().pos, Msg: msg}
	return nil
}

func binop(k ekind, a, b *node) *node {
	if a == nil || b == nil {
		return nil
	}
	return &node{kind: k, a: a, b: b}
}

var opOf = map[tokKind]Op{tkEq: OpEq, tkNeq: OpNe, tkLt: OpLt, tkLeq: OpLe, tkGt: OpGt, tkGeq: OpGe}

// invert is what "not" does to a comparison.
func (o Op) invert() Op {
	switch o {
	case OpEq:
		return OpNe
	case OpNe:
		return OpEq
	case OpLt:
		return OpGe
	case OpLe:
		return OpGt
	case OpGt:
		return OpLe
	default:
		return OpLt
	}
}

// parseTest is WinDivertParseTest.
func (p *parser) parseTest() *node {
	not := false
	for p.tok().kind == tkNot {
		not = !not
		p.i++
	}
	t := p.tok()
	if t.kind != tkField {
		return p.fail(msgParse)
	}
	n := &node{kind: eTest, field: t.field}
	p.i++
	if size := fields[t.field].size; size > 0 {
		if p.tok().kind != tkSqOpen {
			return p.fail(msgParse)
		}
		p.i++
		neg := false
		if p.tok().kind == tkMinus {
			neg = true
			p.i++
		}
		if p.tok().kind != tkNumber {
			return p.fail(msgParse)
		}
		v := p.tok().val
		if v[3] != 0 || v[2] != 0 || v[1] != 0 || v[0] > mtuMax {
			return p.fail(msgIndexOOB)
		}
		idx := int(v[0])
		p.i++
		if p.tok().kind == tkBytes {
			p.i++
		} else {
			idx *= size
		}
		if (!neg && idx > 0xFFFF-size) || (neg && idx > 0xFFFF) || (neg && idx < size) {
			return p.fail(msgIndexOOB)
		}
		if neg {
			idx = -idx
		}
		n.idx = int32(idx)
		if p.tok().kind != tkSqClose {
			return p.fail(msgParse)
		}
		p.i++
	}
	op, ok := opOf[p.tok().kind]
	if !ok {
		n.op = OpNe
		if not {
			n.op = OpEq
		}
		return n
	}
	if not {
		op = op.invert()
	}
	n.op = op
	p.i++
	if p.tok().kind == tkMinus {
		n.neg = true
		p.i++
	}
	if p.tok().kind != tkNumber {
		return p.fail(msgParse)
	}
	n.val = p.tok().val
	p.i++
	return n
}

// parseArg is WinDivertParseAndOrArg.
func (p *parser) parseArg(depth int) *node {
	if depth < 0 {
		return p.fail(msgTooDeep)
	}
	depth--
	if p.tok().kind != tkOpen {
		return p.parseTest()
	}
	p.i++
	arg := p.parseFilter(depth, false)
	switch p.tok().kind {
	case tkClose:
		p.i++
		return arg
	case tkQuestion:
		p.i++
		th := p.parseFilter(depth, false)
		if th == nil {
			return nil
		}
		if p.tok().kind != tkColon {
			return p.fail(msgParse)
		}
		p.i++
		el := p.parseFilter(depth, false)
		if el == nil {
			return nil
		}
		if p.tok().kind != tkClose {
			return p.fail(msgParse)
		}
		p.i++
		// arg may be nil here (with p.err set), as in WinDivert.
		return &node{kind: eIf, a: arg, b: th, c: el}
	}
	return p.fail(msgParse)
}

// parseFilter is WinDivertParseFilter.
func (p *parser) parseFilter(depth int, and bool) *node {
	if depth < 0 {
		return p.fail(msgTooDeep)
	}
	depth--
	var expr *node
	if and {
		expr = p.parseArg(depth)
	} else {
		expr = p.parseFilter(depth, true)
	}
	for {
		if expr == nil {
			return nil
		}
		switch p.tok().kind {
		case tkAnd:
			p.i++
			expr = binop(eAnd, expr, p.parseArg(depth))
		case tkOr:
			p.i++
			expr = binop(eOr, expr, p.parseFilter(depth, true))
		default:
			return expr
		}
	}
}

// cmp128 is WinDivertCompare128: a signed comparison of sign+magnitude
// numbers in which any negative number is below any non-negative one (so
// -0 < 0). With big unset only the low 32 bits are compared.
func cmp128(negA bool, a *u128, negB bool, b *u128, big bool) int {
	if negA != negB {
		if negA {
			return -1
		}
		return 1
	}
	s := 1
	if negA {
		s = -1
	}
	k := 0
	if big {
		k = 3
	}
	for ; k >= 0; k-- {
		if a[k] < b[k] {
			return -s
		}
		if a[k] > b[k] {
			return s
		}
	}
	return 0
}

// simplify is WinDivertSimplifyTest: a comparison whose result the field's
// range decides becomes a presence test of the field's protocol (or a
// constant).
func simplify(n *node) {
	result, ok := foldResult(n)
	if !ok {
		return
	}
	n.field = fields[n.field].proto
	n.idx = 0
	n.neg = false
	n.val = u128{}
	if result {
		n.val[0] = 1
	}
	n.op = OpEq
}

// foldResult is the decision of WinDivertSimplifyTest: ok when the field's
// range decides the comparison n, with its result for a packet that has the
// field.
func foldResult(n *node) (result, ok bool) {
	fi := &fields[n.field]
	if !fi.fold {
		return false, false
	}
	lb := cmp128(n.neg, &n.val, fi.negLo, &fi.lo, true)
	ub := cmp128(n.neg, &n.val, false, &fi.hi, true)
	switch n.op {
	case OpEq:
		switch {
		case lb < 0 || ub > 0:
			result = false
		case fi.eq && lb == 0:
			result = true
		default:
			return false, false
		}
	case OpNe:
		switch {
		case lb < 0 || ub > 0:
			result = true
		case fi.eq && lb == 0:
			result = false
		default:
			return false, false
		}
	case OpLt:
		switch {
		case ub > 0:
			result = true
		case lb <= 0:
			result = false
		default:
			return false, false
		}
	case OpLe:
		switch {
		case ub >= 0:
			result = true
		case lb < 0:
			result = false
		default:
			return false, false
		}
	case OpGt:
		switch {
		case ub >= 0:
			result = false
		case lb < 0:
			result = true
		default:
			return false, false
		}
	case OpGe:
		switch {
		case ub > 0:
			result = false
		case lb <= 0:
			result = true
		default:
			return false, false
		}
	}
	return result, true
}

// flatten is WinDivertFlattenExpr: tests are pushed on stack in reverse
// order of execution; the return value is the entry label (or -1 when there
// are more than 256 tests).
func flatten(n *node, label *int, succ, fail int, stack []*node) int {
	if succ < 0 || fail < 0 {
		return -1
	}
	switch n.kind {
	case eAnd:
		succ = flatten(n.b, label, succ, fail, stack)
		return flatten(n.a, label, succ, fail, stack)
	case eOr:
		fail = flatten(n.b, label, succ, fail, stack)
		return flatten(n.a, label, succ, fail, stack)
	case eIf:
		fail1 := flatten(n.c, label, succ, fail, stack)
		succ1 := flatten(n.b, label, succ, fail, stack)
		return flatten(n.a, label, succ1, fail1, stack)
	}
	simplify(n)
	if n.op == OpEq && n.field == fTrue {
		if n.val[0] != 0 {
			return succ
		}
		return fail
	}
	if *label >= maxTests {
		return -1
	}
	stack[*label] = n
	n.succ, n.fail = succ, fail
	l := *label
	*label++
	return l
}

// insn is one test of a compiled filter: "field op value", then jump to
// succ or fail (an index further on, or resAccept/resReject).
type insn struct {
	field fid
	op    Op
	neg   bool
	big   bool
	idx   int32
	val   u128
	succ  uint16
	fail  uint16

	// Fast path for header fields (see prepare): the value is
	// (load(width) at base+off >> shift) & mask when the header exists.
	load  uint8 // loadNone, loadIP4, loadIP6, loadTrans
	proto uint8 // loadTrans: the transport protocol
	off   uint8
	width uint8
	shift uint8
	mask  uint32
}

const (
	loadNone    = iota // generic path (evalCtx.value)
	loadIP4            // in the IPv4 header
	loadIP6            // in the IPv6 header
	loadTrans          // in the transport header
	loadPresent        // header presence (ip, ipv6, tcp, ...) at the network layers
	loadAddr6          // a 128-bit address at off in the IPv6 header
	loadPayLen         // tcp/udp.PayloadLength
)

type loader struct {
	base              uint8
	off, width, shift uint8
	mask              uint32
}

var loaders = map[fid]loader{
	fIPHdrLength: {loadIP4, 0, 1, 0, 0x0F}, fIPTOS: {loadIP4, 1, 1, 0, 0xFF},
	fIPLength: {loadIP4, 2, 2, 0, 0xFFFF}, fIPId: {loadIP4, 4, 2, 0, 0xFFFF},
	fIPDF: {loadIP4, 6, 1, 6, 1}, fIPMF: {loadIP4, 6, 1, 5, 1}, fIPFragOff: {loadIP4, 6, 2, 0, 0x1FFF},
	fIPTTL: {loadIP4, 8, 1, 0, 0xFF}, fIPProtocol: {loadIP4, 9, 1, 0, 0xFF},
	fIPChecksum:       {loadIP4, 10, 2, 0, 0xFFFF},
	fIPv6TrafficClass: {loadIP6, 0, 2, 4, 0xFF}, fIPv6FlowLabel: {loadIP6, 0, 4, 0, 0xFFFFF},
	fIPv6Length: {loadIP6, 4, 2, 0, 0xFFFF}, fIPv6NextHdr: {loadIP6, 6, 1, 0, 0xFF},
	fIPv6HopLimit: {loadIP6, 7, 1, 0, 0xFF},
	fICMPType:     {loadTrans, 0, 1, 0, 0xFF}, fICMPCode: {loadTrans, 1, 1, 0, 0xFF},
	fICMPChecksum: {loadTrans, 2, 2, 0, 0xFFFF}, fICMPBody: {loadTrans, 4, 4, 0, 0xFFFFFFFF},
	fICMPv6Type: {loadTrans, 0, 1, 0, 0xFF}, fICMPv6Code: {loadTrans, 1, 1, 0, 0xFF},
	fICMPv6Checksum: {loadTrans, 2, 2, 0, 0xFFFF}, fICMPv6Body: {loadTrans, 4, 4, 0, 0xFFFFFFFF},
	fTCPSrcPort: {loadTrans, 0, 2, 0, 0xFFFF}, fTCPDstPort: {loadTrans, 2, 2, 0, 0xFFFF},
	fTCPSeqNum: {loadTrans, 4, 4, 0, 0xFFFFFFFF}, fTCPAckNum: {loadTrans, 8, 4, 0, 0xFFFFFFFF},
	fTCPHdrLength: {loadTrans, 12, 1, 4, 0x0F}, fTCPUrg: {loadTrans, 13, 1, 5, 1},
	fTCPAck: {loadTrans, 13, 1, 4, 1}, fTCPPsh: {loadTrans, 13, 1, 3, 1}, fTCPRst: {loadTrans, 13, 1, 2, 1},
	fTCPSyn: {loadTrans, 13, 1, 1, 1}, fTCPFin: {loadTrans, 13, 1, 0, 1},
	fTCPWindow: {loadTrans, 14, 2, 0, 0xFFFF}, fTCPChecksum: {loadTrans, 16, 2, 0, 0xFFFF},
	fTCPUrgPtr:  {loadTrans, 18, 2, 0, 0xFFFF},
	fUDPSrcPort: {loadTrans, 0, 2, 0, 0xFFFF}, fUDPDstPort: {loadTrans, 2, 2, 0, 0xFFFF},
	fUDPLength: {loadTrans, 4, 2, 0, 0xFFFF}, fUDPChecksum: {loadTrans, 6, 2, 0, 0xFFFF},
}

// prepare fills the fast-path fields of the program's instructions.
func prepare(prog []insn, layer Layer) {
	for i := range prog {
		in := &prog[i]
		in.big = fields[in.field].big
		l, ok := loaders[in.field]
		switch in.field {
		case fIPSrcAddr, fIPDstAddr:
			// Folding (and the object decoder) leave ::ffff:x constants.
			if in.val[1] == 0xFFFF && in.val[2] == 0 && in.val[3] == 0 {
				l, ok = loader{loadIP4, 12, 4, 0, 0xFFFFFFFF}, true
				if in.field == fIPDstAddr {
					l.off = 16
				}
			}
		case fTCPPayloadLength, fUDPPayloadLength:
			l, ok = loader{base: loadPayLen}, true
		case fIPv6SrcAddr:
			l, ok = loader{base: loadAddr6, off: 8}, true
		case fIPv6DstAddr:
			l, ok = loader{base: loadAddr6, off: 24}, true
		case fIP, fIPv6, fTCP, fUDP, fICMP, fICMPv6:
			ok = layer <= LayerNetworkForward
			l = loader{base: loadPresent}
		}
		if !ok {
			continue
		}
		in.load, in.off, in.width, in.shift, in.mask = l.base, l.off, l.width, l.shift, l.mask
		in.proto = proto(in.field)
		switch in.field {
		case fTCP:
			in.proto = 6
		case fUDP:
			in.proto = 17
		case fICMP:
			in.proto = 1
		case fICMPv6:
			in.proto = 58
		}
	}
}

// compileText compiles a filter string into a program (WinDivertCompileFilter).
func compileText(text string, layer Layer) ([]insn, *Error) {
	if n := indexNUL(text); n >= 0 {
		// WinDivert's C string would end there and the rest go unread: a
		// Go string with a NUL inside is refused instead.
		return nil, &Error{Pos: n, Msg: msgBadToken}
	}
	if len(text) > 0 && text[0] == '@' {
		prog, ok := decodeObject(text, layer)
		if !ok {
			return nil, &Error{Pos: 0, Msg: msgBadObject}
		}
		prepare(prog, layer)
		return prog, nil
	}
	toks, err := tokenize(text, layer, make([]token, 0, 16))
	if err != nil {
		return nil, err
	}
	p := parser{toks: toks}
	expr := p.parseFilter(maxDepth, false)
	if expr == nil {
		return nil, p.err
	}
	if p.tok().kind != tkEnd {
		return nil, &Error{Pos: p.tok().pos, Msg: msgParse}
	}
	if p.err != nil {
		// Only a ternary whose condition failed to parse gets here; WinDivert
		// would go on with a NULL expression.
		return nil, p.err
	}
	var stack [maxTests]*node
	label := 0
	root := flatten(expr, &label, resAccept, resReject, stack[:])
	if root < 0 {
		return nil, &Error{Pos: 0, Msg: msgTooLong}
	}
	prog := emit(stack[:], root)
	prepare(prog, layer)
	return prog, nil
}

func indexNUL(s string) int {
	for i := 0; i < len(s); i++ {
		if s[i] == 0 {
			return i
		}
	}
	return -1
}

// emit is WinDivertEmitFilter.
func emit(stack []*node, root int) []insn {
	if root == resAccept || root == resReject {
		return []insn{{field: fZero, op: OpEq, succ: uint16(root), fail: uint16(root)}}
	}
	prog := make([]insn, root+1)
	target := func(l int) uint16 {
		if l == resAccept || l == resReject {
			return uint16(l)
		}
		return uint16(root - l)
	}
	for k := range prog {
		n := stack[root-k]
		if fields[n.field].size > 0 {
			// WinDivert stores the index in arg[1] and so keeps only the
			// low 32 bits of the value, which are all it compares.
			n.val = u128{n.val[0]}
		}
		prog[k] = insn{
			field: n.field, op: n.op, neg: n.neg, big: fields[n.field].big,
			idx: n.idx, val: n.val, succ: target(n.succ), fail: target(n.fail),
		}
	}
	return prog
}
