//go:build windows

package divert

// Tests of the Windows backend over internal/windivert's Fake: the seam
// openWinDivert is swapped for a constructor that records its arguments and
// returns the fake, so Open, Recv, Send, the batches, the error mapping and
// the deadlines run the real divert_windows.go code without a driver. They
// run under Wine in CI (.ci/wine.sh).

import (
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/netdivert/divert/filter"
	"github.com/netdivert/divert/internal/windivert"
)

type winOpenCall struct {
	filter   string
	layer    uint8
	priority int16
	flags    uint64
}

// winSeam makes Open use h (or fail with err) and records the calls.
func winSeam(t *testing.T, h windivert.Handle, err error) *[]winOpenCall {
	t.Helper()
	old := openWinDivert
	calls := new([]winOpenCall)
	openWinDivert = func(f string, layer uint8, prio int16, flags uint64) (windivert.Handle, error) {
		*calls = append(*calls, winOpenCall{f, layer, prio, flags})
		if err != nil {
			return nil, err
		}
		return h, nil
	}
	t.Cleanup(func() { openWinDivert = old })
	return calls
}

// winOpen opens a handle over a new Fake.
func winOpen(t *testing.T, filterText string, layer Layer, prio int16, flags Flag) (*Handle, *windivert.Fake) {
	t.Helper()
	f := windivert.NewFake()
	winSeam(t, f, nil)
	h, err := Open(filterText, layer, prio, flags)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { h.Close() })
	return h, f
}

// errHandle is a Fake whose calls fail with the given errors.
type errHandle struct {
	*windivert.Fake
	recvErr, sendErr, shutErr, paramErr error
	mu                                  sync.Mutex
	shutHow                             []uint32
}

func (e *errHandle) RecvEx(b []byte, a []windivert.RawAddr) (int, int, error) {
	if e.recvErr != nil {
		return 0, 0, e.recvErr
	}
	return e.Fake.RecvEx(b, a)
}

func (e *errHandle) SendEx(b []byte, a []windivert.RawAddr) (int, error) {
	if e.sendErr != nil {
		return 0, e.sendErr
	}
	return e.Fake.SendEx(b, a)
}

func (e *errHandle) Shutdown(how uint32) error {
	e.mu.Lock()
	e.shutHow = append(e.shutHow, how)
	e.mu.Unlock()
	if e.shutErr != nil {
		return e.shutErr
	}
	return e.Fake.Shutdown(how)
}

func (e *errHandle) SetParam(p uint32, v uint64) error {
	if e.paramErr != nil {
		return e.paramErr
	}
	return e.Fake.SetParam(p, v)
}

func winIPv4(n int, fill byte) []byte {
	p := make([]byte, n)
	p[0] = 0x45
	p[2], p[3] = byte(n>>8), byte(n)
	p[8] = 64
	p[9] = 17
	for i := 20; i < n; i++ {
		p[i] = fill
	}
	return p
}

func winIPv6(payload int, fill byte) []byte {
	p := make([]byte, 40+payload)
	p[0] = 0x60
	p[4], p[5] = byte(payload>>8), byte(payload)
	p[6] = 17
	p[7] = 64
	for i := 40; i < len(p); i++ {
		p[i] = fill
	}
	return p
}

