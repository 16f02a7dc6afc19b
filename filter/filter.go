// Package filter implements WinDivert 2.2's filter language: the tokenizer,
// parser, constant folder and code generator of WinDivertHelperCompileFilter
// (with its error messages; an error's position is at the fault, where
// WinDivert's is sometimes one before or after it), the interpreter of
// WinDivertHelperEvalFilter, the normalized text of
// WinDivertHelperFormatFilter, WinDivert's compiled filter objects, a static
// analysis in the spirit of WinDivertAnalyzeFilter, and a lowering to a small
// intermediate representation (ir.go) that backends translate into kernel
// packet-filter rules.
//
// The language, in brief: tests "field op constant" joined by and/&&, or/||
// (and binds tighter; both are right-associative), parenthesised, and
// "(a ? b : c)" (a ternary needs its own parentheses). A test without an
// operator means "field != 0". "not"/"!" may prefix a test only, and inverts
// its operator. Constants are decimal or 0x-hex numbers up to 128 bits, IPv4
// and IPv6 literals (an IPv4 address is the number ::ffff:a.b.c.d) and macros
// (TRUE, FALSE, TCP, UDP, ICMP, ICMPV6, layer and event names), optionally
// negative ("-x" is below every non-negative number, so -0 < 0).
//
// WinDivert semantics are kept exactly, among them: a test on a field that is
// absent from the packet (tcp.DstPort on a UDP packet, packet[100] on a short
// one) is false whatever its operator; a comparison whose result the field's
// range decides is folded into a test of the field's protocol
// ("tcp.DstPort != 70000" is "tcp", "tcp.DstPort == 70000" is "not tcp");
// length is the size of the buffer; local/remote address and port follow the
// direction; random8/16/32 come from WinDivert's packet hash seeded with the
// timestamp; limits are 256 tests, 1277 tokens, 39-character words.
//
// Besides evaluation (Match, Eval) and text (String, Object), a Filter gives
// backends two static views: Analyze (which directions, IP versions,
// transport protocols and events it can match) and Lower (an
// over-approximating disjunction of conjunctions of simple comparisons, the
// IR of ir.go, exact for most filters) from which kernel rules are made.
//
// Differences from WinDivert 2.2, all deliberate:
//
//   - ipv6.FlowLabel is the real 20-bit flow label. WinDivert 2.2 reads it
//     wrongly (for the header bytes 6X Yf ab cd it yields 0xabcd0f00-style
//     values), so that there only "ipv6.FlowLabel == 0" works reliably.
//   - At the FLOW and SOCKET layers, ip and ipv6 follow Meta.IPv6 (the
//     documented meaning); WinDivert 2.2's interpreter has no IP header
//     there and so evaluates both as 0.
//   - String prints the sign of a negative constant where WinDivert's
//     formatter drops it (array fields, and boolean fields as in
//     "inbound != -1"), which only filter objects can contain.
//   - String is WinDivert's normalized text formatted again until it no
//     longer changes: WinDivert's formatter is not idempotent on intricate
//     filters (Format gives its one-pass output).
//   - String of a filter object keeps the object's meaning. An object's
//     tests are evaluated as they are, but a test that the field's range
//     decides is folded when compiled from text, and the folding changes
//     its meaning ("tcp.HdrLength > 27" is false for every packet as an
//     object test, "not tcp" as text), so String prints such a test as
//     what it means ("false", here). WinDivert's formatter prints it as it
//     is (Format, too).
//   - An object whose array index the language has no text for (such as
//     packet16[-1], or packet[65535]) does not compile: WinDivert's
//     formatter would print a filter that its compiler refuses.
package filter

import (
	"errors"
	"fmt"
)

// Layer is a WinDivert layer; the values equal divert.Layer's.
type Layer uint8

// Layers.
const (
	LayerNetwork        Layer = 0 // packets to and from the local host
	LayerNetworkForward Layer = 1 // packets routed through the host
	LayerFlow           Layer = 2 // flow established/deleted events
	LayerSocket         Layer = 3 // socket operations
	LayerReflect        Layer = 4 // WinDivert handles opened and closed
)

// Events (the values of the event field, Meta.Event).
const (
	EventPacket       = 0 // a packet, at the network layers
	EventEstablished  = 1 // FLOW: a flow was established
	EventDeleted      = 2 // FLOW: a flow was deleted
	EventBind         = 3 // SOCKET: bind
	EventConnect      = 4 // SOCKET: connect
	EventListen       = 5 // SOCKET: listen
	EventAccept       = 6 // SOCKET: accept
	EventOpen         = 8 // REFLECT: a handle was opened
	EventSocketClose  = 7 // SOCKET: close
	EventReflectClose = 9 // REFLECT: a handle was closed
)

