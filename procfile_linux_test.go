package divert

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
)

// TestProcFileReadAt checks the raw pread reader the reaper and Stats use
// (procFile): reads at an offset, io.EOF at the end, a closed descriptor's
// error, and readWhole growing its buffer until a 10,000-byte file fits.
func TestProcFileReadAt(t *testing.T) {
	want := make([]byte, 10000)
	for i := range want {
		want[i] = byte(i * 7)
	}
	path := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(path, want, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	fd, ok := procFileOf(f)
	if !ok {
		t.Fatal("no descriptor")
	}
	p := make([]byte, 100)
	if n, err := fd.ReadAt(p, 5000); err != nil || n != 100 || !bytes.Equal(p, want[5000:5100]) {
		t.Fatalf("ReadAt(100 bytes at 5000): %d, %v", n, err)
	}
	if n, err := fd.ReadAt(p, 9950); !errors.Is(err, io.EOF) || n != 50 || !bytes.Equal(p[:50], want[9950:]) {
		t.Fatalf("ReadAt(100 bytes at 9950): %d, %v; want the last 50 and io.EOF", n, err)
	}
	if n, err := fd.ReadAt(p, 10000); n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("ReadAt at the end: %d, %v; want io.EOF", n, err)
	}
	buf, size, err := readWhole(fd, make([]byte, 64))
	if err != nil || size != len(want) || !bytes.Equal(buf[:size], want) {
		t.Fatalf("readWhole: %d bytes, %v; want the whole %d-byte file", size, err, len(want))
	}
	f.Close()
	if _, err := fd.ReadAt(p, 0); err == nil {
		t.Fatal("ReadAt on a closed descriptor: no error")
	}
}
