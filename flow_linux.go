package divert

import (
	"container/list"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mdlayher/netlink"
	"github.com/ti-mo/conntrack"
	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/filter"
	"github.com/netdivert/divert/internal/netcap"
	"github.com/netdivert/divert/internal/nfq"
	"github.com/netdivert/divert/internal/nftrules"
)

// LayerFlow on Linux: conntrack's events.
//
// A flow handle joins conntrack's NEW, UPDATE and DESTROY event groups on
// a netlink socket of the caller's network namespace, then installs an
// owned nftables table (nftrules.InstallFlowTrack) whose rules make
// conntrack run there for the handle's life and label each connection
// the host begins (output hook; lo as well: loopback) or another host
// begins toward it (input hook). Forwarded connections cross neither hook
// and carry no label, so they are never reported, nor are connections
// conntrack tracked before the table existed (no label either), as
// WinDivert reports only flows established after Open.
//
// A reader goroutine decodes the events (github.com/ti-mo/conntrack's
// Event.Unmarshal: the ecosystem's decoder of ctnetlink messages, on a
// netlink socket of our own, whose receive errors — ENOBUFS above all —
// and deadlines the handle must see; conntrack's Listen hides both behind
// worker goroutines that stop at the first error), turns them into
// Addresses (flowTracker), judges them with the handle's filter and queues
// those that match, at most ParamQueueLength; Recv takes them from that
// queue.
//
// The process of a TCP or UDP flow is looked up when it is established
// (flowpid_linux.go), before the filter judges the event.
//
// Established: for TCP, the update that moves the connection to
// ESTABLISHED (the handshake completed, when WinDivert's
// ALE_FLOW_ESTABLISHED fires; a refused or unanswered connect is never
// reported); for every other protocol the NEW event (the first packet).
// Deleted: conntrack's DESTROY, which comes when conntrack forgets the
// connection, after its timeout (TCP's TIME_WAIT, 120 s by default; UDP's
// 30 s or 120 s once replied both ways; ICMP's 30 s). A DESTROY event
// carries no labels: the tracker keeps each reported flow, by conntrack
// id, until it, and gives the deletion the same FlowData as the
// establishment.
//
// Events the socket's buffer cannot take are lost (ENOBUFS): the reader
// then dumps conntrack's table on a second socket and reconciles the
// tracker with it (flowTracker.dumped, flowBackend.resync), as conntrackd
// resynchronises.

const (
	// flowTrackMax bounds the flows a handle remembers between their
	// NEW and DESTROY events. Past it the oldest TCP connection not yet
	// established is forgotten (should it complete its handshake, it is
	// not reported, unless a dump after an overflow finds it), or when
	// there is none the oldest flow: its DESTROY is then not reported
	// (counted in Stats.Overflows if its establishment was delivered,
	// unless the event socket overflowed since the flow was added and no
	// dump found it alive since: that overflow, counted already, may have
	// taken its DESTROY), nor its establishment again by a dump that
	// finds it alive (flowTracker.forgotten).
	flowTrackMax = 1 << 16
	// loopServerBit marks the EndpointID of the server's view of a
	// loopback flow (the client's is the conntrack id).
	loopServerBit = 1 << 32
)

// TCP states of conntrack (enum tcp_conntrack).
const (
	tcpSynSent  = 1
	tcpSynRecv  = 2
	tcpEstab    = 3
	tcpTimeWait = 7
	tcpSynSent2 = 9
)

// tcpFlagBeLiberal is IP_CT_TCP_FLAG_BE_LIBERAL, which conntrack sets in
// both directions' flags of a TCP connection it picks up in mid-stream.
const tcpFlagBeLiberal = 0x08

// ctKind is a conntrack event's type.
type ctKind uint8

const (
	ctNew ctKind = iota + 1
	ctUpdate
	ctDestroy
)

// ctTuple is one direction of a connection.
type ctTuple struct {
	src, dst     netip.Addr
	sport, dport uint16
}

// ctEvent is what the tracker needs of a conntrack event.
type ctEvent struct {
	kind        ctKind
	id          uint32
	proto       uint8
	orig, reply ctTuple
	icmp        bool  // ICMP or ICMPv6: icmpType and icmpCode hold the first packet's
	icmpType    uint8 // of the original direction
	icmpCode    uint8
	labels      byte // byte nftrules.LabelByte of the labels (NEW events, dumps)
	tcpState    int  // -1: no TCP protoinfo in the event
	// pickedUp: TCP whose original direction conntrack tracks with
	// liberal window checks, as it does a connection picked up in
	// mid-stream (tcp_new)
	pickedUp bool
}

// ctEventOf converts a decoded conntrack event. ok is false for events
// that are not about a connection (expectations) or lack its tuple.
func ctEventOf(ev *conntrack.Event) (e ctEvent, ok bool) {
	switch ev.Type {
	case conntrack.EventNew:
		e.kind = ctNew
	case conntrack.EventUpdate:
		e.kind = ctUpdate
	case conntrack.EventDestroy:
		e.kind = ctDestroy
	default:
		return e, false
	}
	f := ev.Flow
	if f == nil || !f.TupleOrig.IP.SourceAddress.IsValid() || !f.TupleOrig.IP.DestinationAddress.IsValid() {
		return e, false
	}
	e.id = f.ID
	o, r := &f.TupleOrig, &f.TupleReply
	e.proto = o.Proto.Protocol
	e.orig = ctTuple{o.IP.SourceAddress, o.IP.DestinationAddress, o.Proto.SourcePort, o.Proto.DestinationPort}
	e.reply = ctTuple{r.IP.SourceAddress, r.IP.DestinationAddress, r.Proto.SourcePort, r.Proto.DestinationPort}
	if !e.reply.src.IsValid() || !e.reply.dst.IsValid() {
		// Not expected (the kernel sends both tuples); the original
		// reversed is the reply without NAT.
		e.reply = ctTuple{e.orig.dst, e.orig.src, e.orig.dport, e.orig.sport}
	}
	if o.Proto.ICMPv4 || o.Proto.ICMPv6 {
		e.icmp = true
		e.icmpType, e.icmpCode = o.Proto.ICMPType, o.Proto.ICMPCode
		e.orig.sport, e.orig.dport, e.reply.sport, e.reply.dport = 0, 0, 0, 0
	}
	if len(f.Labels) > nftrules.LabelByte {
		e.labels = f.Labels[nftrules.LabelByte]
	}
	e.tcpState = -1
	if f.ProtoInfo.TCP != nil {
		e.tcpState = int(f.ProtoInfo.TCP.State)
		// CTA_PROTOINFO_TCP_FLAGS_ORIGINAL is struct nf_ct_tcp_flags
		// {flags, mask}, which the decoder reads as a big-endian uint16.
		e.pickedUp = (f.ProtoInfo.TCP.OriginalFlags>>8)&tcpFlagBeLiberal != 0
	}
	return e, true
}

