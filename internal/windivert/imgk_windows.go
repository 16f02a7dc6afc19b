package windivert

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	imgk "github.com/imgk/divert-go"
	"golang.org/x/sys/windows"
)

// The DLL is loaded by us, once, and a failure is returned by every Open
// (imgk's own loader panics on the second Open after a failed load).
// WinDivertOpen is called through the proc directly: imgk's non-cgo Open
// rejects priorities beyond ±3000, WinDivert takes ±30000. imgk's Handle
// methods only issue DeviceIoControl and never touch its DLL procs.
var (
	loadOnce sync.Once
	loadErr  error
	procOpen *windows.Proc
)

func load() error {
	loadOnce.Do(func() {
		var dll *windows.DLL
		// Prefer the DLL next to the executable (no search-path preloading).
		if exe, err := os.Executable(); err == nil {
			p := filepath.Join(filepath.Dir(exe), "WinDivert.dll")
			if _, err := os.Stat(p); err == nil {
				dll, loadErr = windows.LoadDLL(p)
			}
		}
		if dll == nil && loadErr == nil {
			dll, loadErr = windows.LoadDLL("WinDivert.dll")
		}
		if loadErr != nil {
			loadErr = fmt.Errorf("load WinDivert.dll (put WinDivert.dll and the .sys driver next to the executable): %w", loadErr)
			return
		}
		procOpen, loadErr = dll.FindProc("WinDivertOpen")
		if loadErr != nil {
			loadErr = fmt.Errorf("WinDivert.dll has no WinDivertOpen (not WinDivert 2.x?): %w", loadErr)
		}
	})
	return loadErr
}

// overlapped returns the address of one of imgk.Handle's unexported
// OVERLAPPED fields, checking its type, so that the events can be created
// for a handle opened here and a pending receive cancelled alone.
func overlapped(h *imgk.Handle, name string) (*windows.Overlapped, error) {
	v := reflect.ValueOf(h).Elem().FieldByName(name)
	if !v.IsValid() || v.Type() != reflect.TypeOf(windows.Overlapped{}) {
		return nil, fmt.Errorf("imgk/divert-go Handle has no %s OVERLAPPED field (unsupported version)", name)
	}
	return (*windows.Overlapped)(unsafe.Pointer(v.UnsafeAddr())), nil
}

type imgkHandle struct {
	h      *imgk.Handle
	rOv    *windows.Overlapped
	recvMu sync.Mutex // imgk shares one OVERLAPPED per direction
	sendMu sync.Mutex
	// closed is set by Close before it waits for the I/O in progress: a
	// call that takes its mutex afterwards fails instead of issuing I/O on
	// a handle that is closed (or whose value Windows gave to another).
	closed atomic.Bool
}

// Open opens a WinDivert handle. filter is WinDivert's filter text.
func Open(filter string, layer uint8, priority int16, flags uint64) (Handle, error) {
	if err := load(); err != nil {
		return nil, err
	}
	fp, err := windows.BytePtrFromString(filter)
	if err != nil {
		return nil, err
	}
	var r uintptr
	var e error
	if unsafe.Sizeof(uintptr(0)) == 4 {
		// 386: the UINT64 flags take two stack slots, low word first.
		r, _, e = procOpen.Call(uintptr(unsafe.Pointer(fp)), uintptr(layer), uintptr(priority), uintptr(uint32(flags)), uintptr(flags>>32))
	} else {
		r, _, e = procOpen.Call(uintptr(unsafe.Pointer(fp)), uintptr(layer), uintptr(priority), uintptr(flags))
	}
	// WinDivertOpen returns FALSE (0), not INVALID_HANDLE_VALUE, when its
	// own heap allocation fails (dll/windivert.c).
	if windows.Handle(r) == windows.InvalidHandle || r == 0 {
		var errno windows.Errno
		if !errors.As(e, &errno) {
			return nil, fmt.Errorf("WinDivertOpen: %w", e)
		}
		return nil, errno
	}
	h := &imgk.Handle{Handle: windows.Handle(r)}
	ih := &imgkHandle{h: h}
	for _, name := range []string{"rOverlapped", "wOverlapped"} {
		ov, err := overlapped(h, name)
		if err == nil {
			ov.HEvent, err = windows.CreateEvent(nil, 0, 0, nil)
		}
		if err != nil {
			h.Close()
			return nil, err
		}
		if name == "rOverlapped" {
			ih.rOv = ov
		}
	}
	return ih, nil
}

