package divert

import (
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// fakeBackend moves packets through a channel; it lets the tests check what
// Handle does above the OS layer.
type fakeBackend struct {
	mu       sync.Mutex
	in       chan []byte
	sent     [][]byte
	dropped  int
	params   map[Param]uint64
	shutHow  ShutdownHow
	closed   bool
	deadline time.Time
}

func newFake() *fakeBackend {
	return &fakeBackend{in: make(chan []byte, 16), params: map[Param]uint64{}}
}

func (f *fakeBackend) recv(b []byte, a *Address) (int, error) {
	p, ok := <-f.in
	if !ok {
		return 0, ErrShutdown
	}
	*a = Address{Layer: LayerNetwork, Outbound: true}
	n := copy(b, p)
	if n < len(p) {
		return n, ErrTruncated
	}
	return n, nil
}

func (f *fakeBackend) recvBatch(ms []Message) (int, error) {
	n, err := f.recv(ms[0].Buf, &ms[0].Addr)
	ms[0].N = n
	return 1, err
}

func (f *fakeBackend) send(b []byte, a *Address) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sent = append(f.sent, append([]byte(nil), b...))
	return len(b), nil
}

func (f *fakeBackend) sendBatch(ms []Message) (int, error) {
	for i := range ms {
		if _, err := f.send(ms[i].Buf[:ms[i].N], &ms[i].Addr); err != nil {
			return i, err
		}
	}
	return len(ms), nil
}

func (f *fakeBackend) drop(a *Address) error {
	f.mu.Lock()
	f.dropped++
	f.mu.Unlock()
	return nil
}

func (f *fakeBackend) shutdown(how ShutdownHow) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if how&ShutdownRecv != 0 && f.shutHow&ShutdownRecv == 0 {
		close(f.in)
	}
	f.shutHow |= how
	return nil
}

func (f *fakeBackend) close() error {
	f.mu.Lock()
	f.closed = true
	f.mu.Unlock()
	return nil
}

func (f *fakeBackend) setParam(p Param, v uint64) error {
	f.params[p] = v
	return nil
}

func (f *fakeBackend) setReadDeadline(t time.Time) error {
	f.deadline = t
	return nil
}

func (f *fakeBackend) version() (uint64, uint64) { return 2, 2 }

func fakeHandle(flags Flag) (*Handle, *fakeBackend) {
	f := newFake()
	return &Handle{b: f, flags: flags, params: [3]uint64{QueueLengthDefault, QueueTimeDefault, QueueSizeDefault}}, f
}

func TestFlagValidate(t *testing.T) {
	for _, tc := range []struct {
		f  Flag
		ok bool
	}{
		{0, true},
		{FlagSniff, true},
		{FlagSniff | FlagRecvOnly, true},
		{FlagDrop | FlagPassThrough, true},
		{FlagReassemble | FlagFailOpen | FlagPassThrough, true},
		{FlagSniff | FlagDrop, false},
		{FlagRecvOnly | FlagSendOnly, false},
		{FlagFragments | FlagReassemble, false},
		{0x40, false},
		{1 << 40, false},
	} {
		err := tc.f.Validate()
		if tc.ok {
			require.NoError(t, err, "flags %#x", uint64(tc.f))
		} else {
			require.Error(t, err, "flags %#x", uint64(tc.f))
		}
	}
}

func TestFlagValues(t *testing.T) {
	// WinDivert's values (windivert.h).
	require.Equal(t, Flag(0x01), FlagSniff)
	require.Equal(t, Flag(0x02), FlagDrop)
	require.Equal(t, Flag(0x04), FlagRecvOnly)
	require.Equal(t, Flag(0x08), FlagSendOnly)
	require.Equal(t, Flag(0x10), FlagNoInstall)
	require.Equal(t, Flag(0x20), FlagFragments)
	require.Equal(t, "NETWORK_FORWARD", LayerNetworkForward.String())
	require.Equal(t, "Layer(9)", Layer(9).String())
	require.Equal(t, "CONNECT", EventSocketConnect.String())
	require.Equal(t, "QueueTime", ParamQueueTime.String())
}

