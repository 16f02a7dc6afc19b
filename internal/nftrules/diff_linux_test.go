package nftrules

// A randomized differential test of the whole pipeline: filter text from
// WinDivert's grammar (and, one filter in ten, a filter object of one test
// that text would have folded), compiled by package filter, lowered by
// Lower and by this package, installed at prerouting, input or output, and
// checked packet by packet against (*filter.Filter).Match.
//
// The rules are installed as a FlagDrop handle's are (drop rules, with the
// v6Unclear chain queueing to a queue nobody reads, so that those packets
// are dropped too): a packet dropped is a packet the rules select. Every
// packet is sent with its own socket mark, and the bed's probe chains
// (before and after the rules under test) count each mark separately: a
// packet counted before the rules and not after them was selected.
//
// Correct means: the rules select every packet the filter matches (a miss
// is a filter bypass), and exact rules select nothing else, except IPv6
// packets that user space checks with the filter anyway (see recheck).

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/filter"
)

const (
	diffSeed      = 0x5eed_d1ff
	diffFilters   = 200
	diffMarkBase  = 0x00A0_0000 // outside [MarkMagic, Mark(p)]: never skipped
	diffMaxMarks  = 640
	diffMinimize  = 16 // mismatches to minimise at most
	diffMinBudget = 64 * time.Second
	diffQueue     = 4711 // the queue the unclear packets go to; nobody reads it
)

// recheck reports whether the backend checks p with the filter in user
// space whatever the rules say (divert_linux.go, v6HasExt): an IPv6 packet
// with an extension header WinDivert walks, or nothing past its header.
func recheck(p []byte) bool {
	if p[0]>>4 != 6 {
		return false
	}
	if len(p) <= 40 {
		return true
	}
	switch p[6] {
	case 0, 43, 44, 51, 60, 135:
		return true
	}
	return false
}

// --- the counting bed ---

type dbed struct {
	*bed
	nmarks int
	last   map[uint32][2]uint64 // per mark: packets counted before / after
}

func newDiffBed(t *testing.T, hook Hook) *dbed {
	b := newBedAt(t, hook)
	d := &dbed{bed: b, nmarks: diffMaxMarks, last: map[uint32][2]uint64{}}
	err := b.ns.Do(func() error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		for i := 0; i < d.nmarks; i++ {
			for _, ch := range []*nftables.Chain{b.pre, b.post} {
				c.AddRule(&nftables.Rule{Table: b.probe, Chain: ch, Exprs: []expr.Any{
					meta(expr.MetaKeyMARK), cmp(expr.CmpOpEq, nativeU32(diffMarkBase+uint32(i))), &expr.Counter{}}})
			}
			if i%64 == 63 {
				if err := c.Flush(); err != nil {
					return err
				}
			}
		}
		return c.Flush()
	})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// markCounters reads every mark's counters before and after the rules.
func (d *dbed) markCounters() (map[uint32][2]uint64, error) {
	out := map[uint32][2]uint64{}
	err := d.ns.Do(func() error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		for side, ch := range []*nftables.Chain{d.pre, d.post} {
			rules, err := c.GetRules(d.probe, ch)
			if err != nil {
				return err
			}
			for _, r := range rules {
				var mark uint32
				var isMark bool
				var n uint64
				for _, e := range r.Exprs {
					switch e := e.(type) {
					case *expr.Meta:
						isMark = e.Key == expr.MetaKeyMARK
					case *expr.Cmp:
						if len(e.Data) == 4 {
							mark = binary.NativeEndian.Uint32(e.Data)
						}
					case *expr.Counter:
						n = e.Packets
					}
				}
				if isMark {
					v := out[mark]
					v[side] = n
					out[mark] = v
				}
			}
		}
		return nil
	})
	return out, err
}

// sendMarked sends pkts[i] with mark diffMarkBase+i; sent[i] is false when
// the kernel refused to send it.
func (d *dbed) sendMarked(pkts [][]byte) (sent []bool) {
	sent = make([]bool, len(pkts))
	for i, p := range pkts {
		if err := unix.SetsockoptInt(d.fdFor(p), unix.SOL_SOCKET, unix.SO_MARK, int(diffMarkBase+uint32(i))); err != nil {
			panic(err)
		}
		sent[i] = d.send(p) == nil
	}
	return sent
}

