package windivert

import (
	"errors"
	"sync"
	"syscall"
)

// Handle is what the Windows backend needs of an open WinDivert handle.
// Errors carry the Windows error code, which Code extracts.
type Handle interface {
	// RecvEx receives up to len(addrs) items packed back to back into buf
	// and returns the bytes used and the number of items. A first item
	// larger than buf is truncated and the error has code
	// ErrorInsufficientBuffer.
	RecvEx(buf []byte, addrs []RawAddr) (n, count int, err error)
	// SendEx injects len(addrs) packets packed back to back in buf.
	SendEx(buf []byte, addrs []RawAddr) (int, error)
	// CancelRecv aborts a pending RecvEx (ErrorOperationAborted).
	CancelRecv() error
	Shutdown(how uint32) error
	GetParam(p uint32) (uint64, error)
	SetParam(p uint32, v uint64) error
	Close() error
}

// Code returns the Windows error code in err (a windows.Errno, which is a
// syscall.Errno, on Windows; a FakeErrno from Fake), 0 if it has none.
// It allocates nothing when err is nil or is the code itself.
func Code(err error) uint32 {
	switch e := err.(type) {
	case nil:
		return 0
	case syscall.Errno:
		return uint32(e)
	case FakeErrno:
		return uint32(e)
	}
	var e syscall.Errno
	if errors.As(err, &e) {
		return uint32(e)
	}
	var f FakeErrno
	if errors.As(err, &f) {
		return uint32(f)
	}
	return 0
}

// FakeErrno is the error type of Fake.
type FakeErrno uint32

// Error returns "windivert: error" and the code in decimal.
func (e FakeErrno) Error() string { return "windivert: error " + itoa(uint32(e)) }

// Code returns the Windows error code e stands for.
func (e FakeErrno) Code() uint32 { return uint32(e) }

func itoa(v uint32) string {
	var b [10]byte
	i := len(b)
	for {
		i--
		b[i] = byte('0' + v%10)
		v /= 10
		if v == 0 {
			return string(b[i:])
		}
	}
}

// Item is a queued packet of Fake.
type Item struct {
	Data []byte
	Addr Addr
}

// Fake is an in-memory Handle that behaves like the driver's queue: RecvEx
// packs whole items while they fit, truncates only the first, blocks until
// an item comes, a cancel, a shutdown or Close.
type Fake struct {
	mu       sync.Mutex
	cond     *sync.Cond
	queue    []Item
	sent     []Item
	params   [5]uint64
	shutRecv bool
	shutSend bool
	closed   bool
	cancel   bool
}

// NewFake returns a Fake with WinDivert's default params and version 2.2.
func NewFake() *Fake {
	f := &Fake{params: [5]uint64{4096, 2000, 4 << 20, 2, 2}}
	f.cond = sync.NewCond(&f.mu)
	return f
}

// Push queues an item for RecvEx.
func (f *Fake) Push(it Item) {
	f.mu.Lock()
	f.queue = append(f.queue, it)
	f.mu.Unlock()
	f.cond.Broadcast()
}

// Sent returns what SendEx injected.
func (f *Fake) Sent() []Item {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Item(nil), f.sent...)
}

// RecvEx implements Handle.
func (f *Fake) RecvEx(buf []byte, addrs []RawAddr) (int, int, error) {
	if len(buf) == 0 || len(addrs) == 0 {
		return 0, 0, FakeErrno(ErrorInvalidParameter)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for len(f.queue) == 0 && !f.closed && !f.cancel && !f.shutRecv {
		f.cond.Wait()
	}
	switch {
	case f.closed:
		return 0, 0, FakeErrno(ErrorInvalidHandle)
	case f.cancel:
		f.cancel = false
		return 0, 0, FakeErrno(ErrorOperationAborted)
	case len(f.queue) == 0:
		return 0, 0, FakeErrno(ErrorNoData)
	}
	n, i := 0, 0
	var err error
	for i < len(addrs) && i < 255 && len(f.queue) > 0 {
		it := f.queue[0]
		if i > 0 && len(it.Data) > len(buf)-n {
			break
		}
		c := copy(buf[n:], it.Data)
		if c < len(it.Data) {
			err = FakeErrno(ErrorInsufficientBuffer)
		}
		addrs[i].Encode(&it.Addr)
		n += c
		i++
		f.queue = f.queue[1:]
	}
	return n, i, err
}

// SendEx implements Handle.
func (f *Fake) SendEx(buf []byte, addrs []RawAddr) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return 0, FakeErrno(ErrorInvalidHandle)
	}
	if f.shutSend {
		return 0, FakeErrno(ErrorNoData)
	}
	layer := uint8(LayerNetwork)
	lens := make([]int, len(addrs))
	if len(addrs) > 0 {
		layer = addrs[0][8]
	}
	if !Split(buf, len(buf), len(addrs), layer, lens) {
		return 0, FakeErrno(ErrorInvalidParameter)
	}
	off := 0
	for i := range addrs {
		var a Addr
		addrs[i].Decode(&a)
		f.sent = append(f.sent, Item{Data: append([]byte(nil), buf[off:off+lens[i]]...), Addr: a})
		off += lens[i]
	}
	return len(buf), nil
}

// CancelRecv implements Handle.
func (f *Fake) CancelRecv() error {
	f.mu.Lock()
	f.cancel = true
	f.mu.Unlock()
	f.cond.Broadcast()
	return nil
}

// Shutdown implements Handle.
func (f *Fake) Shutdown(how uint32) error {
	if how < 1 || how > 3 {
		return FakeErrno(ErrorInvalidParameter)
	}
	f.mu.Lock()
	f.shutRecv = f.shutRecv || how&1 != 0
	f.shutSend = f.shutSend || how&2 != 0
	f.mu.Unlock()
	f.cond.Broadcast()
	return nil
}

// GetParam implements Handle.
func (f *Fake) GetParam(p uint32) (uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if p >= uint32(len(f.params)) {
		return 0, FakeErrno(ErrorInvalidParameter)
	}
	return f.params[p], nil
}

// SetParam implements Handle.
func (f *Fake) SetParam(p uint32, v uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if p > 2 {
		return FakeErrno(ErrorInvalidParameter)
	}
	f.params[p] = v
	return nil
}

// Close implements Handle.
func (f *Fake) Close() error {
	f.mu.Lock()
	f.closed = true
	f.mu.Unlock()
	f.cond.Broadcast()
	return nil
}
