package nftrules

import (
	"encoding/binary"
	"testing"

	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/filter"
)

// decodeLowered turns fuzz bytes into a Lowered: each 12-byte record is one
// Cond (field, op, index, value, neg, end-of-term flag).
func decodeLowered(b []byte) *filter.Lowered {
	l := &filter.Lowered{Exact: len(b) > 0 && b[0]&1 == 1}
	var t filter.Term
	for len(b) >= 12 {
		c := filter.Cond{
			Field: filter.Field(b[0] % 90),
			Op:    filter.Op(b[1] % 7), // 6 is out of range on purpose
			Index: int32(int8(b[2])),
			Value: filter.Value{Lo: binary.LittleEndian.Uint64(b[3:11]), Neg: b[11]&1 == 1},
		}
		if b[11]&2 != 0 {
			c.Value.Hi = uint64(b[3])
		}
		t.Conds = append(t.Conds, c)
		if b[11]&4 != 0 {
			l.Terms = append(l.Terms, t)
			t = filter.Term{}
		}
		b = b[12:]
	}
	if len(t.Conds) > 0 {
		l.Terms = append(l.Terms, t)
	}
	return l
}

// FuzzLower: lowering any IR never panics, stays within its bounds, and
// every expression marshals.
func FuzzLower(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{byte(filter.FieldTCP), 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{byte(filter.FieldLocalPort), 1, 0, 80, 0, 0, 0, 0, 0, 0, 0, 4, byte(filter.FieldICMP), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{byte(filter.FieldIPSrcAddr), 3, 0, 1, 0, 0x4d, 0x0a, 0xff, 0xff, 0, 0, 0})
	f.Add([]byte{byte(filter.FieldPacket32), 5, 200, 1, 2, 3, 4, 0, 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		lw := decodeLowered(b)
		for _, h := range []Hook{HookPrerouting, HookInput, HookForward, HookOutput, HookPostrouting} {
			l := lowerer{hook: h}
			d := l.lower(lw)
			if len(d) > maxConjPerHook {
				t.Fatalf("%d conjunctions", len(d))
			}
			for _, c := range d {
				for _, e := range append(append([]expr.Any(nil), c.exprs...), concat(c.guards...)...) {
					if _, err := expr.Marshal(unix.NFPROTO_INET, e); err != nil {
						t.Fatalf("marshal %T: %v", e, err)
					}
				}
			}
		}
	})
}