// round sends pkts (at most nmarks) through whatever rules are installed and
// reports, per packet, whether it reached prerouting and whether it got past
// the rules.
func (d *dbed) round(t *testing.T, pkts [][]byte) (arrived, passed []bool) {
	t.Helper()
	if len(pkts) > d.nmarks {
		t.Fatalf("%d packets, %d marks", len(pkts), d.nmarks)
	}
	sent := d.sendMarked(pkts)
	arrived = make([]bool, len(pkts))
	passed = make([]bool, len(pkts))
	deadline := time.Now().Add(3 * time.Second)
	var now map[uint32][2]uint64
	var err error
	settled := 0
	for {
		if now, err = d.markCounters(); err != nil {
			t.Fatal(err)
		}
		all := true
		for i := range pkts {
			m := diffMarkBase + uint32(i)
			if sent[i] && now[m][0] == d.last[m][0] {
				all = false
			}
		}
		if all {
			// Counted before the rules: give the packets that are not yet
			// counted after them a moment (the same softirq pass).
			if settled++; settled == 3 {
				break
			}
		} else if time.Now().After(deadline) {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	for i := range pkts {
		m := diffMarkBase + uint32(i)
		dpre, dpost := now[m][0]-d.last[m][0], now[m][1]-d.last[m][1]
		if dpre > 1 || dpost > 1 || dpost > dpre {
			t.Fatalf("mark %#x: counters moved by %d/%d", m, dpre, dpost)
		}
		arrived[i], passed[i] = dpre == 1, dpost == 1
	}
	d.last = now
	return arrived, passed
}

// install installs f's rules as a FlagDrop handle's are.
func (d *dbed) install(f *filter.Filter) (*Ruleset, error) {
	var r *Ruleset
	err := d.ns.Do(func() (err error) {
		r, err = Install(Config{Hooks: []Hook{d.hook}, IPv4: true, IPv6: true, Lowered: f.Lower(),
			Action: ActionDrop, UnclearQueue: true, QueueNum: diffQueue, QueueCount: 1})
		return err
	})
	return r, err
}

// kernelSelects installs f and reports which of pkts the rules select
// (ok[i] is false when pkts[i] never reached prerouting).
func (d *dbed) kernelSelects(t *testing.T, f *filter.Filter, pkts [][]byte) (sel, ok []bool, exact bool, err error) {
	t.Helper()
	r, err := d.install(f)
	if err != nil {
		return nil, nil, false, err
	}
	defer r.Close()
	arrived, passed := d.round(t, pkts)
	sel = make([]bool, len(pkts))
	for i := range pkts {
		sel[i] = arrived[i] && !passed[i]
	}
	return sel, arrived, r.Exact(), nil
}

// queueSelects reports whether the queueing rules Open would install for f
// (families from Analyze, queue action, so also the v6Unclear rules) select
// pkt: with no program on the queue, a selected packet is dropped.
func (d *dbed) queueSelects(t *testing.T, f *filter.Filter, pkt []byte) bool {
	t.Helper()
	an := f.Analyze()
	if an.None {
		return false
	}
	var r *Ruleset
	if err := d.ns.Do(func() (err error) {
		r, err = Install(Config{Hooks: []Hook{d.hook}, IPv4: an.IPv4, IPv6: an.IPv6, Lowered: f.Lower(),
			Action: ActionQueue, QueueNum: diffQueue, QueueCount: 1})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	arrived, passed := d.round(t, [][]byte{pkt})
	return arrived[0] && !passed[0]
}

// meta is the Meta the backend gives the filter for p at the bed's hook:
// the packets come in by lo, or leave by it.
func (d *dbed) meta(p []byte) *filter.Meta {
	return &filter.Meta{Layer: filter.LayerNetwork, Outbound: d.hook.Outbound(), Loopback: true, IfIdx: 1, IPv6: p[0]>>4 == 6}
}

// reaching returns the packets of all that reach the bed's hook unchanged
// with no rules installed (some random ones are refused by the raw socket
// or dropped on the way: bad hop-by-hop options, IPv4 fragments before
// input), as the hook sees them.
func (d *dbed) reaching(t *testing.T, all []namedPkt) []namedPkt {
	t.Helper()
	if d.hook == HookInput {
		// What the input hook sees, as the program would: the kernel's
		// IPv4 option parsing (ip_options_compile) sets every byte after
		// an End of Options List to 0 before it.
		for i := range all {
			all[i].b = diffNormalize(eolZeroed(all[i].b))
		}
	}
	var raw [][]byte
	for _, p := range all {
		raw = append(raw, p.b)
	}
	arrived, passed := d.round(t, raw)
	var pkts []namedPkt
	for i, p := range all {
		if arrived[i] && !passed[i] {
			t.Fatalf("%s: dropped with no rules", p.name)
		}
		if arrived[i] {
			pkts = append(pkts, p)
		}
	}
	return pkts
}

// wrong reports whether the rules' decision sel on p is wrong for a filter
// that matches p (want): a miss always, a selection of exact rules when
// user space would not check the packet again.
func wrong(want, sel, exact bool, p []byte) (bad, miss bool) {
	switch {
	case want && !sel:
		return true, true
	case exact && sel && !want && !recheck(p):
		return true, false
	}
	return false, false
}

// --- packets ---

var (
	diffSrc4 = []netip.Addr{remote4, remote4, netip.MustParseAddr("10.77.0.3"), netip.MustParseAddr("192.0.2.7"), netip.MustParseAddr("10.77.0.1"), netip.MustParseAddr("10.78.255.254")}
	diffSrc6 = []netip.Addr{remote6, remote6, netip.MustParseAddr("fd00:77::3"), netip.MustParseAddr("2001:db8::7"), netip.MustParseAddr("fd00:77::1"), netip.MustParseAddr("fe80::1234")}
	diffPort = []uint16{0, 1, 53, 80, 443, 5353, 8080, 40000, 65535}
)

// diffNormalize makes p what the kernel's raw-socket path leaves of it
// before prerouting: IPv4 total length, a non-zero identification and the
// header checksum; IPv6 payload length.
func diffNormalize(p []byte) []byte {
	switch p[0] >> 4 {
	case 4:
		binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
		if p[4] == 0 && p[5] == 0 {
			p[5] = 1
		}
		if binary.BigEndian.Uint32(p[12:]) == 0 {
			copy(p[12:16], remote4.AsSlice())
		}
		ihl := int(p[0]&0xf) * 4
		if ihl >= 20 && ihl <= len(p) {
			p[10], p[11] = 0, 0
			binary.BigEndian.PutUint16(p[10:], csum(p[:ihl]))
		}
	case 6:
		binary.BigEndian.PutUint16(p[4:], uint16(len(p)-40))
	}
	return p
}

// eolZeroed sets to 0, in place, the IPv4 option bytes after an End of
// Options List, as the kernel's input path does, and returns p.
func eolZeroed(p []byte) []byte {
	if p[0]>>4 != 4 {
		return p
	}
	ihl := min(int(p[0]&0xf)*4, len(p))
	for i := 20; i < ihl; {
		switch p[i] {
		case 0: // EOL
			clear(p[i+1 : ihl])
			return p
		case 1: // NOP
			i++
			continue
		}
		if i+1 >= ihl || p[i+1] < 2 {
			return p // malformed: the kernel drops it
		}
		i += int(p[i+1])
	}
	return p
}

type pgen struct {
	r *rand.Rand
}

func (g *pgen) n(k int) int      { return g.r.IntN(k) }
func (g *pgen) p(x float64) bool { return g.r.Float64() < x }
func (g *pgen) port() uint16 {
	if g.p(0.7) {
		return diffPort[g.n(len(diffPort))]
	}
	return uint16(g.r.Uint32())
}
func (g *pgen) bytes(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(g.r.Uint32())
	}
	return b
}

// l4 builds a transport header (and payload) for proto; name describes it.
func (g *pgen) l4(proto byte) ([]byte, string) {
	switch proto {
	case 6:
		doff := byte(5)
		switch g.n(8) {
		case 0:
			doff = byte(g.n(5)) // 0..4: not a TCP header for WinDivert
		case 1, 2:
			doff = byte(6 + g.n(10))
		}
		h := tcp(g.port(), g.port(), byte(g.r.Uint32()), doff, nil)
		binary.BigEndian.PutUint32(h[4:], g.r.Uint32())
		binary.BigEndian.PutUint16(h[14:], uint16(g.r.Uint32()))
		binary.BigEndian.PutUint16(h[16:], uint16(g.r.Uint32()))
		if g.p(0.3) {
			binary.BigEndian.PutUint16(h[18:], uint16(g.r.Uint32()))
		}
		if doff > 5 {
			h = append(h, g.bytes(min(int(doff-5)*4, 4*g.n(11)))...)
		}
		h = append(h, g.bytes(g.n(24))...)
		return h, fmt.Sprintf("tcp doff %d", doff)
	case 17:
		h := udp(g.port(), g.port(), g.bytes(g.n(24)))
		if g.p(0.2) {
			binary.BigEndian.PutUint16(h[4:], uint16(g.n(64)))
		}
		if g.p(0.5) {
			binary.BigEndian.PutUint16(h[6:], uint16(g.r.Uint32()))
		}
		return h, "udp"
	case 1, 58:
		typ := byte(g.r.Uint32())
		if g.p(0.5) {
			typ = []byte{0, 3, 8, 11, 128, 129, 133, 135}[g.n(8)]
		}
		h := icmpEcho(typ, uint16(g.r.Uint32()), uint16(g.n(4)))
		h[1] = byte(g.n(4))
		return append(h, g.bytes(g.n(8))...), fmt.Sprintf("icmp%d type %d", proto, typ)
	}
	return g.bytes(g.n(32)), fmt.Sprintf("proto %d", proto)
}

func (g *pgen) proto() byte {
	return []byte{6, 6, 6, 17, 17, 17, 1, 58, 47, 0, 50, 59, 255, byte(g.r.Uint32())}[g.n(14)]
}

// truncate cuts p somewhere after its first min bytes.
func (g *pgen) truncate(p []byte, min int) []byte {
	if len(p) <= min {
		return p
	}
	return p[:min+g.n(len(p)-min)]
}

func (g *pgen) v4() ([]byte, string) {
	o := v4opts{tos: byte(g.r.Uint32()), id: uint16(g.r.Uint32()) | 1, ttl: byte(1 + g.n(255)),
		src: diffSrc4[g.n(len(diffSrc4))], dst: local4}
	var fl []string
	switch g.n(10) {
	case 0, 1, 2:
	case 3, 4:
		o.flags = 0x4000
	case 5:
		o.flags = 0x2000
	case 6:
		o.flags = 0x6000
	case 7:
		o.flags = uint16(1 + g.n(8))
	case 8:
		o.flags = 0x2000 | uint16(1+g.n(0x1fff))
	case 9:
		o.flags = uint16(g.r.Uint32())
	}
	if o.flags != 0 {
		fl = append(fl, fmt.Sprintf("flags %#04x", o.flags))
	}
	if g.p(0.25) {
		o.ihlOpt = 1 + g.n(10)
		fl = append(fl, fmt.Sprintf("+%d opt words", o.ihlOpt))
	}
	o.proto = g.proto()
	pl, name := g.l4(o.proto)
	p := ipv4(o, pl)
	if o.ihlOpt > 0 && g.p(0.5) {
		for i := 20; i < 20+4*o.ihlOpt; i++ {
			p[i] = []byte{0, 1, 1, byte(g.r.Uint32())}[g.n(4)]
		}
	}
	if g.p(0.2) {
		p = g.truncate(p, 20+4*o.ihlOpt)
		fl = append(fl, fmt.Sprintf("cut to %d", len(p)))
	}
	return diffNormalize(p), "v4 " + name + " " + strings.Join(fl, " ")
}

// ext builds one IPv6 extension header of type typ, followed by next.
func (g *pgen) ext(typ, next byte, first bool) ([]byte, string) {
	switch typ {
	case 0, 60:
		k := g.n(3)
		h := make([]byte, (k+1)*8)
		h[0], h[1] = next, byte(k)
		// One PadN over the rest (valid); sometimes random options
		// (only where the kernel does not parse them before prerouting).
		h[2], h[3] = 1, byte(len(h)-4)
		if !first && g.p(0.3) {
			copy(h[2:], g.bytes(len(h)-2))
		}
		return h, map[byte]string{0: "hbh", 60: "dst"}[typ]
	case 43:
		k := g.n(3) * 2
		h := make([]byte, (k+1)*8)
		h[0], h[1], h[2], h[3] = next, byte(k), byte(g.n(5)), byte(g.n(3))
		copy(h[8:], g.bytes(len(h)-8))
		return h, "rt"
	case 44:
		h := make([]byte, 8)
		h[0] = next
		off := uint16(0)
		if g.p(0.5) {
			off = uint16(1 + g.n(0x1fff))
		}
		m := uint16(g.n(2))
		binary.BigEndian.PutUint16(h[2:], off<<3|m|uint16(g.n(2))<<1)
		binary.BigEndian.PutUint32(h[4:], g.r.Uint32())
		if off != 0 {
			return h, fmt.Sprintf("frag(off %d m %d)", off, m)
		}
		return h, fmt.Sprintf("frag(first m %d)", m)
	case 51:
		pl := 1 + g.n(4)
		h := make([]byte, (pl+2)*4)
		h[0], h[1] = next, byte(pl)
		copy(h[4:], g.bytes(len(h)-4))
		return h, "ah"
	}
	panic("ext type")
}

func (g *pgen) v6() ([]byte, string) {
	o := v6opts{tc: byte(g.r.Uint32()), flow: g.r.Uint32() & 0xfffff, hop: byte(1 + g.n(255)),
		src: diffSrc6[g.n(len(diffSrc6))], dst: local6}
	var types []byte
	frag := false
	for n := g.n(4); len(types) < n; {
		t := []byte{0, 43, 60, 44, 51}[g.n(5)]
		if t == 44 && frag || t == 0 && len(types) > 0 && g.p(0.7) {
			continue
		}
		frag = frag || t == 44
		types = append(types, t)
	}
	final := g.proto()
	if final == 44 || final == 0 || final == 43 || final == 60 || final == 51 || final == 135 {
		final = 6
	}
	pl, name := g.l4(final)
	var names []string
	var ext []byte
	for i := len(types) - 1; i >= 0; i-- {
		next := final
		if i+1 < len(types) {
			next = types[i+1]
		}
		h, n := g.ext(types[i], next, i == 0)
		ext = append(h, ext...)
		names = append([]string{n}, names...)
	}
	first := final
	if len(types) > 0 {
		first = types[0]
	}
	o.next = 0xff // replaced below
	p := ipv6(o, append(ext, pl...))
	p[6] = first
	desc := "v6 " + strings.Join(append(names, name), ",")
	switch {
	case len(ext) > 0 && g.p(0.15):
		// cut inside the extension headers or just after them
		p = g.truncate(p, 40+len(ext)-min(len(ext), 8))
		desc += fmt.Sprintf(" cut to %d", len(p))
	case g.p(0.15):
		p = g.truncate(p, 40+len(ext))
		desc += fmt.Sprintf(" cut to %d", len(p))
	}
	return diffNormalize(p), desc
}

// mutate flips a few bytes of p, never the IP version nor the destination.
func (g *pgen) mutate(p []byte) []byte {
	q := append([]byte(nil), p...)
	v6 := q[0]>>4 == 6
	for k := 1 + g.n(3); k > 0; k-- {
		i := g.n(len(q))
		switch {
		case i == 0:
			q[0] = q[0]&0xf0 | byte(g.n(16))
		case !v6 && i >= 16 && i < 20, v6 && i >= 24 && i < 40:
		case !v6 && (i == 2 || i == 3), v6 && (i == 4 || i == 5):
		default:
			q[i] = byte(g.r.Uint32())
		}
	}
	if g.p(0.2) && len(q) > 41 {
		q = q[:len(q)-1-g.n(min(8, len(q)-41))]
	}
	return diffNormalize(q)
}

func diffPackets(r *rand.Rand) []namedPkt {
	g := &pgen{r}
	pkts := testPackets()
	for i := 0; i < 170; i++ {
		b, n := g.v4()
		pkts = append(pkts, namedPkt{n, b})
	}
	for i := 0; i < 230; i++ {
		b, n := g.v6()
		pkts = append(pkts, namedPkt{n, b})
	}
	base := len(pkts)
	for i := 0; i < 120; i++ {
		src := pkts[g.n(base)]
		pkts = append(pkts, namedPkt{"mutated " + src.name, g.mutate(src.b)})
	}
	return pkts
}

// --- filters ---

type fkind int

const (
	kBool fkind = iota
	kNum
	kAddr4
	kAddr6
	kAddr
	kArr
)

type fspec struct {
	name string
	f    filter.Field
	kind fkind
	max  uint64
	size int // array element size
}

var diffFields = []fspec{
	{"ip", filter.FieldIP, kBool, 1, 0}, {"ipv6", filter.FieldIPv6, kBool, 1, 0},
	{"tcp", filter.FieldTCP, kBool, 1, 0}, {"udp", filter.FieldUDP, kBool, 1, 0},
	{"icmp", filter.FieldICMP, kBool, 1, 0}, {"icmpv6", filter.FieldICMPv6, kBool, 1, 0},
	{"inbound", filter.FieldInbound, kBool, 1, 0}, {"outbound", filter.FieldOutbound, kBool, 1, 0},
	{"loopback", filter.FieldLoopback, kBool, 1, 0}, {"fragment", filter.FieldFragment, kBool, 1, 0},
	{"impostor", filter.FieldImpostor, kBool, 1, 0},
	{"ifIdx", filter.FieldIfIdx, kNum, 4, 0}, {"subIfIdx", filter.FieldSubIfIdx, kNum, 2, 0},
	{"length", filter.FieldLength, kNum, 200, 0}, {"protocol", filter.FieldProtocol, kNum, 255, 0},
	{"zero", filter.FieldZero, kNum, 1, 0}, {"event", filter.FieldEvent, kNum, 2, 0},
	{"random8", filter.FieldRandom8, kNum, 255, 0},
	{"ip.HdrLength", filter.FieldIPHdrLength, kNum, 15, 0}, {"ip.TOS", filter.FieldIPTOS, kNum, 255, 0},
	{"ip.Length", filter.FieldIPLength, kNum, 200, 0}, {"ip.Id", filter.FieldIPId, kNum, 0xffff, 0},
	{"ip.DF", filter.FieldIPDF, kBool, 1, 0}, {"ip.MF", filter.FieldIPMF, kBool, 1, 0},
	{"ip.FragOff", filter.FieldIPFragOff, kNum, 0x1fff, 0}, {"ip.TTL", filter.FieldIPTTL, kNum, 255, 0},
	{"ip.Protocol", filter.FieldIPProtocol, kNum, 255, 0}, {"ip.Checksum", filter.FieldIPChecksum, kNum, 0xffff, 0},
	{"ip.SrcAddr", filter.FieldIPSrcAddr, kAddr4, 0, 0}, {"ip.DstAddr", filter.FieldIPDstAddr, kAddr4, 0, 0},
	{"ipv6.TrafficClass", filter.FieldIPv6TrafficClass, kNum, 255, 0}, {"ipv6.FlowLabel", filter.FieldIPv6FlowLabel, kNum, 0xfffff, 0},
	{"ipv6.Length", filter.FieldIPv6Length, kNum, 200, 0}, {"ipv6.NextHdr", filter.FieldIPv6NextHdr, kNum, 255, 0},
	{"ipv6.HopLimit", filter.FieldIPv6HopLimit, kNum, 255, 0},
	{"ipv6.SrcAddr", filter.FieldIPv6SrcAddr, kAddr6, 0, 0}, {"ipv6.DstAddr", filter.FieldIPv6DstAddr, kAddr6, 0, 0},
	{"localAddr", filter.FieldLocalAddr, kAddr, 0, 0}, {"remoteAddr", filter.FieldRemoteAddr, kAddr, 0, 0},
	{"localPort", filter.FieldLocalPort, kNum, 0xffff, 0}, {"remotePort", filter.FieldRemotePort, kNum, 0xffff, 0},
	{"icmp.Type", filter.FieldICMPType, kNum, 255, 0}, {"icmp.Code", filter.FieldICMPCode, kNum, 255, 0},
	{"icmp.Checksum", filter.FieldICMPChecksum, kNum, 0xffff, 0}, {"icmp.Body", filter.FieldICMPBody, kNum, 0xffffffff, 0},
	{"icmpv6.Type", filter.FieldICMPv6Type, kNum, 255, 0}, {"icmpv6.Code", filter.FieldICMPv6Code, kNum, 255, 0},
	{"icmpv6.Checksum", filter.FieldICMPv6Checksum, kNum, 0xffff, 0}, {"icmpv6.Body", filter.FieldICMPv6Body, kNum, 0xffffffff, 0},
	{"tcp.SrcPort", filter.FieldTCPSrcPort, kNum, 0xffff, 0}, {"tcp.DstPort", filter.FieldTCPDstPort, kNum, 0xffff, 0},
	{"tcp.SeqNum", filter.FieldTCPSeqNum, kNum, 0xffffffff, 0}, {"tcp.AckNum", filter.FieldTCPAckNum, kNum, 0xffffffff, 0},
	{"tcp.HdrLength", filter.FieldTCPHdrLength, kNum, 15, 0},
	{"tcp.Urg", filter.FieldTCPUrg, kBool, 1, 0}, {"tcp.Ack", filter.FieldTCPAck, kBool, 1, 0},
	{"tcp.Psh", filter.FieldTCPPsh, kBool, 1, 0}, {"tcp.Rst", filter.FieldTCPRst, kBool, 1, 0},
	{"tcp.Syn", filter.FieldTCPSyn, kBool, 1, 0}, {"tcp.Fin", filter.FieldTCPFin, kBool, 1, 0},
	{"tcp.Window", filter.FieldTCPWindow, kNum, 0xffff, 0}, {"tcp.Checksum", filter.FieldTCPChecksum, kNum, 0xffff, 0},
	{"tcp.UrgPtr", filter.FieldTCPUrgPtr, kNum, 0xffff, 0}, {"tcp.PayloadLength", filter.FieldTCPPayloadLength, kNum, 64, 0},
	{"udp.SrcPort", filter.FieldUDPSrcPort, kNum, 0xffff, 0}, {"udp.DstPort", filter.FieldUDPDstPort, kNum, 0xffff, 0},
	{"udp.Length", filter.FieldUDPLength, kNum, 64, 0}, {"udp.Checksum", filter.FieldUDPChecksum, kNum, 0xffff, 0},
	{"udp.PayloadLength", filter.FieldUDPPayloadLength, kNum, 64, 0},
	{"packet", filter.FieldPacket, kArr, 0xff, 1}, {"packet16", filter.FieldPacket16, kArr, 0xffff, 2},
	{"packet32", filter.FieldPacket32, kArr, 0xffffffff, 4},
	// packet and packet16 twice: drawn twice as often.
	{"packet", filter.FieldPacket, kArr, 0xff, 1}, {"packet16", filter.FieldPacket16, kArr, 0xffff, 2},
	{"tcp.Payload", filter.FieldTCPPayload, kArr, 0xff, 1}, {"tcp.Payload16", filter.FieldTCPPayload16, kArr, 0xffff, 2},
	{"tcp.Payload32", filter.FieldTCPPayload32, kArr, 0xffffffff, 4},
	{"udp.Payload", filter.FieldUDPPayload, kArr, 0xff, 1}, {"udp.Payload16", filter.FieldUDPPayload16, kArr, 0xffff, 2},
	{"udp.Payload32", filter.FieldUDPPayload32, kArr, 0xffffffff, 4},
}

// fnode is a filter expression: a leaf (text), and, or, or ?:.
type fnode struct {
	op   string // "", "and", "or", "?"
	text string
	kids []*fnode
}

func (n *fnode) String() string {
	switch n.op {
	case "":
		return n.text
	case "?":
		return "(" + n.kids[0].String() + " ? " + n.kids[1].String() + " : " + n.kids[2].String() + ")"
	}
	return "(" + n.kids[0].String() + " " + n.op + " " + n.kids[1].String() + ")"
}

func (n *fnode) size() int {
	s := 1
	for _, k := range n.kids {
		s += k.size()
	}
	return s
}

type fgen struct {
	r    *rand.Rand
	pkts []namedPkt
	hook Hook
}

func (g *fgen) n(k int) int      { return g.r.IntN(k) }
func (g *fgen) p(x float64) bool { return g.r.Float64() < x }

var diffOps = []string{"==", "=", "!=", "<", "<=", ">", ">="}

func (g *fgen) num(v uint64) string {
	switch g.n(3) {
	case 0:
		return fmt.Sprintf("0x%x", v)
	}
	return strconv.FormatUint(v, 10)
}

// sample is the value of field s (at index idx) in a random packet, when
// the reference evaluator knows it.
func (g *fgen) sample(s fspec, idx int32) (uint64, bool) {
	for try := 0; try < 6; try++ {
		p := g.pkts[g.n(len(g.pkts))].b
		pi, ok := parse(p)
		if !ok {
			continue
		}
		v, present, known := value(&pi, env{hook: g.hook, ifIdx: 1, lo: true}, filter.Cond{Field: s.f, Index: idx})
		if known && present && v.hi == 0 {
			if s.kind == kAddr4 || s.kind == kAddr && v.lo>>32 == 0xffff {
				v.lo &= 0xffffffff
			}
			return v.lo, true
		}
	}
	return 0, false
}

func (g *fgen) value(s fspec, idx int32) string {
	if g.p(0.08) {
		return "-" + strconv.Itoa(g.n(3)*(1+g.n(100)))
	}
	if v, ok := g.sample(s, idx); ok && g.p(0.6) {
		switch g.n(6) {
		case 0:
			v++
		case 1:
			if v > 0 {
				v--
			}
		}
		return g.num(v)
	}
	switch g.n(8) {
	case 0:
		return "0"
	case 1:
		return "1"
	case 2:
		return g.num(s.max)
	case 3:
		return g.num(s.max + 1 + uint64(g.n(70000)))
	case 4:
		return g.num(0xffffffff)
	}
	return g.num(g.r.Uint64N(s.max + 1))
}

var (
	diffAddr4 = []string{"10.77.0.1", "10.77.0.2", "10.77.0.0", "10.77.0.255", "0.0.0.0", "255.255.255.255", "192.0.2.7", "10.77.0.3"}
	diffAddr6 = []string{"fd00:77::1", "fd00:77::2", "::", "::1", "::ffff:10.77.0.2", "fd00:77::ffff", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "fe80::1234", "2001:db8::7", "fd00:77::3"}
)

func (g *fgen) addr(k fkind) string {
	if k == kAddr {
		k = []fkind{kAddr4, kAddr6}[g.n(2)]
	}
	if g.p(0.1) {
		k ^= kAddr4 ^ kAddr6 // the other family now and then
	}
	if g.p(0.05) {
		return g.num(uint64(g.n(70000)))
	}
	if k == kAddr4 {
		return diffAddr4[g.n(len(diffAddr4))]
	}
	return diffAddr6[g.n(len(diffAddr6))]
}

func (g *fgen) leaf() *fnode {
	if g.p(0.04) {
		return &fnode{text: []string{"true", "false"}[g.n(2)]}
	}
	s := diffFields[g.n(len(diffFields))]
	name := s.name
	var idx int32
	if s.kind == kArr {
		switch i := g.n(10); {
		case i == 0: // negative: from the end
			k := 1 + g.n(24)
			name += fmt.Sprintf("[-%d]", k)
			idx = int32(-k * s.size)
		case i == 1: // beyond what the kernel can load, or far out
			k := 240 + g.n(40)
			name += fmt.Sprintf("[%db]", k)
			idx = int32(k)
		case i < 5 && s.size > 1: // byte index
			k := g.n(72)
			name += fmt.Sprintf("[%db]", k)
			idx = int32(k)
		default:
			k := g.n(72 / s.size)
			name += fmt.Sprintf("[%d]", k)
			idx = int32(k * s.size)
		}
	}
	var val string
	switch s.kind {
	case kBool:
		switch g.n(4) {
		case 0:
			return &fnode{text: name}
		case 1:
			return &fnode{text: []string{"not ", "!"}[g.n(2)] + name}
		}
		val = []string{"0", "1", "2", "-1", "1", "0"}[g.n(6)]
	case kAddr4, kAddr6, kAddr:
		val = g.addr(s.kind)
	default:
		if g.p(0.05) && s.kind != kArr {
			return &fnode{text: name} // numeric field alone: != 0
		}
		val = g.value(s, idx)
	}
	return &fnode{text: name + " " + diffOps[g.n(len(diffOps))] + " " + val}
}

// object returns, now and then, a filter object of one test with a value
// at or past the edges of the field's range: the driver runs an object's
// tests as they are, where compiled text has such comparisons folded (the
// lowering then sees comparisons that text never gives it). Nil when the
// field is not numeric, or its number cannot be read off its text.
func (g *fgen) object() *fnode {
	s := diffFields[g.n(len(diffFields))]
	for g.p(0.5) && s.kind != kArr {
		s = diffFields[g.n(len(diffFields))] // arrays half the time: presence is their own
	}
	if s.kind != kNum && s.kind != kArr && s.kind != kBool {
		return nil
	}
	f, err := filter.Compile(s.name+" == 0", filter.LayerNetwork)
	if err != nil {
		return nil
	}
	obj := f.Object() // "@WinDiv_" 0 1 "_" field ...
	if !strings.HasPrefix(obj, "@WinDiv_WX_") {
		return nil // folded away, or more than one test
	}
	field, ok := objNumber(obj[len("@WinDiv_WX_"):])
	if !ok {
		return nil
	}
	var idx int32
	if s.kind == kArr {
		idx = []int32{0, 1, 3, 8, 20, 32, 40, 60, 300, -1, -2, -4, -8, -40}[g.n(14)]
	}
	var val uint64
	neg := false
	switch g.n(6) {
	case 0:
		val = 0
	case 1:
		val = s.max
	case 2:
		val = s.max + 1
	case 3:
		val = 0xffffffff
	case 4:
		val, neg = uint64(1+g.n(200)), true
	default:
		if v, ok := g.sample(s, idx); ok {
			val = v
		}
	}
	b := []byte("@WinDiv_WX_")
	b = objPut(b, field)
	b = objPut(b, uint32(g.n(6))) // ==, !=, <, <=, >, >=
	b = objPut(b, uint32(b2i(neg)))
	b = objPut(b, uint32(val))
	if s.kind == kArr {
		b = objPut(b, uint32(idx+0xFFFF))
	}
	b = append(b, 'A', 'X')
	return &fnode{text: string(b)}
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// objDigits are the digits of WinDivert's filter objects: 5 bits each,
// the last of a number from the second half.
const objDigits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+="

// objPut appends v in the object encoding (WinDivertSerializeNumber).
func objPut(b []byte, v uint32) []byte {
	var ds []byte
	for {
		ds = append(ds, byte(v&0x1F))
		v >>= 5
		if v == 0 {
			break
		}
	}
	for i := len(ds) - 1; i >= 0; i-- {
		k := ds[i]
		if i == 0 {
			k += 32
		}
		b = append(b, objDigits[k])
	}
	return b
}

// objNumber reads the number at the start of s.
func objNumber(s string) (uint32, bool) {
	var v uint32
	for i := 0; i < len(s) && i < 7; i++ {
		k := strings.IndexByte(objDigits, s[i])
		if k < 0 {
			return 0, false
		}
		v = v<<5 | uint32(k&0x1F)
		if k >= 32 {
			return v, true
		}
	}
	return 0, false
}

func (g *fgen) expr(depth int) *fnode {
	if depth == 0 || g.p(0.3) {
		return g.leaf()
	}
	switch g.n(10) {
	case 0: // negation of an expression: WinDivert's "not" only takes a test
		return &fnode{op: "?", kids: []*fnode{g.expr(depth - 1), {text: "false"}, {text: "true"}}}
	case 1:
		return &fnode{op: "?", kids: []*fnode{g.expr(depth - 1), g.expr(depth - 1), g.expr(depth - 1)}}
	case 2, 3, 4, 5:
		return &fnode{op: "and", kids: []*fnode{g.expr(depth - 1), g.expr(depth - 1)}}
	}
	return &fnode{op: "or", kids: []*fnode{g.expr(depth - 1), g.expr(depth - 1)}}
}

// --- the test ---

type mismatch struct {
	filter *fnode
	f      *filter.Filter
	pkt    []byte
	name   string
	miss   bool // the filter matches, the kernel does not select
}

func (m mismatch) kind() string {
	if m.miss {
		return "kernel miss (bypass)"
	}
	return "exact rules select too much"
}

// still reports whether filter text shows a mismatch of kind miss on each
// packet.
func (d *dbed) still(t *testing.T, text string, miss bool, pkts [][]byte) []bool {
	out := make([]bool, len(pkts))
	f, err := filter.Compile(text, filter.LayerNetwork)
	if err != nil {
		return out
	}
	sel, arrived, exact, err := d.kernelSelects(t, f, pkts)
	if err != nil {
		return out
	}
	for i, p := range pkts {
		if !arrived[i] {
			continue
		}
		bad, isMiss := wrong(f.Match(p, d.meta(p)), sel[i], exact, p)
		out[i] = bad && isMiss == miss
	}
	return out
}

// shrinkFilter returns the smaller filters one step from n.
func shrinkFilter(n *fnode) []*fnode {
	var out []*fnode
	if n.op != "" {
		out = append(out, n.kids...)
		for i, k := range n.kids {
			for _, s := range shrinkFilter(k) {
				c := &fnode{op: n.op, kids: append([]*fnode(nil), n.kids...)}
				c.kids[i] = s
				out = append(out, c)
			}
		}
	}
	return out
}

// minimizeInstall shrinks a filter whose rules do not install.
func (d *dbed) minimizeInstall(n *fnode) *fnode {
	fails := func(c *fnode) bool {
		f, err := filter.Compile(c.String(), filter.LayerNetwork)
		if err != nil {
			return false
		}
		r, err := d.install(f)
		if err == nil {
			r.Close()
			return false
		}
		return true
	}
	for progress := true; progress; {
		progress = false
		cands := shrinkFilter(n)
		sort.SliceStable(cands, func(i, j int) bool { return cands[i].size() < cands[j].size() })
		for _, c := range cands {
			if fails(c) {
				n, progress = c, true
				break
			}
		}
	}
	return n
}

// minimize shrinks m's filter, then its packet, keeping the mismatch and
// the packet's class (diffQuirk).
func (d *dbed) minimize(t *testing.T, m mismatch) mismatch {
	deadline := time.Now().Add(diffMinBudget / diffMinimize)
	quirk := diffQuirk(m.pkt)
	for progress := true; progress && time.Now().Before(deadline); {
		progress = false
		cands := shrinkFilter(m.filter)
		sort.SliceStable(cands, func(i, j int) bool { return cands[i].size() < cands[j].size() })
		for _, c := range cands {
			if d.still(t, c.String(), m.miss, [][]byte{m.pkt})[0] {
				m.filter, progress = c, true
				break
			}
		}
	}
	text := m.filter.String()
	v6 := m.pkt[0]>>4 == 6
	keep := func(i int) bool {
		return i == 0 || !v6 && i >= 16 && i < 20 || v6 && i >= 24 && i < 40
	}
	for progress := true; progress && time.Now().Before(deadline); {
		progress = false
		var cands [][]byte
		lo := 20
		if v6 {
			lo = 40
		}
		for l := lo; l < len(m.pkt); l++ {
			cands = append(cands, diffNormalize(append([]byte(nil), m.pkt[:l]...)))
		}
		for i := range m.pkt {
			if m.pkt[i] != 0 && !keep(i) && !(!v6 && (i == 2 || i == 3 || i == 10 || i == 11)) && !(v6 && (i == 4 || i == 5)) {
				c := append([]byte(nil), m.pkt...)
				c[i] = 0
				cands = append(cands, diffNormalize(c))
			}
		}
		for len(cands) > 0 && !progress {
			batch := cands[:min(len(cands), d.nmarks)]
			cands = cands[len(batch):]
			for i, ok := range d.still(t, text, m.miss, batch) {
				if ok && diffQuirk(batch[i]) == quirk {
					m.pkt, progress = batch[i], true
					break
				}
			}
		}
	}
	if f, err := filter.Compile(text, filter.LayerNetwork); err == nil {
		m.f = f
	}
	return m
}

// TestDiffRandomFilters is the randomized differential test: with a fixed
// seed (DIVERT_DIFF_SEED and DIVERT_DIFF_FILTERS override the seed and the
// number of filters), about 500 packets that reach prerouting against 200
// random filters. A mismatch is minimised and reported with its filter and
// packet.
func TestDiffRandomFilters(t *testing.T) {
	seed := uint64(diffSeed)
	if s := os.Getenv("DIVERT_DIFF_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 0, 64)
	}
	nfilters := diffFilters
	if s := os.Getenv("DIVERT_DIFF_FILTERS"); s != "" {
		nfilters, _ = strconv.Atoi(s)
	}
	// Prerouting gets the most filters; input and output, where the
	// handle's rules go (output is also where loopback traffic is seen),
	// half as many each, with the direction-dependent fields (inbound,
	// localAddr, remotePort...) decided the other way at output.
	for _, h := range []struct {
		hook Hook
		n    int
	}{{HookPrerouting, nfilters}, {HookInput, (nfilters + 1) / 2}, {HookOutput, (nfilters + 1) / 2}} {
		t.Run(h.hook.String(), func(t *testing.T) {
			diffRun(t, h.hook, seed+uint64(h.hook), h.n)
		})
	}
}

// diffRun is TestDiffRandomFilters at one hook.
func diffRun(t *testing.T, hook Hook, seed uint64, nfilters int) {
	start := time.Now()
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	d := newDiffBed(t, hook)
	all := diffPackets(r)
	pkts := d.reaching(t, all)
	var raw [][]byte
	var v4, v6 int
	for _, p := range pkts {
		raw = append(raw, p.b)
		if p.b[0]>>4 == 4 {
			v4++
		} else {
			v6++
		}
	}
	t.Logf("seed %#x: %d packets generated, %d reach %s (%d IPv4, %d IPv6)", seed, len(all), len(pkts), hook, v4, v6)

	g := &fgen{r: r, pkts: pkts, hook: hook}
	var mism []mismatch
	checked, compileErr, exactN, pairs := 0, 0, 0, 0
	var installErr []*fnode
	var perFilter [][]mismatch
	for i := 0; i < nfilters; i++ {
		var n *fnode
		if g.p(0.1) {
			n = g.object() // an object is a whole filter: never inside text
		}
		if n == nil {
			n = g.expr(1 + g.n(3))
		}
		text := n.String()
		f, err := filter.Compile(text, filter.LayerNetwork)
		if err != nil {
			compileErr++
			continue
		}
		checked++
		sel, arrived, exact, err := d.kernelSelects(t, f, raw)
		if err != nil {
			installErr = append(installErr, n)
			continue
		}
		for j := range raw {
			if !arrived[j] {
				t.Fatalf("%s never reached %s: %x", pkts[j].name, hook, raw[j])
			}
		}
		if exact {
			exactN++
		}
		lw := f.Lower()
		var these []mismatch
		for j, p := range pkts {
			pairs++
			want := f.Match(p.b, d.meta(p.b))
			if bad, miss := wrong(want, sel[j], exact, p.b); bad {
				these = append(these, mismatch{n, f, p.b, p.name, miss})
			}
			if lw.Exact && lw.Match(p.b, d.meta(p.b)) != want {
				t.Errorf("filter.Lower is exact but differs from Match: %q on %s (%x)", text, p.name, p.b)
			}
		}
		if len(these) > 0 {
			perFilter = append(perFilter, these)
			mism = append(mism, these...)
		}
	}
	t.Logf("%d filters checked (%d exact), %d did not compile, %d did not install, %d filter×packet pairs, %d mismatches in %d filters, %v",
		checked, exactN, compileErr, len(installErr), pairs, len(mism), len(perFilter), time.Since(start).Round(time.Millisecond))

	// Filters that compile but whose rules the kernel refuses: minimise.
	for k, n := range installErr {
		if k >= 3 {
			break
		}
		n = d.minimizeInstall(n)
		f := filter.MustCompile(n.String(), filter.LayerNetwork)
		_, err := d.install(f)
		t.Errorf("install failure: filter %q (normalized %q): %v", n.String(), f.String(), err)
	}

	// Group the mismatches by kind and by the packet's known parsing
	// difference, and minimise a few of each group (from distinct filters).
	type group struct {
		n       int
		filters map[string]bool
		first   []mismatch
	}
	groups := map[string]*group{}
	var keys []string
	for _, these := range perFilter {
		seen := map[string]bool{}
		for _, m := range these {
			key := m.kind() + " | " + diffQuirk(m.pkt)
			gr := groups[key]
			if gr == nil {
				gr = &group{filters: map[string]bool{}}
				groups[key] = gr
				keys = append(keys, key)
			}
			gr.n++
			gr.filters[m.filter.String()] = true
			if !seen[key] {
				seen[key] = true
				gr.first = append(gr.first, m)
			}
		}
	}
	sort.Strings(keys)
	for _, key := range keys {
		gr := groups[key]
		t.Logf("GROUP %s: %d mismatches in %d filters", key, gr.n, len(gr.filters))
	}
	budget := diffMinimize
	for _, key := range keys {
		gr := groups[key]
		lim := 3
		done := map[string]bool{}
		for _, m := range gr.first {
			if lim == 0 || budget == 0 {
				break
			}
			lim--
			budget--
			m = d.minimize(t, m)
			text := m.filter.String()
			if done[text] {
				continue
			}
			done[text] = true
			want := m.f.Match(m.pkt, d.meta(m.pkt))
			lw := m.f.Lower()
			t.Errorf("mismatch [%s] (now %s): filter %q (normalized %q), packet (from %s) %s\n\tMatch=%v, Lower().Match=%v, Lower().Exact=%v; queueing rules as Open installs them select it: %v",
				key, diffQuirk(m.pkt), text, m.f.String(), m.name, hex.EncodeToString(m.pkt), want,
				lw.Match(m.pkt, d.meta(m.pkt)), lw.Exact, d.queueSelects(t, m.f, m.pkt))
		}
	}
}

// diffQuirk names the known difference between WinDivert's and the kernel's
// parse of an IPv6 packet's extension headers, or "none".
func diffQuirk(p []byte) string {
	if p[0]>>4 != 6 || len(p) < 40 {
		return "none"
	}
	nh, off, end := p[6], 40, len(p)
	var q []string
	for {
		switch nh {
		case 0, 43, 60, 51, 44:
		default:
			if len(q) == 0 {
				return "none"
			}
			return strings.Join(q, ", ")
		}
		if end-off < 2 {
			return strings.Join(append(q, "header cut short"), ", ")
		}
		hl := (int(p[off+1]) + 1) * 8
		switch nh {
		case 51:
			hl = (int(p[off+1]) + 2) * 4
			if len(q) == 0 || q[len(q)-1] != "AH" {
				q = append(q, "AH")
			}
		case 44:
			hl = 8
		}
		if end-off < hl {
			return strings.Join(append(q, "header cut short"), ", ")
		}
		if nh == 44 && binary.BigEndian.Uint16(p[off+2:])&0xfff8 != 0 {
			switch p[off] {
			case 0, 43, 60, 51, 44:
				q = append(q, "non-first fragment before an extension header")
			}
			if len(q) == 0 {
				return "none"
			}
			return strings.Join(q, ", ")
		}
		nh, off = p[off], off+hl
	}
}
