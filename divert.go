// Package divert gives every OS the divert socket: it takes IP packets out of
// the host's path by a filter, hands them to the program, and lets the program
// reinject them (changed or not), drop them, or inject packets it made itself.
//
// The API mirrors WinDivert (Open, Recv, Send, batches, Shutdown, params) and
// keeps the divert-socket meaning of an address: an outbound address sends out,
// an inbound address delivers in. Filters are written in WinDivert's filter
// language on every OS (see package filter).
//
// Backends:
//
//   - Linux: NFQUEUE, with nftables rules compiled from the filter in a table
//     owned by the handle (the rules vanish with the process); LayerFlow
//     from conntrack's events.
//   - FreeBSD: native divert(4) sockets, with ipfw rules.
//   - Windows: WinDivert through github.com/imgk/divert-go.
//
// Every other OS compiles, and Open of a valid filter, layer and flags
// returns an error wrapping ErrNotSupported (invalid ones get the same
// errors as elsewhere).
//
// The classic loop:
//
//	h, err := divert.Open("tcp.DstPort == 80", divert.LayerNetwork, 0, 0)
//	if err != nil {
//		return err
//	}
//	defer h.Close()
//	buf := make([]byte, divert.MTUMax)
//	var addr divert.Address
//	for {
//		n, err := h.Recv(buf, &addr)
//		if err != nil {
//			return err
//		}
//		// inspect or change buf[:n] here
//		if _, err := h.Send(buf[:n], &addr); err != nil {
//			return err
//		}
//	}
package divert

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"

	"sync"
	"sync/atomic"
	"time"

	"github.com/netdivert/divert/filter"
	"github.com/netdivert/divert/internal/reassembly"
)

// Limits shared by every backend (WinDivert's values).
const (
	// PriorityHighest is the highest handle priority; packets visit
	// higher-priority handles first.
	PriorityHighest = 30000
	// PriorityLowest is the lowest handle priority.
	PriorityLowest = -30000
	// BatchMax is the largest number of packets RecvBatch and SendBatch
	// move in one call.
	BatchMax = 255
	// MTUMax is the largest packet a handle carries: 40 bytes of IPv6 header
	// plus a 65535-byte payload. A buffer of this size never truncates (on
	// Linux the kernel's queue may: see ErrTruncated).
	MTUMax = 40 + 0xFFFF
)

// Layer selects where in the network stack a handle intercepts.
type Layer uint8

// Layers, with WinDivert's values.
const (
	// LayerNetwork intercepts packets to and from the local host.
	LayerNetwork Layer = 0
	// LayerNetworkForward intercepts packets routed through the host.
	LayerNetworkForward Layer = 1
	// LayerFlow reports flow established/deleted events (Windows; Linux,
	// from conntrack's events: see the README's Linux notes).
	LayerFlow Layer = 2
	// LayerSocket reports socket operations (Windows only).
	LayerSocket Layer = 3
	// LayerReflect reports other handles being opened and closed (Windows only).
	LayerReflect Layer = 4
)

var layerNames = [...]string{"NETWORK", "NETWORK_FORWARD", "FLOW", "SOCKET", "REFLECT"}

// String returns WinDivert's name of the layer.
func (l Layer) String() string {
	if int(l) < len(layerNames) {
		return layerNames[l]
	}
	return fmt.Sprintf("Layer(%d)", uint8(l))
}

// Event says what an Address describes.
type Event uint8

// Events, with WinDivert's values.
const (
	EventNetworkPacket   Event = 0 // a packet (network layers)
	EventFlowEstablished Event = 1 // a flow was established (flow layer)
	EventFlowDeleted     Event = 2 // a flow was deleted (flow layer)
	EventSocketBind      Event = 3 // a socket was bound (socket layer)
	EventSocketConnect   Event = 4 // a socket connected (socket layer)
	EventSocketListen    Event = 5 // a socket listens (socket layer)
	EventSocketAccept    Event = 6 // a socket accepted a connection (socket layer)
	EventSocketClose     Event = 7 // a socket was closed (socket layer)
	EventReflectOpen     Event = 8 // a handle was opened (reflect layer)
	EventReflectClose    Event = 9 // a handle was closed (reflect layer)
)

var eventNames = [...]string{"PACKET", "ESTABLISHED", "DELETED", "BIND", "CONNECT", "LISTEN", "ACCEPT", "CLOSE", "OPEN", "CLOSE"}

// String returns WinDivert's name of the event.
func (e Event) String() string {
	if int(e) < len(eventNames) {
		return eventNames[e]
	}
	return fmt.Sprintf("Event(%d)", uint8(e))
}

// Flag modifies how a handle intercepts. The low bits are WinDivert's flags
// with WinDivert's values; the high bits are divert-socket options.
type Flag uint64

