package filter

// This file is the tokenizer: WinDivertTokenizeFilter's behaviour and
// quirks (see the package documentation), with error positions at the
// fault rather than WinDivert's.

// tokKind is the kind of a token.
type tokKind uint8

const (
	tkField    tokKind = iota // a field name; token.field says which
	tkNumber                  // a number, address or expanded macro
	tkMacro                   // a macro that is not valid for the layer
	tkOpen                    // (
	tkClose                   // )
	tkSqOpen                  // [
	tkSqClose                 // ]
	tkMinus                   // -
	tkBytes                   // b
	tkEq                      // = or ==
	tkNeq                     // !=
	tkLt                      // <
	tkLeq                     // <=
	tkGt                      // >
	tkGeq                     // >=
	tkNot                     // not or !
	tkAnd                     // and or &&
	tkOr                      // or or ||
	tkColon                   // :
	tkQuestion                // ?
	tkEnd                     // end of the filter
)

// Limits of the language (WinDivert's).
const (
	maxTests    = 256 // WINDIVERT_FILTER_MAXLEN
	tokensMax   = 5*256 - 1
	tokenMaxLen = 40 // TOKEN_MAXLEN, including the terminating NUL
	mtuMax      = 40 + 0xFFFF
	maxDepth    = 1024
)

// Error messages, exactly as WinDivertHelperCompileFilter reports them.
const (
	msgTooDeep       = "Filter expression too deep"
	msgTooLong       = "Filter expression too long"
	msgBadToken      = "Filter expression contains a bad token"
	msgBadTokenLayer = "Filter expression contains a bad token for layer"
	msgParse         = "Filter expression parse error"
	msgIndexOOB      = "Filter expression array index is out-of-bounds"
	msgBadObject     = "Filter object is invalid"
)

// u128 is a 128-bit number as four 32-bit words, least significant first.
type u128 [4]uint32

func (v u128) isZero() bool { return v[0]|v[1]|v[2]|v[3] == 0 }

// token is one token of a filter.
type token struct {
	kind  tokKind
	field fid   // tkField
	macro macro // tkMacro
	pos   int
	val   u128 // tkNumber
}

// macro names a macro word.
type macro uint8

const (
	mNone macro = iota
	mNetwork
	mNetworkForward
	mFlow
	mSocket
	mReflect
	mPacket
	mEstablished
	mDeleted
	mBind
	mConnect
	mListen
	mAccept
	mOpen
	mClose
	mTrue
	mFalse
	mTCP
	mUDP
	mICMP
	mICMPv6
)

var macroNames = map[string]macro{
	"ACCEPT": mAccept, "BIND": mBind, "CLOSE": mClose, "CONNECT": mConnect,
	"DELETED": mDeleted, "ESTABLISHED": mEstablished, "FALSE": mFalse,
	"FLOW": mFlow, "ICMP": mICMP, "ICMPV6": mICMPv6, "LISTEN": mListen,
	"NETWORK": mNetwork, "NETWORK_FORWARD": mNetworkForward, "OPEN": mOpen,
	"PACKET": mPacket, "REFLECT": mReflect, "SOCKET": mSocket, "TCP": mTCP,
	"TRUE": mTrue, "UDP": mUDP,
}

// expand is WinDivertExpandMacro: the macro's value, and whether it is a
// number at this layer.
func (m macro) expand(layer Layer) (uint32, bool) {
	switch m {
	case mNetwork:
		return uint32(LayerNetwork), true
	case mNetworkForward:
		return uint32(LayerNetworkForward), true
	case mFlow:
		return uint32(LayerFlow), true
	case mSocket:
		return uint32(LayerSocket), true
	case mReflect:
		return uint32(LayerReflect), true
	case mPacket:
		return EventPacket, layer == LayerNetwork || layer == LayerNetworkForward
	case mEstablished:
		return EventEstablished, layer == LayerFlow
	case mDeleted:
		return EventDeleted, layer == LayerFlow
	case mBind:
		return EventBind, layer == LayerSocket
	case mConnect:
		return EventConnect, layer == LayerSocket
	case mListen:
		return EventListen, layer == LayerSocket
	case mAccept:
		return EventAccept, layer == LayerSocket
	case mOpen:
		return EventOpen, layer == LayerReflect
	case mClose:
		switch layer {
		case LayerSocket:
			return EventSocketClose, true
		case LayerReflect:
			return EventReflectClose, true
		}
		return 0, false
	case mTrue:
		return 1, true
	case mFalse:
		return 0, true
	case mTCP:
		return 6, true
	case mUDP:
		return 17, true
	case mICMP:
		return 1, true
	case mICMPv6:
		return 58, true
	}
	return 0, false
}