func TestWinOpenPassesArguments(t *testing.T) {
	for _, tc := range []struct {
		filter string
		layer  Layer
		prio   int16
		flags  Flag
		want   uint64
	}{
		{"tcp.DstPort == 80", LayerNetwork, PriorityHighest, 0, 0},
		{"udp", LayerNetwork, PriorityLowest, FlagSniff | FlagRecvOnly, 0x05},
		{"true", LayerNetwork, 3001, FlagDrop | FlagNoInstall, 0x12},
		{"ip", LayerNetwork, -3001, FlagFragments | FlagSendOnly, 0x28},
		{"ipv6 and tcp.Syn", LayerNetworkForward, 12345, 0, 0},
		{"tcp", LayerFlow, -1, FlagSniff | FlagRecvOnly, 0x05},
		{"event == CONNECT", LayerSocket, 0, FlagRecvOnly, 0x04},
		{"true", LayerReflect, 0, FlagSniff | FlagRecvOnly, 0x05},
	} {
		f := windivert.NewFake()
		calls := winSeam(t, f, nil)
		h, err := Open(tc.filter, tc.layer, tc.prio, tc.flags)
		if err != nil {
			t.Fatalf("Open(%q, %v, %d, %#x): %v", tc.filter, tc.layer, tc.prio, uint64(tc.flags), err)
		}
		want, err := filter.Compile(tc.filter, filter.Layer(tc.layer))
		if err != nil {
			t.Fatal(err)
		}
		if len(*calls) != 1 {
			t.Fatalf("%d WinDivertOpen calls", len(*calls))
		}
		c := (*calls)[0]
		if c.filter != want.String() || c.filter == "" {
			t.Errorf("filter %q passed as %q, want %q", tc.filter, c.filter, want.String())
		}
		if c.layer != uint8(tc.layer) || c.priority != tc.prio || c.flags != tc.want {
			t.Errorf("%q: passed layer %d priority %d flags %#x, want %d %d %#x",
				tc.filter, c.layer, c.priority, c.flags, tc.layer, tc.prio, tc.want)
		}
		if err := h.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
	}
	// Out of range priorities never reach the driver.
	calls := winSeam(t, windivert.NewFake(), nil)
	for _, p := range []int16{PriorityHighest + 1, PriorityLowest - 1} {
		if _, err := Open("true", LayerNetwork, p, 0); err == nil || !strings.Contains(err.Error(), "priority") {
			t.Errorf("priority %d: %v", p, err)
		}
	}
	if len(*calls) != 0 {
		t.Fatalf("out of range priority passed to WinDivertOpen: %+v", *calls)
	}
}

func TestWinOpenNotSupported(t *testing.T) {
	calls := winSeam(t, windivert.NewFake(), nil)
	if _, err := OpenPort(1, 0); !errors.Is(err, ErrNotSupported) {
		t.Errorf("OpenPort: %v", err)
	}
	for _, fl := range []Flag{FlagReassemble, FlagPassThrough, FlagFailOpen, FlagSniff | FlagFailOpen} {
		if _, err := Open("true", LayerNetwork, 0, fl); !errors.Is(err, ErrNotSupported) {
			t.Errorf("flags %#x: %v", uint64(fl), err)
		}
	}
	if len(*calls) != 0 {
		t.Fatalf("unsupported opens reached WinDivertOpen: %+v", *calls)
	}
}

func TestWinOpenErrors(t *testing.T) {
	sys := "WinDivert64.sys"
	if ptrSize := 32 << (^uintptr(0) >> 63); ptrSize == 32 {
		sys = "WinDivert32.sys"
	}
	for _, tc := range []struct {
		code uint32
		text string
		perm bool
	}{
		{5, "Administrator", true},
		{2, sys, false},
		{87, "rejected the filter", false},
		{577, "signature", false},
		{654, "incompatible version", false},
		{1060, "not installed", false},
		{1275, "blocked", false},
		{1753, "Base Filtering Engine", false},
		{31, "", false}, // no explanation: the code still comes through
	} {
		for _, e := range []error{windivert.FakeErrno(tc.code), syscall.Errno(tc.code)} {
			winSeam(t, nil, e)
			h, err := Open("true", LayerNetwork, 0, 0)
			if h != nil || err == nil {
				t.Fatalf("code %d: Open succeeded", tc.code)
			}
			if !strings.Contains(err.Error(), tc.text) || !strings.Contains(err.Error(), "WinDivertOpen") {
				t.Errorf("code %d: %q does not mention %q", tc.code, err, tc.text)
			}
			if errors.Is(err, os.ErrPermission) != tc.perm {
				t.Errorf("code %d (%T): errors.Is(os.ErrPermission) = %v", tc.code, e, !tc.perm)
			}
			if got := windivert.Code(err); got != tc.code {
				t.Errorf("code %d (%T): Code(err) = %d: %v", tc.code, e, got, err)
			}
		}
	}
	// A DLL load failure has no code and is passed on whole.
	load := errors.New("load WinDivert.dll: the specified module could not be found")
	winSeam(t, nil, load)
	if _, err := Open("true", LayerNetwork, 0, 0); !errors.Is(err, load) {
		t.Errorf("load error: %v", err)
	}
}