// errnoOf converts imgk's error type back to windows.Errno; it allocates
// nothing for nil (every successful call) or an imgk.Error itself.
func errnoOf(err error) error {
	switch e := err.(type) {
	case nil:
		return nil
	case imgk.Error:
		return windows.Errno(e)
	}
	var e imgk.Error
	if errors.As(err, &e) {
		return windows.Errno(e)
	}
	return err
}

func asImgk(addrs []RawAddr) []imgk.Address {
	if len(addrs) == 0 {
		return nil
	}
	return unsafe.Slice((*imgk.Address)(unsafe.Pointer(&addrs[0])), len(addrs))
}

func (h *imgkHandle) RecvEx(buf []byte, addrs []RawAddr) (int, int, error) {
	if len(buf) == 0 || len(addrs) == 0 { // imgk indexes [0] unchecked
		return 0, 0, windows.ERROR_INVALID_PARAMETER
	}
	h.recvMu.Lock()
	defer h.recvMu.Unlock()
	if h.closed.Load() {
		return 0, 0, windows.ERROR_INVALID_HANDLE
	}
	n, c, err := h.h.RecvEx(buf, asImgk(addrs))
	return int(n), int(c), errnoOf(err)
}

func (h *imgkHandle) SendEx(buf []byte, addrs []RawAddr) (int, error) {
	if len(buf) == 0 || len(addrs) == 0 {
		return 0, windows.ERROR_INVALID_PARAMETER
	}
	h.sendMu.Lock()
	defer h.sendMu.Unlock()
	if h.closed.Load() {
		return 0, windows.ERROR_INVALID_HANDLE
	}
	n, err := h.h.SendEx(buf, asImgk(addrs))
	return int(n), errnoOf(err)
}

func (h *imgkHandle) CancelRecv() error {
	if h.closed.Load() {
		return nil // Close cancels and waits itself
	}
	err := windows.CancelIoEx(h.h.Handle, h.rOv)
	if err == windows.ERROR_NOT_FOUND {
		return nil // nothing pending
	}
	return err
}

// Shutdown passes how as WinDivert numbers it (1 recv, 2 send, 3 both):
// imgk's Shutdown constants are off by one (0, 1, 2).
func (h *imgkHandle) Shutdown(how uint32) error {
	if h.closed.Load() {
		return windows.ERROR_INVALID_HANDLE
	}
	return errnoOf(h.h.Shutdown(imgk.Shutdown(how)))
}

func (h *imgkHandle) GetParam(p uint32) (uint64, error) {
	if h.closed.Load() {
		return 0, windows.ERROR_INVALID_HANDLE
	}
	v, err := h.h.GetParam(imgk.Param(p))
	return v, errnoOf(err)
}

func (h *imgkHandle) SetParam(p uint32, v uint64) error {
	if h.closed.Load() {
		return windows.ERROR_INVALID_HANDLE
	}
	return errnoOf(h.h.SetParam(imgk.Param(p), v))
}

// Close cancels pending I/O, waits for it to return, then closes.
// CancelIoEx reaches only I/O already issued, and a receive may hold
// recvMu without having issued its DeviceIoControl yet: Close cancels again
// until it has the receive side (that receive then finds closed set, or
// its I/O is cancelled).
func (h *imgkHandle) Close() error {
	if h.closed.Swap(true) {
		return windows.ERROR_INVALID_HANDLE
	}
	for !h.recvMu.TryLock() {
		_ = windows.CancelIoEx(h.h.Handle, nil)
		time.Sleep(time.Millisecond)
	}
	h.sendMu.Lock()
	defer h.recvMu.Unlock()
	defer h.sendMu.Unlock()
	return errnoOf(h.h.Close())
}
