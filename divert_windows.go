package divert

// Windows backend: WinDivert 2.x through github.com/imgk/divert-go v0.1.0,
// behind the seam internal/windivert (GPL-3.0: a Windows binary that links
// this package is a combined work under GPLv3).
//
// The filter is compiled by package filter first (the same errors on every
// OS) and handed to WinDivertOpen in its normalized form (f.String()).
// WinDivert.dll and WinDivert64.sys (WinDivert32.sys on 386) must sit next to
// the executable or on the DLL search path; a failed load is reported by
// Open, every time. Priorities use the full ±30000 range (WinDivertOpen is
// called through the DLL directly; imgk's own Open stops at ±3000).
//
// Defects of imgk guarded here: one OVERLAPPED per direction is shared by
// all callers (receives are serialised, sends too), an empty buffer panics
// (checked first), its Shutdown constants are off by one (WinDivert's values
// are passed), its error type hides syscall.Errno (converted back).
//
// Deadlines cancel the pending receive with CancelIoEx on its OVERLAPPED.
//
// FlagReassemble: WinDivert reassembles inbound datagrams at LayerNetwork by
// itself; outbound packets and LayerNetworkForward come as fragments, which
// this backend holds and reassembles with internal/reassembly (see
// reassemble_windows.go). Recv and RecvBatch then return whole datagrams
// only; a reassembled datagram comes with the Address of its last fragment
// (the one that completed it: its Timestamp, Outbound, IfIdx, SubIfIdx and
// checksum flags, with IPChecksum set for IPv4 since its header checksum was
// recomputed). Fragments held longer than ParamQueueTime are dropped with
// their datagram, as the driver drops packets queued too long; so are
// fragments the reassembler refuses (overlaps, tiny TCP fragments, ...).
// Send of a reassembled datagram larger than the largest fragment it came in
// refragments it at that size with its identification and injects the
// fragments in one batch, with the checksums its Address's clear bits ask
// for computed first when the program changed it (the driver computes no
// fragment's TCP or UDP checksum); an IPv4 datagram with DF set is then cut
// with DF on every fragment when its largest fragment had DF (as Linux's
// reassembly marks a datagram DF, and refragments it when it forwards it),
// and is otherwise (the program set DF) an error that says so, and nothing
// is sent. A copy of its Address with
// Outbound reversed describes an answer, a new packet: that goes whole.
// Held fragments are lost on Close (they were out of the stack already).
// FlagReassemble needs a network layer.
//
// FlagPassThrough is accepted and is what WinDivert always does: when the
// handle goes away (Close, or the process dies) the driver removes its
// filter at once and matching packets pass untouched, so packets pass when
// no program is receiving. It does not mean that packets pass while the
// handle is open but nobody calls Recv: they wait in the handle's queue and
// are dropped after ParamQueueTime (or when the queue overflows), as
// without the flag. At Close the driver reinjects the packets still queued
// and not expired (WinDivert >= 1.4; fragments held for FlagReassemble
// have left the driver's queue and are lost). When a process dies, Windows
// closes its handles, with the same effect; a process that hangs keeps its
// handle, and the packets wait out ParamQueueTime.
//
// FlagFailOpen is not supported: on overflow (ParamQueueLength or
// ParamQueueSize reached) the driver drops the oldest queued packet, and
// WinDivert has no way to let packets pass instead.

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/netdivert/divert/internal/windivert"
)

// sysAddr marks a datagram reassembled under FlagReassemble (WinDivertSend
// needs only the public Address fields otherwise): Send refragments it at
// fragLen with identification id when it is larger, unless its Outbound
// was reversed (an answer: a new packet, sent whole).
type sysAddr struct {
	owner       uint32 // serial of the handle that received the packet (userStats); 0 for new packets
	out         bool   // the Outbound it was received with (userStats, refragment)
	reassembled bool
	id          uint32 // IPv4 identification, or the IPv6 Fragment header's
	fragLen     uint32 // the largest fragment it came in (whole IP packet)
	fragDF      bool   // IPv4: that largest fragment had DF (reassembly.Info.DF)
	dsum        uint64 // maphash (dgramSeed) of the datagram as handed over
}