// flowEntry is a flow the tracker reports: one view, or two for loopback
// (the client's, outbound, then the server's, inbound).
type flowEntry struct {
	key         flowKey
	views       [2]Address
	nviews      int
	established bool
	lost        [2]bool // the view's establishment was not delivered: lost to a full queue, or no socket took its datagram (owner)
	elem        *list.Element
	in          *list.List // the tracker's list that holds elem
	since       uint64     // flowTracker.overflows when the flow was added
	seen        uint64     // flowTracker.sync of the last dump that had the flow
	// resynced: added by a dump after an overflow; its NEW event, should
	// it be read later, is not a new flow
	resynced bool
	// gone: the view's establishment expired unread (ParamQueueTime),
	// set by the receiving side: its deletion is not reported either.
	gone [2]atomic.Bool
}

// flowKey names a connection: its conntrack id, a 32-bit hash that two
// live connections may share (a busy host's tens of thousands of them
// meet such a pair every few minutes), with what the hash is of.
type flowKey struct {
	id    uint32
	proto uint8
	orig  ctTuple
}

// flowTracker turns conntrack events into flow events. It is used by one
// goroutine at a time.
type flowTracker struct {
	max   int
	flows map[flowKey]*flowEntry
	// ids counts the flows remembered under each conntrack id: an UPDATE
	// or DESTROY of an id not here concerns no flow of the handle, and
	// the reader skips it without decoding it (ctSkip).
	ids   map[uint32]int
	order list.List // of the established *flowEntry, oldest first
	// pending holds the TCP connections not yet established, oldest
	// first: at the bound they go first (a SYN flood's would else push
	// out the flows whose deletions are owed).
	pending list.List
	// deliver hands an event on, with its view's gone flag (which the
	// queue sets when an establishment expires, and checks before it
	// returns a deletion); false means it was lost (a full queue).
	// Filtered out is not lost.
	deliver func(a *Address, gone *atomic.Bool) bool
	// lost counts a deletion that will not be reported because the
	// tracker forgot an established flow (flowTrackMax).
	lost func(deleted *Address)
	// overflows counts the event socket's overflows (ENOBUFS), each
	// counted in Stats.Overflows already: a flow added before one may
	// have lost its DESTROY to it, and is not counted again when
	// forgotten, unless a dump (resync) since found it alive.
	overflows uint64
	// sync numbers the dumps (resync); synced is overflows when the last
	// complete one began (syncFrom: when the current one did).
	sync, synced, syncFrom uint64
	// forgotten holds the keys of the established flows forgotten at the
	// bound (their establishment reported, their deletion counted lost),
	// oldest first in forgotOrder, at most max of them: a dump after an
	// overflow that finds one alive does not report it established
	// again. A complete dump drops those it no longer has.
	forgotten   map[flowKey]*list.Element // of *forgotFlow, in forgotOrder
	forgotOrder list.List
	// owner, when not nil, returns the process of an established view
	// (0: unknown), whose Timestamp says when its event was read; the
	// deletion keeps it. noSocket reports an inbound UDP view whose local
	// socket the kernel says does not exist: a datagram to a port nobody
	// listens on (a port scan's), which WinDivert's flow layer, needing a
	// socket to accept the flow, does not report either.
	owner func(a *Address) (pid uint32, noSocket bool)
}

// forgotFlow is an entry of flowTracker.forgotten.
type forgotFlow struct {
	key  flowKey
	seen uint64 // flowTracker.sync of the last dump that had the flow
}

func newFlowTracker(max int, deliver func(*Address, *atomic.Bool) bool, lost func(*Address)) *flowTracker {
	return &flowTracker{max: max, flows: make(map[flowKey]*flowEntry), ids: make(map[uint32]int),
		forgotten: make(map[flowKey]*list.Element), deliver: deliver, lost: lost}
}

// handle processes one event read at now (Address.Timestamp).
func (t *flowTracker) handle(e *ctEvent, now int64) {
	switch e.kind {
	case ctNew:
		if e.labels&(nftrules.LabelOut|nftrules.LabelIn) == 0 {
			return // forwarded, or tracked before the handle's table
		}
		if e.proto == unix.IPPROTO_TCP && e.tcpState != tcpSynSent && e.tcpState != -1 {
			// Picked up in mid-stream (conntrack's loose tracking of a
			// connection older than the table): not a new flow.
			return
		}
		if old := t.flows[flowKey{e.id, e.proto, e.orig}]; old != nil {
			if old.resynced {
				// The dump after an overflow found the flow: this is
				// its NEW, read late.
				old.resynced = false
				return
			}
			t.remove(old) // its DESTROY was lost (ENOBUFS, counted)
		}
		if f := t.forgotten[flowKey{e.id, e.proto, e.orig}]; f != nil {
			t.unforget(f) // a new flow of a key forgotten: the old flow ended
		}
		t.add(e, now, e.proto != unix.IPPROTO_TCP)
	case ctUpdate:
		fe := t.flows[flowKey{e.id, e.proto, e.orig}]
		if fe == nil || fe.established || e.proto != unix.IPPROTO_TCP {
			return
		}
		if e.tcpState >= tcpEstab && e.tcpState <= tcpTimeWait {
			t.pending.Remove(fe.elem)
			fe.in = &t.order
			fe.elem = t.order.PushBack(fe)
			t.establish(fe, now)
		}
	case ctDestroy:
		fe := t.flows[flowKey{e.id, e.proto, e.orig}]
		if fe == nil {
			return
		}
		t.deleted(fe, now)
	}
}