// Flags.
const (
	// FlagSniff leaves packets on their path and hands the program a copy
	// (Address.Sniffed is set). The originals do not wait for the program
	// to read: on Linux, where the kernel's queue holds them until an
	// ACCEPT, the handle accepts whatever it has not read within about
	// 10-20 ms, and a full queue lets new packets pass; the copies stay
	// for Recv until ParamQueueTime.
	FlagSniff Flag = 0x01
	// FlagDrop drops matching packets without queueing them; do not Recv.
	// Where the kernel's rules cannot judge a packet exactly as the filter
	// does (a filter they cannot express; on Linux also IPv6 packets whose
	// extension headers the kernel walks otherwise than WinDivert), the
	// handle diverts such packets and drops in user space those the filter
	// matches, letting the rest pass.
	FlagDrop Flag = 0x02
	// FlagRecvOnly forbids Send on the handle.
	FlagRecvOnly Flag = 0x04
	// FlagSendOnly forbids Recv on the handle (an injection-only handle,
	// usually opened with the filter "false").
	FlagSendOnly Flag = 0x08
	// FlagNoInstall fails instead of installing a missing driver
	// (Windows). Elsewhere it changes nothing: the library never loads a
	// kernel module.
	FlagNoInstall Flag = 0x10
	// FlagFragments hands over IP fragments as they are on the wire instead
	// of reassembled datagrams (inbound, network layer). FreeBSD refuses it
	// (ErrNotSupported): ipfw's divert rules always reassemble. On Linux
	// such a handle takes inbound packets at prerouting, before conntrack
	// reassembles them there, and so before every handle without the flag
	// (they take them at input), whatever the priorities.
	FlagFragments Flag = 0x20

	// FlagPassThrough lets matching packets pass instead of being dropped
	// when no socket listens on the handle's queue: while a dying process's
	// rules are still in place, or for a queue of OpenQueues whose handle
	// was closed before the others (the divert-socket "pass-through"
	// option). It does not apply while the handle is open and the program
	// merely stops calling Recv: unread packets wait, and are dropped after
	// ParamQueueTime. On Windows it is what WinDivert always does; FreeBSD
	// refuses it (ErrNotSupported).
	FlagPassThrough Flag = 1 << 32
	// FlagReassemble hands over whole datagrams: fragments are reassembled
	// before Recv sees them (the divert-socket "always defragment" option;
	// on FreeBSD a FlagSniff handle's copies come as they are). On Linux
	// and Windows Send refragments a datagram that arrived in fragments to
	// the size of the largest of them, and one the program changed first
	// gets the checksums its Address's clear bits ask for (see Send); on
	// FreeBSD, where ipfw reassembled it, the kernel fragments it when it
	// sends it out, to the interface's MTU. On Linux the fragments stay
	// held in the queue until the datagram's verdict: sent back unchanged
	// they are accepted as they came (the kernel forwards them through its
	// forward hook, and answers ICMP when they do not fit the route),
	// changed they carry its new fragments, and Drop, ParamQueueTime
	// expiry and Close apply to them as to a held packet. Only a datagram
	// the program grew past what its fragments can carry leaves as new
	// raw packets (at LayerNetworkForward through the router's output
	// path, which the forward hook's rules do not see).
	FlagReassemble Flag = 1 << 33
	// FlagFailOpen lets packets pass when the handle's queue overflows,
	// instead of dropping them (Linux: the queue's fail-open flag). Windows
	// and FreeBSD refuse it (ErrNotSupported): WinDivert drops the oldest
	// queued packet, and divert(4) has no fail-open.
	FlagFailOpen Flag = 1 << 34

	flagsWinDivert = FlagSniff | FlagDrop | FlagRecvOnly | FlagSendOnly | FlagNoInstall | FlagFragments
	flagsAll       = flagsWinDivert | FlagPassThrough | FlagReassemble | FlagFailOpen
)

// Validate reports whether f is a valid combination: no unknown bits, not
// both FlagSniff and FlagDrop, not both FlagRecvOnly and FlagSendOnly, not both
// FlagFragments and FlagReassemble.
func (f Flag) Validate() error {
	switch {
	case f&^flagsAll != 0:
		return fmt.Errorf("divert: unknown flag bits %#x: %w", uint64(f&^flagsAll), os.ErrInvalid)
	case f&(FlagSniff|FlagDrop) == FlagSniff|FlagDrop:
		return fmt.Errorf("divert: FlagSniff and FlagDrop are exclusive: %w", os.ErrInvalid)
	case f&(FlagRecvOnly|FlagSendOnly) == FlagRecvOnly|FlagSendOnly:
		return fmt.Errorf("divert: FlagRecvOnly and FlagSendOnly are exclusive: %w", os.ErrInvalid)
	case f&(FlagFragments|FlagReassemble) == FlagFragments|FlagReassemble:
		return fmt.Errorf("divert: FlagFragments and FlagReassemble are exclusive: %w", os.ErrInvalid)
	}
	return nil
}

// Param names a tunable of a handle.
type Param uint32

// Params, with WinDivert's values.
const (
	// ParamQueueLength is the most packets the handle's queue holds
	// (default 4096, 32..16384). On Linux the kernel's queue also holds the
	// packets the program has received and not yet sent or dropped, so
	// they count too; on Windows they have left the driver's queue.
	ParamQueueLength Param = 0
	// ParamQueueTime is how long, in milliseconds, a packet may wait in the
	// queue before it is dropped (default 2000, 100..16000).
	ParamQueueTime Param = 1
	// ParamQueueSize is the most bytes the handle's queue holds
	// (default 4 MiB, 65535..32 MiB). On Linux it is the receive buffer
	// of the queue's socket, which holds the packets the kernel handed
	// over and Recv has not read yet (a packet that does not fit is
	// dropped, or passes with FlagFailOpen: Stats.Overflows); on FreeBSD
	// the divert socket's buffers.
	ParamQueueSize Param = 2
	// ParamVersionMajor is the backend's major version (read-only): the
	// WinDivert driver's on Windows (2 for 2.2), the FreeBSD release's on
	// FreeBSD, this package's Linux backend's (1) on Linux, 2 for a Pipe.
	// A program that tests it for WinDivert 2.x should test it on Windows
	// only.
	ParamVersionMajor Param = 3
	// ParamVersionMinor is the backend's minor version (read-only), of
	// the same version as ParamVersionMajor.
	ParamVersionMinor Param = 4
)