// A network-layer packet's address comes through Recv whole, and Send hands
// it back to the driver unchanged (with the handle's layer).
func TestWinRecvSendAddress(t *testing.T) {
	for _, layer := range []Layer{LayerNetwork, LayerNetworkForward} {
		h, f := winOpen(t, "true", layer, 0, 0)
		addrs := []windivert.Addr{
			{Timestamp: 0x0123456789abcdef, Layer: uint8(layer), Outbound: true, IPChecksum: true, TCPChecksum: true,
				UDPChecksum: true, IfIdx: 7, SubIfIdx: 0xfffffffe},
			{Timestamp: -1, Layer: uint8(layer), Sniffed: true, Loopback: true, Impostor: true, IPv6: true, IfIdx: 1},
		}
		pkts := [][]byte{winIPv4(60, 0xaa), winIPv6(12, 0xbb)}
		for i := range pkts {
			f.Push(windivert.Item{Data: pkts[i], Addr: addrs[i]})
		}
		buf := make([]byte, MTUMax)
		for i := range pkts {
			var a Address
			n, err := h.Recv(buf, &a)
			if err != nil || string(buf[:n]) != string(pkts[i]) {
				t.Fatalf("%v: Recv %d = %d, %v", layer, i, n, err)
			}
			w := addrs[i]
			want := Address{Timestamp: w.Timestamp, Layer: layer, Sniffed: w.Sniffed, Outbound: w.Outbound,
				Loopback: w.Loopback, Impostor: w.Impostor, IPv6: w.IPv6, IPChecksum: w.IPChecksum,
				TCPChecksum: w.TCPChecksum, UDPChecksum: w.UDPChecksum, IfIdx: w.IfIdx, SubIfIdx: w.SubIfIdx}
			if a != want {
				t.Fatalf("%v: address %+v\nwant %+v", layer, a, want)
			}
			if m, err := h.Send(buf[:n], &a); err != nil || m != n {
				t.Fatalf("%v: Send = %d, %v", layer, m, err)
			}
		}
		sent := f.Sent()
		if len(sent) != len(pkts) {
			t.Fatalf("%v: %d sent", layer, len(sent))
		}
		for i := range sent {
			if sent[i].Addr != addrs[i] || string(sent[i].Data) != string(pkts[i]) {
				t.Errorf("%v: sent %d: %+v\nwant %+v", layer, i, sent[i].Addr, addrs[i])
			}
		}
		// A fresh address takes the handle's layer.
		if _, err := h.Send(pkts[0], &Address{Layer: LayerReflect, Outbound: true, IfIdx: 3}); err != nil {
			t.Fatal(err)
		}
		got := f.Sent()[len(pkts)].Addr
		if want := (windivert.Addr{Layer: uint8(layer), Outbound: true, IfIdx: 3}); got != want {
			t.Errorf("%v: fresh address sent as %+v, want %+v", layer, got, want)
		}
	}
}

func TestWinRecvFlowSocketReflect(t *testing.T) {
	local := [16]byte{10: 0xff, 11: 0xff, 12: 10, 13: 1, 14: 2, 15: 3}
	remote := [16]byte{0: 0xfd, 15: 9}
	for _, tc := range []struct {
		layer Layer
		flags Flag
		event Event
	}{
		{LayerFlow, FlagSniff | FlagRecvOnly, EventFlowEstablished},
		{LayerSocket, FlagRecvOnly, EventSocketConnect},
	} {
		h, f := winOpen(t, "true", tc.layer, 0, tc.flags)
		f.Push(windivert.Item{Addr: windivert.Addr{Timestamp: 99, Layer: uint8(tc.layer), Event: uint8(tc.event),
			Sniffed: true, Outbound: true, EndpointID: 0x1122334455667788, ParentEndpointID: 42, ProcessID: 4321,
			LocalAddr: local, RemoteAddr: remote, LocalPort: 50000, RemotePort: 443, Protocol: 6}})
		var a Address
		buf := make([]byte, 100)
		n, err := h.Recv(buf, &a)
		if err != nil || n != 0 {
			t.Fatalf("%v: Recv = %d, %v", tc.layer, n, err)
		}
		want := Address{Timestamp: 99, Layer: tc.layer, Event: tc.event, Sniffed: true, Outbound: true,
			Flow: FlowData{EndpointID: 0x1122334455667788, ParentEndpointID: 42, ProcessID: 4321,
				LocalAddr: local, RemoteAddr: remote, LocalPort: 50000, RemotePort: 443, Protocol: 6}}
		if a != want {
			t.Errorf("%v: %+v\nwant %+v", tc.layer, a, want)
		}
	}

	h, f := winOpen(t, "true", LayerReflect, 0, FlagSniff|FlagRecvOnly)
	obj := []byte("@WinDiv_WX_eXWWAX\x00")
	f.Push(windivert.Item{Data: obj, Addr: windivert.Addr{Timestamp: 5, Layer: windivert.LayerReflect, Event: uint8(EventReflectOpen),
		Sniffed: true, ReflectTimestamp: -77, ProcessID: 8, ReflectLayer: 1, ReflectFlags: 0x21, ReflectPriority: -30000}})
	var a Address
	buf := make([]byte, 100)
	n, err := h.Recv(buf, &a)
	if err != nil || string(buf[:n]) != string(obj) {
		t.Fatalf("reflect: Recv = %q, %v", buf[:n], err)
	}
	want := Address{Timestamp: 5, Layer: LayerReflect, Event: EventReflectOpen, Sniffed: true,
		Reflect: ReflectData{Timestamp: -77, ProcessID: 8, Layer: LayerNetworkForward, Flags: FlagSniff | FlagFragments, Priority: -30000}}
	if a != want {
		t.Errorf("reflect: %+v\nwant %+v", a, want)
	}
}