// add remembers the flow of e, established (reported) or pending (a TCP
// connection whose handshake has not completed), and returns it.
func (t *flowTracker) add(e *ctEvent, now int64, established bool) *flowEntry {
	k := flowKey{e.id, e.proto, e.orig}
	fe := &flowEntry{key: k, since: t.overflows}
	fe.nviews = flowViews(e, &fe.views)
	if len(t.flows) >= t.max {
		if p := t.pending.Front(); p != nil {
			t.remove(p.Value.(*flowEntry)) // nothing reported yet
		} else {
			oldest := t.order.Front().Value.(*flowEntry)
			// An overflow since it was added, which no dump followed,
			// may have taken its DESTROY: counted once, then. A dump
			// that had it (the last complete one, or the one under way,
			// which may be what adds a flow now) found it alive after
			// the overflows before the dump began.
			alive := t.synced
			if oldest.seen == t.sync {
				alive = max(alive, t.syncFrom)
			}
			counted := t.overflows > max(oldest.since, alive)
			for i := range oldest.nviews {
				if !counted && !oldest.lost[i] && !oldest.gone[i].Load() {
					a := oldest.views[i]
					a.Event = EventFlowDeleted
					t.lost(&a)
				}
			}
			t.remove(oldest)
			t.forget(oldest.key)
		}
	}
	t.flows[k] = fe
	t.ids[k.id]++
	if established {
		fe.in = &t.order
		fe.elem = t.order.PushBack(fe)
		t.establish(fe, now)
	} else {
		fe.in = &t.pending
		fe.elem = t.pending.PushBack(fe)
	}
	return fe
}

// deleted forgets fe and reports its deletion, if its establishment was.
func (t *flowTracker) deleted(fe *flowEntry, now int64) {
	t.remove(fe)
	if !fe.established {
		return // a TCP connect that never completed
	}
	for i := range fe.nviews {
		if fe.lost[i] || fe.gone[i].Load() {
			continue
		}
		a := fe.views[i]
		a.Event = EventFlowDeleted
		a.Timestamp = now
		t.deliver(&a, &fe.gone[i])
	}
}

// After an overflow of the event socket (ENOBUFS) the reader dumps
// conntrack's table, as conntrackd resynchronises, and hands the tracker
// each labelled connection of the dump (beginSync, dumped, endSync):
//   - a flow the tracker has pending (its UPDATE to ESTABLISHED lost) that
//     the dump shows established is established now;
//   - a labelled flow the tracker does not know (its NEW lost) is added,
//     and established when it is (the labels prove it began after the
//     table was installed; a TCP connection conntrack picked up in
//     mid-stream, an older one, is left out as its NEW event would be);
//   - a flow the tracker has that the dump does not (its DESTROY lost, or
//     not read yet) is deleted.

// beginSync starts a dump.
func (t *flowTracker) beginSync() {
	t.sync++
	t.syncFrom = t.overflows
}

// dumped takes one connection of the dump.
func (t *flowTracker) dumped(e *ctEvent, now int64) {
	if fe := t.flows[flowKey{e.id, e.proto, e.orig}]; fe != nil {
		fe.seen = t.sync
		if !fe.established && e.proto == unix.IPPROTO_TCP && e.tcpState >= tcpEstab && e.tcpState <= tcpTimeWait {
			t.pending.Remove(fe.elem)
			fe.in = &t.order
			fe.elem = t.order.PushBack(fe)
			t.establish(fe, now)
		}
		return
	}
	if f := t.forgotten[flowKey{e.id, e.proto, e.orig}]; f != nil {
		f.Value.(*forgotFlow).seen = t.sync // reported already, and alive
		return
	}
	if e.labels&(nftrules.LabelOut|nftrules.LabelIn) == 0 {
		return
	}
	established := true
	if e.proto == unix.IPPROTO_TCP {
		switch {
		case e.tcpState == -1 || e.pickedUp:
			return
		case e.tcpState >= tcpEstab && e.tcpState <= tcpTimeWait:
		case e.tcpState == tcpSynSent || e.tcpState == tcpSynRecv || e.tcpState == tcpSynSent2:
			established = false
		default:
			return // CLOSE: refused, or reset; never known established
		}
	}
	fe := t.add(e, now, established)
	fe.seen, fe.resynced = t.sync, true
}

// endSync ends a complete dump: what it did not have is deleted.
func (t *flowTracker) endSync(now int64) {
	for _, fe := range t.flows {
		if fe.seen != t.sync {
			t.deleted(fe, now)
		}
	}
	for _, f := range t.forgotten {
		if f.Value.(*forgotFlow).seen != t.sync {
			t.unforget(f) // ended: its key may come again, a new flow
		}
	}
	t.synced = t.syncFrom
}

// forget remembers the key of an established flow forgotten at the
// bound, forgetting the oldest such key past max.
func (t *flowTracker) forget(k flowKey) {
	if f := t.forgotten[k]; f != nil {
		t.unforget(f)
	}
	if len(t.forgotten) >= t.max {
		t.unforget(t.forgotOrder.Front())
	}
	t.forgotten[k] = t.forgotOrder.PushBack(&forgotFlow{key: k, seen: t.sync})
}

func (t *flowTracker) unforget(f *list.Element) {
	delete(t.forgotten, f.Value.(*forgotFlow).key)
	t.forgotOrder.Remove(f)
}