// Param defaults and ranges.
const (
	QueueLengthDefault = 4096
	QueueLengthMin     = 32
	QueueLengthMax     = 16384
	QueueTimeDefault   = 2000
	QueueTimeMin       = 100
	QueueTimeMax       = 16000
	QueueSizeDefault   = 4 << 20
	QueueSizeMin       = 65535
	QueueSizeMax       = 32 << 20
)

var paramNames = [...]string{"QueueLength", "QueueTime", "QueueSize", "VersionMajor", "VersionMinor"}

// String returns the name of the param.
func (p Param) String() string {
	if int(p) < len(paramNames) {
		return paramNames[p]
	}
	return fmt.Sprintf("Param(%d)", uint32(p))
}

// checkParam validates a value for SetParam. It never clamps.
func checkParam(p Param, v uint64) error {
	var lo, hi uint64
	switch p {
	case ParamQueueLength:
		lo, hi = QueueLengthMin, QueueLengthMax
	case ParamQueueTime:
		lo, hi = QueueTimeMin, QueueTimeMax
	case ParamQueueSize:
		lo, hi = QueueSizeMin, QueueSizeMax
	case ParamVersionMajor, ParamVersionMinor:
		return fmt.Errorf("divert: param %v is read-only: %w", p, os.ErrInvalid)
	default:
		return fmt.Errorf("divert: unknown param %d: %w", uint32(p), os.ErrInvalid)
	}
	if v < lo || v > hi {
		return fmt.Errorf("divert: param %v value %d out of range [%d, %d]: %w", p, v, lo, hi, os.ErrInvalid)
	}
	return nil
}

// ShutdownHow says which direction Shutdown stops.
type ShutdownHow int

// Shutdown directions, with WinDivert's values.
const (
	// ShutdownRecv stops queueing new packets (they go on their way,
	// unseen, as in WinDivert); packets already queued can still be
	// received, then Recv returns ErrShutdown.
	ShutdownRecv ShutdownHow = 1
	// ShutdownSend stops injection; Send returns ErrShutdown.
	ShutdownSend ShutdownHow = 2
	// ShutdownBoth is ShutdownRecv and ShutdownSend.
	ShutdownBoth ShutdownHow = 3
)

// Errors.
var (
	// ErrNotSupported is wrapped by every error that reports a feature the
	// OS or its backend lacks.
	ErrNotSupported = errors.New("divert: not supported")
	// ErrTruncated is returned by Recv, with the truncated packet, when the
	// buffer is smaller than the packet (WinDivert's
	// ERROR_INSUFFICIENT_BUFFER), and on Linux, wrapped, when the packet is
	// longer than the 65531 bytes the kernel's queue hands over (a whole
	// 65535-byte datagram at the output hook, before fragmentation). On
	// Linux such a packet can be sent back unchanged, not changed (Send
	// then returns an error wrapping ErrTruncated and the packet stays
	// held); on Windows and FreeBSD the packet has left the kernel, and
	// only what was received can be sent. (On Linux, Send of the received bytes
	// unchanged puts the whole original packet back; elsewhere, and with
	// NewPipe, the cut packet is sent, and must then be whole: see Send.)
	ErrTruncated = errors.New("divert: packet truncated: buffer too small")
	// ErrShutdown is returned by Recv once the handle was shut down for
	// receiving and its queue is empty, and by Send after ShutdownSend
	// (WinDivert's ERROR_NO_DATA). errors.Is(ErrShutdown, io.EOF) holds.
	ErrShutdown error = shutdownError{}
	// ErrDontFragment is wrapped by the error Send returns when a
	// reassembled IPv4 datagram (FlagReassemble; Linux and Windows) is
	// larger than the size it must be refragmented to (see FlagReassemble)
	// and has DF set, and on Linux when a new outbound IPv4 packet larger
	// than its route's MTU has DF set (that error wraps syscall.EMSGSIZE
	// too: see Send). Nothing is sent.
	ErrDontFragment = reassembly.ErrDontFragment
	// ErrFragment is wrapped by the error CalcChecksums returns for a
	// first fragment: its transport checksum covers the whole datagram,
	// which the fragment does not hold (the IPv4 header checksum is fixed
	// all the same). Reassemble the datagram first, or skip that checksum.
	ErrFragment = errors.New("divert: a fragment holds only part of the datagram")
	// ErrNotQueued is wrapped by the error Send and Drop return for a
	// received packet (or reassembled datagram) that is no longer queued
	// for its verdict: already sent or dropped, through its Address or a
	// copy of it, or dropped when it waited ParamQueueTime. Nothing is
	// sent. Only where received packets wait in the kernel's queue (Linux)
	// or in a Pipe: on Windows and FreeBSD a received packet has left the
	// kernel, and every Send injects it anew.
	ErrNotQueued = errors.New("divert: packet no longer queued")
)