// openWinDivert is the seam; tests replace it with a fake.
var openWinDivert = windivert.Open

type winBackend struct {
	h     windivert.Handle
	layer Layer

	recvMu sync.Mutex // serialises receives; guards the fields below
	rbuf   []byte
	raddrs [BatchMax]windivert.RawAddr
	lens   [BatchMax]int
	timer  *time.Timer
	// guarded by dlMu
	deadline time.Time
	timedOut bool
	shutRecv bool // Shutdown(ShutdownRecv) succeeded: Recv drains, whatever the deadline

	sendMu sync.Mutex // guards sbuf, saddrs
	sbuf   []byte
	saddrs [BatchMax]windivert.RawAddr

	dlMu   sync.Mutex // guards deadline, timedOut, shutRecv, closed, recvSeq
	closed bool
	// inRecv is the number of the RecvEx in progress (recvSeq counts
	// them), 0 between them: see cancelRecv.
	recvSeq uint64
	inRecv  atomic.Uint64

	reasm     *winReasm    // FlagReassemble, else nil
	queueTime atomic.Int64 // ParamQueueTime, ns

	userStats // WinDivert counts nothing for a handle
}

// layerSupport accepts every layer: WinDivert has them all.
func layerSupport(Layer) error { return nil }

func openBackend(cfg *openConfig) (backend, error) {
	if cfg.filter == nil {
		return nil, fmt.Errorf("%w: OpenPort on windows (WinDivert has no divert rules to attach to)", ErrNotSupported)
	}
	if cfg.flags&FlagReassemble != 0 && cfg.layer != LayerNetwork && cfg.layer != LayerNetworkForward {
		return nil, fmt.Errorf("divert: FlagReassemble at layer %v: %w: no packets at this layer", cfg.layer, ErrNotSupported)
	}
	if cfg.flags&FlagFailOpen != 0 {
		return nil, fmt.Errorf("divert: FlagFailOpen on windows: %w: WinDivert drops the oldest queued packet when the queue is full and cannot let packets pass instead", ErrNotSupported)
	}
	// FlagPassThrough is WinDivert's own behaviour (see above): nothing to do.
	h, err := openWinDivert(cfg.filter.String(), uint8(cfg.layer), cfg.priority, uint64(cfg.flags&flagsWinDivert))
	if err != nil {
		return nil, mapOpenError(err)
	}
	b := &winBackend{h: h, layer: cfg.layer}
	b.userStats.init(cfg.flags)
	b.queueTime.Store(int64(cfg.params[ParamQueueTime]) * int64(time.Millisecond))
	if cfg.flags&FlagReassemble != 0 {
		b.reasm = newWinReasm()
	}
	b.timer = time.AfterFunc(time.Hour, b.expire)
	b.timer.Stop()
	return b, nil
}

func mapOpenError(err error) error {
	code := windivert.Code(err)
	msg := windivert.Describe(code, int(unsafe.Sizeof(uintptr(0))))
	switch {
	case code == windivert.ErrorAccessDenied:
		return fmt.Errorf("divert: WinDivertOpen: %s: %w: %w", msg, os.ErrPermission, err)
	case code == windivert.ErrorInvalidParameter:
		return fmt.Errorf("divert: WinDivertOpen: %s: %w: %w", msg, os.ErrInvalid, err)
	case msg != "":
		return fmt.Errorf("divert: WinDivertOpen: %s: %w", msg, err)
	case code == 0:
		return fmt.Errorf("divert: %w", err)
	}
	return fmt.Errorf("divert: WinDivertOpen: %w", err)
}