// Error is a filter that does not compile.
type Error struct {
	Pos int    // byte offset in the text of the fault (the start of the bad token or character); never negative
	Msg string // WinDivert's message
}

// Error formats the message with its position.
func (e *Error) Error() string { return fmt.Sprintf("filter: %s at position %d", e.Msg, e.Pos) }

// Errors from Eval. They are wrapped; test with errors.Is.
var (
	// ErrPacket reports a packet that does not parse as IPv4 or IPv6 (at
	// the network layers), or a packet given at the FLOW or SOCKET layer.
	ErrPacket = errors.New("filter: invalid packet")
	// ErrMeta reports metadata that contradicts the filter or the packet:
	// another layer than the filter's, or Meta.IPv6 disagreeing with the
	// packet's IP version.
	ErrMeta = errors.New("filter: metadata does not match")
)

// Meta is what a filter may test besides the packet bytes: the fields of
// WinDivert's WINDIVERT_ADDRESS. Addresses are in network byte order, IPv4
// addresses IPv4-mapped (::ffff:a.b.c.d).
type Meta struct {
	Layer     Layer  // the layer of the packet or event (Eval checks it)
	Event     uint8  // event (EventPacket at the network layers)
	Outbound  bool   // outbound (else inbound)
	Loopback  bool   // loopback packet or flow
	Impostor  bool   // injected by someone else
	IPv6      bool   // an IPv6 packet or flow
	IfIdx     uint32 // interface index (network layers)
	SubIfIdx  uint32 // sub-interface index (network layers)
	Timestamp int64  // capture time; also the seed of random8/16/32

	// FLOW and SOCKET layers.
	EndpointID       uint64   // WFP endpoint id
	ParentEndpointID uint64   // WFP parent endpoint id
	ProcessID        uint32   // process id (also at REFLECT)
	LocalAddr        [16]byte // local address of the flow or socket
	RemoteAddr       [16]byte // remote address of the flow or socket
	LocalPort        uint16   // local port
	RemotePort       uint16   // remote port
	Protocol         uint8    // transport protocol number

	// REFLECT layer: the reflected handle's layer and priority.
	ReflectLayer Layer // the reflected handle's layer
	Priority     int16 // the reflected handle's priority
}

// Filter is a compiled filter. It is immutable and safe for concurrent use.
type Filter struct {
	layer Layer
	prog  []insn
	hash  bool // uses random8/16/32
	str   string
}

// Compile compiles text, a filter in WinDivert's language (or a WinDivert
// filter object "@WinDiv_..."), for layer. A filter that does not compile
// gives an *Error with WinDivert's message and the position of the fault
// (where WinDivert reports one before a token, or -1, Pos is the token's
// start). A NUL byte inside text is refused: in WinDivert's C string it
// would end the filter and leave the rest unread.
func Compile(text string, layer Layer) (*Filter, error) {
	if layer > LayerReflect {
		return nil, &Error{Pos: 0, Msg: msgBadTokenLayer}
	}
	prog, err := compileText(text, layer)
	if err != nil {
		return nil, err
	}
	f := &Filter{layer: layer, prog: prog}
	for i := range prog {
		switch prog[i].field {
		case fRandom8, fRandom16, fRandom32:
			f.hash = true
		}
	}
	f.str = normalize(prog, layer)
	return f, nil
}

// normalize returns the normalized text of prog: WinDivert's formatter
// applied until the text no longer changes (for all but intricate filters
// that is WinDivert's output itself; WinDivert's formatter is not always
// idempotent, and String promises a text that formats to itself).
func normalize(prog []insn, layer Layer) string {
	s := format(unfold(prog), layer)
	for i := 0; i < 16; i++ {
		p, err := compileText(s, layer)
		if err != nil {
			break // not reachable: formatted text always compiles
		}
		t := format(p, layer)
		if t == s {
			break
		}
		s = t
	}
	return s
}

