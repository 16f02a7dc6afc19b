//go:build windows

package divert

// Tests of the Windows backend over internal/windivert's Fake: the seam
// openWinDivert is swapped for a constructor that records its arguments and
// returns the fake, so Open, Recv, Send, the batches, the error mapping and
// the deadlines run the real divert_windows.go code without a driver. They
// run under Wine in CI (.ci/wine.sh).

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"math/rand"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/netdivert/divert/filter"
	"github.com/netdivert/divert/internal/reassembly"
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

// received is want as h's Recv returns it: marked as received by h (see
// userStats), which a Send or Drop of it then tells from a new packet; a
// FlagSniff copy is not.
func received(h *Handle, want Address) Address {
	if b := h.b.(*winBackend); !b.sniff {
		want.sys.owner, want.sys.out = b.serial, want.Outbound
	}
	return want
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
	// FlagReassemble and FlagPassThrough are supported: TestWinOpenFlagsSupport.
	for _, fl := range []Flag{FlagFailOpen, FlagSniff | FlagFailOpen, FlagPassThrough | FlagFailOpen} {
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
			if inval := tc.code == windivert.ErrorInvalidParameter; errors.Is(err, os.ErrInvalid) != inval {
				t.Errorf("code %d (%T): errors.Is(os.ErrInvalid) = %v", tc.code, e, !inval)
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
			if want = received(h, want); a != want {
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
		if want = received(h, want); a != want {
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
	if want = received(h, want); a != want {
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
		want := received(h, Address{Timestamp: int64(i), Outbound: i%2 == 0, IPv6: i == 1, IfIdx: uint32(10 + i)})
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
		{windivert.FakeErrno(87), func(e error) bool { return errors.Is(e, os.ErrInvalid) && windivert.Code(e) == 87 }, "os.ErrInvalid"},
		{syscall.Errno(87), func(e error) bool { return errors.Is(e, os.ErrInvalid) }, "os.ErrInvalid"},
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
		if _, err := h.RecvBatch([]Message{{Buf: make([]byte, 100)}, {Buf: make([]byte, 100)}}); !tc.check(err) {
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
	// A passed deadline does not stop the drain after Shutdown (as on
	// Linux and FreeBSD).
	h.SetReadDeadline(time.Now().Add(-time.Second))
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

// An empty buffer never reaches the driver (imgk indexes it unchecked), nor
// takes a packet: Recv refuses it, and an empty Buf ends a batch before it,
// so the packets are all there for the buffers that follow.
func TestWinEmptyBuffer(t *testing.T) {
	h, f := winOpen(t, "true", LayerNetwork, 0, 0)
	f.Push(windivert.Item{Data: winIPv4(60, 1), Addr: windivert.Addr{Outbound: true, IfIdx: 8}})
	f.Push(windivert.Item{Data: winIPv4(40, 2), Addr: windivert.Addr{IfIdx: 9}})
	f.Push(windivert.Item{Data: winIPv4(28, 3), Addr: windivert.Addr{IfIdx: 10}})
	for i, b := range [][]byte{nil, make([]byte, 0, 100)} {
		var a Address
		if n, err := h.Recv(b, &a); n != 0 || err == nil || errors.Is(err, ErrTruncated) {
			t.Fatalf("Recv(empty %d) = %d, %v; want a refusal", i, n, err)
		}
	}
	if n, err := h.RecvBatch([]Message{{Buf: nil}, {Buf: make([]byte, 100)}}); n != 0 || err == nil {
		t.Fatalf("RecvBatch(empty first) = %d, %v; want a refusal", n, err)
	}
	ms := []Message{{Buf: make([]byte, 100)}, {Buf: []byte{}}, {Buf: make([]byte, 100)}}
	n, err := h.RecvBatch(ms)
	if n != 1 || err != nil || ms[0].N != 60 || ms[0].Addr.IfIdx != 8 {
		t.Fatalf("RecvBatch(empty second) = %d, %v, %+v; want the first packet only", n, err, ms[0])
	}
	for _, want := range []uint32{9, 10} {
		var a Address
		if _, err := h.Recv(make([]byte, 100), &a); err != nil || a.IfIdx != want {
			t.Fatalf("Recv after the refusals: %v, IfIdx %d; want %d", err, a.IfIdx, want)
		}
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

// FlagReassemble and FlagPassThrough. The fragments fed in are made by the
// helpers below (independent of internal/reassembly); what Send injects is
// checked field by field and reassembled again.

func winCsum(h []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(h); i += 2 {
		s += uint32(binary.BigEndian.Uint16(h[i:]))
	}
	for s>>16 != 0 {
		s = s&0xFFFF + s>>16
	}
	return ^uint16(s)
}

// winUDP4 is an IPv4 UDP datagram of n bytes with identification id and a
// valid header checksum; the payload is a pattern seeded by seed.
func winUDP4(n int, id uint16, seed byte) []byte {
	p := make([]byte, n)
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:], uint16(n))
	binary.BigEndian.PutUint16(p[4:], id)
	p[8], p[9] = 64, 17
	copy(p[12:], []byte{10, 0, 0, 1, 10, 0, 0, 2})
	binary.BigEndian.PutUint16(p[20:], 5000)
	binary.BigEndian.PutUint16(p[22:], 53)
	binary.BigEndian.PutUint16(p[24:], uint16(n-20))
	for i := 28; i < n; i++ {
		p[i] = seed + byte(i*7)
	}
	binary.BigEndian.PutUint16(p[10:], winCsum(p[:20]))
	return p
}

// winUDP6 is an IPv6 UDP datagram with an n-byte payload.
func winUDP6(n int, seed byte) []byte {
	p := make([]byte, 40+n)
	p[0] = 0x60
	binary.BigEndian.PutUint16(p[4:], uint16(n))
	p[6], p[7] = 17, 64
	p[8], p[23] = 0xfd, 1
	p[24], p[39] = 0xfd, 2
	binary.BigEndian.PutUint16(p[40:], 5000)
	binary.BigEndian.PutUint16(p[42:], 53)
	binary.BigEndian.PutUint16(p[44:], uint16(n))
	for i := 48; i < len(p); i++ {
		p[i] = seed + byte(i*5)
	}
	return p
}

// winFrag4 splits an IPv4 datagram (20-byte header) into fragments of at
// most mtu bytes.
func winFrag4(d []byte, mtu int) [][]byte {
	data := d[20:]
	per := (mtu - 20) &^ 7
	var out [][]byte
	for off := 0; off < len(data); off += per {
		end := min(off+per, len(data))
		f := make([]byte, 20+end-off)
		copy(f, d[:20])
		copy(f[20:], data[off:end])
		binary.BigEndian.PutUint16(f[2:], uint16(len(f)))
		fo := uint16(off / 8)
		if end < len(data) {
			fo |= 0x2000
		}
		binary.BigEndian.PutUint16(f[6:], fo)
		f[10], f[11] = 0, 0
		binary.BigEndian.PutUint16(f[10:], winCsum(f[:20]))
		out = append(out, f)
	}
	return out
}

// winFrag6 splits an IPv6 datagram (no extension headers) into fragments
// of at most mtu bytes with identification id.
func winFrag6(d []byte, mtu int, id uint32) [][]byte {
	data := d[40:]
	per := (mtu - 48) &^ 7
	var out [][]byte
	for off := 0; off < len(data); off += per {
		end := min(off+per, len(data))
		f := make([]byte, 48+end-off)
		copy(f, d[:40])
		f[6] = 44
		binary.BigEndian.PutUint16(f[4:], uint16(8+end-off))
		f[40] = d[6]
		fo := uint16(off)
		if end < len(data) {
			fo |= 1
		}
		binary.BigEndian.PutUint16(f[42:], fo)
		binary.BigEndian.PutUint32(f[44:], id)
		copy(f[48:], data[off:end])
		out = append(out, f)
	}
	return out
}

// winSetUDPSum sets the UDP checksum of an IPv4 or IPv6 UDP datagram (no
// IPv6 extension headers), computed over its pseudo header.
func winSetUDPSum(p []byte) {
	off := 40
	if p[0]>>4 == 4 {
		off = int(p[0]&0x0F) * 4
	}
	p[off+6], p[off+7] = 0, 0
	sum := winUDPSum(p)
	if sum == 0 {
		sum = 0xFFFF
	}
	binary.BigEndian.PutUint16(p[off+6:], sum)
}

// winUDPSum is the Internet checksum of a UDP datagram's pseudo header,
// header and data: 0 when its checksum field is right.
func winUDPSum(p []byte) uint16 {
	var ph, udp []byte
	if p[0]>>4 == 4 {
		udp = p[int(p[0]&0x0F)*4 : binary.BigEndian.Uint16(p[2:])]
		ph = append(ph, p[12:20]...)
		ph = append(ph, 0, 17, byte(len(udp)>>8), byte(len(udp)))
	} else {
		udp = p[40:]
		ph = append(ph, p[8:40]...)
		ph = binary.BigEndian.AppendUint32(ph, uint32(len(udp)))
		ph = append(ph, 0, 0, 0, 17)
	}
	all := append(ph, udp...)
	if len(all)%2 != 0 {
		all = append(all, 0)
	}
	return winCsum(all)
}

// winCheckFrags checks that frags are fragments of d of at most mtu bytes
// with identification id, in order, and that they reassemble to d.
func winCheckFrags(t *testing.T, frags [][]byte, d []byte, mtu int, id uint32) {
	t.Helper()
	if len(frags) < 2 {
		t.Fatalf("%d fragments", len(frags))
	}
	v6 := d[0]>>4 == 6
	next := 0
	for i, f := range frags {
		if len(f) > mtu {
			t.Fatalf("fragment %d: %d bytes > %d", i, len(f), mtu)
		}
		var off, hl int
		var more bool
		var fid uint32
		if v6 {
			hl = 48
			if f[6] != 44 || int(binary.BigEndian.Uint16(f[4:]))+40 != len(f) {
				t.Fatalf("fragment %d: not an IPv6 fragment: %x", i, f[:48])
			}
			fo := binary.BigEndian.Uint16(f[42:])
			off, more, fid = int(fo&^7), fo&1 != 0, binary.BigEndian.Uint32(f[44:])
		} else {
			hl = 20
			if int(binary.BigEndian.Uint16(f[2:])) != len(f) || winCsum(f[:20]) != 0 {
				t.Fatalf("fragment %d: bad length or checksum: %x", i, f[:20])
			}
			fo := binary.BigEndian.Uint16(f[6:])
			off, more, fid = int(fo&0x1FFF)*8, fo&0x2000 != 0, uint32(binary.BigEndian.Uint16(f[4:]))
		}
		if fid != id || off != next || more != (i < len(frags)-1) {
			t.Fatalf("fragment %d: id %#x offset %d more %v; want id %#x offset %d", i, fid, off, more, id, next)
		}
		next += len(f) - hl
	}
	r := reassembly.New(reassembly.Config{MaxFragments: 1 << 14})
	var got []byte
	for i, f := range frags {
		out, done, err := r.Add(nil, f, time.Now())
		if err != nil || done != (i == len(frags)-1) {
			t.Fatalf("reassembling fragment %d: done %v, %v", i, done, err)
		}
		got = out
	}
	if !bytes.Equal(got, d) {
		t.Fatalf("fragments reassemble to %x\nwant %x", got, d)
	}
}

// countHandle counts SendEx calls and their item counts.
type countHandle struct {
	*windivert.Fake
	mu    sync.Mutex
	calls []int
}

func (c *countHandle) SendEx(b []byte, a []windivert.RawAddr) (int, error) {
	c.mu.Lock()
	c.calls = append(c.calls, len(a))
	c.mu.Unlock()
	if len(a) > BatchMax {
		return 0, windivert.FakeErrno(windivert.ErrorInvalidParameter)
	}
	return c.Fake.SendEx(b, a)
}

func winOpenCount(t *testing.T, layer Layer, flags Flag) (*Handle, *countHandle) {
	t.Helper()
	c := &countHandle{Fake: windivert.NewFake()}
	winSeam(t, c, nil)
	h, err := Open("true", layer, 0, flags)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { h.Close() })
	return h, c
}

// winNoMore checks that nothing more comes within a short deadline.
func winNoMore(t *testing.T, h *Handle) {
	t.Helper()
	h.SetReadDeadline(time.Now().Add(40 * time.Millisecond))
	defer h.SetReadDeadline(time.Time{})
	var a Address
	buf := make([]byte, MTUMax)
	if n, err := h.Recv(buf, &a); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("unexpected Recv = %d bytes %x, %v", n, buf[:min(n, 48)], err)
	}
}

func TestWinReassembleRandomOrder(t *testing.T) {
	for _, layer := range []Layer{LayerNetwork, LayerNetworkForward} {
		h, f := winOpen(t, "true", layer, 0, FlagReassemble)
		rng := rand.New(rand.NewSource(1))
		buf := make([]byte, MTUMax)
		for round := 0; round < 12; round++ {
			var d []byte
			var frags [][]byte
			var id uint32
			if round%2 == 0 {
				id = uint32(0x1200 + round)
				d = winUDP4(1000+rng.Intn(20000), uint16(id), byte(round))
				frags = winFrag4(d, 576+8*rng.Intn(120))
			} else {
				id = 0xabcd0000 + uint32(round)
				d = winUDP6(1000+rng.Intn(20000), byte(round))
				frags = winFrag6(d, 1280+8*rng.Intn(30), id)
			}
			maxLen := len(frags[0])
			rng.Shuffle(len(frags), func(i, j int) { frags[i], frags[j] = frags[j], frags[i] })
			for i, fr := range frags {
				f.Push(windivert.Item{Data: fr, Addr: windivert.Addr{Timestamp: int64(1000*round + i), Layer: uint8(layer),
					Outbound: true, IPv6: d[0]>>4 == 6, IfIdx: uint32(i + 1), SubIfIdx: 9}})
			}
			var a Address
			n, err := h.Recv(buf, &a)
			if err != nil || !bytes.Equal(buf[:n], d) {
				t.Fatalf("%v round %d (%d fragments): Recv = %d, %v; datagram differs", layer, round, len(frags), n, err)
			}
			last := len(frags) - 1
			want := Address{Timestamp: int64(1000*round + last), Layer: layer, Outbound: true, IPv6: d[0]>>4 == 6,
				IPChecksum: d[0]>>4 == 4, IfIdx: uint32(last + 1), SubIfIdx: 9,
				sys: sysAddr{reassembled: true, id: id, fragLen: uint32(maxLen), dsum: maphash.Bytes(dgramSeed, d)}}
			if want = received(h, want); a != want {
				t.Fatalf("%v round %d: address %+v\nwant %+v (the last fragment's)", layer, round, a, want)
			}
		}
		winNoMore(t, h)
		if st := h.b.(*winBackend).reasm.r.Stats(); st.Pending != 0 || st.Completed != 12 {
			t.Fatalf("%v: stats %+v", layer, st)
		}
	}
}

// Fragments and other packets mixed in a batch: whole datagrams come out
// in the order they were completed; fragments take no message.
func TestWinReassembleBatch(t *testing.T) {
	h, f := winOpen(t, "true", LayerNetwork, 0, FlagReassemble)
	d4 := winUDP4(3000, 0x4242, 1)
	d6 := winUDP6(2500, 2)
	f4 := winFrag4(d4, 1500)
	f6 := winFrag6(d6, 1280, 77)
	plain := winUDP4(100, 1, 3)
	seq := [][]byte{f4[2], f6[0], plain, f4[0], f6[2], f4[1], f6[1]}
	for i, p := range seq {
		f.Push(windivert.Item{Data: p, Addr: windivert.Addr{Timestamp: int64(i), Outbound: true, IPv6: p[0]>>4 == 6}})
	}
	ms := make([]Message, 8)
	for i := range ms {
		ms[i].Buf = make([]byte, 4000)
	}
	n, err := h.RecvBatch(ms)
	if err != nil || n != 3 {
		t.Fatalf("RecvBatch = %d, %v", n, err)
	}
	for i, want := range [][]byte{plain, d4, d6} {
		if !bytes.Equal(ms[i].Buf[:ms[i].N], want) {
			t.Errorf("message %d: %d bytes, want %d", i, ms[i].N, len(want))
		}
	}
	if ms[0].Addr.Timestamp != 2 || ms[0].Addr.sys.reassembled || ms[1].Addr.Timestamp != 5 || ms[2].Addr.Timestamp != 6 {
		t.Errorf("addresses %+v %+v %+v", ms[0].Addr, ms[1].Addr, ms[2].Addr)
	}
	// A batch of fragments only blocks for the rest; a small buffer gets
	// the datagram's head and ErrTruncated.
	for _, p := range f4[:2] {
		f.Push(windivert.Item{Data: p, Addr: windivert.Addr{Outbound: true}})
	}
	go func() {
		time.Sleep(30 * time.Millisecond)
		f.Push(windivert.Item{Data: f4[2], Addr: windivert.Addr{Outbound: true, IfIdx: 5}})
	}()
	small := []Message{{Buf: make([]byte, 100)}, {Buf: make([]byte, 100)}}
	n, err = h.RecvBatch(small)
	if n != 1 || !errors.Is(err, ErrTruncated) || small[0].N != 100 || !bytes.Equal(small[0].Buf, d4[:100]) || small[0].Addr.IfIdx != 5 {
		t.Fatalf("truncated datagram: %d, %v, N %d", n, err, small[0].N)
	}
}

// Packets that are not fragments come through untouched, addresses too,
// including a non-fragment with a wrong checksum and IPv6 with extension
// headers; refused fragments are dropped.
func TestWinReassemblePassesNonFragments(t *testing.T) {
	h, f := winOpen(t, "true", LayerNetworkForward, 0, FlagReassemble)
	df := winUDP4(1400, 7, 4)
	df[6] = 0x40 // DF, checksum now wrong: not a fragment, not checked
	hbh := winUDP6(64, 5)
	hbh = append(hbh[:40], append([]byte{17, 0, 1, 4, 0, 0, 0, 0}, hbh[40:]...)...)
	hbh[6] = 0
	binary.BigEndian.PutUint16(hbh[4:], uint16(len(hbh)-40))
	atomic := winFrag6(winUDP6(100, 6), 2000, 99)[0] // offset 0, M clear
	pkts := [][]byte{winUDP4(60, 1, 1), df, winUDP6(12, 2), hbh, atomic, winIPv4(20, 0)}
	for i, p := range pkts {
		f.Push(windivert.Item{Data: p, Addr: windivert.Addr{Timestamp: int64(i), Layer: 1, Loopback: i == 1, IPv6: p[0]>>4 == 6, IfIdx: uint32(i), TCPChecksum: true}})
	}
	buf := make([]byte, MTUMax)
	for i, p := range pkts {
		var a Address
		n, err := h.Recv(buf, &a)
		if err != nil || !bytes.Equal(buf[:n], p) {
			t.Fatalf("packet %d: Recv = %d, %v; bytes differ", i, n, err)
		}
		want := received(h, Address{Timestamp: int64(i), Layer: LayerNetworkForward, Loopback: i == 1, IPv6: p[0]>>4 == 6, IfIdx: uint32(i), TCPChecksum: true})
		if a != want {
			t.Fatalf("packet %d: address %+v\nwant %+v", i, a, want)
		}
		if m, err := h.Send(buf[:n], &a); err != nil || m != n {
			t.Fatalf("packet %d: Send = %d, %v", i, m, err)
		}
	}
	for i, s := range f.Sent() {
		if !bytes.Equal(s.Data, pkts[i]) {
			t.Errorf("sent %d differs", i)
		}
	}
	// Inbound fragments with a bad header checksum (no offload excuse) and
	// overlapping fragments are dropped.
	d := winUDP4(3000, 0x77, 7)
	fr := winFrag4(d, 1500)
	bad := append([]byte(nil), fr[0]...)
	bad[10] ^= 0xff
	for _, p := range [][]byte{bad, fr[1], fr[2]} {
		f.Push(windivert.Item{Data: p, Addr: windivert.Addr{Layer: 1}})
	}
	winNoMore(t, h)
	d2 := winUDP4(3000, 0x78, 8)
	fr2 := winFrag4(d2, 1500)
	o := append([]byte(nil), fr2[1]...)
	o[len(o)-1] ^= 1 // same bounds, different bytes: an overlap
	for _, p := range [][]byte{fr2[1], o, fr2[0], fr2[2]} {
		f.Push(windivert.Item{Data: p, Addr: windivert.Addr{Layer: 1}})
	}
	winNoMore(t, h)
	st := h.b.(*winBackend).reasm.r.Stats()
	if st.RejectedMalformed != 1 || st.RejectedOverlap != 1 || st.Completed != 0 {
		t.Fatalf("stats %+v", st)
	}
}

// Outbound fragments whose IPv4 header checksum was left to the NIC
// (IPChecksum clear) are reassembled all the same.
func TestWinReassembleChecksumOffload(t *testing.T) {
	h, f := winOpen(t, "true", LayerNetwork, 0, FlagReassemble)
	d := winUDP4(4000, 0x99, 9)
	for _, p := range winFrag4(d, 1500) {
		p[10], p[11] = 0, 0
		f.Push(windivert.Item{Data: p, Addr: windivert.Addr{Outbound: true}})
	}
	buf := make([]byte, MTUMax)
	var a Address
	if n, err := h.Recv(buf, &a); err != nil || !bytes.Equal(buf[:n], d) || !a.IPChecksum {
		t.Fatalf("Recv = %d, %v, %+v", n, err, a)
	}
}

// Send refragments a reassembled datagram at the size it came in, with its
// identification, in one SendEx; a smaller one goes whole.
func TestWinReassembleSendRefragments(t *testing.T) {
	h, c := winOpenCount(t, LayerNetwork, FlagReassemble)
	buf := make([]byte, MTUMax)
	for _, tc := range []struct {
		d     []byte
		frags [][]byte
		mtu   int
		id    uint32
	}{
		{winUDP4(9000, 0x5151, 1), nil, 1500, 0x5151},
		{winUDP6(9000, 2), nil, 1280, 0xdeadbeef},
	} {
		if tc.d[0]>>4 == 4 {
			tc.frags = winFrag4(tc.d, tc.mtu)
		} else {
			tc.frags = winFrag6(tc.d, tc.mtu, tc.id)
		}
		for i := len(tc.frags) - 1; i >= 0; i-- {
			c.Push(windivert.Item{Data: tc.frags[i], Addr: windivert.Addr{Outbound: true, IfIdx: 3, IPv6: tc.d[0]>>4 == 6}})
		}
		var a Address
		n, err := h.Recv(buf, &a)
		if err != nil || !bytes.Equal(buf[:n], tc.d) {
			t.Fatalf("Recv = %d, %v", n, err)
		}
		c.mu.Lock()
		c.calls = c.calls[:0]
		c.mu.Unlock()
		before := len(c.Sent())
		if m, err := h.Send(buf[:n], &a); err != nil || m != n {
			t.Fatalf("Send = %d, %v", m, err)
		}
		sent := c.Sent()[before:]
		c.mu.Lock()
		calls := append([]int(nil), c.calls...)
		c.mu.Unlock()
		if len(calls) != 1 || calls[0] != len(sent) {
			t.Fatalf("SendEx calls %v for %d fragments, want one", calls, len(sent))
		}
		var got [][]byte
		for _, s := range sent {
			want := windivert.Addr{Outbound: true, IfIdx: 3, IPv6: tc.d[0]>>4 == 6, IPChecksum: tc.d[0]>>4 == 4}
			if s.Addr != want {
				t.Fatalf("fragment address %+v, want %+v", s.Addr, want)
			}
			got = append(got, s.Data)
		}
		if len(got) != len(tc.frags) {
			t.Errorf("%d fragments sent, %d came", len(got), len(tc.frags))
		}
		winCheckFrags(t, got, tc.d, tc.mtu, tc.id)

		// Shortened to fit one fragment, it goes whole.
		short := append([]byte(nil), tc.d[:600]...)
		if short[0]>>4 == 4 {
			binary.BigEndian.PutUint16(short[2:], 600)
			short[10], short[11] = 0, 0
			binary.BigEndian.PutUint16(short[10:], winCsum(short[:20]))
		} else {
			binary.BigEndian.PutUint16(short[4:], 560)
		}
		before = len(c.Sent())
		if m, err := h.Send(short, &a); err != nil || m != 600 {
			t.Fatalf("Send short = %d, %v", m, err)
		}
		if s := c.Sent()[before:]; len(s) != 1 || !bytes.Equal(s[0].Data, short) {
			t.Fatalf("short datagram sent as %d packets", len(s))
		}
	}
	// A fresh address never refragments: the driver gets the datagram.
	big := winUDP4(9000, 1, 3)
	before := len(c.Sent())
	if _, err := h.Send(big, &Address{Outbound: true}); err != nil {
		t.Fatal(err)
	}
	if s := c.Sent()[before:]; len(s) != 1 || !bytes.Equal(s[0].Data, big) {
		t.Fatalf("fresh datagram sent as %d packets", len(s))
	}
}

func TestWinReassembleSendBatch(t *testing.T) {
	h, c := winOpenCount(t, LayerNetwork, FlagReassemble)
	d4 := winUDP4(5000, 0x6161, 1)
	d6 := winUDP6(4000, 2)
	plain := winUDP4(80, 2, 3)
	for _, p := range winFrag4(d4, 1500) {
		c.Push(windivert.Item{Data: p, Addr: windivert.Addr{Outbound: true}})
	}
	c.Push(windivert.Item{Data: plain, Addr: windivert.Addr{IfIdx: 4}})
	for _, p := range winFrag6(d6, 1400, 0x10203) {
		c.Push(windivert.Item{Data: p, Addr: windivert.Addr{Outbound: true, IPv6: true}})
	}
	ms := make([]Message, 3)
	for i := range ms {
		ms[i].Buf = make([]byte, MTUMax)
	}
	got := 0
	for got < 3 {
		n, err := h.RecvBatch(ms[got:])
		if err != nil {
			t.Fatal(err)
		}
		got += n
	}
	if !bytes.Equal(ms[0].Buf[:ms[0].N], d4) || !bytes.Equal(ms[1].Buf[:ms[1].N], plain) || !bytes.Equal(ms[2].Buf[:ms[2].N], d6) {
		t.Fatal("datagrams differ")
	}
	if n, err := h.SendBatch(ms); n != 3 || err != nil {
		t.Fatalf("SendBatch = %d, %v", n, err)
	}
	sent := c.Sent()
	c.mu.Lock()
	calls := append([]int(nil), c.calls...)
	c.mu.Unlock()
	if len(calls) != 1 || calls[0] != len(sent) {
		t.Fatalf("SendEx calls %v for %d packets", calls, len(sent))
	}
	var frags4, frags6 [][]byte
	i := 0
	for ; i < len(sent) && sent[i].Addr.Outbound && !sent[i].Addr.IPv6; i++ {
		frags4 = append(frags4, sent[i].Data)
	}
	if i >= len(sent) || !bytes.Equal(sent[i].Data, plain) || sent[i].Addr.IfIdx != 4 {
		t.Fatalf("item %d is not the plain packet", i)
	}
	for i++; i < len(sent); i++ {
		frags6 = append(frags6, sent[i].Data)
	}
	winCheckFrags(t, frags4, d4, 1500, 0x6161)
	winCheckFrags(t, frags6, d6, 1400, 0x10203)

	// More than BatchMax fragments: several SendEx calls, all sent. The
	// datagram came in 68-byte fragments and was grown by the program.
	d := winUDP4(148, 0x7171, 4)
	for _, p := range winFrag4(d, 68) {
		c.Push(windivert.Item{Data: p, Addr: windivert.Addr{Outbound: true}})
	}
	var a Address
	buf := make([]byte, MTUMax)
	if n, err := h.Recv(buf, &a); err != nil || !bytes.Equal(buf[:n], d) {
		t.Fatalf("Recv = %d, %v", n, err)
	}
	grown := winUDP4(20000, 0x7171, 5)
	winSetUDPSum(grown) // changed with its UDP bit clear: Send would compute it
	c.mu.Lock()
	c.calls = c.calls[:0]
	c.mu.Unlock()
	before := len(c.Sent())
	if n, err := h.SendBatch([]Message{{Buf: grown, N: len(grown), Addr: a}, {Buf: plain, N: len(plain), Addr: Address{Outbound: true}}}); n != 2 || err != nil {
		t.Fatalf("SendBatch grown = %d, %v", n, err)
	}
	sent = c.Sent()[before:]
	c.mu.Lock()
	calls = append([]int(nil), c.calls...)
	c.mu.Unlock()
	want := (len(grown)-20+47)/48 + 1
	if len(sent) != want || len(calls) != 2 || calls[0] != BatchMax || calls[0]+calls[1] != want {
		t.Fatalf("%d packets in SendEx calls %v, want %d in chunks of at most %d", len(sent), calls, want, BatchMax)
	}
	var fr [][]byte
	for _, s := range sent[:len(sent)-1] {
		fr = append(fr, s.Data)
	}
	winCheckFrags(t, fr, grown, 68, 0x7171)
	if !bytes.Equal(sent[len(sent)-1].Data, plain) {
		t.Fatal("the plain packet did not follow")
	}
}

// A reassembled datagram the program changed and sends back with its UDP
// checksum bit clear is refragmented with that checksum computed (the
// driver computes no fragment's TCP or UDP checksum), in a copy; one sent
// back unchanged goes as it came (winUDP4 and winUDP6 leave the checksum
// 0, which a computation would replace); a set bit leaves the program's
// checksum as it is. Send and SendBatch, IPv4 and IPv6, both layers.
func TestWinReassembleSendChangedChecksums(t *testing.T) {
	for _, layer := range []Layer{LayerNetwork, LayerNetworkForward} {
		h, c := winOpenCount(t, layer, FlagReassemble)
		buf := make([]byte, MTUMax)
		for _, batch := range []bool{false, true} {
			for _, v6 := range []bool{false, true} {
				name := fmt.Sprintf("%v batch=%v ipv6=%v", layer, batch, v6)
				var d []byte
				var frags [][]byte
				mtu, id := 1500, uint32(0x3131)
				if v6 {
					mtu, id = 1280, 0x60006
					d = winUDP6(5000, 7)
					frags = winFrag6(d, mtu, id)
				} else {
					d = winUDP4(5000, uint16(id), 7)
					frags = winFrag4(d, mtu)
				}
				// roundTrip receives d's fragments, sends p with the
				// Address Recv filled (changed by edit) and returns what
				// was injected.
				roundTrip := func(p []byte, edit func(*Address)) [][]byte {
					t.Helper()
					for _, fr := range frags {
						c.Push(windivert.Item{Data: fr, Addr: windivert.Addr{Layer: uint8(layer), Outbound: true, IPv6: v6, IfIdx: 2}})
					}
					var a Address
					n, err := h.Recv(buf, &a)
					if err != nil || !bytes.Equal(buf[:n], d) || a.UDPChecksum || a.TCPChecksum {
						t.Fatalf("%s: Recv = %d, %v, %+v", name, n, err, a)
					}
					if edit != nil {
						edit(&a)
					}
					if p == nil {
						p = buf[:n]
					}
					before := len(c.Sent())
					if batch {
						if k, err := h.SendBatch([]Message{{Buf: p, N: len(p), Addr: a}}); k != 1 || err != nil {
							t.Fatalf("%s: SendBatch = %d, %v", name, k, err)
						}
					} else if k, err := h.Send(p, &a); k != len(p) || err != nil {
						t.Fatalf("%s: Send = %d, %v", name, k, err)
					}
					var got [][]byte
					for _, s := range c.Sent()[before:] {
						if !s.Addr.Outbound || s.Addr.IfIdx != 2 {
							t.Fatalf("%s: fragment sent with %+v", name, s.Addr)
						}
						got = append(got, s.Data)
					}
					return got
				}

				// Unchanged: as it came, checksum 0 included.
				winCheckFrags(t, roundTrip(nil, nil), d, mtu, id)

				// Changed, UDP bit clear: the checksum is computed, in a
				// copy (the caller's bytes stay as they were).
				changed := append([]byte(nil), d...)
				changed[len(changed)-1] ^= 0x5A
				changed[len(changed)/2] ^= 0xA5
				orig := append([]byte(nil), changed...)
				want := append([]byte(nil), changed...)
				winSetUDPSum(want)
				if bytes.Equal(want, changed) || winUDPSum(want) != 0 {
					t.Fatalf("%s: test datagram: checksum already right", name)
				}
				winCheckFrags(t, roundTrip(changed, nil), want, mtu, id)
				if !bytes.Equal(changed, orig) {
					t.Fatalf("%s: Send wrote into the caller's buffer", name)
				}

				// Changed, UDP bit set: the program's checksum, as given.
				winCheckFrags(t, roundTrip(changed, func(a *Address) { a.UDPChecksum = true }), changed, mtu, id)
			}
		}
	}
}

// A copy of a reassembled datagram's Address with Outbound reversed
// describes an answer, a new packet: Send and SendBatch inject it whole,
// larger than the fragments the datagram came in or not, DF set or not
// (not refragmented with the received datagram's size and identification),
// while the Address as received still refragments. Both layers, IPv4 and
// IPv6.
func TestWinReassembleAnswerGoesWhole(t *testing.T) {
	for _, layer := range []Layer{LayerNetwork, LayerNetworkForward} {
		h, c := winOpenCount(t, layer, FlagReassemble)
		buf := make([]byte, MTUMax)
		for _, v6 := range []bool{false, true} {
			name := fmt.Sprintf("%v ipv6=%v", layer, v6)
			var d, answer []byte
			var frags [][]byte
			if v6 {
				d = winUDP6(3000, 3)
				frags = winFrag6(d, 1280, 0x4321)
				answer = winUDP6(2900, 4)
				answer[8], answer[24] = 0xfe, 0xfe // another flow
			} else {
				d = winUDP4(3000, 0x4321, 3)
				frags = winFrag4(d, 1000)
				answer = winUDP4(2900, 0x1111, 4)
				answer[6] |= 0x40 // DF, as a host's own datagrams often have
				answer[10], answer[11] = 0, 0
				binary.BigEndian.PutUint16(answer[10:], winCsum(answer[:20]))
			}
			for _, fr := range frags {
				c.Push(windivert.Item{Data: fr, Addr: windivert.Addr{Layer: uint8(layer), Outbound: true, IPv6: v6, IfIdx: 5}})
			}
			var a Address
			n, err := h.Recv(buf, &a)
			if err != nil || !bytes.Equal(buf[:n], d) || !a.Outbound {
				t.Fatalf("%s: Recv = %d, %v, %+v", name, n, err, a)
			}
			back := a
			back.Outbound = false
			before := len(c.Sent())
			if k, err := h.Send(answer, &back); k != len(answer) || err != nil {
				t.Fatalf("%s: Send of the answer = %d, %v", name, k, err)
			}
			msgs := []Message{{Buf: answer, N: len(answer), Addr: back}, {Buf: buf, N: n, Addr: a}}
			if k, err := h.SendBatch(msgs); k != 2 || err != nil {
				t.Fatalf("%s: SendBatch = %d, %v", name, k, err)
			}
			sent := c.Sent()[before:]
			if len(sent) != 2+len(frags) {
				t.Fatalf("%s: %d packets sent, want the answer twice whole and the datagram in %d fragments", name, len(sent), len(frags))
			}
			for i, s := range sent[:2] {
				if !bytes.Equal(s.Data, answer) || s.Addr.Outbound || s.Addr.IfIdx != 5 {
					t.Fatalf("%s: packet %d: %d bytes, %+v; want the answer whole, inbound", name, i, len(s.Data), s.Addr)
				}
			}
			var got [][]byte
			for _, s := range sent[2:] {
				got = append(got, s.Data)
			}
			mtu, id := 1000, uint32(0x4321)
			if v6 {
				mtu = 1280
			}
			winCheckFrags(t, got, d, mtu, id)
		}
	}
}

// A reassembled IPv4 datagram with DF set that does not fit is an error;
// nothing is sent, in Send or in SendBatch (which sends what came before).
func TestWinReassembleDontFragment(t *testing.T) {
	h, f := winOpen(t, "true", LayerNetwork, 0, FlagReassemble)
	d := winUDP4(3000, 0x3333, 1)
	fr := winFrag4(d, 1000) // 996-byte fragments
	for _, p := range fr {
		f.Push(windivert.Item{Data: p, Addr: windivert.Addr{Outbound: true}})
	}
	buf := make([]byte, MTUMax)
	var a Address
	n, err := h.Recv(buf, &a)
	if err != nil || !bytes.Equal(buf[:n], d) {
		t.Fatalf("Recv = %d, %v", n, err)
	}
	buf[6] |= 0x40
	_, err = h.Send(buf[:n], &a)
	if err == nil || !errors.Is(err, reassembly.ErrDontFragment) || !strings.Contains(err.Error(), "DF") ||
		!strings.Contains(err.Error(), "3000 bytes") || !strings.Contains(err.Error(), fmt.Sprintf("%d-byte", len(fr[0]))) {
		t.Fatalf("Send with DF: %v", err)
	}
	if len(f.Sent()) != 0 {
		t.Fatalf("sent %d packets", len(f.Sent()))
	}
	plain := winUDP4(60, 1, 1)
	ms := []Message{{Buf: plain, N: len(plain), Addr: Address{Outbound: true}}, {Buf: buf, N: n, Addr: a}}
	if n, err := h.SendBatch(ms); n != 1 || !errors.Is(err, reassembly.ErrDontFragment) || !strings.Contains(err.Error(), "message 1") {
		t.Fatalf("SendBatch with DF = %d, %v", n, err)
	}
	if s := f.Sent(); len(s) != 1 || !bytes.Equal(s[0].Data, plain) {
		t.Fatalf("sent %d packets", len(s))
	}
	// DF on a datagram that fits is fine.
	buf[6] &^= 0x40
	if _, err := h.Send(buf[:n], &a); err != nil {
		t.Fatal(err)
	}
}

// A datagram that came as fragments with DF set is handed over with DF (as
// Linux's reassembly marks it) and sent back unchanged it goes out as the
// fragments it came in, DF on each, byte for byte, as Linux forwards it.
func TestWinReassembleDFFragments(t *testing.T) {
	h, f := winOpen(t, "true", LayerNetwork, 0, FlagReassemble)
	d := winUDP4(3000, 0x3434, 1)
	fr := winFrag4(d, 1000)
	for _, p := range fr {
		p[6] |= 0x40
		fixIPv4HeaderChecksum(p)
		f.Push(windivert.Item{Data: p, Addr: windivert.Addr{Outbound: true}})
	}
	buf := make([]byte, MTUMax)
	var a Address
	n, err := h.Recv(buf, &a)
	want := bytes.Clone(d)
	want[6] |= 0x40
	want[10], want[11] = 0, 0 // the header's checksum; the UDP one (none, 0) is unchanged
	binary.BigEndian.PutUint16(want[10:], winCsum(want[:20]))
	if err != nil || !bytes.Equal(buf[:n], want) {
		t.Fatalf("Recv = %d, %v; datagram header %x, want %x", n, err, buf[:20], want[:20])
	}
	if _, err := h.Send(buf[:n], &a); err != nil {
		t.Fatalf("Send: %v", err)
	}
	s := f.Sent()
	if len(s) != len(fr) {
		t.Fatalf("sent %d packets, want %d", len(s), len(fr))
	}
	for i := range s {
		if !bytes.Equal(s[i].Data, fr[i]) {
			t.Errorf("fragment %d: header %x, want %x", i, s[i].Data[:20], fr[i][:20])
		}
	}
}

// Held fragments follow ParamQueueTime: older than it, their datagram is
// dropped; a later SetParam applies to what is held.
func TestWinReassembleTimeout(t *testing.T) {
	h, f := winOpen(t, "true", LayerNetwork, 0, FlagReassemble)
	b := h.b.(*winBackend)
	buf := make([]byte, MTUMax)
	d := winUDP4(3000, 0x4444, 1)
	fr := winFrag4(d, 1500)
	// Default 2000 ms: 150 ms between fragments is fine.
	f.Push(windivert.Item{Data: fr[0], Addr: windivert.Addr{Outbound: true}})
	winNoMore(t, h)
	time.Sleep(150 * time.Millisecond)
	f.Push(windivert.Item{Data: fr[1], Addr: windivert.Addr{Outbound: true}})
	f.Push(windivert.Item{Data: fr[2], Addr: windivert.Addr{Outbound: true}})
	var a Address
	if n, err := h.Recv(buf, &a); err != nil || !bytes.Equal(buf[:n], d) {
		t.Fatalf("Recv = %d, %v", n, err)
	}
	// 100 ms: the first fragment expires, the rest never completes.
	if err := h.SetParam(ParamQueueTime, 100); err != nil {
		t.Fatal(err)
	}
	f.Push(windivert.Item{Data: fr[0], Addr: windivert.Addr{Outbound: true}})
	winNoMore(t, h)
	time.Sleep(150 * time.Millisecond)
	f.Push(windivert.Item{Data: fr[1], Addr: windivert.Addr{Outbound: true}})
	f.Push(windivert.Item{Data: fr[2], Addr: windivert.Addr{Outbound: true}})
	winNoMore(t, h)
	st := b.reasm.r.Stats()
	if st.Timeouts != 1 || st.Pending != 1 || st.Completed != 1 {
		t.Fatalf("stats %+v", st)
	}
	// The leftovers expire too; a whole set then completes.
	time.Sleep(150 * time.Millisecond)
	for _, p := range fr {
		f.Push(windivert.Item{Data: p, Addr: windivert.Addr{Outbound: true}})
	}
	if n, err := h.Recv(buf, &a); err != nil || !bytes.Equal(buf[:n], d) {
		t.Fatalf("Recv after expiry = %d, %v", n, err)
	}
	if st := b.reasm.r.Stats(); st.Timeouts != 2 || st.Pending != 0 || st.Completed != 2 {
		t.Fatalf("stats %+v", st)
	}
	// Each incomplete datagram dropped is one Expired.
	if st, _ := h.Stats(); st.Expired != 2 || st.Received != 2 {
		t.Fatalf("Stats %+v: want 2 expired, 2 received", st)
	}
	// A longer queue time applies to fragments already held.
	if err := h.SetParam(ParamQueueTime, 100); err != nil {
		t.Fatal(err)
	}
	f.Push(windivert.Item{Data: fr[0], Addr: windivert.Addr{Outbound: true}})
	winNoMore(t, h)
	if err := h.SetParam(ParamQueueTime, 5000); err != nil {
		t.Fatal(err)
	}
	time.Sleep(150 * time.Millisecond)
	f.Push(windivert.Item{Data: fr[1], Addr: windivert.Addr{Outbound: true}})
	f.Push(windivert.Item{Data: fr[2], Addr: windivert.Addr{Outbound: true}})
	if n, err := h.Recv(buf, &a); err != nil || !bytes.Equal(buf[:n], d) {
		t.Fatalf("Recv with a longer queue time = %d, %v", n, err)
	}
}

// loopHandle hands out the same packets over and over and discards what
// is sent, without allocating: for the steady-state allocation test.
type loopHandle struct {
	windivert.Fake
	pkts  [][]byte
	addrs []windivert.Addr
	i     int
	sent  int
}

func (l *loopHandle) RecvEx(buf []byte, addrs []windivert.RawAddr) (int, int, error) {
	p := l.pkts[l.i%len(l.pkts)]
	addrs[0].Encode(&l.addrs[l.i%len(l.pkts)])
	l.i++
	return copy(buf, p), 1, nil
}

func (l *loopHandle) SendEx(buf []byte, addrs []windivert.RawAddr) (int, error) {
	l.sent += len(addrs)
	return len(buf), nil
}

func (l *loopHandle) CancelRecv() error { return nil }
func (l *loopHandle) Close() error      { return nil }

func TestWinReassembleAllocs(t *testing.T) {
	d := winUDP4(9000, 0x5555, 1)
	fr := winFrag4(d, 1500)
	plain := winUDP4(200, 2, 2)
	l := &loopHandle{pkts: append(fr, plain)}
	for range l.pkts {
		l.addrs = append(l.addrs, windivert.Addr{Outbound: true})
	}
	winSeam(t, l, nil)
	h, err := Open("true", LayerNetwork, 0, FlagReassemble)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	buf := make([]byte, MTUMax)
	var a Address
	ms := []Message{{Buf: make([]byte, MTUMax)}}
	cycle := func() {
		for _, want := range [][]byte{d, plain} {
			n, err := h.Recv(buf, &a)
			if err != nil || n != len(want) {
				t.Fatalf("Recv = %d, %v", n, err)
			}
			if _, err := h.Send(buf[:n], &a); err != nil {
				t.Fatal(err)
			}
		}
		n, err := h.RecvBatch(ms)
		if err != nil || n != 1 || ms[0].N != len(d) {
			t.Fatalf("RecvBatch = %d, %v", n, err)
		}
		if _, err := h.SendBatch(ms); err != nil {
			t.Fatal(err)
		}
		if _, err := h.RecvBatch(ms); err != nil {
			t.Fatal(err)
		}
	}
	cycle()
	if allocs := testing.AllocsPerRun(100, cycle); allocs != 0 {
		t.Fatalf("%v allocations per cycle of 2 datagrams of %d fragments and 2 packets", allocs, len(fr))
	}
	if l.sent == 0 {
		t.Fatal("nothing sent")
	}
}

func TestWinOpenFlagsSupport(t *testing.T) {
	// FlagPassThrough and FlagReassemble open; neither reaches the driver.
	for _, tc := range []struct {
		layer Layer
		flags Flag
		want  uint64
	}{
		{LayerNetwork, FlagPassThrough, 0},
		{LayerNetwork, FlagPassThrough | FlagSniff, 0x01},
		{LayerNetworkForward, FlagReassemble | FlagPassThrough, 0},
		{LayerNetwork, FlagReassemble | FlagRecvOnly, 0x04},
		{LayerFlow, FlagPassThrough | FlagSniff | FlagRecvOnly, 0x05},
	} {
		calls := winSeam(t, windivert.NewFake(), nil)
		h, err := Open("true", tc.layer, 0, tc.flags)
		if err != nil {
			t.Fatalf("%v %#x: %v", tc.layer, uint64(tc.flags), err)
		}
		if len(*calls) != 1 || (*calls)[0].flags != tc.want {
			t.Errorf("%v %#x: driver calls %+v, want flags %#x", tc.layer, uint64(tc.flags), *calls, tc.want)
		}
		if (h.b.(*winBackend).reasm != nil) != (tc.flags&FlagReassemble != 0) {
			t.Errorf("%v %#x: reassembler %v", tc.layer, uint64(tc.flags), h.b.(*winBackend).reasm != nil)
		}
		h.Close()
	}
	// FlagFailOpen, and FlagReassemble without packets, do not.
	calls := winSeam(t, windivert.NewFake(), nil)
	for _, tc := range []struct {
		layer Layer
		flags Flag
		text  string
	}{
		{LayerNetwork, FlagFailOpen, "drops the oldest"},
		{LayerNetwork, FlagFailOpen | FlagPassThrough, "drops the oldest"},
		{LayerFlow, FlagReassemble | FlagSniff | FlagRecvOnly, "FlagReassemble"},
		{LayerSocket, FlagReassemble | FlagRecvOnly, "FlagReassemble"},
		{LayerReflect, FlagReassemble | FlagSniff | FlagRecvOnly, "FlagReassemble"},
	} {
		_, err := Open("true", tc.layer, 0, tc.flags)
		if !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), tc.text) {
			t.Errorf("%v %#x: %v", tc.layer, uint64(tc.flags), err)
		}
	}
	if len(*calls) != 0 {
		t.Fatalf("unsupported opens reached WinDivertOpen: %+v", *calls)
	}
}

// winPendingHandle cancels as CancelIoEx does: only a receive already
// issued (pending) is aborted, and a cancel with nothing pending does
// nothing, which imgkHandle.CancelRecv reports as nil. RecvEx says it was
// entered and waits for gate before it becomes pending: the instructions
// between recvRaw's deadline check and its DeviceIoControl.
type winPendingHandle struct {
	*windivert.Fake
	mu      sync.Mutex
	pending bool
	abort   chan struct{}
	entered chan struct{}
	gate    chan struct{}
}

func (h *winPendingHandle) RecvEx(b []byte, a []windivert.RawAddr) (int, int, error) {
	h.entered <- struct{}{}
	<-h.gate
	h.mu.Lock()
	h.pending = true
	h.abort = make(chan struct{})
	ab := h.abort
	h.mu.Unlock()
	defer func() { h.mu.Lock(); h.pending = false; h.mu.Unlock() }()
	select {
	case <-ab:
		return 0, 0, windivert.FakeErrno(windivert.ErrorOperationAborted)
	case <-time.After(3 * time.Second): // no packet ever comes: a safety stop
		return 0, 0, windivert.FakeErrno(1460) // ERROR_TIMEOUT, test only
	}
}

func (h *winPendingHandle) CancelRecv() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.pending {
		close(h.abort)
		h.pending = false
	}
	return nil
}

// TestWinDeadlineBeforePending: SetReadDeadline(time.Now()), the usual way
// to wake a reader, issued while Recv is between its deadline check and
// its DeviceIoControl still ends that Recv with os.ErrDeadlineExceeded: the
// cancel is repeated until the receive returns.
func TestWinDeadlineBeforePending(t *testing.T) {
	ph := &winPendingHandle{Fake: windivert.NewFake(), entered: make(chan struct{}, 1), gate: make(chan struct{})}
	winSeam(t, ph, nil)
	h, err := Open("true", LayerNetwork, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	done := make(chan error, 1)
	go func() {
		var a Address
		_, err := h.Recv(make([]byte, 100), &a)
		done <- err
	}()
	<-ph.entered // Recv checked the (zero) deadline; its I/O is not issued yet
	start := time.Now()
	h.SetReadDeadline(time.Now())
	close(ph.gate) // now it is
	err = <-done
	if el := time.Since(start); !errors.Is(err, os.ErrDeadlineExceeded) || el > time.Second {
		t.Fatalf("Recv after SetReadDeadline(now) = %v after %v; want os.ErrDeadlineExceeded at once", err, el)
	}
}

// winDriverSendHandle splits a SendEx buffer as the driver does
// (sys/windivert.c, windivert_write): by each packet's IP length, not by
// the caller's; a packet that fails to inject (failIdx) is a soft error:
// the others are still injected and the request completes with the error.
type winDriverSendHandle struct {
	*windivert.Fake
	mu       sync.Mutex
	injected [][]byte
	failIdx  int // -1: none
}

func (d *winDriverSendHandle) SendEx(b []byte, addrs []windivert.RawAddr) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var soft error
	n := 0
	for i := range addrs {
		if len(b) < 20 {
			return n, windivert.FakeErrno(windivert.ErrorInsufficientBuffer)
		}
		l := int(binary.BigEndian.Uint16(b[2:4]))
		if b[0]>>4 != 4 || l < 20 {
			return n, windivert.FakeErrno(windivert.ErrorInvalidParameter)
		}
		if l > len(b) {
			return n, windivert.FakeErrno(windivert.ErrorInsufficientBuffer)
		}
		if i == d.failIdx {
			soft = windivert.FakeErrno(windivert.ErrorHostUnreachable)
		} else {
			d.injected = append(d.injected, append([]byte(nil), b[:l]...))
		}
		n += l
		b = b[l:]
	}
	return n, soft
}

// TestWinSendBatchSoftError: WinDivert injects the rest of a batch past a
// packet it could not inject, so SendBatch counts every message (a caller
// that resent from the count would duplicate them) and returns the error.
func TestWinSendBatchSoftError(t *testing.T) {
	d := &winDriverSendHandle{Fake: windivert.NewFake(), failIdx: 1}
	winSeam(t, d, nil)
	h, err := Open("true", LayerNetwork, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	ms := make([]Message, 3)
	for i := range ms {
		ms[i] = Message{Buf: winIPv4(40, byte(i)), N: 40, Addr: Address{Outbound: true}}
	}
	n, err := h.SendBatch(ms)
	if n != 3 || windivert.Code(err) != windivert.ErrorHostUnreachable || len(d.injected) != 2 {
		t.Fatalf("SendBatch = %d, %v (code %d); injected %d: want 3 and ERROR_HOST_UNREACHABLE, 2 injected", n, err, windivert.Code(err), len(d.injected))
	}
	if st, _ := h.Stats(); st.Sent != 2 || st.Injected != 2 {
		t.Fatalf("Stats %+v: want the 2 injected counted", st)
	}
}

// TestWinSendBatchLengthMismatch: the driver cuts a batch by IP length, so
// a message whose N is not its packet's length would shift the ones after
// it. SendBatch, also under FlagReassemble, sends the messages before it
// and reports it, a refused argument (os.ErrInvalid), whether N is shorter
// or longer than the IP length.
func TestWinSendBatchLengthMismatch(t *testing.T) {
	for _, flags := range []Flag{0, FlagReassemble} {
		for _, n1 := range []int{40, 60} {
			d := &winDriverSendHandle{Fake: windivert.NewFake(), failIdx: -1}
			winSeam(t, d, nil)
			h, err := Open("true", LayerNetwork, 0, flags)
			if err != nil {
				t.Fatal(err)
			}
			p0, p1, p2 := winIPv4(60, 0xAA), winIPv4(50, 0xBB), winIPv4(60, 0xCC)
			p1 = append(p1, make([]byte, 10)...)
			ms := []Message{
				{Buf: p0, N: 60, Addr: Address{Outbound: true}},
				{Buf: p1, N: n1, Addr: Address{Outbound: true}}, // N not the IP length (50)
				{Buf: p2, N: 60, Addr: Address{Outbound: true}},
			}
			n, err := h.SendBatch(ms)
			h.Close()
			if n != 1 || err == nil || len(d.injected) != 1 || !bytes.Equal(d.injected[0], p0) {
				t.Fatalf("flags %#x, N %d: SendBatch = %d, %v; injected %d: want 1 sent (p0), an error for message 1", uint64(flags), n1, n, err, len(d.injected))
			}
			if strings.Count(err.Error(), "divert:") != 1 {
				t.Errorf("flags %#x, N %d: %q: want one \"divert:\" prefix", uint64(flags), n1, err)
			}
			if !errors.Is(err, os.ErrInvalid) {
				t.Fatalf("flags %#x, N %d: SendBatch error %v, want os.ErrInvalid", uint64(flags), n1, err)
			}
		}
	}
}

// TestWinSendBatchPaddedLast: bytes after the last packet of a batch are
// ignored by the driver, as Send allows them: SendBatch sends such a batch.
func TestWinSendBatchPaddedLast(t *testing.T) {
	d := &winDriverSendHandle{Fake: windivert.NewFake(), failIdx: -1}
	winSeam(t, d, nil)
	h, err := Open("true", LayerNetwork, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	p := append(winIPv4(46, 0xAA), make([]byte, 14)...) // padded to 60
	n, err := h.SendBatch([]Message{{Buf: winIPv4(40, 1), N: 40, Addr: Address{Outbound: true}}, {Buf: p, N: len(p), Addr: Address{Outbound: true}}})
	if n != 2 || err != nil || len(d.injected) != 2 {
		t.Fatalf("SendBatch = %d, %v; injected %d: want both", n, err, len(d.injected))
	}
}

// WinDivert's way to answer a packet (its netfilter sample): a copy of the
// received Address with Outbound reversed sends the answer the other way.
// The driver does that by itself; Stats count the answer as a new packet,
// and the received Address still reinjects its packet.
func TestWinStatsAnswerWithReversedAddress(t *testing.T) {
	h, f := winOpen(t, "true", LayerNetwork, 0, 0)
	f.Push(windivert.Item{Data: winIPv4(40, 1), Addr: windivert.Addr{IfIdx: 4}})
	f.Push(windivert.Item{Data: winIPv4(40, 2), Addr: windivert.Addr{Outbound: true, IfIdx: 4}})
	buf := make([]byte, MTUMax)
	var recvAddr Address
	if _, err := h.Recv(buf, &recvAddr); err != nil {
		t.Fatal(err)
	}
	sendAddr := recvAddr
	sendAddr.Outbound = !recvAddr.Outbound
	if _, err := h.Send(winIPv4(40, 9), &sendAddr); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Send(winIPv4(40, 1), &recvAddr); err != nil {
		t.Fatal(err)
	}
	ms := make([]Message, 1)
	ms[0].Buf = make([]byte, 128)
	if n, err := h.RecvBatch(ms); err != nil || n != 1 {
		t.Fatalf("RecvBatch = %d, %v", n, err)
	}
	held := ms[0].Addr
	ms[0].Addr.Outbound = !ms[0].Addr.Outbound
	if _, err := h.SendBatch(ms); err != nil {
		t.Fatal(err)
	}
	if err := h.Drop(&held); err != nil {
		t.Fatal(err)
	}
	if sent := f.Sent(); len(sent) != 3 || !sent[0].Addr.Outbound || sent[1].Addr.Outbound || sent[2].Addr.Outbound {
		t.Fatalf("sent %+v: want the answers reversed, the reinjection as received", sent)
	}
	want := Stats{Received: 2, Sent: 3, Injected: 2, Dropped: 1}
	if st, err := h.Stats(); err != nil || st != want {
		t.Fatalf("Stats = %+v, %v\nwant %+v", st, err, want)
	}
}

// TestWinStats: WinDivert keeps no counters, so the handle counts what its
// own calls see. A Send of a received Address is a reinjection, of any
// other an injection; a Drop counts once, for a received packet only, and
// not with FlagSniff; a reassembled datagram counts once.
func TestWinStats(t *testing.T) {
	h, f := winOpen(t, "true", LayerNetwork, 0, 0)
	for i := 0; i < 6; i++ {
		f.Push(windivert.Item{Data: winIPv4(40, byte(i)), Addr: windivert.Addr{IfIdx: uint32(i + 1)}})
	}
	buf := make([]byte, MTUMax)
	var a, b Address
	if _, err := h.Recv(buf, &a); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Send(winIPv4(40, 0), &a); err != nil { // reinjected
		t.Fatal(err)
	}
	if _, err := h.Send(winIPv4(40, 0), &a); err != nil { // the same Address again: now an injection
		t.Fatal(err)
	}
	if _, err := h.Send(winIPv4(40, 9), &Address{IfIdx: 3}); err != nil { // new
		t.Fatal(err)
	}
	if _, err := h.Recv(buf, &b); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := h.Drop(&b); err != nil { // counted once
			t.Fatal(err)
		}
	}
	if err := h.Drop(&Address{}); err != nil { // a new packet: nothing to drop
		t.Fatal(err)
	}
	ms := make([]Message, 4)
	for i := range ms {
		ms[i].Buf = make([]byte, 128)
	}
	n, err := h.RecvBatch(ms)
	if err != nil || n != 4 {
		t.Fatalf("RecvBatch = %d, %v", n, err)
	}
	ms[1].Addr = Address{IfIdx: 7} // one of the batch replaced by a new packet
	if s, err := h.SendBatch(ms[:3]); err != nil || s != 3 {
		t.Fatalf("SendBatch = %d, %v", s, err)
	}
	if err := h.Drop(&ms[3].Addr); err != nil {
		t.Fatal(err)
	}
	if err := h.Drop(&ms[0].Addr); err != nil { // already sent
		t.Fatal(err)
	}
	want := Stats{Received: 6, Sent: 6, Injected: 3, Dropped: 2}
	if st, err := h.Stats(); err != nil || st != want {
		t.Fatalf("Stats = %+v, %v\nwant %+v", st, err, want)
	}
	// An Address another handle received is new to this one.
	h2, f2 := winOpen(t, "true", LayerNetwork, 0, 0)
	f2.Push(windivert.Item{Data: winIPv4(40, 1)})
	var c Address
	if _, err := h2.Recv(buf, &c); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Send(winIPv4(40, 1), &c); err != nil {
		t.Fatal(err)
	}
	if err := h.Drop(&c); err != nil {
		t.Fatal(err)
	}
	want.Sent++
	want.Injected++
	if st, _ := h.Stats(); st != want {
		t.Fatalf("after another handle's Address: %+v\nwant %+v", st, want)
	}
	if st, _ := h2.Stats(); st != (Stats{Received: 1}) {
		t.Fatalf("the other handle: %+v", st)
	}
	h.Close()
	if st, err := h.Stats(); err != nil || st != want {
		t.Fatalf("after Close: %+v, %v", st, err)
	}

	// FlagSniff: the original went on, so Drop of a copy drops nothing
	// and sending it injects a new packet (as on Linux).
	hs, fs := winOpen(t, "true", LayerNetwork, 0, FlagSniff)
	fs.Push(windivert.Item{Data: winIPv4(40, 1)})
	fs.Push(windivert.Item{Data: winIPv4(40, 2)})
	if _, err := hs.Recv(buf, &a); err != nil {
		t.Fatal(err)
	}
	if err := hs.Drop(&a); err != nil {
		t.Fatal(err)
	}
	if _, err := hs.Recv(buf, &b); err != nil {
		t.Fatal(err)
	}
	if _, err := hs.Send(winIPv4(40, 2), &b); err != nil {
		t.Fatal(err)
	}
	if st, _ := hs.Stats(); st != (Stats{Received: 2, Sent: 1, Injected: 1}) {
		t.Fatalf("sniff: %+v", st)
	}

	// FlagReassemble: a datagram counts once, however many fragments.
	hr, fr := winOpen(t, "true", LayerNetwork, 0, FlagReassemble)
	d := winUDP4(3000, 0x4242, 1)
	frags := winFrag4(d, 576)
	for _, p := range frags {
		fr.Push(windivert.Item{Data: p, Addr: windivert.Addr{Outbound: true}})
	}
	n, err = hr.Recv(buf, &a)
	if err != nil || !bytes.Equal(buf[:n], d) {
		t.Fatalf("reassembled Recv = %d, %v", n, err)
	}
	if _, err := hr.Send(buf[:n], &a); err != nil {
		t.Fatal(err)
	}
	if st, _ := hr.Stats(); st != (Stats{Received: 1, Sent: 1}) || len(frags) < 3 {
		t.Fatalf("reassembled: %+v (%d fragments)", st, len(frags))
	}
}