func TestOpenArgumentErrors(t *testing.T) {
	_, err := Open("true", Layer(5), 0, 0)
	require.ErrorContains(t, err, "invalid layer")
	_, err = Open("true", LayerNetwork, 30001, 0)
	require.ErrorContains(t, err, "priority")
	_, err = Open("true", LayerNetwork, -30001, 0)
	require.ErrorContains(t, err, "priority")
	_, err = Open("true", LayerNetwork, 0, FlagSniff|FlagDrop)
	require.ErrorContains(t, err, "exclusive")
	// Through a Pipe, which has every layer: Open on Linux and FreeBSD
	// refuses these layers first (ErrNotSupported, TestLinuxNotSupported).
	_, _, err = NewPipe("true", LayerFlow, 0)
	require.ErrorContains(t, err, "FlagSniff|FlagRecvOnly")
	_, _, err = NewPipe("true", LayerSocket, 0)
	require.ErrorContains(t, err, "FlagRecvOnly")
	if layerSupport(LayerFlow) != nil {
		_, err = Open("true", LayerFlow, 0, 0)
		require.ErrorIs(t, err, ErrNotSupported, "a layer the OS lacks is refused before its flags")
	}
	_, err = Open("true", LayerNetworkForward, 0, FlagFragments)
	require.ErrorContains(t, err, "FlagFragments")
	_, err = OpenPort(1, 1<<50)
	require.ErrorContains(t, err, "unknown flag")
	for _, f := range []Flag{FlagDrop, FlagPassThrough, FlagFragments, FlagReassemble, FlagPassThrough | FlagSniff} {
		_, err = OpenPort(1, f)
		require.ErrorIs(t, err, ErrNotSupported, "OpenPort with flags %#x", uint64(f))
	}
}

func TestOpenFilterError(t *testing.T) {
	_, err := Open("tcp.DstPort ==", LayerNetwork, 0, 0)
	var fe *FilterError
	require.ErrorAs(t, err, &fe)
	require.Equal(t, 14, fe.Pos)
	require.True(t, strings.Contains(err.Error(), "position 14"), err.Error())
}

func TestParamChecks(t *testing.T) {
	h, f := fakeHandle(0)
	for _, tc := range []struct {
		p  Param
		v  uint64
		ok bool
	}{
		{ParamQueueLength, 31, false},
		{ParamQueueLength, 32, true},
		{ParamQueueLength, 16384, true},
		{ParamQueueLength, 16385, false},
		{ParamQueueTime, 99, false},
		{ParamQueueTime, 100, true},
		{ParamQueueTime, 16000, true},
		{ParamQueueTime, 16001, false},
		{ParamQueueSize, 65534, false},
		{ParamQueueSize, 65535, true},
		{ParamQueueSize, 32 << 20, true},
		{ParamQueueSize, 32<<20 + 1, false},
		{ParamVersionMajor, 1, false},
		{ParamVersionMinor, 1, false},
		{Param(9), 1, false},
	} {
		before, _ := h.Param(tc.p)
		err := h.SetParam(tc.p, tc.v)
		if tc.ok {
			require.NoError(t, err)
			got, err := h.Param(tc.p)
			require.NoError(t, err)
			require.Equal(t, tc.v, got)
			require.Equal(t, tc.v, f.params[tc.p])
		} else {
			require.Error(t, err, "%v=%d", tc.p, tc.v)
			after, _ := h.Param(tc.p)
			require.Equal(t, before, after, "a rejected value must not change the param")
		}
	}
	major, err := h.Param(ParamVersionMajor)
	require.NoError(t, err)
	require.EqualValues(t, 2, major)
}

func TestDefaults(t *testing.T) {
	h, _ := fakeHandle(0)
	for p, want := range map[Param]uint64{ParamQueueLength: 4096, ParamQueueTime: 2000, ParamQueueSize: 4194304} {
		got, err := h.Param(p)
		require.NoError(t, err)
		require.Equal(t, want, got, p.String())
	}
}