// mapError maps an I/O error of the handle.
func (b *winBackend) mapError(op string, err error) error {
	switch windivert.Code(err) {
	case windivert.ErrorNoData:
		return ErrShutdown
	case windivert.ErrorInsufficientBuffer:
		return ErrTruncated
	case windivert.ErrorAccessDenied:
		return fmt.Errorf("divert: %s: %w: %w", op, os.ErrPermission, err)
	case windivert.ErrorInvalidParameter:
		return fmt.Errorf("divert: %s: %w: %w", op, os.ErrInvalid, err)
	case windivert.ErrorInvalidHandle:
		return errClosed
	}
	return fmt.Errorf("divert: %s: %w", op, err)
}

// expire runs when the deadline timer fires. A deadline moved later or
// cleared since the timer was armed does not cancel the receive: the timer
// is re-armed for the new time instead.
func (b *winBackend) expire() {
	b.dlMu.Lock()
	dl := b.deadline
	if dl.IsZero() {
		b.dlMu.Unlock()
		return
	}
	if d := time.Until(dl); d > 0 {
		b.timer.Reset(d)
		b.dlMu.Unlock()
		return
	}
	b.timedOut = true
	g := b.inRecv.Load()
	b.dlMu.Unlock()
	b.cancelRecv(g)
}

// cancelRecv aborts receive number g, if it is still in progress.
// CancelIoEx reaches only an I/O already issued, and a receive may be
// between its deadline check and its DeviceIoControl: while receive g has
// not returned, it is cancelled again every 100 us (in the background, for
// at most a second) so that the cancel cannot fall in that gap.
func (b *winBackend) cancelRecv(g uint64) {
	if g == 0 {
		return
	}
	_ = b.h.CancelRecv()
	if b.inRecv.Load() != g {
		return
	}
	go func() {
		for end := time.Now().Add(time.Second); b.inRecv.Load() == g && time.Now().Before(end); {
			time.Sleep(100 * time.Microsecond)
			_ = b.h.CancelRecv()
		}
	}()
}

// recvRaw runs one RecvEx into buf with up to len(addrs) items, honouring
// the deadline. recvMu is held.
func (b *winBackend) recvRaw(buf []byte, addrs []windivert.RawAddr) (int, int, error) {
	for {
		b.dlMu.Lock()
		dl := b.deadline
		b.timedOut = false
		if !dl.IsZero() && !b.shutRecv {
			// After ShutdownRecv the driver hands over what is queued and
			// then ERROR_NO_DATA without waiting: the handle drains, as on
			// the other OSes.
			d := time.Until(dl)
			if d <= 0 {
				b.dlMu.Unlock()
				return 0, 0, fmt.Errorf("divert: recv: %w", os.ErrDeadlineExceeded)
			}
			b.timer.Reset(d)
		}
		b.recvSeq++
		b.inRecv.Store(b.recvSeq)
		b.dlMu.Unlock()
		n, c, err := b.h.RecvEx(buf, addrs)
		b.inRecv.Store(0)
		b.timer.Stop() // also one armed by SetReadDeadline during the receive
		if windivert.Code(err) == windivert.ErrorOperationAborted {
			b.dlMu.Lock()
			to, closed := b.timedOut, b.closed
			b.dlMu.Unlock()
			switch {
			case closed:
				return 0, 0, errClosed
			case to:
				return 0, 0, fmt.Errorf("divert: recv: %w", os.ErrDeadlineExceeded)
			}
			continue // cancelled by a deadline that was since moved
		}
		if err != nil && windivert.Code(err) != windivert.ErrorInsufficientBuffer {
			b.dlMu.Lock()
			closed := b.closed
			b.dlMu.Unlock()
			if closed {
				return 0, 0, errClosed
			}
			return 0, 0, b.mapError("recv", err)
		}
		return n, c, err
	}
}

func (b *winBackend) recv(p []byte, a *Address) (int, error) {
	n, err := b.recvOne(p, a)
	b.gotOne(a, err)
	return n, err
}