func TestWinBatch(t *testing.T) {
	h, f := winOpen(t, "true", LayerNetwork, 0, 0)
	pkts := [][]byte{winIPv4(40, 1), winIPv6(8, 2), winIPv4(100, 3)}
	for i, p := range pkts {
		f.Push(windivert.Item{Data: p, Addr: windivert.Addr{Timestamp: int64(i), Outbound: i%2 == 0, IPv6: p[0]>>4 == 6, IfIdx: uint32(10 + i)}})
	}
	ms := make([]Message, 4)
	for i := range ms {
		ms[i].Buf = make([]byte, 128)
	}
	n, err := h.RecvBatch(ms)
	if err != nil || n != 3 {
		t.Fatalf("RecvBatch = %d, %v", n, err)
	}
	for i := 0; i < n; i++ {
		if string(ms[i].Buf[:ms[i].N]) != string(pkts[i]) {
			t.Errorf("message %d: %d bytes %x", i, ms[i].N, ms[i].Buf[:ms[i].N])
		}
		want := Address{Timestamp: int64(i), Outbound: i%2 == 0, IPv6: i == 1, IfIdx: uint32(10 + i)}
		if ms[i].Addr != want {
			t.Errorf("message %d: %+v\nwant %+v", i, ms[i].Addr, want)
		}
	}
	if s, err := h.SendBatch(ms[:n]); err != nil || s != n {
		t.Fatalf("SendBatch = %d, %v", s, err)
	}
	sent := f.Sent()
	if len(sent) != n {
		t.Fatalf("%d sent", len(sent))
	}
	for i := range sent {
		want := windivert.Addr{Timestamp: int64(i), Outbound: i%2 == 0, IPv6: i == 1, IfIdx: uint32(10 + i)}
		if string(sent[i].Data) != string(pkts[i]) || sent[i].Addr != want {
			t.Errorf("sent %d: %x %+v", i, sent[i].Data, sent[i].Addr)
		}
	}

	// A message too small for its packet gets the packet's head and the
	// batch says ErrTruncated; the other messages are whole.
	f.Push(windivert.Item{Data: winIPv4(40, 4), Addr: windivert.Addr{IfIdx: 1}})
	f.Push(windivert.Item{Data: winIPv4(30, 5), Addr: windivert.Addr{IfIdx: 2}})
	small := []Message{{Buf: make([]byte, 100)}, {Buf: make([]byte, 10)}}
	n, err = h.RecvBatch(small)
	if n != 2 || !errors.Is(err, ErrTruncated) || small[0].N != 40 || small[1].N != 10 ||
		string(small[1].Buf) != string(winIPv4(30, 5)[:10]) || small[1].Addr.IfIdx != 2 {
		t.Fatalf("truncated batch = %d, %v; N %d %d", n, err, small[0].N, small[1].N)
	}
	// A first packet larger than all the buffers comes truncated, alone.
	f.Push(windivert.Item{Data: winIPv4(300, 6), Addr: windivert.Addr{IfIdx: 3}})
	f.Push(windivert.Item{Data: winIPv4(20, 7)})
	n, err = h.RecvBatch(small)
	if n != 1 || !errors.Is(err, ErrTruncated) || small[0].N != 100 || small[0].Addr.IfIdx != 3 {
		t.Fatalf("first too big = %d, %v, N %d", n, err, small[0].N)
	}
	if n, err = h.RecvBatch(small); n != 1 || err != nil || small[0].N != 20 {
		t.Fatalf("after the truncated one = %d, %v", n, err)
	}
}

