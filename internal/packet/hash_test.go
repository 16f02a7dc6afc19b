package packet

import (
	"encoding/hex"
	"encoding/json"
	"os"
	"strconv"
	"testing"
)

type hashVector struct {
	Name     string `json:"packet_name"`
	Hex      string `json:"packet_hex"`
	Seed     int64  `json:"seed_timestamp"`
	Hash64   string `json:"hash64"`
	Random8  uint64 `json:"random8"`
	Random16 uint64 `json:"random16"`
	Random32 uint64 `json:"random32"`
}

func loadHashVectors(t testing.TB) []hashVector {
	t.Helper()
	data, err := os.ReadFile("testdata/windivert-hash-vectors.json")
	if err != nil {
		t.Fatal(err)
	}
	var vs []hashVector
	if err := json.Unmarshal(data, &vs); err != nil {
		t.Fatal(err)
	}
	if len(vs) != 40 {
		t.Fatalf("got %d hash vectors, want 40", len(vs))
	}
	return vs
}

func TestHashVectors(t *testing.T) {
	for _, v := range loadHashVectors(t) {
		b, err := hex.DecodeString(v.Hex)
		if err != nil {
			t.Fatal(err)
		}
		want, err := strconv.ParseUint(v.Hash64, 16, 64)
		if err != nil {
			t.Fatal(err)
		}
		got := Hash(b, uint64(v.Seed))
		if got != want {
			t.Errorf("%s seed %d: Hash = %016x, want %016x", v.Name, v.Seed, got, want)
		}
		var p Info
		if err := Parse(b, &p); err != nil {
			t.Fatalf("%s: %v", v.Name, err)
		}
		r := HashInfo(b, &p, uint64(v.Seed)) | 0xFF00000000000000
		if r8, r16, r32 := (r>>48)&0xFF, (r>>32)&0xFFFF, r&0xFFFFFFFF; r8 != v.Random8 || r16 != v.Random16 || r32 != v.Random32 {
			t.Errorf("%s seed %d: random8/16/32 = %d/%d/%d, want %d/%d/%d", v.Name, v.Seed, r8, r16, r32, v.Random8, v.Random16, v.Random32)
		}
	}
}

func TestHashUnparsable(t *testing.T) {
	b, _ := hex.DecodeString("4500005412344000400100000a0000010808080808003cd20d5600018ba6605400000000f9080a0000000000101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031323334353637")
	if h := Hash(b, 1); h == 0 {
		t.Fatal("Hash of a valid packet is 0")
	}
	// Truncated: WinDivertHelperHashPacket fails (returns 0).
	if h := Hash(b[:len(b)-1], 1); h != 0 {
		t.Errorf("Hash(truncated) = %x, want 0", h)
	}
	if h := Hash(b[:19], 1); h != 0 {
		t.Errorf("Hash(19 bytes) = %x, want 0", h)
	}
	b[0] = 0x55
	if h := Hash(b, 1); h != 0 {
		t.Errorf("Hash(version 5) = %x, want 0", h)
	}
}