func (b *winBackend) recvOne(p []byte, a *Address) (int, error) {
	b.recvMu.Lock()
	defer b.recvMu.Unlock()
	if b.reasm != nil {
		return b.recvReassembled(p, a)
	}
	buf := p
	var one [1]byte
	if len(buf) == 0 {
		buf = one[:] // imgk and the driver need a buffer; the packet is truncated
	}
	if b.layer == LayerFlow || b.layer == LayerSocket {
		buf = one[:] // no data at these layers
	}
	n, c, err := b.recvRaw(buf, b.raddrs[:1])
	if err != nil && windivert.Code(err) != windivert.ErrorInsufficientBuffer {
		return 0, err
	}
	if c < 1 {
		return 0, fmt.Errorf("divert: recv: driver returned no address")
	}
	decodeAddr(&b.raddrs[0], a)
	if len(p) == 0 || b.layer == LayerFlow || b.layer == LayerSocket {
		n = 0
	}
	if err != nil {
		return n, ErrTruncated
	}
	return n, nil
}

func (b *winBackend) recvBatch(ms []Message) (int, error) {
	k, err := b.recvMany(ms)
	b.gotBatch(ms, k)
	return k, err
}

func (b *winBackend) recvMany(ms []Message) (int, error) {
	b.recvMu.Lock()
	defer b.recvMu.Unlock()
	if b.reasm != nil {
		return b.recvBatchReassembled(ms)
	}
	total := 0
	for i := range ms {
		if len(ms[i].Buf) == 0 && carriesPackets(b.layer) {
			ms = ms[:i] // an empty Buf ends a batch of packets (RecvBatch)
			break
		}
		total += len(ms[i].Buf)
	}
	if total < 1 {
		total = 1
	}
	if total > BatchMax*MTUMax {
		total = BatchMax * MTUMax
	}
	if cap(b.rbuf) < total {
		b.rbuf = make([]byte, total)
	}
	buf := b.rbuf[:total]
	n, c, err := b.recvRaw(buf, b.raddrs[:len(ms)])
	if err != nil && windivert.Code(err) != windivert.ErrorInsufficientBuffer {
		return 0, err
	}
	trunc := err != nil
	if c < 1 || c > len(ms) {
		return 0, fmt.Errorf("divert: recv: driver returned %d addresses", c)
	}
	layer := uint8(b.layer)
	if !windivert.Split(buf, n, c, layer, b.lens[:c]) {
		return 0, fmt.Errorf("divert: recv: cannot split a batch of %d items in %d bytes", c, n)
	}
	off := 0
	for i := 0; i < c; i++ {
		l := b.lens[i]
		ms[i].N = copy(ms[i].Buf, buf[off:off+l])
		trunc = trunc || ms[i].N < l
		off += l
		decodeAddr(&b.raddrs[i], &ms[i].Addr)
	}
	if trunc {
		return c, ErrTruncated
	}
	return c, nil
}

func (b *winBackend) send(p []byte, a *Address) (int, error) {
	n, err := b.sendOne(p, a)
	if err == nil {
		b.sentOne(a)
	}
	return n, err
}

func (b *winBackend) sendOne(p []byte, a *Address) (int, error) {
	// The driver refuses such a packet with ERROR_INVALID_PARAMETER, which
	// names nothing; the batch path says what is wrong, and so does this.
	if _, err := sendable(p); err != nil {
		return 0, err
	}
	if b.reasm != nil {
		return b.sendReassembled(p, a)
	}
	b.sendMu.Lock()
	defer b.sendMu.Unlock()
	encodeAddr(&b.saddrs[0], a, b.layer)
	n, err := b.h.SendEx(p, b.saddrs[:1])
	if err != nil {
		return 0, b.mapError("send", err)
	}
	return n, nil
}

func (b *winBackend) sendBatch(ms []Message) (int, error) {
	n, err := b.sendMany(ms)
	failed := 0
	if errors.Is(err, errNotInjected) {
		failed = 1 // at least
	}
	b.sentBatch(ms, n, failed)
	return n, err
}

// errNotInjected is wrapped by SendBatch's error when the driver could not
// inject a packet of the batch but went on with the others.
var errNotInjected = errors.New("a packet of the batch was not injected")