func (t *flowTracker) establish(fe *flowEntry, now int64) {
	fe.established = true
	for i := range fe.nviews {
		fe.views[i].Timestamp = now
		if t.owner != nil {
			pid, noSocket := t.owner(&fe.views[i])
			if noSocket {
				fe.lost[i] = true // not a flow: no deletion either, nothing counted
				continue
			}
			fe.views[i].Flow.ProcessID = pid
		}
		a := fe.views[i]
		a.Event = EventFlowEstablished
		a.Timestamp = now
		fe.lost[i] = !t.deliver(&a, &fe.gone[i])
	}
}

// overflowed tells the tracker that the event socket overflowed (ENOBUFS,
// counted in Stats.Overflows): events were lost, a DESTROY among them
// maybe.
func (t *flowTracker) overflowed() { t.overflows++ }

func (t *flowTracker) remove(fe *flowEntry) {
	fe.in.Remove(fe.elem)
	delete(t.flows, fe.key)
	if t.ids[fe.key.id]--; t.ids[fe.key.id] <= 0 {
		delete(t.ids, fe.key.id)
	}
}

// tracked reports whether a flow of conntrack id id is remembered.
func (t *flowTracker) tracked(id uint32) bool { return t.ids[id] > 0 }

// ctSkip reports whether the conntrack event m concerns no flow of the
// handle, told from its header and two top-level attributes without
// decoding it (github.com/ti-mo/conntrack's decoder allocates some 30
// times for an event; a router's forwarded connections send many): a NEW
// event without the handle's labels (LabelOut or LabelIn: forwarded, or
// older than the table), an UPDATE or DESTROY of an id no remembered flow
// has. It answers false whenever it cannot tell, and never true for an
// event the tracker would act on: like the decoder, it takes the last
// CTA_ID and CTA_LABELS of the message. (The event socket's filter,
// ctFilter, drops most such NEW events in the kernel already.)
func ctSkip(m netlink.Message, tracked func(id uint32) bool) bool {
	isNew := false
	switch ctMsgType(m) {
	case ctMsgNew:
		isNew = m.Header.Flags&(netlink.Create|netlink.Excl) != 0
	case ctMsgDelete:
	default:
		return false
	}
	id, labels, ok := ctScan(m.Data)
	if !ok {
		return false // malformed: the decoder decides
	}
	if isNew {
		return !ctLabelled(labels)
	}
	return !tracked(id)
}

// ctnetlink's message types (enum cntl_msg_types), without the subsystem.
const (
	ctMsgNew    = 0 // IPCTNL_MSG_CT_NEW: NEW (with NLM_F_CREATE or NLM_F_EXCL) or UPDATE; a dump's entries
	ctMsgGet    = 1 // IPCTNL_MSG_CT_GET: with NLM_F_DUMP, the dump request
	ctMsgDelete = 2 // IPCTNL_MSG_CT_DELETE: DESTROY
)

// ctMsgType returns the ctnetlink message type of m, or -1 when m is not
// a ctnetlink message with a netfilter header.
func ctMsgType(m netlink.Message) int {
	typ := uint16(m.Header.Type)
	if typ>>8 != unix.NFNL_SUBSYS_CTNETLINK || len(m.Data) < 4 {
		return -1
	}
	return int(typ & 0xff)
}

// ctScan returns the last CTA_ID and CTA_LABELS among the top-level
// attributes of a ctnetlink message's data (after its netfilter header),
// as the decoder takes them; ok is false when the attributes are
// malformed.
func ctScan(data []byte) (id uint32, labels []byte, ok bool) {
	const (
		attrID     = 12
		attrLabels = 22
	)
	if len(data) < 4 {
		return 0, nil, false
	}
	for b := data[4:]; len(b) >= 4; {
		l := int(binary.NativeEndian.Uint16(b))
		if l < 4 || l > len(b) {
			return 0, nil, false
		}
		// The decoder tells attributes by the low byte of the type
		// (ti-mo/conntrack's attributeType is a uint8): so does this.
		switch uint8(binary.NativeEndian.Uint16(b[2:])) {
		case attrID:
			if l != 8 {
				return 0, nil, false
			}
			id = binary.BigEndian.Uint32(b[4:8])
		case attrLabels:
			labels = b[4:l]
		}
		b = b[min(len(b), (l+3)&^3):]
	}
	return id, labels, true
}

// ctLabelled reports whether conntrack labels (CTA_LABELS) carry the
// handle's LabelOut or LabelIn: a connection with a local endpoint that
// began after the table was installed.
func ctLabelled(labels []byte) bool {
	return len(labels) > nftrules.LabelByte && labels[nftrules.LabelByte]&(nftrules.LabelOut|nftrules.LabelIn) != 0
}

// flowViews fills vs with the Addresses (but Event and Timestamp) of the
// flow of a NEW event, and returns how many: two for a loopback flow, the
// client's (outbound) and the server's (inbound), as WinDivert reports
// each of the connection's endpoints; else one.
func flowViews(e *ctEvent, vs *[2]Address) int {
	out := e.labels&nftrules.LabelOut != 0
	loop := out && e.labels&nftrules.LabelLoop != 0
	v6 := e.orig.src.Is6() && !e.orig.src.Is4In6()
	base := Address{Layer: LayerFlow, Sniffed: true, IPv6: v6, Loopback: loop}
	base.Flow.Protocol = e.proto
	// The client's view: the original direction as it left the socket
	// (before any source NAT). The server's: the reply direction (after
	// any destination NAT, as the accepting socket sees it).
	client := func(a *Address) {
		a.Outbound = true
		a.Flow.LocalAddr, a.Flow.RemoteAddr = e.orig.src.As16(), e.orig.dst.As16()
		a.Flow.LocalPort, a.Flow.RemotePort = e.orig.sport, e.orig.dport
	}
	server := func(a *Address) {
		a.Outbound = false
		a.Flow.LocalAddr, a.Flow.RemoteAddr = e.reply.src.As16(), e.reply.dst.As16()
		a.Flow.LocalPort, a.Flow.RemotePort = e.reply.sport, e.reply.dport
	}
	vs[0] = base
	vs[0].Flow.EndpointID = uint64(e.id)
	if out {
		client(&vs[0])
	} else {
		server(&vs[0])
	}
	n := 1
	if loop {
		vs[1] = base
		vs[1].Flow.EndpointID = uint64(e.id) | loopServerBit
		server(&vs[1])
		n = 2
	}
	if e.icmp {
		// WFP's convention at its flow layer: the local port holds the
		// ICMP type, the remote port the code (of the flow's first
		// packet).
		for i := range n {
			vs[i].Flow.LocalPort, vs[i].Flow.RemotePort = uint16(e.icmpType), uint16(e.icmpCode)
		}
	}
	return n
}

