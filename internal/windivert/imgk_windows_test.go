package windivert

import (
	"errors"
	"strings"
	"testing"
	"unsafe"

	imgk "github.com/imgk/divert-go"
	"golang.org/x/sys/windows"
)

// imgk's Address must be the 80-byte WINDIVERT_ADDRESS that RawAddr is
// reinterpreted as.
func TestImgkAddressSize(t *testing.T) {
	if s := unsafe.Sizeof(imgk.Address{}); s != AddrSize {
		t.Fatalf("imgk.Address is %d bytes, want %d", s, AddrSize)
	}
	addrs := make([]RawAddr, 3)
	a := asImgk(addrs)
	if len(a) != 3 || unsafe.Pointer(&a[2]) != unsafe.Pointer(&addrs[2]) {
		t.Fatal("asImgk does not alias the RawAddr slice")
	}
	if asImgk(nil) != nil {
		t.Fatal("asImgk(nil) != nil")
	}
}

// The OVERLAPPED fields Open reaches by reflection exist in imgk v0.1.0 and
// are the ones its Handle uses.
func TestImgkOverlapped(t *testing.T) {
	h := &imgk.Handle{}
	for _, name := range []string{"rOverlapped", "wOverlapped"} {
		ov, err := overlapped(h, name)
		if err != nil {
			t.Fatal(err)
		}
		ov.HEvent = windows.Handle(0x1234)
	}
	r, _ := overlapped(h, "rOverlapped")
	w, _ := overlapped(h, "wOverlapped")
	if r == w || r.HEvent != 0x1234 || w.HEvent != 0x1234 {
		t.Fatal("overlapped fields alias each other or do not stick")
	}
	if _, err := overlapped(h, "Handle"); err == nil {
		t.Fatal("a non-OVERLAPPED field accepted")
	}
}

// Empty buffers and address slices are refused before imgk indexes them.
func TestImgkEmptyGuards(t *testing.T) {
	h := &imgkHandle{h: &imgk.Handle{Handle: windows.InvalidHandle}}
	if _, _, err := h.RecvEx(nil, make([]RawAddr, 1)); Code(err) != ErrorInvalidParameter {
		t.Errorf("RecvEx(nil buf): %v", err)
	}
	if _, _, err := h.RecvEx(make([]byte, 10), nil); Code(err) != ErrorInvalidParameter {
		t.Errorf("RecvEx(no addrs): %v", err)
	}
	if _, err := h.SendEx(nil, make([]RawAddr, 1)); Code(err) != ErrorInvalidParameter {
		t.Errorf("SendEx(nil buf): %v", err)
	}
	if _, err := h.SendEx(make([]byte, 20), nil); Code(err) != ErrorInvalidParameter {
		t.Errorf("SendEx(no addrs): %v", err)
	}
}

// Where WinDivert.dll cannot be loaded, every Open says so with the same
// error instead of panicking on the second call as imgk's loader does.
func TestOpenWithoutDLL(t *testing.T) {
	if _, err := windows.LoadDLL("WinDivert.dll"); err == nil {
		// A machine with WinDivert installed: the loader must succeed too.
		if err := load(); err != nil {
			t.Fatalf("WinDivert.dll loads but load() fails: %v", err)
		}
		return
	}
	var first error
	for i := 0; i < 2; i++ {
		h, err := Open("true", LayerNetwork, 0, 0)
		if h != nil || err == nil {
			t.Fatalf("Open %d succeeded without WinDivert.dll", i)
		}
		if !strings.Contains(err.Error(), "WinDivert.dll") {
			t.Fatalf("Open %d: %v", i, err)
		}
		var errno windows.Errno
		if !errors.As(err, &errno) || errno != windows.ERROR_MOD_NOT_FOUND {
			t.Errorf("Open %d: %v does not wrap ERROR_MOD_NOT_FOUND", i, err)
		}
		if i == 1 && err != first {
			t.Errorf("second Open: %v, first %v", err, first)
		}
		first = err
	}
}