type shutdownError struct{}

func (shutdownError) Error() string        { return "divert: handle shut down" }
func (shutdownError) Is(target error) bool { return target == io.EOF }

// FilterError reports a filter that does not compile. It is the filter
// package's error; Pos is the character position of the fault.
type FilterError = filter.Error

// FlowData is the flow or socket 5-tuple of an Address at LayerFlow and
// LayerSocket. Addresses are 16-byte values; IPv4 is IPv4-mapped
// (::ffff:a.b.c.d), as in WinDivert.
type FlowData struct {
	EndpointID       uint64   // the endpoint (WinDivert's EndpointId)
	ParentEndpointID uint64   // the parent endpoint (ParentEndpointId)
	ProcessID        uint32   // the process that owns the flow or socket
	LocalAddr        [16]byte // local address, IPv4-mapped for IPv4
	RemoteAddr       [16]byte // remote address, IPv4-mapped for IPv4
	LocalPort        uint16   // local port
	RemotePort       uint16   // remote port
	Protocol         uint8    // IP protocol number
}

// ReflectData describes another handle at LayerReflect.
type ReflectData struct {
	Timestamp int64  // when the handle was opened (QueryPerformanceCounter ticks)
	ProcessID uint32 // the process that opened it
	Layer     Layer  // its layer
	Flags     Flag   // its flags
	Priority  int16  // its priority
}

// Address is what comes with every packet: where it was taken and how to put
// it back. Recv fills it; Send reads Outbound, Impostor, the checksum bits,
// IfIdx and SubIfIdx (WinDivert's contract; its driver reads Outbound at
// LayerNetwork only, see Send), and, for a packet that was
// received, the hidden reference that lets the backend reinject that exact
// packet, as long as Outbound is what Recv set. A zero Address with Outbound
// set describes a new outbound packet; a zero Address with an IfIdx
// describes a new inbound packet; a received Address with Outbound reversed
// describes a new packet going back the way the received one came (see
// Send).
type Address struct {
	// Timestamp is when the packet was taken: nanoseconds since the Unix
	// epoch on Linux and FreeBSD, QueryPerformanceCounter ticks on Windows.
	Timestamp int64
	// Layer is the handle's layer.
	Layer Layer
	// Event says what the address describes.
	Event Event
	// Sniffed is set when the packet was copied, not taken (FlagSniff).
	Sniffed bool
	// Outbound is set for packets leaving the host; clear for inbound. At
	// LayerNetworkForward it is always set, as WinDivert's driver sets it
	// for a routed packet.
	Outbound bool
	// Loopback is set for packets from the host to itself.
	Loopback bool
	// Impostor is set for packets injected by someone else (Windows: by
	// another driver). Linux and FreeBSD never set it, so the filter's
	// impostor field is false there. On Send, Windows' driver decrements
	// the TTL or hop limit of a packet whose Impostor is set, so that it
	// cannot loop, and refuses it (error code ERROR_HOST_UNREACHABLE) when
	// that is 1 or less; Linux and FreeBSD ignore the bit.
	Impostor bool
	// IPv6 is set for IPv6 packets.
	IPv6 bool
	// IPChecksum, TCPChecksum and UDPChecksum are set when that checksum is
	// known valid. On Send they say the checksum is already valid.
	IPChecksum  bool
	TCPChecksum bool
	UDPChecksum bool
	// IfIdx is the interface index (the receiving interface for inbound
	// packets, the sending one for outbound packets when known; at
	// LayerNetworkForward the one the packet is forwarded through).
	IfIdx uint32
	// SubIfIdx is the sub-interface index (Windows; zero elsewhere).
	SubIfIdx uint32
	// Flow holds the 5-tuple at LayerFlow and LayerSocket.
	Flow FlowData
	// Reflect describes the other handle at LayerReflect.
	Reflect ReflectData

	sys  sysAddr // backend's reference to the queued packet; zero for new packets
	pipe uint64  // a Pipe's reference to the queued packet (NewPipe)
}

// Message is one packet of a batch: Buf is caller-owned, the packet is
// Buf[:N].
type Message struct {
	Buf  []byte  // the caller's buffer
	N    int     // the packet's length: RecvBatch sets it, SendBatch reads it
	Addr Address // the packet's address
}

// backend is the seam between Handle and an OS implementation. Handle checks
// arguments and state; a backend only moves packets.
type backend interface {
	recv(b []byte, a *Address) (int, error)
	recvBatch(ms []Message) (int, error)
	send(b []byte, a *Address) (int, error)
	sendBatch(ms []Message) (int, error)
	drop(a *Address) error
	shutdown(how ShutdownHow) error
	close() error
	setParam(p Param, v uint64) error
	setReadDeadline(t time.Time) error
	version() (major, minor uint64)
}

// openConfig is what Open and OpenPort hand a backend.
type openConfig struct {
	filter   *filter.Filter // nil for OpenPort
	layer    Layer
	priority int16
	flags    Flag
	port     int // -1 for Open; the queue number / divert port for OpenPort
	params   [3]uint64
}