func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func isXDigit(c byte) bool {
	return isDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')
}

func isAlNum(c byte) bool {
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || isDigit(c)
}

func isWordChar(c byte) bool { return isAlNum(c) || c == '.' || c == ':' || c == '_' }

// mulAdd sets n = n*m + a and reports whether it did not overflow 128 bits.
func (n *u128) mulAdd(m, a uint32) bool {
	c := uint64(a)
	for i := range n {
		t := uint64(n[i])*uint64(m) + c
		n[i] = uint32(t)
		c = t >> 32
	}
	return c == 0
}

// atoi parses the leading decimal digits of s (WinDivertAToI): the value,
// the number of digits, and false when there are none or they overflow.
func atoi(s string) (u128, int, bool) {
	var n u128
	i := 0
	for ; i < len(s) && isDigit(s[i]); i++ {
		if !n.mulAdd(10, uint32(s[i]-'0')) {
			return n, i, false
		}
	}
	return n, i, i > 0
}

// atox parses hex digits of s from off (WinDivertAToX).
func atox(s string, off int) (u128, int, bool) {
	var n u128
	i := off
	for ; i < len(s) && isXDigit(s[i]); i++ {
		c := s[i]
		var d uint32
		switch {
		case isDigit(c):
			d = uint32(c - '0')
		case c >= 'a':
			d = uint32(c-'a') + 10
		default:
			d = uint32(c-'A') + 10
		}
		if !n.mulAdd(16, d) {
			return n, i, false
		}
	}
	return n, i, i > 0
}

// parseIPv4 is WinDivertHelperParseIPv4Address: four decimal parts, each
// (after 128-bit parsing truncated to 32 bits) at most 255, separated by dots.
func parseIPv4(s string) (uint32, bool) {
	var addr uint32
	for i := 0; i < 4; i++ {
		n, l, ok := atoi(s)
		if !ok || n[0] > 255 {
			return 0, false
		}
		s = s[l:]
		if i != 3 {
			if len(s) == 0 || s[0] != '.' {
				return 0, false
			}
			s = s[1:]
		}
		addr |= n[0] << (8 * (3 - i))
	}
	return addr, len(s) == 0
}

// parseIPv6 is WinDivertHelperParseIPv6Address with its quirks: text after
// eight groups is ignored, and a dotted-quad tail is accepted only for
// ::a.b.c.d and ::ffff:a.b.c.d.
func parseIPv6(s string) (u128, bool) {
	var laddr, raddr [8]uint16
	var out u128
	left, ipv4 := true, false
	var ipv4Addr uint32
	i, j := 0, 0
	at := func(k int) byte {
		if k < len(s) {
			return s[k]
		}
		return 0
	}
	p := 0
	if at(p) == ':' {
		p++
		if at(p) != ':' {
			return out, false
		}
		left = false
		p++
		if at(p) == 0 {
			goto done
		}
	}
	for k := 0; k < 8; k++ {
		if at(p) == ':' {
			if !left {
				return out, false
			}
			left = false
			p++
			if at(p) == 0 {
				break
			}
		}
		// j <= 6: a dotted quad after seven groups would be a ninth and
		// tenth group, past the end of raddr (in WinDivert's C as well).
		if i < 6 && j <= 6 {
			if a, ok := parseIPv4(s[p:]); ok {
				ipv4, ipv4Addr = true, a
				j += 2
				goto done
			}
		}
		l := 0
		var part uint16
		for l < 4 && isXDigit(at(p)) {
			c := at(p)
			var d uint16
			switch {
			case isDigit(c):
				d = uint16(c - '0')
			case c >= 'a':
				d = uint16(c-'a') + 10
			default:
				d = uint16(c-'A') + 10
			}
			part = part<<4 | d
			p++
			l++
		}
		if l == 0 {
			return out, false
		}
		if at(p) != ':' && at(p) != 0 {
			return out, false
		}
		if left {
			laddr[i] = part
			i++
		} else {
			raddr[j] = part
			j++
		}
		if at(p) == 0 {
			if !left || k == 7 {
				break
			}
			return out, false
		}
		p++
	}
done:
	for w := 0; w < 4; w++ {
		k := 2*w + j
		l := k + 1
		if k >= 8 {
			k -= 8
		}
		if l >= 8 {
			l -= 8
		}
		out[3-w] = uint32(laddr[2*w+1]) | uint32(laddr[2*w])<<16 |
			uint32(raddr[l]) | uint32(raddr[k])<<16
	}
	if ipv4 {
		if out[3] != 0 || out[2] != 0 || out[0] != 0 || (out[1] != 0xFFFF && out[1] != 0) {
			return out, false
		}
		out[0] = ipv4Addr
	}
	return out, true
}