func TestClosedHandle(t *testing.T) {
	h, f := fakeHandle(0)
	require.NoError(t, h.Close())
	require.True(t, f.closed)
	var a Address
	_, err := h.Recv(make([]byte, 10), &a)
	require.ErrorIs(t, err, net.ErrClosed)
	_, err = h.Send([]byte{0x45}, &a)
	require.ErrorIs(t, err, net.ErrClosed)
	_, err = h.RecvBatch(make([]Message, 1))
	require.ErrorIs(t, err, net.ErrClosed)
	require.ErrorIs(t, h.Close(), net.ErrClosed)
	require.ErrorIs(t, h.Shutdown(ShutdownBoth), net.ErrClosed)
	require.ErrorIs(t, h.SetParam(ParamQueueLength, 100), net.ErrClosed)
	require.ErrorIs(t, h.SetReadDeadline(time.Now()), net.ErrClosed)
	require.ErrorIs(t, h.Drop(&a), net.ErrClosed)
}

func TestRecvSendOnly(t *testing.T) {
	h, _ := fakeHandle(FlagSendOnly)
	var a Address
	_, err := h.Recv(make([]byte, 10), &a)
	require.ErrorContains(t, err, "cannot receive")
	h, _ = fakeHandle(FlagRecvOnly)
	_, err = h.Send([]byte{0x45}, &a)
	require.ErrorContains(t, err, "cannot send")
}

func TestSendLengths(t *testing.T) {
	h, f := fakeHandle(0)
	var a Address
	_, err := h.Send(nil, &a)
	require.Error(t, err)
	_, err = h.Send(make([]byte, MTUMax+1), &a)
	require.Error(t, err)
	_, err = h.Send([]byte{1}, nil)
	require.Error(t, err)
	n, err := h.Send(make([]byte, MTUMax), &a)
	require.NoError(t, err)
	require.Equal(t, MTUMax, n)
	_, err = h.SendBatch([]Message{{Buf: make([]byte, 4), N: 5}})
	require.Error(t, err, "N beyond Buf")
	n, err = h.SendBatch([]Message{{Buf: []byte{1, 2}, N: 2}, {Buf: []byte{3}, N: 1}})
	require.NoError(t, err)
	require.Equal(t, 2, n)
	require.Len(t, f.sent, 3)
}

func TestShutdown(t *testing.T) {
	h, f := fakeHandle(0)
	f.in <- []byte{1, 2, 3}
	require.Error(t, h.Shutdown(0))
	require.Error(t, h.Shutdown(4))
	require.NoError(t, h.Shutdown(ShutdownRecv))
	var a Address
	buf := make([]byte, 2)
	n, err := h.Recv(buf, &a)
	require.ErrorIs(t, err, ErrTruncated, "queued packet still delivered, truncated")
	require.Equal(t, 2, n)
	_, err = h.Recv(buf, &a)
	require.ErrorIs(t, err, ErrShutdown)
	require.ErrorIs(t, err, io.EOF)
	require.NoError(t, h.Shutdown(ShutdownSend))
	_, err = h.Send([]byte{1}, &a)
	require.ErrorIs(t, err, ErrShutdown)
}

func TestErrShutdownIsEOF(t *testing.T) {
	require.True(t, errors.Is(ErrShutdown, io.EOF))
	require.False(t, errors.Is(ErrTruncated, io.EOF))
}

func TestOpenQueuesArguments(t *testing.T) {
	_, err := OpenQueues("true", LayerNetwork, 0, 0, 0)
	require.ErrorContains(t, err, "queue count")
	_, err = OpenQueues("true", LayerNetwork, 0, 0, MaxQueues+1)
	require.ErrorContains(t, err, "queue count")
	_, err = OpenQueues("tcp.DstPort ==", LayerNetwork, 0, 0, 2)
	var fe *FilterError
	require.ErrorAs(t, err, &fe)
}

func TestSharedBackendClosesWithLastView(t *testing.T) {
	f := newFake()
	bs := shareBackend(f, 3)
	require.Len(t, bs, 3)
	hs := make([]*Handle, 3)
	for i, b := range bs {
		hs[i] = &Handle{b: b}
	}
	f.in <- []byte{1}
	var a Address
	n, err := hs[2].Recv(make([]byte, 4), &a)
	require.NoError(t, err)
	require.Equal(t, 1, n)
	require.NoError(t, hs[0].Close())
	require.ErrorIs(t, hs[0].Close(), net.ErrClosed)
	require.NoError(t, hs[1].Close())
	require.False(t, f.closed, "backend must outlive all but the last view")
	_, err = hs[2].Send([]byte{0x45}, &a)
	require.NoError(t, err)
	require.NoError(t, hs[2].Close())
	require.True(t, f.closed)
	require.Len(t, shareBackend(f, 1), 1)
}