// --- the handle ------------------------------------------------------------

// flowItem is a queued event.
type flowItem struct {
	a    Address
	t    int64        // monoNow when queued
	gone *atomic.Bool // its view's (flowEntry.gone), or nil
}

type flowBackend struct {
	filt  *filter.Filter
	rules *nftrules.Ruleset
	conn  *netlink.Conn // conntrack's events
	// dump: a second socket, to dump conntrack's table after an overflow
	// of conn (resync)
	dump     *netlink.Conn
	recvHook func()        // flowRecvHook
	tr       *flowTracker  // the reader's
	owner    *sockOwner    // the reader's; nil without sock_diag
	done     chan struct{} // closed when the reader ends
	// started: the reader runs (set by a successful Open, before Close
	// can be called)
	started bool

	stopOnce sync.Once // closes conn (Shutdown or Close)

	queueTime atomic.Int64 // ns

	mu       sync.Mutex
	q        []flowItem // ring of cap len(q)
	head, n  int
	qlen     int           // ParamQueueLength
	changed  chan struct{} // closed and replaced when the state below changes
	deadline time.Time
	shut     bool
	closed   bool
	stopping bool  // conn is being closed: the reader's error is expected
	rerr     error // the reader's error, returned once the queue is drained

	received, overflows, expired, passed atomic.Uint64
}

// ctGroups are conntrack's event groups a flow handle joins.
var ctGroups = []uint32{unix.NFNLGRP_CONNTRACK_NEW, unix.NFNLGRP_CONNTRACK_UPDATE, unix.NFNLGRP_CONNTRACK_DESTROY}

// ctEventsSysctl says whether conntrack reports events in the network
// namespace of the thread that opens it: 0 no, 1 yes, 2 (since Linux 6.0,
// the default) when someone listens.
const ctEventsSysctl = "/proc/sys/net/netfilter/nf_conntrack_events"

// openFlow opens a LayerFlow handle in the calling thread's network
// namespace.
func openFlow(cfg *openConfig) (_ backend, err error) {
	if cfg.flags&FlagReassemble != 0 {
		// As on Windows: there is no packet to reassemble. The other
		// flags a flow handle may have change nothing (FlagPassThrough:
		// nothing is held; FlagFailOpen: a full queue loses events, and
		// no packet waits).
		return nil, fmt.Errorf("divert: FlagReassemble at layer %v, which carries no packets: %w", LayerFlow, ErrNotSupported)
	}
	b := &flowBackend{
		filt:    cfg.filter,
		qlen:    int(cfg.params[ParamQueueLength]),
		changed: make(chan struct{}),
		done:    make(chan struct{}),
	}
	b.queueTime.Store(int64(cfg.params[ParamQueueTime]) * int64(time.Millisecond))
	b.tr = newFlowTracker(flowTrackMax, b.deliver, b.forgot)
	defer func() {
		if err != nil {
			err = withCleanup(err, b.release())
		}
	}()
	// Listen first: no event of a connection the table labels is missed.
	if b.conn, err = netlink.Dial(unix.NETLINK_NETFILTER, ctConfig); err != nil {
		return nil, flowSetupError(nil, "open a netfilter netlink socket", err)
	}
	// Opened here, in the caller's network namespace, as the event socket.
	if b.dump, err = netlink.Dial(unix.NETLINK_NETFILTER, ctConfig); err != nil {
		return nil, flowSetupError(nil, "open a netfilter netlink socket", err)
	}
	b.recvHook = flowRecvHook
	// The kernel drops other connections' NEW events (flowbpf_linux.go).
	// Best effort: the reader skips them too.
	if raw, err := ctFilterOnce(); err == nil {
		_ = b.conn.SetBPF(raw)
	}
	for _, g := range ctGroups {
		if err := b.conn.JoinGroup(g); err != nil {
			return nil, flowSetupError(b.conn, "join conntrack's event groups", err)
		}
	}
	_ = setRecvBuf(b.conn, int(cfg.params[ParamQueueSize])) // the default buffer serves too
	// The processes of the flows: best effort (see flowpid_linux.go).
	if o, err := newSockOwner(); err == nil {
		b.owner = o
		b.tr.owner = o.process
	}
	if b.rules, err = nftrules.InstallFlowTrack(); err != nil {
		return nil, mapSetupError("install the nftables table that runs conntrack", err)
	}
	// The table loaded conntrack (and its sysctls) if it was not.
	v, err := os.ReadFile(ctEventsSysctl)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("divert: layer %v: %w: the kernel has no conntrack events (%s missing: CONFIG_NF_CONNTRACK_EVENTS)", LayerFlow, ErrNotSupported, ctEventsSysctl)
	case err != nil:
		return nil, fmt.Errorf("divert: layer %v: read %s: %w", LayerFlow, ctEventsSysctl, err)
	case strings.TrimSpace(string(v)) == "0":
		return nil, fmt.Errorf("divert: layer %v: %w: conntrack events are disabled in this network namespace (sysctl net.netfilter.nf_conntrack_events = 0; set it to 1 or 2)", LayerFlow, ErrNotSupported)
	}
	b.started = true
	go b.read()
	return b, nil
}