// Handle is an open divert handle. It is safe for concurrent use: many
// goroutines may Recv and Send at once.
type Handle struct {
	b      backend
	layer  Layer
	flags  Flag
	closed atomic.Bool
	shut   atomic.Int32
	mu     sync.Mutex // guards params
	params [3]uint64
}

// Open opens a handle that intercepts the packets filter matches at layer.
// filter is WinDivert's filter language (see package filter); priority is in
// [PriorityLowest, PriorityHighest], higher first. A filter error is a
// *FilterError with the position of the fault. Missing privileges give an
// error wrapping os.ErrPermission (on Linux also, rarely, nftables tables
// that other processes own under every name Open tries; the message says
// so); a layer or flag the OS cannot do gives an error wrapping
// ErrNotSupported. A failed Open undoes what it set up; on
// Linux an error in undoing it is wrapped in Open's error too, as Close
// returns the errors of its own cleanup.
func Open(filterText string, layer Layer, priority int16, flags Flag) (*Handle, error) {
	cfg, err := prepare(filterText, layer, priority, flags, true)
	if err != nil {
		return nil, err
	}
	return open(cfg)
}

// MaxQueues is the most handles OpenQueues opens at once.
const MaxQueues = 64

// OpenQueues is Open for a multi-core consumer: it opens n handles that share
// one filter, layer, priority and flags and split the matching packets
// between them, one reader goroutine per handle. On Linux each handle reads
// its own NFQUEUE queue and the kernel spreads packets over the queues by a
// hash of the address pair (and, for IPv4, the protocol; not the ports):
// every packet between two hosts, both ways, goes to one handle, so the
// load spreads when many address pairs are diverted, and throughput then
// grows with cores when the consumer is the bottleneck. WinDivert and divert(4) serve
// concurrent readers from one queue: there (and on Linux at LayerFlow, one
// event socket, and for FlagDrop and FlagSendOnly handles, which no program
// reads, one backend) the n handles share it, with its read deadline and Shutdown
// state, and closing one of them does not end a Recv blocked on it: that
// returns with the next packet or event, or when the last handle is closed;
// Shutdown ends them all. The rules stay until the last of the n
// handles is closed. A failed OpenQueues undoes what it set up, as Open
// does; on Linux its error holds, after the cause, one "(and cleaning up:
// ...)" group with every error of undoing it, each found by errors.Is. On
// its way to a success it may bind queues and give them up (a run of free
// queue numbers cut short by a busy one); closing those leaves nothing
// behind, and a successful OpenQueues has no error to report it in.
func OpenQueues(filterText string, layer Layer, priority int16, flags Flag, n int) ([]*Handle, error) {
	if n < 1 || n > MaxQueues {
		return nil, fmt.Errorf("divert: queue count %d out of range [1, %d]: %w", n, MaxQueues, os.ErrInvalid)
	}
	cfg, err := prepare(filterText, layer, priority, flags, true)
	if err != nil {
		return nil, err
	}
	cfg.params = [3]uint64{QueueLengthDefault, QueueTimeDefault, QueueSizeDefault}
	bs, err := openBackends(&cfg, n)
	if err != nil {
		return nil, err
	}
	hs := make([]*Handle, len(bs))
	for i, b := range bs {
		hs[i] = &Handle{b: b, layer: cfg.layer, flags: cfg.flags, params: cfg.params}
	}
	return hs, nil
}

// prepare validates Open's arguments and compiles the filter. With osLayer,
// a layer the OS has no counterpart of is refused first (ErrNotSupported),
// rather than after the flags it would need elsewhere.
func prepare(filterText string, layer Layer, priority int16, flags Flag, osLayer bool) (openConfig, error) {
	if layer > LayerReflect {
		return openConfig{}, fmt.Errorf("divert: invalid layer %d: %w", uint8(layer), os.ErrInvalid)
	}
	if osLayer {
		if err := layerSupport(layer); err != nil {
			return openConfig{}, err
		}
	}
	if priority < PriorityLowest || priority > PriorityHighest {
		return openConfig{}, fmt.Errorf("divert: priority %d out of range [%d, %d]: %w", priority, PriorityLowest, PriorityHighest, os.ErrInvalid)
	}
	if err := flags.Validate(); err != nil {
		return openConfig{}, err
	}
	if err := checkLayerFlags(layer, flags); err != nil {
		return openConfig{}, err
	}
	f, err := filter.Compile(filterText, filter.Layer(layer))
	if err != nil {
		return openConfig{}, err
	}
	return openConfig{filter: f, layer: layer, priority: priority, flags: flags, port: -1}, nil
}