func (b *winBackend) sendMany(ms []Message) (int, error) {
	if b.reasm != nil {
		return b.sendBatchReassembled(ms)
	}
	// WinDivert cuts the batch by each packet's IP length: a message whose
	// N differs would shift every packet after it. The messages before the
	// first such one are sent; it is reported.
	valid, verr := validBatch(ms)
	ms = ms[:valid]
	if len(ms) == 0 {
		return 0, verr
	}
	b.sendMu.Lock()
	defer b.sendMu.Unlock()
	total := 0
	for i := range ms {
		total += ms[i].N
	}
	if cap(b.sbuf) < total {
		b.sbuf = make([]byte, total)
	}
	buf := b.sbuf[:0]
	for i := range ms {
		buf = append(buf, ms[i].Buf[:ms[i].N]...)
		encodeAddr(&b.saddrs[i], &ms[i].Addr, b.layer)
	}
	if _, err := b.h.SendEx(buf, b.saddrs[:len(ms)]); err != nil {
		if softSendError(err) {
			return len(ms), fmt.Errorf("divert: send: %w, the others were: %w", errNotInjected, b.mapError("send", err))
		}
		return 0, b.mapError("send", err)
	}
	return len(ms), verr
}

// validBatch returns how many messages of ms, from the first, the driver
// would cut as they are (see ipLengthIs), and an error for the first one
// it would not.
func validBatch(ms []Message) (int, error) {
	for i := range ms {
		if err := ipLengthIs(ms[i].Buf[:ms[i].N], i == len(ms)-1); err != nil {
			return i, fmt.Errorf("divert: send: message %d: %w", i, err)
		}
	}
	return len(ms), nil
}

// ipLengthIs checks that p is one whole IPv4 or IPv6 packet by the length
// its header gives (ipPacketLen, as sendable), the way the driver cuts a batch into
// packets. The last packet of a batch may be followed by bytes the driver
// ignores (padding), as Send allows.
func ipLengthIs(p []byte, last bool) error {
	l, err := ipPacketLen(p)
	if err != nil {
		return fmt.Errorf("%w: %w", err, os.ErrInvalid)
	}
	if l != len(p) && !last {
		return fmt.Errorf("length %d is not the packet's IP length %d (the driver would cut the batch there): %w", len(p), l, os.ErrInvalid)
	}
	return nil
}

// softSendError reports whether a failed WinDivertSendEx still injected the
// rest of its batch: the driver (sys/windivert.c, windivert_write) keeps
// going past a packet it could not inject, and completes the request with
// that packet's error; it stops only on a bad request, a bad or cut packet,
// a shut-down or closed handle and a want of memory.
func softSendError(err error) bool {
	switch windivert.Code(err) {
	case windivert.ErrorInvalidParameter, windivert.ErrorInsufficientBuffer, windivert.ErrorNoData,
		windivert.ErrorInvalidHandle, windivert.ErrorAccessDenied, windivert.ErrorOperationAborted,
		errorBadCommand, errorNoSystemResources:
		return false
	}
	return windivert.Code(err) != 0
}

// Win32 codes of the driver's hard send errors that internal/windivert
// does not name: STATUS_INVALID_DEVICE_STATE and STATUS_INSUFFICIENT_RESOURCES
// as Windows maps them. (A failure to inject one packet, whatever its
// code, is soft: windivert_write goes on with the others.)
const (
	errorBadCommand        = 22
	errorNoSystemResources = 1450
)

// drop only counts: a received packet is gone unless sent back.
func (b *winBackend) drop(a *Address) error {
	b.droppedOne(a)
	return nil
}

func (b *winBackend) shutdown(how ShutdownHow) error {
	if err := b.h.Shutdown(uint32(how)); err != nil {
		return b.mapError("shutdown", err)
	}
	if how&ShutdownRecv != 0 {
		b.dlMu.Lock()
		b.shutRecv = true
		b.dlMu.Unlock()
	}
	return nil
}