// TestInvalidArguments: every argument the API refuses wraps os.ErrInvalid
// (WinDivert's ERROR_INVALID_PARAMETER), before anything reaches an OS.
func TestInvalidArguments(t *testing.T) {
	openErr := func(layer Layer, prio int16, flags Flag) func() error {
		return func() error { _, err := Open("true", layer, prio, flags); return err }
	}
	h, _ := fakeHandle(0)
	h.layer = LayerNetwork
	buf := make([]byte, 64)
	for _, tc := range []struct {
		name string
		call func() error
	}{
		{"layer", openErr(LayerReflect+1, 0, 0)},
		{"priority", openErr(LayerNetwork, PriorityHighest+1, 0)},
		{"unknown flag", openErr(LayerNetwork, 0, 0x40)},
		{"sniff and drop", openErr(LayerNetwork, 0, FlagSniff|FlagDrop)},
		{"recv-only and send-only", openErr(LayerNetwork, 0, FlagRecvOnly|FlagSendOnly)},
		{"fragments and reassemble", openErr(LayerNetwork, 0, FlagFragments|FlagReassemble)},
		// Through a Pipe: Open on Linux and FreeBSD refuses these layers
		// first (ErrNotSupported).
		{"flow without sniff", func() error { _, _, err := NewPipe("true", LayerFlow, FlagRecvOnly); return err }},
		{"socket without recv-only", func() error { _, _, err := NewPipe("true", LayerSocket, FlagSniff); return err }},
		{"fragments at forward", openErr(LayerNetworkForward, 0, FlagFragments)},
		{"queue count", func() error { _, err := OpenQueues("true", LayerNetwork, 0, 0, 0); return err }},
		{"param value", func() error { return h.SetParam(ParamQueueLength, QueueLengthMax+1) }},
		{"read-only param", func() error { return h.SetParam(ParamVersionMajor, 1) }},
		{"unknown param to set", func() error { return h.SetParam(Param(9), 1) }},
		{"unknown param to get", func() error { _, err := h.Param(Param(9)); return err }},
		{"shutdown direction", func() error { return h.Shutdown(0) }},
		{"send nil address", func() error { _, err := h.Send(buf, nil); return err }},
		{"send empty packet", func() error { _, err := h.Send(nil, &Address{}); return err }},
		{"send batch too large", func() error { _, err := h.SendBatch(make([]Message, BatchMax+1)); return err }},
		{"send batch length", func() error { _, err := h.SendBatch([]Message{{Buf: buf, N: 65}}); return err }},
		{"recv empty buffer", func() error { var a Address; _, err := h.Recv(nil, &a); return err }},
		{"recv nil address", func() error { _, err := h.Recv(buf, nil); return err }},
		{"eval nil address", func() error { _, err := EvalFilter("true", buf, nil); return err }},
		// WinDivert answers ERROR_INVALID_PARAMETER to these too (sys/windivert.c:
		// a read of a send-only handle, a write of a receive-only one, a
		// packet whose version or IPv4 length is not a packet's).
		{"recv on a send-only handle", func() error {
			so, _ := fakeHandle(FlagSendOnly)
			var a Address
			_, err := so.Recv(buf, &a)
			return err
		}},
		{"send on a recv-only handle", func() error {
			ro, _ := fakeHandle(FlagRecvOnly)
			_, err := ro.Send(buf, &Address{})
			return err
		}},
		{"send a malformed packet", func() error {
			ph, _, err := NewPipe("true", LayerNetwork, 0)
			if err != nil {
				return err
			}
			defer ph.Close()
			bad := make([]byte, 20)
			bad[0], bad[3] = 0x45, 40 // IPv4 total length past the buffer
			_, err = ph.Send(bad, &Address{Outbound: true})
			return err
		}},
		{"checksum flags", func() error { return CalcChecksums(buf, nil, 1<<20) }},
	} {
		err := tc.call()
		require.Error(t, err, tc.name)
		require.ErrorIs(t, err, os.ErrInvalid, tc.name)
		require.True(t, strings.HasPrefix(err.Error(), "divert: "), "%s: %v", tc.name, err)
	}
}