// OpenPort attaches to a divert rule an administrator set up instead of
// installing one: on Linux port is the NFQUEUE queue number (for rules such
// as "iptables -A INPUT -p icmp -j NFQUEUE --queue-num 1234"), on FreeBSD the
// divert port of an ipfw "divert" rule. Windows has no such rules and returns
// ErrNotSupported. The handle is at LayerNetwork; every packet the rule
// queues is received (on Linux except inbound loopback packets, which are
// accepted unseen and counted in Stats.Passed, as WinDivert shows loopback
// traffic outbound only). On Linux the handle's priority is 0, and the new
// packets it sends carry the socket mark 0xD1103530: when the rule queues
// them again (or any packet with a mark from 0xD1000000 to it, which
// handles of priority 0 or higher sent), the handle accepts them unseen,
// counted in Stats.Passed, so that it never receives its own injections;
// a rule that leaves those marks alone (nft: "meta mark !=
// 0xd1000000-0xd1103530") spares them the trip through user space. The
// rule decides what is taken, where and how, so the
// flags about that (FlagDrop, FlagPassThrough, FlagFragments,
// FlagReassemble) are refused with ErrNotSupported. With FlagSniff the
// handle sends nothing back: on FreeBSD that suits a "tee" rule, whose
// packets are copies; a "divert" rule's packets would be lost. On FreeBSD a
// new packet the handle sends resumes after the highest rule number its
// received packets of that direction came with, so that the rule does not
// divert it back to the handle; before the handle has received a packet it
// runs the whole ruleset, and the rule may.
func OpenPort(port uint16, flags Flag) (*Handle, error) {
	if err := flags.Validate(); err != nil {
		return nil, err
	}
	if f := flags & (FlagDrop | FlagPassThrough | FlagFragments | FlagReassemble); f != 0 {
		return nil, fmt.Errorf("divert: OpenPort with flags %#x: %w (the administrator's rule decides what is taken and how)", uint64(f), ErrNotSupported)
	}
	return open(openConfig{layer: LayerNetwork, flags: flags, port: int(port)})
}

func checkLayerFlags(layer Layer, flags Flag) error {
	switch layer {
	case LayerFlow, LayerReflect:
		if flags&(FlagSniff|FlagRecvOnly) != FlagSniff|FlagRecvOnly {
			return fmt.Errorf("divert: layer %v needs FlagSniff|FlagRecvOnly: %w", layer, os.ErrInvalid)
		}
	case LayerSocket:
		if flags&FlagRecvOnly == 0 {
			return fmt.Errorf("divert: layer %v needs FlagRecvOnly: %w", layer, os.ErrInvalid)
		}
	}
	if flags&FlagFragments != 0 && layer != LayerNetwork {
		return fmt.Errorf("divert: FlagFragments needs layer %v: %w", LayerNetwork, os.ErrInvalid)
	}
	return nil
}

func open(cfg openConfig) (*Handle, error) {
	cfg.params = [3]uint64{QueueLengthDefault, QueueTimeDefault, QueueSizeDefault}
	b, err := openBackend(&cfg)
	if err != nil {
		return nil, err
	}
	return &Handle{b: b, layer: cfg.layer, flags: cfg.flags, params: cfg.params}, nil
}

var errClosed = fmt.Errorf("divert: use of closed handle: %w", net.ErrClosed)

func (h *Handle) checkRecv() error {
	if h.closed.Load() {
		return errClosed
	}
	if h.flags&(FlagSendOnly|FlagDrop) != 0 {
		return fmt.Errorf("divert: handle cannot receive (FlagSendOnly or FlagDrop): %w", os.ErrInvalid)
	}
	return nil
}

func (h *Handle) checkSend() error {
	if h.closed.Load() {
		return errClosed
	}
	if h.flags&FlagRecvOnly != 0 {
		return fmt.Errorf("divert: handle cannot send (FlagRecvOnly): %w", os.ErrInvalid)
	}
	if h.shut.Load()&int32(ShutdownSend) != 0 {
		return ErrShutdown
	}
	return nil
}

// Recv receives one packet into b and fills a. It blocks until a packet
// comes, the read deadline passes (os.ErrDeadlineExceeded), the handle is
// shut down and drained (ErrShutdown) or closed (net.ErrClosed). A buffer
// smaller than the packet receives the first len(b) bytes and ErrTruncated.
// A received packet stays out of the host's path until it is sent back with
// Send, dropped with Drop, or its ParamQueueTime runs out (then it is
// dropped; Linux, where the kernel holds it: on Windows and FreeBSD it has
// left the kernel and waits for Send as long as the program likes). At the
// network layers an empty b is refused before anything is received: no
// packet could be sent back from it. (At the flow, socket and reflect
// layers, which carry no packet, b may be empty, as in WinDivert.)
func (h *Handle) Recv(b []byte, a *Address) (int, error) {
	if err := h.checkRecv(); err != nil {
		return 0, err
	}
	if a == nil {
		return 0, fmt.Errorf("divert: nil Address: %w", os.ErrInvalid)
	}
	if len(b) == 0 && carriesPackets(h.layer) {
		return 0, errEmptyBuf
	}
	return h.b.recv(b, a)
}

var errEmptyBuf = fmt.Errorf("divert: recv: empty buffer (nothing received): %w", os.ErrInvalid)

// carriesPackets reports whether a layer's events are packets, which a
// receive buffer must hold (the others carry only an Address).
func carriesPackets(l Layer) bool { return l == LayerNetwork || l == LayerNetworkForward }

