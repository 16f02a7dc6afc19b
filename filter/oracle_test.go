package filter

import (
	"encoding/hex"
	"encoding/json"
	"os"
	"strconv"
	"testing"
)

type oracleRow struct {
	Filter         string `json:"filter"`
	PacketHex      string `json:"packet_hex"`
	Match          bool   `json:"match"`
	PacketName     string `json:"packet_name"`
	TestIndex      int    `json:"test_index"`
	Nondeterminist bool   `json:"nondeterministic"`
	MatchTS0       *bool  `json:"oracle_match_timestamp0"`
}

func loadOracle(t testing.TB) []oracleRow {
	t.Helper()
	b, err := os.ReadFile("testdata/windivert-filter-cases.json")
	if err != nil {
		t.Fatal(err)
	}
	var rows []oracleRow
	if err := json.Unmarshal(b, &rows); err != nil {
		t.Fatal(err)
	}
	if len(rows) != 241 {
		t.Fatalf("oracle has %d rows, want 241", len(rows))
	}
	return rows
}

// TestOracle runs WinDivert's own test table (test/test.c): every
// deterministic row must agree, and the random* rows must agree with
// WinDivert's result at timestamp 0.
func TestOracle(t *testing.T) {
	var det, rnd int
	for _, r := range loadOracle(t) {
		pkt, err := hex.DecodeString(r.PacketHex)
		if err != nil {
			t.Fatal(err)
		}
		f, err := Compile(r.Filter, LayerNetwork)
		if err != nil {
			t.Errorf("#%d %q: %v", r.TestIndex, r.Filter, err)
			continue
		}
		meta := &Meta{Layer: LayerNetwork, Outbound: true, IPv6: pkt[0]>>4 == 6}
		want := r.Match
		if r.Nondeterminist {
			if r.MatchTS0 == nil {
				t.Fatalf("#%d: random row without oracle_match_timestamp0", r.TestIndex)
			}
			want = *r.MatchTS0
			rnd++
		} else {
			det++
		}
		got, err := f.Eval(pkt, meta)
		if err != nil {
			t.Errorf("#%d %q on %s: %v", r.TestIndex, r.Filter, r.PacketName, err)
			continue
		}
		if got != want {
			t.Errorf("#%d %q on %s: got %v, want %v (normalized %q)", r.TestIndex, r.Filter, r.PacketName, got, want, f.String())
		}
		if m := f.Match(pkt, meta); m != got {
			t.Errorf("#%d %q: Match %v, Eval %v", r.TestIndex, r.Filter, m, got)
		}
		// The normalized text must be the same filter.
		g, err := Compile(f.String(), LayerNetwork)
		if err != nil {
			t.Errorf("#%d %q: String %q does not compile: %v", r.TestIndex, r.Filter, f.String(), err)
			continue
		}
		if g.String() != f.String() {
			t.Errorf("#%d: String not stable: %q -> %q", r.TestIndex, f.String(), g.String())
		}
		if m := g.Match(pkt, meta); m != got {
			t.Errorf("#%d %q: recompiled String %q gives %v, want %v", r.TestIndex, r.Filter, f.String(), m, got)
		}
	}
	if det != 225 || rnd != 16 {
		t.Errorf("ran %d deterministic and %d random rows, want 225 and 16", det, rnd)
	}
}

type hashRow struct {
	PacketName string `json:"packet_name"`
	PacketHex  string `json:"packet_hex"`
	Seed       int64  `json:"seed_timestamp"`
	Random8    uint32 `json:"random8"`
	Random16   uint32 `json:"random16"`
	Random32   uint32 `json:"random32"`
}

// TestRandomVectors checks random8/16/32 against WinDivert's values: each
// field equals its recorded value for the recorded timestamp, and no other.
func TestRandomVectors(t *testing.T) {
	b, err := os.ReadFile("testdata/windivert-hash-vectors.json")
	if err != nil {
		t.Fatal(err)
	}
	var rows []hashRow
	if err := json.Unmarshal(b, &rows); err != nil {
		t.Fatal(err)
	}
	if len(rows) != 40 {
		t.Fatalf("%d hash vectors, want 40", len(rows))
	}
	for _, r := range rows {
		pkt, err := hex.DecodeString(r.PacketHex)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			field string
			want  uint32
		}{{"random8", r.Random8}, {"random16", r.Random16}, {"random32", r.Random32}} {
			eq := MustCompile(c.field+" == "+strconv.FormatUint(uint64(c.want), 10), LayerNetwork)
			ne := MustCompile(c.field+" == "+strconv.FormatUint(uint64(c.want^1), 10), LayerNetwork)
			m := &Meta{Outbound: true, Timestamp: r.Seed, IPv6: pkt[0]>>4 == 6}
			if !eq.Match(pkt, m) || ne.Match(pkt, m) {
				t.Errorf("%s seed %d: %s != %d", r.PacketName, r.Seed, c.field, c.want)
			}
		}
	}
}