func TestWinErrorMapping(t *testing.T) {
	for _, tc := range []struct {
		err   error
		check func(error) bool
		what  string
	}{
		{windivert.FakeErrno(5), func(e error) bool { return errors.Is(e, os.ErrPermission) }, "os.ErrPermission"},
		{syscall.Errno(5), func(e error) bool { return errors.Is(e, os.ErrPermission) }, "os.ErrPermission"},
		{windivert.FakeErrno(232), func(e error) bool { return errors.Is(e, ErrShutdown) && errors.Is(e, io.EOF) }, "ErrShutdown"},
		{syscall.Errno(232), func(e error) bool { return errors.Is(e, ErrShutdown) }, "ErrShutdown"},
		{windivert.FakeErrno(122), func(e error) bool { return errors.Is(e, ErrTruncated) }, "ErrTruncated"},
		{windivert.FakeErrno(6), func(e error) bool { return errors.Is(e, net.ErrClosed) }, "net.ErrClosed"},
		{windivert.FakeErrno(1232), func(e error) bool { return windivert.Code(e) == 1232 }, "code 1232"},
	} {
		e := &errHandle{Fake: windivert.NewFake(), sendErr: tc.err, paramErr: tc.err, shutErr: tc.err}
		winSeam(t, e, nil)
		h, err := Open("true", LayerNetwork, 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := h.Send(winIPv4(20, 0), &Address{Outbound: true}); !tc.check(err) {
			t.Errorf("Send with %v (%T): %v, want %s", tc.err, tc.err, err, tc.what)
		}
		if err := h.SetParam(ParamQueueLength, 100); !tc.check(err) {
			t.Errorf("SetParam with %v: %v, want %s", tc.err, err, tc.what)
		}
		if err := h.Shutdown(ShutdownSend); !tc.check(err) {
			t.Errorf("Shutdown with %v: %v, want %s", tc.err, err, tc.what)
		}
		h.Close()
		// Receive errors other than the truncation one.
		if windivert.Code(tc.err) == windivert.ErrorInsufficientBuffer {
			continue
		}
		e = &errHandle{Fake: windivert.NewFake(), recvErr: tc.err}
		winSeam(t, e, nil)
		if h, err = Open("true", LayerNetwork, 0, 0); err != nil {
			t.Fatal(err)
		}
		var a Address
		if _, err := h.Recv(make([]byte, 100), &a); !tc.check(err) {
			t.Errorf("Recv with %v: %v, want %s", tc.err, err, tc.what)
		}
		if _, err := h.RecvBatch(make([]Message, 2)); !tc.check(err) {
			t.Errorf("RecvBatch with %v: %v, want %s", tc.err, err, tc.what)
		}
		h.Close()
	}
}

// ERROR_INSUFFICIENT_BUFFER from the driver, ERROR_NO_DATA after a shutdown,
// and the shutdown directions passed with WinDivert's values.
func TestWinTruncatedAndShutdown(t *testing.T) {
	e := &errHandle{Fake: windivert.NewFake()}
	winSeam(t, e, nil)
	h, err := Open("true", LayerNetwork, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	big := winIPv4(60, 9)
	e.Push(windivert.Item{Data: big, Addr: windivert.Addr{IfIdx: 4}})
	e.Push(windivert.Item{Data: winIPv4(20, 0), Addr: windivert.Addr{IfIdx: 5}})
	buf := make([]byte, 24)
	var a Address
	n, err := h.Recv(buf, &a)
	if !errors.Is(err, ErrTruncated) || n != 24 || string(buf) != string(big[:24]) || a.IfIdx != 4 {
		t.Fatalf("truncated Recv = %d, %v, %+v", n, err, a)
	}
	if err := h.Shutdown(ShutdownRecv); err != nil {
		t.Fatal(err)
	}
	// Queued packets still come, then ErrShutdown.
	if n, err := h.Recv(buf, &a); err != nil || n != 20 || a.IfIdx != 5 {
		t.Fatalf("queued after shutdown = %d, %v", n, err)
	}
	if _, err := h.Recv(buf, &a); !errors.Is(err, ErrShutdown) || !errors.Is(err, io.EOF) {
		t.Fatalf("Recv after shutdown: %v", err)
	}
	if _, err := h.RecvBatch([]Message{{Buf: buf}}); !errors.Is(err, ErrShutdown) {
		t.Fatalf("RecvBatch after shutdown: %v", err)
	}
	if err := h.Shutdown(ShutdownSend); err != nil {
		t.Fatal(err)
	}
	if err := h.Shutdown(ShutdownBoth); err != nil {
		t.Fatal(err)
	}
	e.mu.Lock()
	got := append([]uint32(nil), e.shutHow...)
	e.mu.Unlock()
	if len(got) != 3 || got[0] != 1 || got[1] != 2 || got[2] != 3 {
		t.Fatalf("shutdown directions passed %v, want [1 2 3]", got)
	}
}

// An empty buffer never reaches the driver (imgk indexes it unchecked): the
// packet is taken, reported truncated, and its address filled.
func TestWinEmptyBuffer(t *testing.T) {
	h, f := winOpen(t, "true", LayerNetwork, 0, 0)
	f.Push(windivert.Item{Data: winIPv4(60, 1), Addr: windivert.Addr{Outbound: true, IfIdx: 8}})
	f.Push(windivert.Item{Data: winIPv4(40, 2), Addr: windivert.Addr{IfIdx: 9}})
	f.Push(windivert.Item{Data: winIPv4(28, 3), Addr: windivert.Addr{IfIdx: 10}})
	for i, b := range [][]byte{nil, make([]byte, 0, 100)} {
		var a Address
		n, err := h.Recv(b, &a)
		if n != 0 || !errors.Is(err, ErrTruncated) || a.IfIdx != uint32(8+i) {
			t.Fatalf("Recv(empty %d) = %d, %v, %+v", i, n, err, a)
		}
	}
	ms := []Message{{Buf: nil}, {Buf: []byte{}}}
	n, err := h.RecvBatch(ms)
	if n != 1 || !errors.Is(err, ErrTruncated) || ms[0].N != 0 || ms[0].Addr.IfIdx != 10 {
		t.Fatalf("RecvBatch(empty) = %d, %v, %+v", n, err, ms[0])
	}
	if _, err := h.Send(nil, &Address{Outbound: true}); err == nil {
		t.Fatal("Send(nil) succeeded")
	}
	if _, err := h.SendBatch([]Message{{Buf: nil}}); err == nil {
		t.Fatal("SendBatch(empty) succeeded")
	}
	if len(f.Sent()) != 0 {
		t.Fatalf("empty packets reached the driver: %+v", f.Sent())
	}
}

func TestWinClose(t *testing.T) {
	h, f := winOpen(t, "true", LayerNetwork, 0, 0)
	done := make(chan error, 2)
	go func() {
		var a Address
		_, err := h.Recv(make([]byte, 100), &a)
		done <- err
	}()
	go func() {
		_, err := h.RecvBatch([]Message{{Buf: make([]byte, 100)}})
		done <- err
	}()
	time.Sleep(50 * time.Millisecond) // let both block in the driver
	if err := h.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for i := 0; i < 2; i++ {
		select {
		case err := <-done:
			if !errors.Is(err, net.ErrClosed) {
				t.Errorf("blocked receive after Close: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("a blocked receive did not return after Close")
		}
	}
	var a Address
	if _, err := h.Recv(make([]byte, 10), &a); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Recv after Close: %v", err)
	}
	if _, err := h.Send(winIPv4(20, 0), &a); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Send after Close: %v", err)
	}
	if err := h.SetReadDeadline(time.Now()); !errors.Is(err, net.ErrClosed) {
		t.Errorf("SetReadDeadline after Close: %v", err)
	}
	if err := h.Close(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("second Close: %v", err)
	}
	// The driver handle is closed.
	if _, err := f.SendEx(winIPv4(20, 0), make([]windivert.RawAddr, 1)); windivert.Code(err) != windivert.ErrorInvalidHandle {
		t.Errorf("fake not closed: %v", err)
	}
}

func TestWinDeadline(t *testing.T) {
	h, f := winOpen(t, "true", LayerNetwork, 0, 0)
	buf := make([]byte, 100)
	var a Address

	start := time.Now()
	h.SetReadDeadline(start.Add(60 * time.Millisecond))
	_, err := h.Recv(buf, &a)
	t.Logf("deadline 60ms: returned after %v", time.Since(start))
	if el := time.Since(start); !errors.Is(err, os.ErrDeadlineExceeded) || el < 60*time.Millisecond || el > 3*time.Second {
		t.Fatalf("Recv = %v after %v", err, el)
	}
	// A past deadline fails at once.
	if _, err := h.RecvBatch([]Message{{Buf: buf}}); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("RecvBatch past deadline: %v", err)
	}
	// Cleared, a queued packet comes.
	h.SetReadDeadline(time.Time{})
	f.Push(windivert.Item{Data: winIPv4(20, 0)})
	if n, err := h.Recv(buf, &a); err != nil || n != 20 {
		t.Fatalf("Recv without deadline = %d, %v", n, err)
	}

	// A deadline moved later while Recv waits holds for the new time.
	start = time.Now()
	h.SetReadDeadline(start.Add(50 * time.Millisecond))
	go func() {
		time.Sleep(10 * time.Millisecond)
		h.SetReadDeadline(start.Add(300 * time.Millisecond))
	}()
	_, err = h.Recv(buf, &a)
	t.Logf("deadline 50ms moved to 300ms: returned after %v", time.Since(start))
	if el := time.Since(start); !errors.Is(err, os.ErrDeadlineExceeded) || el < 300*time.Millisecond || el > 3*time.Second {
		t.Fatalf("extended deadline: %v after %v", err, el)
	}

	// A deadline set while Recv waits without one ends it.
	h.SetReadDeadline(time.Time{})
	start = time.Now()
	go func() {
		time.Sleep(20 * time.Millisecond)
		h.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	}()
	_, err = h.Recv(buf, &a)
	t.Logf("deadline set at 20ms for +50ms: returned after %v", time.Since(start))
	if el := time.Since(start); !errors.Is(err, os.ErrDeadlineExceeded) || el < 70*time.Millisecond || el > 3*time.Second {
		t.Fatalf("deadline set during Recv: %v after %v", err, el)
	}

	// A deadline in the past wakes a waiting Recv.
	h.SetReadDeadline(time.Time{})
	go func() {
		time.Sleep(20 * time.Millisecond)
		h.SetReadDeadline(time.Now().Add(-time.Second))
	}()
	if _, err := h.Recv(buf, &a); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("past deadline during Recv: %v", err)
	}
	h.SetReadDeadline(time.Time{})
	f.Push(windivert.Item{Data: winIPv4(24, 0)})
	if n, err := h.Recv(buf, &a); err != nil || n != 24 {
		t.Fatalf("Recv after the deadlines = %d, %v", n, err)
	}
}

func TestWinParamsAndVersion(t *testing.T) {
	h, f := winOpen(t, "true", LayerNetwork, 0, 0)
	if err := h.SetParam(ParamQueueLength, 8192); err != nil {
		t.Fatal(err)
	}
	if err := h.SetParam(ParamQueueTime, 16000); err != nil {
		t.Fatal(err)
	}
	for p, want := range map[uint32]uint64{0: 8192, 1: 16000, 2: QueueSizeDefault} {
		if v, err := f.GetParam(p); err != nil || v != want {
			t.Errorf("driver param %d = %d, %v; want %d", p, v, err, want)
		}
	}
	if v, _ := h.Param(ParamQueueLength); v != 8192 {
		t.Errorf("Param(QueueLength) = %d", v)
	}
	major, _ := h.Param(ParamVersionMajor)
	minor, _ := h.Param(ParamVersionMinor)
	if major != 2 || minor != 2 {
		t.Errorf("version %d.%d, want the fake's 2.2", major, minor)
	}
}
