package filter

// maxTerms bounds the size of a lowered filter (the number of Terms).
const maxTerms = 64

// Lower returns the filter as a disjunction of conjunctions of Conds (see
// ir.go) for backends that translate filters into kernel rules. The Terms
// always over-approximate the filter (the filter matches ⇒ some Term
// matches); Exact is set when they are equivalent to it. The result is
// exact unless the filter tests array fields (packet[i], *.Payload[i]) on a
// failing branch or needs more than 64 Terms.
//
// Conds appear on every field the filter tests, including ones no kernel can
// test (random8, timestamp, loopback, ...); a backend drops what it cannot
// express with Restrict.
func (f *Filter) Lower() *Lowered {
	prog := f.prog
	exact := true
	terms := make([][]Term, len(prog))
	get := func(l uint16) []Term {
		switch l {
		case resAccept:
			return []Term{{}}
		case resReject:
			return nil
		}
		return terms[l]
	}
	for ip := len(prog) - 1; ip >= 0; ip-- {
		in := &prog[ip]
		if in.succ == in.fail {
			terms[ip] = get(in.succ)
			continue
		}
		var out []Term
		raw := in.cond()
		addAll := func(ts []Term, c Cond) {
			c, k := normBool(c)
			if k == condNever {
				return
			}
			for _, t := range ts {
				if k == condAlways {
					out = append(out, t)
				} else if nt, ok := t.and(c); ok {
					out = append(out, nt)
				}
			}
		}
		addAll(get(in.succ), raw)
		fails := get(in.fail)
		if len(fails) > 0 {
			fi := &fields[in.field]
			inv := raw
			inv.Op = raw.Op.invert()
			switch {
			case fi.size > 0:
				// Absence (an index out of bounds) is not a Cond: widen.
				exact = false
				out = append(out, fails...)
			case fi.proto == fTrue:
				addAll(fails, inv)
			default:
				addAll(fails, Cond{Field: fields[fi.proto].ir, Op: OpEq})
				addAll(fails, inv)
			}
		}
		if len(out) > maxTerms {
			out = []Term{common(out)}
			exact = false
		}
		terms[ip] = out
	}
	return &Lowered{Terms: terms[0], Exact: exact}
}

const (
	condTest   = iota // an ordinary Cond
	condAlways        // holds for every packet
	condNever         // holds for no packet
)

// normBool rewrites a Cond on a field whose value is 0 or 1 as "== 0" or
// "== 1" (so "tcp" is {FieldTCP, OpEq, 1} and "not tcp" {FieldTCP, OpEq,
// 0}), or reports that it always or never holds. A flag of a header that
// may be absent (tcp.Syn) that holds for both values becomes the header's
// presence test.
func normBool(c Cond) (Cond, int) {
	f := irToFid[c.Field]
	switch f {
	case fInbound, fOutbound, fFragment, fIP, fIPv6, fICMP, fICMPv6, fTCP, fUDP,
		fLoopback, fImpostor, fIPDF, fIPMF, fTCPUrg, fTCPAck, fTCPPsh, fTCPRst, fTCPSyn, fTCPFin:
	default:
		return c, condTest
	}
	val := u128{uint32(c.Value.Lo), uint32(c.Value.Lo >> 32), uint32(c.Value.Hi), uint32(c.Value.Hi >> 32)}
	h0 := c.Op.Holds(cmp128(false, &u128{}, c.Value.Neg, &val, false))
	h1 := c.Op.Holds(cmp128(false, &u128{1}, c.Value.Neg, &val, false))
	switch {
	case h0 && h1:
		if p := fields[f].proto; p != fTrue {
			return Cond{Field: fields[p].ir, Op: OpEq, Value: Value{Lo: 1}}, condTest
		}
		return c, condAlways
	case h0:
		return Cond{Field: c.Field, Op: OpEq}, condTest
	case h1:
		return Cond{Field: c.Field, Op: OpEq, Value: Value{Lo: 1}}, condTest
	}
	return c, condNever
}

// cond is the Cond an instruction tests.
func (in *insn) cond() Cond {
	c := Cond{Field: fields[in.field].ir, Index: in.idx, Op: in.op}
	c.Value.Neg = in.neg
	c.Value.Lo = uint64(in.val[0])
	if in.big {
		c.Value.Lo |= uint64(in.val[1]) << 32
		c.Value.Hi = uint64(in.val[3])<<32 | uint64(in.val[2])
	}
	return c
}