// flowSetupError maps an error of the event socket: EPERM (joining
// conntrack's groups needs CAP_NET_ADMIN over the namespace) wraps
// os.ErrPermission, a kernel without nfnetlink or ctnetlink
// ErrNotSupported.
func flowSetupError(c *netlink.Conn, what string, err error) error {
	switch {
	case errors.Is(err, os.ErrPermission) && c != nil && netAdmin(c):
		return fmt.Errorf("divert: %s: refused although the process has CAP_NET_ADMIN in the network namespace (a security module?): %w", what, err)
	case errors.Is(err, os.ErrPermission):
		return fmt.Errorf("divert: %s: CAP_NET_ADMIN in this network namespace is needed to receive conntrack events (run as root or grant the capability): %w", what, err)
	case errors.Is(err, unix.EPROTONOSUPPORT), errors.Is(err, unix.EAFNOSUPPORT), errors.Is(err, unix.ENOENT), errors.Is(err, unix.EOPNOTSUPP):
		return fmt.Errorf("divert: %s: %w: the kernel has no nfnetlink conntrack (nf_conntrack_netlink): %w", what, ErrNotSupported, err)
	}
	return fmt.Errorf("divert: %s: %w", what, err)
}

// setRecvBuf sets the socket's receive buffer to n bytes, past
// net.core.rmem_max with CAP_NET_ADMIN (which joining the groups needed).
func setRecvBuf(c *netlink.Conn, n int) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = raw.Control(func(fd uintptr) { serr = nfq.SetRcvBuf(int(fd), n) })
	return errors.Join(err, serr)
}

// netAdmin reports whether the event socket's holder may administer its
// namespace (for errors).
func netAdmin(c *netlink.Conn) bool {
	raw, err := c.SyscallConn()
	if err != nil {
		return netcap.Effective()
	}
	over := false
	if raw.Control(func(fd uintptr) { over = netcap.Over(int(fd)) }) != nil {
		return netcap.Effective()
	}
	return over
}

// ctConfig has the conntrack sockets read each datagram into a buffer
// larger than any the kernel sends them (an event takes less than a page;
// the kernel makes a dump's datagrams at most 32 KiB): mdlayher/netlink then
// reads a datagram with one recvmsg, where by default it first peeks at
// its size with another.
var ctConfig = &netlink.Config{MessageBufferSize: 64 << 10}

// resyncDrain is how long, after an overflow, a receive waits for more
// events before the reader dumps conntrack's table: the events the socket
// still holds are older than the dump, and read first; the dump runs once
// a receive found the socket empty (waited resyncDrain, or emptied it: see
// emptied).
var resyncDrain = 2 * time.Millisecond // a variable for tests

// flowRecvHook, when not nil, is called by the reader of a handle opened
// while it was set before each receive (tests: to hold the reader).
var flowRecvHook func()

// flowResyncHook, when not nil, is called before each dump (tests).
var flowResyncHook func()

// read is the reader goroutine: events from the socket to the queue.
func (b *flowBackend) read() {
	defer close(b.done)
	var (
		due   bool          // an overflow awaits its dump
		dueAt time.Time     // no dump before then
		last  time.Duration // how long the last dump took
	)
	for {
		if b.recvHook != nil {
			b.recvHook()
		}
		if due {
			// The dump waits until a receive has emptied the socket (or
			// waited resyncDrain for more), however long since the
			// overflow: until the reader has emptied the socket the
			// kernel reports no further overflow (it sets ENOBUFS again
			// only once the queue was empty: NETLINK_S_CONGESTED), so
			// events dropped meanwhile, after a dump, would be lost
			// unseen. A deadline armed once, at the overflow, could pass
			// before the next receive (a loaded machine, a slow program)
			// and have the dump run with events still queued.
			_ = b.conn.SetReadDeadline(later(dueAt, time.Now().Add(resyncDrain)))
		}
		ms, err := b.conn.Receive()
		if err != nil {
			switch {
			case errors.Is(err, unix.ENOBUFS):
				// The socket's buffer overflowed: at least one event
				// is lost.
				b.overflowed()
				if !due && b.dump != nil {
					// Read what the buffer still holds, then dump; no
					// sooner after the last dump than it took, so that
					// dumps take at most half the reader's time.
					due = true
					dueAt = time.Now().Add(last)
				}
				continue
			case due && errors.Is(err, os.ErrDeadlineExceeded):
				due = false
				last = b.resyncNow()
				continue
			}
			b.mu.Lock()
			if !b.stopping {
				b.rerr = fmt.Errorf("divert: receive conntrack events: %w", err)
				b.wakeLocked()
			}
			b.mu.Unlock()
			return
		}
		now := monoNow()
		for _, m := range ms {
			if ctSkip(m, b.tr.tracked) {
				continue // no flow of ours: not worth decoding
			}
			var ev conntrack.Event
			if ev.Unmarshal(m) != nil {
				continue // not a conntrack event we can read
			}
			if e, ok := ctEventOf(&ev); ok {
				b.tr.handle(&e, now)
			}
		}
		if due && !time.Now().Before(dueAt) && b.emptied() {
			// Events keep coming, but this receive emptied the socket:
			// the dump need not wait for a quiet moment.
			due = false
			last = b.resyncNow()
		}
	}
}

// resyncNow dumps conntrack's table (resync) and returns how long it took.
// A failed dump (Close, above all) deletes nothing: the overflow is
// counted, and the next receive says whether the socket is still open.
func (b *flowBackend) resyncNow() time.Duration {
	_ = b.conn.SetReadDeadline(time.Time{})
	if flowResyncHook != nil {
		flowResyncHook()
	}
	start := time.Now()
	_ = b.resync()
	return time.Since(start)
}