// RecvBatch receives up to min(len(ms), BatchMax) packets, blocking for the
// first only. It returns how many messages it filled; each gets its packet
// in Buf[:N] and its Address. A message whose Buf is too small holds the
// truncated packet; the call then also returns ErrTruncated. At the network
// layers a message with an empty Buf ends the batch before it (the first
// one is refused, as by Recv).
func (h *Handle) RecvBatch(ms []Message) (int, error) {
	if err := h.checkRecv(); err != nil {
		return 0, err
	}
	if len(ms) > BatchMax {
		ms = ms[:BatchMax]
	}
	if len(ms) == 0 {
		return 0, nil
	}
	if len(ms[0].Buf) == 0 && carriesPackets(h.layer) {
		return 0, errEmptyBuf
	}
	return h.b.recvBatch(ms)
}

// Send injects b. With an Address from Recv it reinjects that packet, changed
// or not, where it was taken (a handle never sees its own reinjected packets
// again; lower-priority handles do). With a fresh Address it injects a new
// packet: outbound when a.Outbound is set, else inbound as if received on
// interface a.IfIdx. A copy of a received Address with Outbound reversed is
// such a fresh one, WinDivert's way to answer a packet (its netfilter
// sample sends a TCP reset or an ICMP error so): Send injects b the other
// way, and the received packet is left to its own Address (on Linux and in
// a Pipe it stays held: Drop it once answered, or it waits out
// ParamQueueTime and counts against ParamQueueLength until then). (On
// Linux, at LayerNetworkForward a new packet always goes out on its route,
// and an outbound one whose destination is scoped to one link, IPv6 or IPv4
// link-local unicast or multicast or the IPv4 limited broadcast
// 255.255.255.255, leaves through interface a.IfIdx when
// it is set. On Windows, at LayerNetworkForward the driver ignores
// a.Outbound and forwards every packet out of interface a.IfIdx, which in
// a received Address is the interface the packet was routed to: an answer
// needs the index of the interface toward its own destination.) On Linux
// an inbound new packet is a raw send to its
// destination, which must be one of the host's addresses: it enters the
// stack through lo, so other handles see it as outbound loopback and
// a.IfIdx is not used. Any other destination (another host's, a broadcast
// or multicast one) would leave the host, so Send refuses it with an error
// wrapping ErrNotSupported and sends nothing. Checksums: a clear IP, TCP or
// UDP checksum bit of a (a zero Address has them all clear) makes Send
// compute that checksum: on Windows for every packet (WinDivert's driver
// does), but for a fragment's TCP or UDP checksum, which covers the whole
// datagram; on Linux for new packets and changed received ones; on both,
// for a datagram FlagReassemble rebuilt from fragments, when it was
// changed, before it is refragmented. Set bits, ICMP's checksums, FreeBSD,
// and packets (on Windows, rebuilt datagrams) sent back unchanged send the
// packet's as given. (On Linux a received packet's TCP and UDP bits are
// often clear: the stack finishes those checksums later.) Use
// CalcChecksums after changing a packet. On Linux a new outbound packet
// larger than its route's MTU goes out as fragments of that MTU, as the
// host fragments its own datagrams; an IPv4 one with DF set is refused with
// an error wrapping syscall.EMSGSIZE. On Windows a packet injected outbound
// at LayerNetwork that is larger than its interface's MTU is not sent, and
// Send cannot tell (the stack refuses it after Send returned); WinDivert's
// driver after 2.2.2 then answers the host with an ICMP
// fragmentation-needed (IPv4, DF or not) or packet-too-big message for an
// MTU it guesses, 2.2.2 and before say nothing. b must hold one
// whole IPv4 or IPv6 packet, whose length field b covers; bytes past it
// are left out, as WinDivert's driver ignores them. Send refuses others with an error, and
// on Linux and in a Pipe a received packet stays held. (On Linux and with NewPipe a received packet sent back unchanged is
// not checked: it is the stack's own.) Sending an Address again after Send or Drop injects a new
// packet; on Windows and FreeBSD so does any copy of a received Address,
// while on Linux a copy taken before the Send or Drop is an error (its
// packet is gone), except for a datagram reassembled in user space.
//
// On Linux a received packet that the kernel dropped while the program
// held it is not reported: its Send returns no error and sends nothing.
// The kernel drops every packet queued in the network namespace when a
// netfilter hook there is removed (another program deletes a base chain or
// table, reloads iptables, or closes a handle of its own), and the packets
// that came in on or were to leave through an interface that goes down.
// The kernel answers the verdict with ENOENT, but on the queue's socket,
// after Send has returned and behind the packets waiting to be received,
// and Recv skips the answer: the verdicts of unchanged packets go out in
// batches, often after their Send returned, and a batch is answered only
// when none of its packets was still queued. Telling Send's caller would
// cost a round trip to the kernel for every packet; Stats.RefusedVerdicts
// counts these answers once a receive call has read them.
func (h *Handle) Send(b []byte, a *Address) (int, error) {
	if err := h.checkSend(); err != nil {
		return 0, err
	}
	if a == nil {
		return 0, fmt.Errorf("divert: nil Address: %w", os.ErrInvalid)
	}
	if len(b) == 0 || len(b) > MTUMax {
		return 0, fmt.Errorf("divert: packet length %d out of range [1, %d]: %w", len(b), MTUMax, os.ErrInvalid)
	}
	return h.b.send(b, a)
}