// common returns a Term that every term of ts implies: the Conds they
// share, and the header-presence facts they all imply (so that merging
// "tcp.DstPort == 1" and "tcp.DstPort == 2" keeps "tcp").
func common(ts []Term) Term {
	var out Term
	for _, c := range ts[0].Conds {
		all := true
		for _, t := range ts[1:] {
			if !t.has(c) {
				all = false
				break
			}
		}
		if all {
			out.Conds = append(out.Conds, c)
		}
	}
	one, zero := uint8(0xFF), uint8(0xFF)
	for _, t := range ts {
		o, z := t.facts()
		one &= o
		zero &= z
	}
	have1, have0 := out.facts()
	for _, f := range []Field{FieldIP, FieldIPv6, FieldTCP, FieldUDP, FieldICMP, FieldICMPv6} {
		bit := presenceBit(f)
		if one&bit != 0 && have1&bit == 0 {
			out.Conds = append(out.Conds, Cond{Field: f, Op: OpEq, Value: Value{Lo: 1}})
			have1, have0 = out.facts()
		}
	}
	for _, f := range []Field{FieldIP, FieldIPv6, FieldTCP, FieldUDP, FieldICMP, FieldICMPv6} {
		bit := presenceBit(f)
		if zero&bit != 0 && have0&bit == 0 {
			out.Conds = append(out.Conds, Cond{Field: f, Op: OpEq})
			_, have0 = out.facts()
		}
	}
	return out
}

// facts returns the presence facts the Term implies.
func (t Term) facts() (one, zero uint8) {
	for _, d := range t.Conds {
		o, z := facts(d)
		one, zero = one|o, zero|z
	}
	return closeFacts(one, zero)
}

// holdsAt reports whether c holds when its field has the value of e (an
// OpEq Cond on the same field and index).
func (c Cond) holdsAt(e Cond) bool {
	f := irToFid[c.Field]
	v := u128{uint32(e.Value.Lo), uint32(e.Value.Lo >> 32), uint32(e.Value.Hi), uint32(e.Value.Hi >> 32)}
	a := u128{uint32(c.Value.Lo), uint32(c.Value.Lo >> 32), uint32(c.Value.Hi), uint32(c.Value.Hi >> 32)}
	return c.Op.Holds(cmp128(e.Value.Neg, &v, c.Value.Neg, &a, fields[f].big))
}

func (t Term) has(c Cond) bool {
	for _, d := range t.Conds {
		if d == c {
			return true
		}
	}
	return false
}

// Presence facts: bits for the fields ip, ipv6, tcp, udp, icmp, icmpv6.
const (
	pIP = 1 << iota
	pIPv6
	pTCP
	pUDP
	pICMP
	pICMPv6
)

func presenceBit(f Field) uint8 {
	switch f {
	case FieldIP:
		return pIP
	case FieldIPv6:
		return pIPv6
	case FieldTCP:
		return pTCP
	case FieldUDP:
		return pUDP
	case FieldICMP:
		return pICMP
	case FieldICMPv6:
		return pICMPv6
	}
	return 0
}

// facts returns the presence facts a Cond implies: bits that must be 1 and
// bits that must be 0. A field needs its header (tcp.DstPort: tcp = 1);
// one IP version and one transport protocol at most; ICMP is IPv4-only and
// ICMPv6 IPv6-only; a packet or flow is IPv4 or IPv6.
func facts(c Cond) (one, zero uint8) {
	if bit := presenceBit(c.Field); bit != 0 {
		if c.Op == OpEq && !c.Value.Neg && c.Value.Hi == 0 && c.Value.Lo <= 1 {
			if c.Value.Lo == 1 {
				one = bit
			} else {
				zero = bit
			}
		}
	} else if p := fields[irToFid[c.Field]].proto; p != fTrue {
		one = presenceBit(fields[p].ir)
	}
	return closeFacts(one, zero)
}

func closeFacts(one, zero uint8) (uint8, uint8) {
	for {
		o, z := one, zero
		if one&pICMP != 0 {
			one |= pIP
		}
		if one&pICMPv6 != 0 {
			one |= pIPv6
		}
		if one&pIP != 0 {
			zero |= pIPv6 | pICMPv6
		}
		if one&pIPv6 != 0 {
			zero |= pIP | pICMP
		}
		if zero&pIP != 0 {
			one |= pIPv6
		}
		if zero&pIPv6 != 0 {
			one |= pIP
		}
		for _, b := range []uint8{pTCP, pUDP, pICMP, pICMPv6} {
			if one&b != 0 {
				zero |= (pTCP | pUDP | pICMP | pICMPv6) &^ b
			}
		}
		if o == one && z == zero {
			return one, zero
		}
	}
}