// emptied reports whether the event socket holds nothing now: a peek that
// finds nothing, which also lets the kernel report the next overflow (it
// does once a receive found the queue empty). An overflow the peek meets
// is counted.
func (b *flowBackend) emptied() bool {
	raw, err := b.conn.SyscallConn()
	if err != nil {
		return false
	}
	var e error
	var buf [1]byte
	if raw.Control(func(fd uintptr) {
		_, _, e = unix.Recvfrom(int(fd), buf[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
	}) != nil {
		return false
	}
	if errors.Is(e, unix.ENOBUFS) {
		b.overflowed() // the error is consumed: count it here
	}
	return errors.Is(e, unix.EAGAIN)
}

// later returns the later of a and b.
func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// resync dumps conntrack's table (IPCTNL_MSG_CT_GET with NLM_F_DUMP, on
// the second socket) into the tracker, after an overflow of the event
// socket: see flowTracker.dumped. The kernel cannot filter a dump by
// labels; the connections without the handle's are skipped undecoded.
// The dump is read as the kernel fills it (up to 32 KiB a receive, for a
// buffer as large: ctConfig), never held whole; Close ends it. An incomplete dump deletes nothing.
func (b *flowBackend) resync() error {
	// What a dump broken off before holds would else be read as this
	// one's answer (a tail of an older table, which lacks live flows).
	if err := drainDump(b.dump); err != nil {
		return err
	}
	if _, err := b.dump.Send(ctDumpRequest()); err != nil {
		return err
	}
	b.tr.beginSync()
	for m, err := range b.dump.ReceiveIter() {
		if err != nil {
			return err
		}
		if ctMsgType(m) != ctMsgNew {
			continue
		}
		if id, labels, ok := ctScan(m.Data); ok && !ctLabelled(labels) && !b.tr.tracked(id) {
			continue // not the handle's: not worth decoding
		}
		var ev conntrack.Event
		if ev.Unmarshal(m) != nil {
			continue
		}
		if e, ok := ctEventOf(&ev); ok {
			b.tr.dumped(&e, monoNow())
		}
	}
	b.tr.endSync(monoNow())
	return nil
}

// dumpDrainMax bounds the datagrams drainDump discards: a dump of a
// table of millions of connections.
const dumpDrainMax = 1 << 20

// errDumpUndrained: drainDump discarded dumpDrainMax datagrams and the
// dump socket still held more.
var errDumpUndrained = errors.New("divert: the conntrack dump socket does not empty")

// drainDump discards what the dump socket holds: the rest of a dump that
// a failed resync broke off (an error of the socket, ENOBUFS when the
// kernel could not allocate a datagram, ends the receive, not the dump:
// the kernel goes on filling it as the socket is read, and answers a new
// request with EBUSY until it ends), and such errors. Each receive makes
// the kernel queue the next datagram of a dump under way; the socket is
// empty, the dump ended, when a receive would wait.
func drainDump(c *netlink.Conn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var (
		buf  [64]byte // the datagrams are discarded (MSG_TRUNC)
		rerr error
	)
	err = raw.Read(func(fd uintptr) bool {
		for range dumpDrainMax {
			_, _, err := unix.Recvfrom(int(fd), buf[:], unix.MSG_DONTWAIT)
			switch err {
			case nil, unix.EINTR, unix.ENOBUFS:
			case unix.EAGAIN:
				return true
			default:
				rerr = err
				return true
			}
		}
		rerr = errDumpUndrained
		return true
	})
	return errors.Join(err, rerr)
}

// ctDumpRequest is the request for a dump of conntrack's table, both
// families (IPCTNL_MSG_CT_GET with NLM_F_DUMP).
func ctDumpRequest() netlink.Message {
	return netlink.Message{
		Header: netlink.Header{
			Type:  netlink.HeaderType(unix.NFNL_SUBSYS_CTNETLINK<<8 | ctMsgGet),
			Flags: netlink.Request | netlink.Dump,
		},
		Data: []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, 0},
	}
}

// overflowed counts an overflow of the event socket (ENOBUFS).
func (b *flowBackend) overflowed() {
	b.overflows.Add(1)
	b.tr.overflowed()
}

// forgot counts a deletion the tracker will not report (it forgot the
// flow), unless the filter would have rejected it.
func (b *flowBackend) forgot(a *Address) {
	if b.filt != nil {
		m := a.Meta()
		if !b.filt.Match(nil, &m) {
			return
		}
	}
	b.overflows.Add(1)
}

// deliver judges a with the filter and queues it, with its view's gone
// flag (nil: none). It returns false when the queue is full (the event is
// lost and counted).
func (b *flowBackend) deliver(a *Address, gone *atomic.Bool) bool {
	if b.filt != nil {
		m := a.Meta()
		if !b.filt.Match(nil, &m) {
			b.passed.Add(1)
			return true
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.shut || b.closed {
		return true // no new events after ShutdownRecv, unseen, as WinDivert
	}
	if b.n >= b.qlen {
		b.overflows.Add(1)
		return false
	}
	if b.n == len(b.q) {
		b.grow()
	}
	b.q[(b.head+b.n)%len(b.q)] = flowItem{a: *a, t: monoNow(), gone: gone}
	b.n++
	b.wakeLocked()
	return true
}

func (b *flowBackend) grow() {
	c := max(2*len(b.q), 64)
	q := make([]flowItem, c)
	for i := range b.n {
		q[i] = b.q[(b.head+i)%len(b.q)]
	}
	b.q, b.head = q, 0
}

// wakeLocked wakes every waiting receive call.
func (b *flowBackend) wakeLocked() {
	close(b.changed)
	b.changed = make(chan struct{})
}

// popLocked takes the oldest queued event that has not waited
// ParamQueueTime; the older ones are dropped (Stats.Expired). An
// establishment so dropped takes its deletion with it (unseen, as one
// lost to a full queue does).
func (b *flowBackend) popLocked(a *Address) bool {
	qt := b.queueTime.Load()
	now := monoNow()
	for b.n > 0 {
		it := b.q[b.head]
		b.q[b.head] = flowItem{}
		b.head = (b.head + 1) % len(b.q)
		b.n--
		if it.gone != nil && it.a.Event == EventFlowDeleted && it.gone.Load() {
			continue
		}
		if now-it.t > qt {
			b.expired.Add(1)
			if it.gone != nil && it.a.Event == EventFlowEstablished {
				it.gone.Store(true)
			}
			continue
		}
		*a = it.a
		return true
	}
	return false
}

// next waits for one event (block) or takes one if queued.
func (b *flowBackend) next(a *Address, block bool) error {
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	b.mu.Lock()
	defer b.mu.Unlock()
	for {
		switch {
		case b.closed:
			return errClosed
		case !b.shut && !b.deadline.IsZero() && !time.Now().Before(b.deadline):
			return errDeadline
		}
		if b.popLocked(a) {
			b.received.Add(1)
			return nil
		}
		switch {
		case b.shut:
			return ErrShutdown
		case b.rerr != nil:
			return b.rerr
		case !block:
			return errWouldBlock
		}
		ch := b.changed
		var tc <-chan time.Time
		if !b.deadline.IsZero() {
			d := time.Until(b.deadline)
			if timer == nil {
				timer = time.NewTimer(d)
			} else {
				timer.Reset(d)
			}
			tc = timer.C
		}
		b.mu.Unlock()
		select {
		case <-ch:
		case <-tc:
		}
		b.mu.Lock()
	}
}

// errWouldBlock ends a batch at the first event not yet queued.
var errWouldBlock = errors.New("divert: no event queued")

// recv returns no bytes: a flow event carries none (WinDivert's Recv
// at LayerFlow takes a NULL buffer).
func (b *flowBackend) recv(_ []byte, a *Address) (int, error) {
	return 0, b.next(a, true)
}

func (b *flowBackend) recvBatch(ms []Message) (int, error) {
	for i := range ms {
		if err := b.next(&ms[i].Addr, i == 0); err != nil {
			if i > 0 {
				return i, nil
			}
			return 0, err
		}
		ms[i].N = 0
	}
	return len(ms), nil
}

// Handle refuses Send and SendBatch (FlagRecvOnly) and Drop finds nothing
// held; these are never reached with a packet.
func (b *flowBackend) send([]byte, *Address) (int, error) {
	return 0, fmt.Errorf("divert: layer %v carries no packet to send: %w", LayerFlow, os.ErrInvalid)
}

func (b *flowBackend) sendBatch([]Message) (int, error) {
	return 0, fmt.Errorf("divert: layer %v carries no packet to send: %w", LayerFlow, os.ErrInvalid)
}

// drop is a no-op, as for a FlagSniff copy: the event holds nothing.
func (b *flowBackend) drop(*Address) error { return nil }

// stop closes the event socket and the dump socket once, which ends the
// reader (and a dump under way). Only the call that closed them returns
// the errors of the closes: a later one (Close after Shutdown) has nothing
// left to close, and returns nil.
func (b *flowBackend) stop() error {
	var err error
	b.stopOnce.Do(func() {
		b.mu.Lock()
		b.stopping = true
		b.mu.Unlock()
		if b.owner != nil {
			b.owner.quit.Store(true) // a scan under way need not finish
		}
		if b.dump != nil {
			err = b.dump.Close() // ends a dump under way
		}
		err = errors.Join(b.conn.Close(), err)
		<-b.done
	})
	return err
}

func (b *flowBackend) shutdown(how ShutdownHow) error {
	if how&ShutdownRecv == 0 {
		return nil
	}
	b.mu.Lock()
	b.shut = true
	b.wakeLocked()
	b.mu.Unlock()
	// No new events: stop reading them (the table stays until Close, so
	// that conntrack keeps running as it did).
	if err := b.stop(); err != nil {
		return fmt.Errorf("divert: shutdown: %w", err)
	}
	return nil
}

func (b *flowBackend) close() error {
	b.mu.Lock()
	b.closed = true
	b.wakeLocked()
	b.mu.Unlock()
	if err := b.release(); err != nil {
		return fmt.Errorf("divert: close: %w", err)
	}
	return nil
}

// release closes the socket and removes the table (Close, or a failed
// Open).
func (b *flowBackend) release() error {
	var errs []error
	if b.conn != nil {
		if b.started {
			errs = append(errs, b.stop())
		} else {
			errs = append(errs, b.conn.Close())
		}
	}
	if b.dump != nil && !b.started {
		errs = append(errs, b.dump.Close())
	}
	if b.owner != nil {
		errs = append(errs, b.owner.close()) // the reader, its user, has stopped
	}
	if b.rules != nil {
		errs = append(errs, b.rules.Close())
	}
	return errors.Join(errs...)
}

func (b *flowBackend) setParam(p Param, v uint64) error {
	switch p {
	case ParamQueueLength:
		b.mu.Lock()
		b.qlen = int(v)
		b.mu.Unlock()
	case ParamQueueTime:
		b.queueTime.Store(int64(v) * int64(time.Millisecond))
	case ParamQueueSize:
		// Under mu: stop, which closes the socket, waits.
		b.mu.Lock()
		defer b.mu.Unlock()
		if b.stopping {
			return nil // shut down: no socket left to size
		}
		if err := setRecvBuf(b.conn, int(v)); err != nil {
			return closedAs(err, "divert: set queue size: %w")
		}
	}
	return nil
}

func (b *flowBackend) setReadDeadline(t time.Time) error {
	b.mu.Lock()
	b.deadline = t
	b.wakeLocked()
	b.mu.Unlock()
	return nil
}

func (b *flowBackend) version() (major, minor uint64) {
	return linuxVersionMajor, linuxVersionMinor
}

func (b *flowBackend) stats() (Stats, error) {
	return Stats{
		Received:  b.received.Load(),
		Overflows: b.overflows.Load(),
		Expired:   b.expired.Load(),
		Passed:    b.passed.Load(),
	}, nil
}