// unfold returns prog, or a copy of it in which every test that the
// compiler would fold (WinDivertSimplifyTest) is replaced by one that means
// the same unfolded. Only a filter object can hold such a test: the compiler
// folds them all, and the driver evaluates an object's tests as they are.
// Printed as they are, they would be folded when the text is compiled, and
// the folding does not keep their meaning: an unfolded test on a field the
// packet lacks is false, while "tcp.HdrLength > 27" folds to "not tcp".
//
// A test the field's range decides is, unfolded, false when it is decided
// false, and "the field is present" when it is decided true: the field's
// protocol for a header field, true for a field every packet has, and for
// an array element a length test (packet[i] needs length >= i+size,
// packet[-i] length >= i).
func unfold(prog []insn) []insn {
	var out []insn
	for i := range prog {
		in := &prog[i]
		n := node{kind: eTest, field: in.field, op: in.op, idx: in.idx, val: in.val, neg: in.neg}
		if fields[in.field].size > 0 {
			n.val = u128{in.val[0]}
		}
		result, ok := foldResult(&n)
		if !ok {
			continue
		}
		if out == nil {
			out = append([]insn(nil), prog...)
		}
		u := &out[i]
		fi := &fields[in.field]
		if !result {
			u.succ = u.fail // false
			continue
		}
		if fi.size == 0 {
			if fi.proto == fTrue {
				u.fail = u.succ // true
				continue
			}
			*u = insn{field: fi.proto, op: OpEq, val: u128{1}, succ: u.succ, fail: u.fail}
			continue
		}
		// An array element: present when its region holds it.
		var need int64
		if in.idx >= 0 {
			need = int64(in.idx) + int64(fi.size)
		} else {
			need = -int64(in.idx)
			if need < int64(fi.size) {
				need = mtuMax + 1 // reaches before the region: never present
			}
		}
		lf := fLength
		switch fi.proto {
		case fTCP:
			lf = fTCPPayloadLength
		case fUDP:
			lf = fUDPPayloadLength
		}
		if need > int64(fields[lf].hi[0]) {
			u.succ = u.fail // no packet is that long
			continue
		}
		*u = insn{field: lf, op: OpGe, val: u128{uint32(need)}, big: fields[lf].big, succ: u.succ, fail: u.fail}
	}
	if out == nil {
		return prog
	}
	return out
}

// Format is WinDivertHelperFormatFilter exactly: text compiled for layer
// and printed once by WinDivert's formatter. (*Filter).String differs only
// for intricate filters, for which WinDivert's formatter is not idempotent.
func Format(text string, layer Layer) (string, error) {
	if layer > LayerReflect {
		return "", &Error{Pos: 0, Msg: msgBadTokenLayer}
	}
	prog, err := compileText(text, layer)
	if err != nil {
		return "", err
	}
	return format(prog, layer), nil
}

// MustCompile is Compile for filters known to be valid; it panics on error.
func MustCompile(text string, layer Layer) *Filter {
	f, err := Compile(text, layer)
	if err != nil {
		panic(err)
	}
	return f
}

// Layer returns the layer the filter was compiled for.
func (f *Filter) Layer() Layer { return f.layer }

// String returns the filter in WinDivert's normalized form
// (WinDivertHelperFormatFilter). Compiling it again gives the same filter.
func (f *Filter) String() string { return f.str }

// Match reports whether the filter accepts the packet (at the network
// layers) or event described by packet and meta. At the network layers a
// packet that does not parse is not matched and the IP version is the
// packet's (Meta.IPv6 and Meta.Layer are ignored); at the other layers
// packet is ignored. A nil meta is the zero Meta. Match does not allocate.
func (f *Filter) Match(packet []byte, meta *Meta) bool {
	var zero Meta
	if meta == nil {
		meta = &zero
	}
	var c evalCtx
	if f.layer <= LayerNetworkForward {
		if c.parse(packet) != nil {
			return false
		}
	}
	c.meta = meta
	c.layer = f.layer
	return c.run(f) == 1
}

// Eval is WinDivertHelperEvalFilter: like Match, but it reports what
// WinDivert reports as errors: a packet that does not parse (ErrPacket), a
// packet at the FLOW or SOCKET layer (ErrPacket), meta.Layer not the
// filter's layer or meta.IPv6 not the packet's IP version (ErrMeta).
func (f *Filter) Eval(packet []byte, meta *Meta) (bool, error) {
	var zero Meta
	if meta == nil {
		meta = &zero
	}
	if meta.Layer != f.layer {
		return false, fmt.Errorf("%w: layer %d, filter compiled for layer %d", ErrMeta, meta.Layer, f.layer)
	}
	var c evalCtx
	switch f.layer {
	case LayerNetwork, LayerNetworkForward:
		if err := c.parse(packet); err != nil {
			return false, fmt.Errorf("%w: %w", ErrPacket, err)
		}
		if meta.IPv6 != (c.info.Version == 6) {
			return false, fmt.Errorf("%w: IPv6 flag does not match the IP version %d", ErrMeta, c.info.Version)
		}
	case LayerFlow, LayerSocket:
		if packet != nil {
			return false, fmt.Errorf("%w: no packet data at layer %d", ErrPacket, f.layer)
		}
	}
	c.meta = meta
	c.layer = f.layer
	switch c.run(f) {
	case 1:
		return true, nil
	case 0:
		return false, nil
	}
	return false, fmt.Errorf("%w: filter evaluation failed", ErrMeta)
}