// SendBatch sends the messages, each Buf[:N] with its Addr, and returns how
// many were sent. More than BatchMax messages are refused, before any is
// sent, as is any with N out of range. On error the count is how many
// messages went before the one that failed, so a caller can go on from
// there; on Windows, where a batch is one WinDivertSendEx that injects its
// other packets past one it could not, the count is then every message
// (and N must be the packet's IP length, as the driver cuts the batch by
// it).
func (h *Handle) SendBatch(ms []Message) (int, error) {
	if err := h.checkSend(); err != nil {
		return 0, err
	}
	if len(ms) > BatchMax {
		// Sending the first BatchMax with no error would leave the rest
		// unsent for a caller that checks only the error.
		return 0, fmt.Errorf("divert: SendBatch of %d messages: at most BatchMax (%d) per call: %w", len(ms), BatchMax, os.ErrInvalid)
	}
	for i := range ms {
		if ms[i].N <= 0 || ms[i].N > len(ms[i].Buf) || ms[i].N > MTUMax {
			return 0, fmt.Errorf("divert: message %d: length %d out of range: %w", i, ms[i].N, os.ErrInvalid)
		}
	}
	if len(ms) == 0 {
		return 0, nil
	}
	return h.b.sendBatch(ms)
}

// Drop releases a received packet at once, dropping it. Not sending a packet
// drops it too, but only when ParamQueueTime runs out (Linux, NewPipe) —
// Drop says so now. On backends where the packet already left the kernel
// (Windows, FreeBSD) it only counts the packet in Stats.Dropped, and its
// Address no longer names a held packet.
func (h *Handle) Drop(a *Address) error {
	if h.closed.Load() {
		return errClosed
	}
	if a == nil {
		return fmt.Errorf("divert: nil Address: %w", os.ErrInvalid)
	}
	return h.b.drop(a)
}

// Shutdown stops receiving, sending or both, like WinDivertShutdown: after
// ShutdownRecv no new packet is queued (what the filter matches goes on
// its way, unseen, also for a FlagDrop handle), packets already queued can
// still be received, and then Recv returns ErrShutdown (at LayerReflect, where
// WinDivert never ends a receive for a shutdown, Recv keeps waiting: use
// Close or a read deadline).
func (h *Handle) Shutdown(how ShutdownHow) error {
	if h.closed.Load() {
		return errClosed
	}
	if how < ShutdownRecv || how > ShutdownBoth {
		return fmt.Errorf("divert: invalid shutdown direction %d: %w", how, os.ErrInvalid)
	}
	for {
		old := h.shut.Load()
		if h.shut.CompareAndSwap(old, old|int32(how)) {
			break
		}
	}
	return h.b.shutdown(how)
}

// Close closes the handle: its rules are removed, packets still queued are
// reinjected (as WinDivert does), and blocked calls return net.ErrClosed.
// Later calls return net.ErrClosed. Only on Linux does a packet the program
// has received (and not sent back) stay queued until Close reinjects it; on
// FreeBSD, on Windows and in a Pipe it has left the queue, and unless sent
// back first it is gone. (On Linux a datagram FlagReassemble rebuilt in
// user space stays queued as its fragments, which Close reinjects.) On
// Linux removing a netfilter hook makes the kernel drop every packet queued
// in the network namespace, other handles' too: so while another handle of
// the process is open in the namespace, Close empties its table and leaves
// its hooks in place until the last handle there is closed; other
// programs' changes still drop them (see the README's Linux notes). On
// FreeBSD a rule ipfw cannot remove (it fails, or another program's rule
// shares its set and number) stays installed: Close then returns an error,
// and the process's later Open and Close calls try again (see the README's
// FreeBSD notes).
func (h *Handle) Close() error {
	if h.closed.Swap(true) {
		return errClosed
	}
	return h.b.close()
}

// SetReadDeadline sets the deadline for Recv and RecvBatch; a zero time
// means none. Past it they return an error wrapping os.ErrDeadlineExceeded,
// even with packets queued (as Go's deadlines do), except after
// Shutdown(ShutdownRecv), when they drain what is queued whatever the
// deadline.
func (h *Handle) SetReadDeadline(t time.Time) error {
	if h.closed.Load() {
		return errClosed
	}
	if h.flags&(FlagDrop|FlagSendOnly) != 0 {
		// No Recv to bound. (A FlagDrop handle's own reader, which drops
		// what its kernel rules cannot judge, must not be stopped.)
		return nil
	}
	return h.b.setReadDeadline(t)
}

// SetParam sets a param. Values out of range are errors, never clamped.
func (h *Handle) SetParam(p Param, v uint64) error {
	if h.closed.Load() {
		return errClosed
	}
	if err := checkParam(p, v); err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := h.b.setParam(p, v); err != nil {
		return err
	}
	h.params[p] = v
	return nil
}

// Param returns a param's value.
func (h *Handle) Param(p Param) (uint64, error) {
	if h.closed.Load() {
		return 0, errClosed
	}
	switch p {
	case ParamQueueLength, ParamQueueTime, ParamQueueSize:
		h.mu.Lock()
		defer h.mu.Unlock()
		return h.params[p], nil
	case ParamVersionMajor:
		major, _ := h.b.version()
		return major, nil
	case ParamVersionMinor:
		_, minor := h.b.version()
		return minor, nil
	}
	return 0, fmt.Errorf("divert: unknown param %d: %w", uint32(p), os.ErrInvalid)
}