func (b *winBackend) close() error {
	b.dlMu.Lock()
	b.closed = true
	b.dlMu.Unlock()
	b.timer.Stop()
	if err := b.h.Close(); err != nil {
		return fmt.Errorf("divert: close: %w", err)
	}
	return nil
}

func (b *winBackend) setParam(p Param, v uint64) error {
	if err := b.h.SetParam(uint32(p), v); err != nil {
		return b.mapError("set param", err)
	}
	if p == ParamQueueTime {
		b.queueTime.Store(int64(v) * int64(time.Millisecond))
	}
	return nil
}

func (b *winBackend) setReadDeadline(t time.Time) error {
	b.dlMu.Lock()
	defer b.dlMu.Unlock()
	b.deadline = t
	switch {
	case t.IsZero():
		b.timer.Stop()
	case !time.Now().Before(t):
		// Already past: wake a pending receive now.
		b.timedOut = true
		b.cancelRecv(b.inRecv.Load())
	default:
		// A pending receive gets the new deadline (expire re-checks it).
		b.timer.Reset(time.Until(t))
	}
	return nil
}

func (b *winBackend) version() (major, minor uint64) {
	major, err := b.h.GetParam(uint32(ParamVersionMajor))
	if err != nil {
		return 0, 0
	}
	minor, err = b.h.GetParam(uint32(ParamVersionMinor))
	if err != nil {
		return major, 0
	}
	return major, minor
}

// decodeAddr converts a WINDIVERT_ADDRESS into an Address.
func decodeAddr(r *windivert.RawAddr, a *Address) {
	var w windivert.Addr
	r.Decode(&w)
	*a = Address{
		Timestamp:   w.Timestamp,
		Layer:       Layer(w.Layer),
		Event:       Event(w.Event),
		Sniffed:     w.Sniffed,
		Outbound:    w.Outbound,
		Loopback:    w.Loopback,
		Impostor:    w.Impostor,
		IPv6:        w.IPv6,
		IPChecksum:  w.IPChecksum,
		TCPChecksum: w.TCPChecksum,
		UDPChecksum: w.UDPChecksum,
		IfIdx:       w.IfIdx,
		SubIfIdx:    w.SubIfIdx,
	}
	switch a.Layer {
	case LayerFlow, LayerSocket:
		a.Flow = FlowData{
			EndpointID:       w.EndpointID,
			ParentEndpointID: w.ParentEndpointID,
			ProcessID:        w.ProcessID,
			LocalAddr:        w.LocalAddr,
			RemoteAddr:       w.RemoteAddr,
			LocalPort:        w.LocalPort,
			RemotePort:       w.RemotePort,
			Protocol:         w.Protocol,
		}
	case LayerReflect:
		a.Reflect = ReflectData{
			Timestamp: w.ReflectTimestamp,
			ProcessID: w.ProcessID,
			Layer:     Layer(w.ReflectLayer),
			Flags:     Flag(w.ReflectFlags),
			Priority:  w.ReflectPriority,
		}
	}
}

// encodeAddr converts an Address for WinDivertSend, which reads Outbound
// (at LayerNetwork only: the driver forwards every packet of
// LayerNetworkForward out of IfIdx), Impostor, the checksum bits, IfIdx
// and SubIfIdx. The layer is the handle's.
func encodeAddr(r *windivert.RawAddr, a *Address, layer Layer) {
	w := windivert.Addr{
		Timestamp:   a.Timestamp,
		Layer:       uint8(layer),
		Event:       uint8(a.Event),
		Sniffed:     a.Sniffed,
		Outbound:    a.Outbound,
		Loopback:    a.Loopback,
		Impostor:    a.Impostor,
		IPv6:        a.IPv6,
		IPChecksum:  a.IPChecksum,
		TCPChecksum: a.TCPChecksum,
		UDPChecksum: a.UDPChecksum,
		IfIdx:       a.IfIdx,
		SubIfIdx:    a.SubIfIdx,
	}
	r.Encode(&w)
}