// tokenize is WinDivertTokenizeFilter.
func tokenize(filter string, layer Layer, toks []token) ([]token, *Error) {
	toks = toks[:0]
	at := func(i int) byte {
		if i < len(filter) {
			return filter[i]
		}
		return 0
	}
	i := 0
	for {
		if len(toks) >= tokensMax-1 {
			return nil, &Error{Pos: i, Msg: msgTooLong}
		}
		for isSpace(at(i)) {
			i++
		}
		t := token{pos: i}
		c := at(i)
		i++
		simple := true
		switch c {
		case 0: // the end (compileText refuses a NUL inside the text)
			t.kind = tkEnd
			return append(toks, t), nil
		case '(':
			t.kind = tkOpen
		case ')':
			t.kind = tkClose
		case '[':
			t.kind = tkSqOpen
		case ']':
			t.kind = tkSqClose
		case '-':
			t.kind = tkMinus
		case '!':
			t.kind = tkNot
			if at(i) == '=' {
				i++
				t.kind = tkNeq
			}
		case '=':
			if at(i) == '=' {
				i++
			}
			t.kind = tkEq
		case '<':
			t.kind = tkLt
			if at(i) == '=' {
				i++
				t.kind = tkLeq
			}
		case '>':
			t.kind = tkGt
			if at(i) == '=' {
				i++
				t.kind = tkGeq
			}
		case ':':
			if at(i) == ':' {
				simple = false // probably an IPv6 address, e.g. ::1
			} else {
				t.kind = tkColon
			}
		case '?':
			t.kind = tkQuestion
		case '&':
			i++
			if at(i-1) != '&' {
				return nil, &Error{Pos: i - 2, Msg: msgBadToken} // at the lone '&'
			}
			t.kind = tkAnd
		case '|':
			i++
			if at(i-1) != '|' {
				return nil, &Error{Pos: i - 2, Msg: msgBadToken} // at the lone '|'
			}
			t.kind = tkOr
		default:
			simple = false
		}
		if simple {
			toks = append(toks, t)
			continue
		}
		if !isWordChar(c) {
			return nil, &Error{Pos: i - 1, Msg: msgBadToken} // at the character
		}
		start := i - 1
		j := 1
		for ; j < tokenMaxLen && isWordChar(at(i)); j, i = j+1, i+1 {
		}
		if j >= tokenMaxLen {
			return nil, &Error{Pos: i - j, Msg: msgBadToken}
		}
		word := filter[start : start+j]
		// A single trailing colon is split off (but "::" is kept). Errors
		// about the word are reported at its start (WinDivert reports one
		// before the start of a word it split so, -1 for the first).
		if word[j-1] == ':' && (j == 1 || word[j-2] != ':') {
			word = word[:j-1]
			i--
		}
		if f, ok := fieldNames[word]; ok {
			if f.wd && !validField(layer, f.id) {
				return nil, &Error{Pos: start, Msg: msgBadTokenLayer}
			}
			t.kind = tkField
			t.field = f.id
			toks = append(toks, t)
			continue
		}
		if kw, ok := keywords[word]; ok {
			t.kind = kw
			toks = append(toks, t)
			continue
		}
		if m, ok := macroNames[word]; ok {
			if v, ok := m.expand(layer); ok {
				t.kind = tkNumber
				t.val[0] = v
			} else {
				t.kind = tkMacro
				t.macro = m
			}
			toks = append(toks, t)
			continue
		}
		if word == "b" {
			// A lone 'b' is overwritten by the next token (WinDivert quirk).
			continue
		}
		if n, l, ok := atoi(word); ok {
			rest := word[l:]
			if rest == "" || rest == "b" {
				t.kind = tkNumber
				t.val = n
				toks = append(toks, t)
				if rest == "b" {
					// At the 'b' (WinDivert leaves this token's position
					// unset, 0 on a fresh heap).
					toks = append(toks, token{kind: tkBytes, pos: start + l})
				}
				continue
			}
		}
		if len(word) >= 2 && word[0] == '0' && word[1] == 'x' {
			if n, l, ok := atox(word, 2); ok && l == len(word) {
				t.kind = tkNumber
				t.val = n
				toks = append(toks, t)
				continue
			}
		}
		if a, ok := parseIPv4(word); ok {
			t.kind = tkNumber
			t.val = u128{a, 0xFFFF}
			toks = append(toks, t)
			continue
		}
		if a, ok := parseIPv6(word); ok {
			t.kind = tkNumber
			t.val = a
			toks = append(toks, t)
			continue
		}
		return nil, &Error{Pos: start, Msg: msgBadToken}
	}
}

var keywords = map[string]tokKind{"and": tkAnd, "or": tkOr, "not": tkNot}