// and returns t ∧ c, or false when that is certainly unsatisfiable. It
// leaves t unchanged.
func (t Term) and(c Cond) (Term, bool) {
	if t.has(c) {
		return t, true
	}
	one, zero := t.facts()
	// An equality decides every other Cond on the same field: keep only
	// the equality (or see that the Term is unsatisfiable).
	drop := -1
	for i, d := range t.Conds {
		if d.Field != c.Field || d.Index != c.Index {
			continue
		}
		switch {
		case d.Op == OpEq && c.Op == OpEq && (d.Value != c.Value):
			return t, false
		case d.Op == OpEq:
			if !c.holdsAt(d) {
				return t, false
			}
			return t, true
		case c.Op == OpEq:
			if !d.holdsAt(c) {
				return t, false
			}
			drop = i
		}
	}
	if drop >= 0 {
		conds := make([]Cond, 0, len(t.Conds))
		for i, d := range t.Conds {
			if i == drop || (d.Field == c.Field && d.Index == c.Index && d.holdsAt(c)) {
				continue
			}
			conds = append(conds, d)
		}
		return Term{Conds: append(conds, c)}, true
	}
	co, cz := facts(c)
	if one&cz != 0 || zero&co != 0 || co&cz != 0 {
		return t, false
	}
	if presenceBit(c.Field) != 0 && co|cz != 0 && one&co == co && zero&cz == cz {
		return t, true // a presence test the Term already implies
	}
	conds := make([]Cond, len(t.Conds), len(t.Conds)+1)
	copy(conds, t.Conds)
	return Term{Conds: append(conds, c)}, true
}

// Restrict returns the Lowered with only the Conds keep accepts. Dropping a
// Cond widens its Term, so the result still over-approximates the filter;
// it is Exact only when l is and nothing was dropped.
func (l *Lowered) Restrict(keep func(Cond) bool) *Lowered {
	out := &Lowered{Exact: l.Exact, Terms: make([]Term, 0, len(l.Terms))}
	for _, t := range l.Terms {
		var nt Term
		for _, c := range t.Conds {
			if keep(c) {
				nt.Conds = append(nt.Conds, c)
			} else {
				out.Exact = false
			}
		}
		out.Terms = append(out.Terms, nt)
	}
	return out
}

// Match reports whether some Term matches the packet or event (see
// Term.Match).
func (l *Lowered) Match(packet []byte, meta *Meta) bool {
	for _, t := range l.Terms {
		if t.Match(packet, meta) {
			return true
		}
	}
	return false
}

// Match reports whether every Cond of t holds for the packet (at the
// network layers) or event, at layer meta.Layer. A packet that does not
// parse at a network layer matches no Term.
func (t Term) Match(packet []byte, meta *Meta) bool {
	var zero Meta
	if meta == nil {
		meta = &zero
	}
	var c evalCtx
	if meta.Layer <= LayerNetworkForward && c.parse(packet) != nil {
		return false
	}
	c.meta = meta
	c.layer = meta.Layer
	for i := range t.Conds {
		if !c.cond(&t.Conds[i]) {
			return false
		}
	}
	return true
}

// Match reports whether c holds for the packet or event, with the
// semantics of Term.Match.
func (c Cond) Match(packet []byte, meta *Meta) bool {
	return Term{Conds: []Cond{c}}.Match(packet, meta)
}

func (c *evalCtx) cond(cd *Cond) bool {
	if int(cd.Field) >= len(irToFid) || cd.Op > OpGe {
		return false
	}
	f := irToFid[cd.Field]
	in := insn{field: f, op: cd.Op, neg: cd.Value.Neg, big: fields[f].big, idx: cd.Index,
		val: u128{uint32(cd.Value.Lo), uint32(cd.Value.Lo >> 32), uint32(cd.Value.Hi), uint32(cd.Value.Hi >> 32)}}
	if f == fTrue || f == fFalse {
		v := u128{}
		if f == fTrue {
			v[0] = 1
		}
		return in.op.Holds(cmp128(false, &v, in.neg, &in.val, true))
	}
	v, neg, st := c.value(&in)
	return st > 0 && in.op.Holds(cmp128(neg, &v, in.neg, &in.val, in.big))
}
