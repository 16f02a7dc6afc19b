package divert

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"iter"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	"github.com/ti-mo/conntrack"
	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/filter"
	"github.com/netdivert/divert/internal/netnstest"
	"github.com/netdivert/divert/internal/nftrules"
)

// --- the pure mapping: conntrack events to Addresses -----------------------

// trackerLog is a flowTracker whose deliveries are recorded; full makes
// deliver report a full queue.
type trackerLog struct {
	t    *flowTracker
	got  []Address
	full bool
	lost int
}

func newTrackerLog(max int) *trackerLog {
	l := &trackerLog{}
	l.t = newFlowTracker(max, func(a *Address, _ *atomic.Bool) bool {
		if l.full {
			return false
		}
		l.got = append(l.got, *a)
		return true
	}, func(*Address) { l.lost++ })
	return l
}

func (l *trackerLog) take() []Address {
	g := l.got
	l.got = nil
	return g
}

func tup(src, dst string, sport, dport uint16) ctTuple {
	return ctTuple{netip.MustParseAddr(src), netip.MustParseAddr(dst), sport, dport}
}

func rev(t ctTuple) ctTuple { return ctTuple{t.dst, t.src, t.dport, t.sport} }

func ev(kind ctKind, id uint32, proto uint8, orig ctTuple, labels byte, state int) *ctEvent {
	return &ctEvent{kind: kind, id: id, proto: proto, orig: orig, reply: rev(orig), labels: labels, tcpState: state}
}

func a16(s string) [16]byte { return netip.MustParseAddr(s).As16() }

func TestFlowTrackerTCPOutbound(t *testing.T) {
	l := newTrackerLog(16)
	o := tup("10.0.0.1", "10.0.0.2", 40000, 80)
	l.t.handle(ev(ctNew, 7, unix.IPPROTO_TCP, o, nftrules.LabelOut, tcpSynSent), 1)
	l.t.handle(ev(ctUpdate, 7, unix.IPPROTO_TCP, o, 0, 2), 2)
	if g := l.take(); len(g) != 0 {
		t.Fatalf("before the handshake completed: %+v", g)
	}
	l.t.handle(ev(ctUpdate, 7, unix.IPPROTO_TCP, o, 0, tcpEstab), 3)
	l.t.handle(ev(ctUpdate, 7, unix.IPPROTO_TCP, o, 0, 4), 4) // FIN_WAIT: no second event
	g := l.take()
	want := Address{Layer: LayerFlow, Event: EventFlowEstablished, Sniffed: true, Outbound: true, Timestamp: 3,
		Flow: FlowData{EndpointID: 7, LocalAddr: a16("::ffff:10.0.0.1"), RemoteAddr: a16("::ffff:10.0.0.2"), LocalPort: 40000, RemotePort: 80, Protocol: 6}}
	if len(g) != 1 || g[0] != want {
		t.Fatalf("established: got %+v\nwant %+v", g, want)
	}
	l.t.handle(ev(ctDestroy, 7, unix.IPPROTO_TCP, o, 0, -1), 9)
	g = l.take()
	want.Event, want.Timestamp = EventFlowDeleted, 9
	if len(g) != 1 || g[0] != want {
		t.Fatalf("deleted: got %+v\nwant %+v", g, want)
	}
	if len(l.t.flows) != 0 || l.t.order.Len() != 0 {
		t.Fatalf("tracker keeps %d flows after DESTROY", len(l.t.flows))
	}
}

// TestFlowTrackerIgnored: what is not a new flow with a local endpoint is
// never reported, its DESTROY neither.
func TestFlowTrackerIgnored(t *testing.T) {
	o := tup("10.0.0.1", "10.0.0.2", 40000, 80)
	for _, tc := range []struct {
		name   string
		events []*ctEvent
	}{
		{"refused connect", []*ctEvent{ev(ctNew, 1, 6, o, nftrules.LabelOut, tcpSynSent), ev(ctUpdate, 1, 6, o, 0, 8), ev(ctDestroy, 1, 6, o, 0, -1)}},
		{"mid-stream pickup", []*ctEvent{ev(ctNew, 1, 6, o, nftrules.LabelOut, tcpEstab), ev(ctUpdate, 1, 6, o, 0, tcpEstab), ev(ctDestroy, 1, 6, o, 0, -1)}},
		{"forwarded", []*ctEvent{ev(ctNew, 1, 17, o, 0, -1), ev(ctDestroy, 1, 17, o, 0, -1)}},
		{"only the loopback bit", []*ctEvent{ev(ctNew, 1, 17, o, nftrules.LabelLoop, -1)}},
		{"unknown id", []*ctEvent{ev(ctUpdate, 1, 6, o, 0, tcpEstab), ev(ctDestroy, 1, 6, o, 0, -1)}},
	} {
		l := newTrackerLog(16)
		for _, e := range tc.events {
			l.t.handle(e, 1)
		}
		if g := l.take(); len(g) != 0 {
			t.Errorf("%s: reported %+v", tc.name, g)
		}
		if len(l.t.flows) != 0 {
			t.Errorf("%s: %d flows remembered", tc.name, len(l.t.flows))
		}
	}
}

func TestFlowTrackerUDPInboundV6(t *testing.T) {
	l := newTrackerLog(16)
	o := tup("fd00::2", "fd00::1", 5000, 53)
	e := ev(ctNew, 9, unix.IPPROTO_UDP, o, nftrules.LabelIn, -1)
	// Destination NAT to a local port: the local end is the reply's source.
	e.reply = tup("fd00::1", "fd00::2", 5353, 5000)
	l.t.handle(e, 1)
	g := l.take()
	want := Address{Layer: LayerFlow, Event: EventFlowEstablished, Sniffed: true, IPv6: true, Timestamp: 1,
		Flow: FlowData{EndpointID: 9, LocalAddr: a16("fd00::1"), RemoteAddr: a16("fd00::2"), LocalPort: 5353, RemotePort: 5000, Protocol: 17}}
	if len(g) != 1 || g[0] != want {
		t.Fatalf("got %+v\nwant %+v", g, want)
	}
	// Another connection that got the same id: not this flow's end.
	l.t.handle(ev(ctDestroy, 9, unix.IPPROTO_UDP, tup("fd00::3", "fd00::1", 5000, 53), 0, -1), 2)
	if g := l.take(); len(g) != 0 {
		t.Fatalf("DESTROY of another tuple reported: %+v", g)
	}
	l.t.handle(ev(ctDestroy, 9, unix.IPPROTO_UDP, o, 0, -1), 3)
	g = l.take()
	want.Event, want.Timestamp = EventFlowDeleted, 3
	if len(g) != 1 || g[0] != want {
		t.Fatalf("got %+v\nwant %+v", g, want)
	}
}

func TestFlowTrackerLoopback(t *testing.T) {
	l := newTrackerLog(16)
	o := tup("127.0.0.1", "127.0.0.1", 41000, 7000)
	l.t.handle(ev(ctNew, 5, 6, o, nftrules.LabelOut|nftrules.LabelLoop, tcpSynSent), 1)
	l.t.handle(ev(ctUpdate, 5, 6, o, 0, tcpEstab), 2)
	l.t.handle(ev(ctDestroy, 5, 6, o, 0, -1), 3)
	g := l.take()
	if len(g) != 4 {
		t.Fatalf("want 2 ESTABLISHED and 2 DELETED, got %+v", g)
	}
	cli := FlowData{EndpointID: 5, LocalAddr: a16("::ffff:127.0.0.1"), RemoteAddr: a16("::ffff:127.0.0.1"), LocalPort: 41000, RemotePort: 7000, Protocol: 6}
	srv := FlowData{EndpointID: 5 | 1<<32, LocalAddr: cli.RemoteAddr, RemoteAddr: cli.LocalAddr, LocalPort: 7000, RemotePort: 41000, Protocol: 6}
	for i, w := range []struct {
		ev  Event
		out bool
		f   FlowData
	}{{EventFlowEstablished, true, cli}, {EventFlowEstablished, false, srv}, {EventFlowDeleted, true, cli}, {EventFlowDeleted, false, srv}} {
		if g[i].Event != w.ev || g[i].Outbound != w.out || !g[i].Loopback || g[i].Flow != w.f {
			t.Errorf("event %d: got %+v, want %v outbound=%v %+v", i, g[i], w.ev, w.out, w.f)
		}
	}
}

func TestFlowTrackerICMP(t *testing.T) {
	l := newTrackerLog(16)
	e := ev(ctNew, 3, unix.IPPROTO_ICMPV6, tup("fd00::1", "fd00::2", 0, 0), nftrules.LabelOut, -1)
	e.icmp, e.icmpType, e.icmpCode = true, 128, 0
	l.t.handle(e, 1)
	g := l.take()
	if len(g) != 1 || g[0].Flow.LocalPort != 128 || g[0].Flow.RemotePort != 0 || !g[0].IPv6 || g[0].Flow.Protocol != 58 || !g[0].Outbound {
		t.Fatalf("got %+v", g)
	}
}

// TestFlowTrackerBounded: the tracker remembers at most max flows; a
// forgotten established flow's deletion is counted lost, and its DESTROY
// reports nothing.
func TestFlowTrackerBounded(t *testing.T) {
	l := newTrackerLog(4)
	for i := range 6 {
		l.t.handle(ev(ctNew, uint32(100+i), 17, tup("10.0.0.1", "10.0.0.2", uint16(1000+i), 53), nftrules.LabelOut, -1), 1)
	}
	if len(l.t.flows) != 4 || l.t.order.Len() != 4 || l.lost != 2 {
		t.Fatalf("%d flows, %d in order, %d lost; want 4, 4, 2", len(l.t.flows), l.t.order.Len(), l.lost)
	}
	l.take()
	l.t.handle(ev(ctDestroy, 100, 17, tup("10.0.0.1", "10.0.0.2", 1000, 53), 0, -1), 2)
	if g := l.take(); len(g) != 0 {
		t.Fatalf("forgotten flow's DESTROY reported: %+v", g)
	}
	l.t.handle(ev(ctDestroy, 105, 17, tup("10.0.0.1", "10.0.0.2", 1005, 53), 0, -1), 2)
	if g := l.take(); len(g) != 1 || g[0].Event != EventFlowDeleted || g[0].Flow.LocalPort != 1005 {
		t.Fatalf("remembered flow's DESTROY: %+v", g)
	}
}

// TestFlowTrackerBoundedPending: at the bound, TCP connections not yet
// established (a SYN flood's) are forgotten before the flows whose
// deletions the program is owed.
func TestFlowTrackerBoundedPending(t *testing.T) {
	l := newTrackerLog(4)
	u1, u2 := tup("10.0.0.1", "10.0.0.2", 1000, 53), tup("10.0.0.1", "10.0.0.2", 1001, 53)
	l.t.handle(ev(ctNew, 1, 17, u1, nftrules.LabelOut, -1), 1)
	l.t.handle(ev(ctNew, 2, 17, u2, nftrules.LabelOut, -1), 1)
	for i := range 4 {
		l.t.handle(ev(ctNew, uint32(10+i), 6, tup("10.0.0.9", "10.0.0.1", uint16(4000+i), 80), nftrules.LabelIn, tcpSynSent), 2)
	}
	// The last attempt completes its handshake.
	last := tup("10.0.0.9", "10.0.0.1", 4003, 80)
	l.t.handle(ev(ctUpdate, 13, 6, last, 0, tcpEstab), 3)
	// It is no longer an attempt to forget first.
	for i := range 2 {
		l.t.handle(ev(ctNew, uint32(20+i), 6, tup("10.0.0.9", "10.0.0.1", uint16(5000+i), 80), nftrules.LabelIn, tcpSynSent), 3)
	}
	l.t.handle(ev(ctDestroy, 1, 17, u1, 0, -1), 4)
	l.t.handle(ev(ctDestroy, 2, 17, u2, 0, -1), 4)
	l.t.handle(ev(ctDestroy, 13, 6, last, 0, -1), 4)
	var evs []string
	for _, x := range l.take() {
		evs = append(evs, fmt.Sprintf("%v:%d", x.Event, x.Flow.LocalPort))
	}
	want := []string{"ESTABLISHED:1000", "ESTABLISHED:1001", "ESTABLISHED:80", "DELETED:1000", "DELETED:1001", "DELETED:80"}
	if !slices.Equal(evs, want) || l.lost != 0 {
		t.Fatalf("events %v, %d lost; want %v, none lost", evs, l.lost, want)
	}
}

// TestFlowTrackerIDCollision: conntrack ids are a 32-bit hash, so two
// live connections may share one; each keeps its own establishment and
// deletion.
func TestFlowTrackerIDCollision(t *testing.T) {
	l := newTrackerLog(16)
	a, b := tup("10.0.0.1", "10.0.0.2", 1000, 53), tup("10.0.0.1", "10.0.0.3", 2000, 53)
	l.t.handle(ev(ctNew, 7, 17, a, nftrules.LabelOut, -1), 1)
	l.t.handle(ev(ctNew, 7, 17, b, nftrules.LabelOut, -1), 2)
	l.t.handle(ev(ctDestroy, 7, 17, a, 0, -1), 3)
	l.t.handle(ev(ctDestroy, 7, 17, b, 0, -1), 4)
	g := l.take()
	var ports []string
	for _, x := range g {
		ports = append(ports, fmt.Sprintf("%v:%d", x.Event, x.Flow.LocalPort))
	}
	want := []string{"ESTABLISHED:1000", "ESTABLISHED:2000", "DELETED:1000", "DELETED:2000"}
	if !slices.Equal(ports, want) {
		t.Fatalf("events %v, want %v", ports, want)
	}
	if len(l.t.flows) != 0 || l.t.order.Len() != 0 || l.lost != 0 {
		t.Fatalf("%d flows, %d in order, %d lost after both deletions", len(l.t.flows), l.t.order.Len(), l.lost)
	}
}

// TestFlowTrackerLostEstablished: an establishment lost to a full queue
// takes its deletion with it, so that the program never sees a deletion
// without its establishment.
func TestFlowTrackerLostEstablished(t *testing.T) {
	l := newTrackerLog(16)
	o := tup("10.0.0.1", "10.0.0.2", 1000, 53)
	l.full = true
	l.t.handle(ev(ctNew, 1, 17, o, nftrules.LabelOut, -1), 1)
	l.full = false
	l.t.handle(ev(ctDestroy, 1, 17, o, 0, -1), 2)
	if g := l.take(); len(g) != 0 {
		t.Fatalf("deletion of a lost establishment reported: %+v", g)
	}
}

// TestFlowTrackerOwner: the process found at the establishment, asked
// once per view when the event is read, is the deletion's too.
func TestFlowTrackerOwner(t *testing.T) {
	l := newTrackerLog(16)
	asked := 0
	l.t.owner = func(a *Address) (uint32, bool) {
		asked++
		if a.Timestamp != 5 {
			t.Errorf("owner asked with Timestamp %d, want the read time 5", a.Timestamp)
		}
		return 1000 + uint32(a.Flow.LocalPort), false
	}
	o := tup("127.0.0.1", "127.0.0.1", 41000, 7000)
	l.t.handle(ev(ctNew, 5, 6, o, nftrules.LabelOut|nftrules.LabelLoop, tcpSynSent), 4)
	l.t.handle(ev(ctUpdate, 5, 6, o, 0, tcpEstab), 5)
	l.t.handle(ev(ctDestroy, 5, 6, o, 0, -1), 6)
	g := l.take()
	if asked != 2 || len(g) != 4 {
		t.Fatalf("owner asked %d times, %d events", asked, len(g))
	}
	for i, want := range []uint32{42000, 8000, 42000, 8000} {
		if g[i].Flow.ProcessID != want {
			t.Errorf("event %d (%v): pid %d, want %d", i, g[i].Event, g[i].Flow.ProcessID, want)
		}
	}
}

// TestFlowTrackerNoSocket: a UDP datagram that no socket took (the owner
// says the kernel has none for the view: a port nobody listens on, as a
// port scan's) is no flow, as at WinDivert's flow layer: neither its
// establishment nor its deletion is reported, and nothing is counted
// lost. The client's view of a loopback flow still is; the owner is not
// asked about TCP differently.
func TestFlowTrackerNoSocket(t *testing.T) {
	l := newTrackerLog(16)
	l.t.owner = func(a *Address) (uint32, bool) {
		return 0, a.Flow.Protocol == 17 && !a.Outbound
	}
	in := tup("10.0.0.2", "10.0.0.1", 40000, 7001) // to the host, inbound
	l.t.handle(ev(ctNew, 1, 17, in, nftrules.LabelIn, -1), 1)
	l.t.handle(ev(ctDestroy, 1, 17, in, 0, -1), 2)
	loop := tup("127.0.0.1", "127.0.0.1", 40001, 7002)
	l.t.handle(ev(ctNew, 2, 17, loop, nftrules.LabelOut|nftrules.LabelLoop, -1), 3)
	l.t.handle(ev(ctDestroy, 2, 17, loop, 0, -1), 4)
	g := l.take()
	if len(g) != 2 {
		t.Fatalf("%d events, want the loopback client's establishment and deletion: %+v", len(g), g)
	}
	for i, want := range []Event{EventFlowEstablished, EventFlowDeleted} {
		if g[i].Event != want || !g[i].Outbound || g[i].Flow.LocalPort != 40001 {
			t.Errorf("event %d: %v outbound %v local port %d, want %v of the client's view", i, g[i].Event, g[i].Outbound, g[i].Flow.LocalPort, want)
		}
	}
	if l.lost != 0 {
		t.Errorf("%d counted lost, want 0", l.lost)
	}
}

// TestSockOwnerScanBudget: sockets the last scan of /proc did not see
// make the next lookup scan again, but a stream of them (an event a scan,
// each costing ms with a few hundred processes) does not keep the reader
// scanning: past the burst, scans take a quarter of its time. A lookup
// once the budget is paid back scans.
func TestSockOwnerScanBudget(t *testing.T) {
	scans := 0
	o := &sockOwner{pids: make(map[uint64]uint32), burst: int64(50 * time.Millisecond)}
	o.scanFn = func() {
		scans++
		time.Sleep(5 * time.Millisecond)
		o.pids[uint64(1000+scans)] = 7 // found: the socket of the first miss
	}
	for i := range 100 {
		// Each event read after the last scan began, of a socket it
		// did not see.
		o.pidOf(uint64(1+i), monoNow())
	}
	// 50 ms of burst: some 14 scans (each adds 3/4 of its 5 ms or more
	// to the debt), more if the test is held up between them; 100
	// without a budget.
	if scans > 60 {
		t.Fatalf("%d scans for 100 events read back to back", scans)
	}
	if o.pidOf(1001, monoNow()) != 7 {
		t.Fatal("a socket the last scan saw is not found")
	}
	time.Sleep(time.Duration((o.debt-o.burst)*scanShare) + 2*time.Millisecond)
	n := scans
	if o.pidOf(5000, monoNow()); scans != n+1 {
		t.Fatalf("a lookup once the budget is paid back: %d scans, want 1", scans-n)
	}
}

// TestSockOwnerScanStops: a scan of /proc ends when the handle stops,
// so that Close and Shutdown do not wait for a long one.
func TestSockOwnerScanStops(t *testing.T) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	o := &sockOwner{pids: make(map[uint64]uint32)}
	o.scan()
	if o.pids[st.Ino] != uint32(os.Getpid()) {
		t.Fatalf("the test's socket %d: pid %d", st.Ino, o.pids[st.Ino])
	}
	o.quit.Store(true)
	o.scan()
	if len(o.pids) != 0 {
		t.Fatalf("a stopped scan found %d sockets", len(o.pids))
	}
}

// TestDiagReq: the sock_diag request is a struct inet_diag_req_v2 (56
// bytes) with the ports big-endian and IPv4 addresses in the first 4
// bytes of their 16; the answer's inode is at offset 68.
func TestDiagReq(t *testing.T) {
	b := appendDiagReq(nil, unix.AF_INET, unix.IPPROTO_TCP, netip.MustParseAddr("::ffff:10.0.0.1"), 0x1234, netip.IPv6Unspecified(), 0)
	if len(b) != 56 || b[0] != unix.AF_INET || b[1] != unix.IPPROTO_TCP || b[8] != 0x12 || b[9] != 0x34 ||
		string(b[12:16]) != "\x0a\x00\x00\x01" || string(b[16:28]) != string(make([]byte, 12)) || string(b[28:44]) != string(make([]byte, 16)) ||
		string(b[48:56]) != "\xff\xff\xff\xff\xff\xff\xff\xff" {
		t.Fatalf("request % x", b)
	}
	b = appendDiagReq(nil, unix.AF_INET6, unix.IPPROTO_UDP, netip.MustParseAddr("fd00::1"), 1, netip.MustParseAddr("fd00::2"), 2)
	if len(b) != 56 || b[12] != 0xfd || b[27] != 1 || b[43] != 2 {
		t.Fatalf("request % x", b)
	}
	msg := make([]byte, 72)
	binary.NativeEndian.PutUint32(msg[68:], 777)
	if diagInode(msg) != 777 || diagInode(msg[:71]) != 0 {
		t.Fatalf("inode %d", diagInode(msg))
	}
}

func TestCtEventOf(t *testing.T) {
	labels := make([]byte, 16)
	labels[nftrules.LabelByte] = nftrules.LabelIn
	f := conntrack.NewFlow(6, 0, netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("10.0.0.1"), 5000, 22, 0, 0)
	f.ID, f.Labels = 42, labels
	f.ProtoInfo.TCP = &conntrack.ProtoInfoTCP{State: tcpSynSent}
	e, ok := ctEventOf(&conntrack.Event{Type: conntrack.EventNew, Flow: &f})
	want := ctEvent{kind: ctNew, id: 42, proto: 6, orig: tup("10.0.0.2", "10.0.0.1", 5000, 22), reply: tup("10.0.0.1", "10.0.0.2", 22, 5000), labels: nftrules.LabelIn, tcpState: tcpSynSent}
	if !ok || e != want {
		t.Fatalf("got %+v %v\nwant %+v", e, ok, want)
	}
	g := conntrack.NewFlow(1, 0, netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2"), 0, 0, 0, 0)
	g.TupleOrig.Proto.ICMPv4, g.TupleOrig.Proto.ICMPType, g.TupleOrig.Proto.ICMPCode, g.TupleOrig.Proto.ICMPID = true, 8, 0, 77
	e, ok = ctEventOf(&conntrack.Event{Type: conntrack.EventDestroy, Flow: &g})
	if !ok || e.kind != ctDestroy || !e.icmp || e.icmpType != 8 || e.tcpState != -1 || e.labels != 0 {
		t.Fatalf("icmp: %+v %v", e, ok)
	}
	if _, ok := ctEventOf(&conntrack.Event{Type: conntrack.EventExpNew}); ok {
		t.Fatal("an expectation event converted")
	}
	if _, ok := ctEventOf(&conntrack.Event{Type: conntrack.EventNew, Flow: &conntrack.Flow{}}); ok {
		t.Fatal("an event without a tuple converted")
	}
}

// --- the queue, without a kernel --------------------------------------------

// bareFlow is a flow backend with no socket and no table: deliver feeds
// it.
func bareFlow(t *testing.T, filt string, qlen int) (*Handle, *flowBackend) {
	t.Helper()
	f, err := filter.Compile(filt, filter.LayerFlow)
	if err != nil {
		t.Fatal(err)
	}
	b := &flowBackend{filt: f, qlen: qlen, changed: make(chan struct{}), done: make(chan struct{})}
	b.queueTime.Store(int64(QueueTimeDefault) * int64(time.Millisecond))
	h := &Handle{b: b, layer: LayerFlow, flags: FlagSniff | FlagRecvOnly, params: [3]uint64{uint64(qlen), QueueTimeDefault, QueueSizeDefault}}
	return h, b
}

func flowAddr(port uint16, out bool) *Address {
	return &Address{Layer: LayerFlow, Event: EventFlowEstablished, Sniffed: true, Outbound: out,
		Flow: FlowData{LocalAddr: a16("::ffff:10.0.0.1"), RemoteAddr: a16("::ffff:10.0.0.2"), LocalPort: 1000, RemotePort: port, Protocol: 6}}
}

func TestFlowQueue(t *testing.T) {
	h, b := bareFlow(t, "tcp and remotePort == 80", 32)
	for i := range 40 {
		b.deliver(flowAddr(80, true), nil)
		if i%2 == 0 {
			b.deliver(flowAddr(81, true), nil) // filtered out: Passed
		}
	}
	st, _ := h.Stats()
	if st.Overflows != 8 || st.Passed != 20 {
		t.Fatalf("stats %+v: want 8 overflows, 20 passed", st)
	}
	ms := make([]Message, 40)
	n, err := h.RecvBatch(ms)
	if n != 32 || err != nil {
		t.Fatalf("RecvBatch: %d, %v", n, err)
	}
	for _, m := range ms[:n] {
		if m.N != 0 || m.Addr.Flow.RemotePort != 80 {
			t.Fatalf("message %+v", m)
		}
	}
	// The deadline: an error wrapping os.ErrDeadlineExceeded, when it
	// passes while Recv waits, and at once when it has passed.
	h.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	var a Address
	if _, err := h.Recv(nil, &a); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Recv past its deadline: %v", err)
	}
	b.deliver(flowAddr(80, true), nil)
	if _, err := h.Recv(nil, &a); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Recv with an event queued past the deadline: %v", err)
	}
	h.SetReadDeadline(time.Time{})
	if _, err := h.Recv(nil, &a); err != nil {
		t.Fatal(err)
	}
	// Expiry: events older than ParamQueueTime are dropped.
	b.deliver(flowAddr(80, true), nil)
	b.queueTime.Store(0)
	time.Sleep(time.Millisecond)
	h.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, err := h.Recv(nil, &a); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Recv of an expired event: %v", err)
	}
	if st, _ := h.Stats(); st.Expired != 1 || st.Received != 33 {
		t.Fatalf("stats %+v: want 1 expired, 33 received", st)
	}
}

// TestFlowForgottenFiltered: a flow the tracker forgets at its bound
// counts as an overflow only when its deletion would have passed the
// filter.
func TestFlowForgottenFiltered(t *testing.T) {
	h, b := bareFlow(t, "udp and remotePort == 53", 32)
	b.tr = newFlowTracker(2, b.deliver, b.forgot)
	for i, port := range []uint16{80, 53, 53, 80} {
		b.tr.handle(ev(ctNew, uint32(1+i), 17, tup("10.0.0.1", "10.0.0.2", uint16(1000+i), port), nftrules.LabelOut, -1), 1)
	}
	// Forgotten: the first (port 80, filtered out) and the second
	// (port 53, its deletion owed).
	if st, _ := h.Stats(); st.Overflows != 1 || st.Passed != 2 {
		t.Fatalf("stats %+v: want 1 overflow, 2 passed", st)
	}
}

// TestFlowExpiredTakesDeletion: an establishment that waited
// ParamQueueTime unread is dropped, and takes its deletion with it,
// whether that is queued behind it already or comes later: the program
// never sees a deletion without its establishment.
func TestFlowExpiredTakesDeletion(t *testing.T) {
	h, b := bareFlow(t, "true", 32)
	b.tr = newFlowTracker(16, b.deliver, b.forgot)
	age := func() { // the oldest queued event waited 10 s
		b.mu.Lock()
		b.q[b.head].t -= int64(10 * time.Second)
		b.mu.Unlock()
	}
	recv := func() (*Address, error) {
		var a Address
		h.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		_, err := h.Recv(nil, &a)
		return &a, err
	}
	u1, u2 := tup("10.0.0.1", "10.0.0.2", 1000, 53), tup("10.0.0.1", "10.0.0.2", 1001, 53)
	// The deletion queued behind its expired establishment.
	b.tr.handle(ev(ctNew, 1, 17, u1, nftrules.LabelOut, -1), 1)
	age()
	b.tr.handle(ev(ctDestroy, 1, 17, u1, 0, -1), 2)
	if a, err := recv(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("after an expired establishment: %v %s", err, fmtFlow(a))
	}
	// The deletion read after its establishment expired.
	b.tr.handle(ev(ctNew, 2, 17, u2, nftrules.LabelOut, -1), 3)
	age()
	if a, err := recv(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("an expired establishment: %v %s", err, fmtFlow(a))
	}
	b.tr.handle(ev(ctDestroy, 2, 17, u2, 0, -1), 4)
	if a, err := recv(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("after an expired establishment: %v %s", err, fmtFlow(a))
	}
	if st, _ := h.Stats(); st.Expired != 2 || st.Received != 0 {
		t.Fatalf("stats %+v: want 2 expired", st)
	}
}

func TestFlowQueueWake(t *testing.T) {
	h, b := bareFlow(t, "true", 32)
	got := make(chan error, 1)
	go func() {
		var a Address
		_, err := h.Recv(nil, &a)
		got <- err
	}()
	time.Sleep(20 * time.Millisecond)
	b.deliver(flowAddr(80, true), nil)
	if err := <-got; err != nil {
		t.Fatal(err)
	}
}

// --- end to end, in network namespaces ---------------------------------------

// flushConntrack deletes every conntrack entry of ns, as conntrack -F
// does: each gets its DESTROY event now. (Waiting out short timeouts is
// no way to a bounded test: the kernel's garbage collector, shared by
// every namespace, finds expired entries up to a minute late when other
// namespaces keep long-lived ones.)
func flushConntrack(t *testing.T, ns *netnstest.NS) {
	t.Helper()
	if err := ns.Do(func() error {
		c, err := conntrack.Dial(nil)
		if err != nil {
			return err
		}
		defer c.Close()
		return c.Flush()
	}); err != nil {
		t.Fatalf("flush conntrack in %s: %v", ns.Name, err)
	}
}

// flowEvents receives from h until done reports true of what came, or
// the wait ends (then it fails t).
func flowEvents(t *testing.T, h *Handle, wait time.Duration, done func([]Address) bool) []Address {
	t.Helper()
	end := time.Now().Add(wait)
	var got []Address
	ms := make([]Message, 16)
	for !done(got) {
		if time.Now().After(end) {
			t.Fatalf("after %v, %d events:\n%s", wait, len(got), fmtFlows(got))
		}
		h.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		n, err := h.RecvBatch(ms)
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatal(err)
		}
		for _, m := range ms[:n] {
			if m.N != 0 {
				t.Fatalf("a flow event with %d bytes", m.N)
			}
			got = append(got, m.Addr)
		}
	}
	return got
}

func fmtFlow(a *Address) string {
	f := &a.Flow
	dir := "in"
	if a.Outbound {
		dir = "out"
	}
	return fmt.Sprintf("%v %s loop=%v v6=%v proto=%d %v:%d -> %v:%d id=%#x pid=%d", a.Event, dir, a.Loopback, a.IPv6, f.Protocol,
		netip.AddrFrom16(f.LocalAddr).Unmap(), f.LocalPort, netip.AddrFrom16(f.RemoteAddr).Unmap(), f.RemotePort, f.EndpointID, f.ProcessID)
}

func fmtFlows(as []Address) string {
	var sb strings.Builder
	for i := range as {
		sb.WriteString(fmtFlow(&as[i]) + "\n")
	}
	return sb.String()
}

// flowWant is an expected event.
type flowWant struct {
	ev         Event
	out, loop  bool
	proto      uint8
	local, rem netip.Addr
	lport      uint16 // 0: any
	rport      uint16 // 0: any
}

func (w flowWant) match(a *Address) bool {
	f := &a.Flow
	return a.Layer == LayerFlow && a.Event == w.ev && a.Outbound == w.out && a.Loopback == w.loop && a.Sniffed &&
		f.Protocol == w.proto && a.IPv6 == (w.local.Is6() && !w.local.Is4In6()) &&
		f.LocalAddr == w.local.As16() && f.RemoteAddr == w.rem.As16() &&
		(w.lport == 0 || f.LocalPort == w.lport) && (w.rport == 0 || f.RemotePort == w.rport) &&
		a.Timestamp > 0 && f.EndpointID != 0 && f.ProcessID == w.pid()
}

// pid is the process a flow of the test reports: the test's own for TCP
// and UDP (its sockets), none for ICMP (not looked up).
func (w flowWant) pid() uint32 {
	if w.proto == 6 || w.proto == 17 {
		return uint32(os.Getpid())
	}
	return 0
}

// findFlows returns, for each want, the index of a matching event (-1:
// none).
func findFlows(got []Address, wants []flowWant) []int {
	idx := make([]int, len(wants))
	for i, w := range wants {
		idx[i] = -1
		for j := range got {
			if w.match(&got[j]) {
				idx[i] = j
				break
			}
		}
	}
	return idx
}

func allFound(got []Address, wants []flowWant) bool {
	for _, i := range findFlows(got, wants) {
		if i < 0 {
			return false
		}
	}
	return true
}

// tcpConnect connects from ns to dst and writes a byte; the connection
// stays open until the test ends, so that the flow's socket, and with it
// its process, can be found when its establishment is read.
func tcpConnect(t *testing.T, ns *netnstest.NS, dst netip.AddrPort) netip.AddrPort {
	t.Helper()
	var c net.Conn
	err := ns.Do(func() (err error) {
		if c, err = net.DialTimeout("tcp", dst.String(), 2*time.Second); err != nil {
			return err
		}
		_, err = c.Write([]byte("x"))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	local := c.LocalAddr().(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
}

// udpSend sends one datagram from ns to dst on a socket that stays open
// until the test ends.
func udpSend(t *testing.T, ns *netnstest.NS, dst netip.AddrPort) {
	t.Helper()
	c, err := ns.DialUDP(dst)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Write([]byte("u")); err != nil {
		t.Fatal(err)
	}
}

// tcpListen listens in ns on addr and accepts (reading until EOF, then
// closing) until the test ends.
func tcpListen(t *testing.T, ns *netnstest.NS, addr netip.AddrPort) {
	t.Helper()
	ln, err := ns.ListenTCP(addr.String())
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			io.Copy(io.Discard, c)
			c.Close()
		}
	}()
}

func openFlowIn(t *testing.T, ns *netnstest.NS, filt string) *Handle {
	t.Helper()
	return openIn(t, ns, filt, LayerFlow, 0, FlagSniff|FlagRecvOnly)
}

// noDivertTables fails t if a table of the library is left in ns.
func noDivertTables(t *testing.T, ns *netnstest.NS) {
	t.Helper()
	for _, name := range nftTables(t, ns) {
		if strings.HasPrefix(name, "divert_") {
			t.Fatalf("table %s left in %s", name, ns.Name)
		}
	}
}

// TestFlowEndToEnd: TCP out and in, UDP, ICMP echo, IPv4 and IPv6, and
// loopback, each established and deleted, with the same FlowData both
// times; then Close leaves no table.
func TestFlowEndToEnd(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "flw", 0)
	h := openFlowIn(t, l.A.NS, "true")
	if tabs := nftTables(t, l.A.NS); len(tabs) != 1 || !strings.HasPrefix(tabs[0], "divert_") {
		t.Fatalf("tables in %s: %v", l.A.NS.Name, tabs)
	}

	tcpListen(t, l.B.NS, netip.AddrPortFrom(l.B.V4, 7001))
	tcpListen(t, l.B.NS, netip.AddrPortFrom(l.B.V6, 7001))
	tcpListen(t, l.A.NS, netip.AddrPortFrom(l.A.V4, 7002))
	lo := netip.MustParseAddr("127.0.0.1")
	tcpListen(t, l.A.NS, netip.AddrPortFrom(lo, 7003))
	tcpListen(t, l.A.NS, netip.AddrPortFrom(netip.IPv6Loopback(), 7003))

	out4 := tcpConnect(t, l.A.NS, netip.AddrPortFrom(l.B.V4, 7001))
	out6 := tcpConnect(t, l.A.NS, netip.AddrPortFrom(l.B.V6, 7001))
	in4 := tcpConnect(t, l.B.NS, netip.AddrPortFrom(l.A.V4, 7002))
	lo4 := tcpConnect(t, l.A.NS, netip.AddrPortFrom(lo, 7003))
	lo6 := tcpConnect(t, l.A.NS, netip.AddrPortFrom(netip.IPv6Loopback(), 7003))
	_, sink := udpSink(t, l, 7004)
	_ = sink
	udpSend(t, l.A.NS, netip.AddrPortFrom(l.B.V4, 7004))
	// Inbound UDP: to a port with a socket, a flow; to one without (as a
	// port scan's), none, as at WinDivert's flow layer.
	udpIn, err := l.A.NS.ListenUDP(netip.AddrPortFrom(l.A.V4, 7005).String())
	if err != nil {
		t.Fatal(err)
	}
	defer udpIn.Close()
	udpSend(t, l.B.NS, netip.AddrPortFrom(l.A.V4, 7998))
	udpSend(t, l.B.NS, netip.AddrPortFrom(l.A.V4, 7005))
	if n, _ := l.A.NS.Ping(l.B.V4, 1, 2*time.Second); n != 1 {
		t.Fatal("ping v4 unanswered")
	}
	if n, _ := l.A.NS.Ping(l.B.V6, 1, 2*time.Second); n != 1 {
		t.Fatal("ping v6 unanswered")
	}
	// A refused connect: no flow.
	if err := l.A.NS.Do(func() error {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(l.B.V4, 7999).String(), 2*time.Second)
		if err == nil {
			c.Close()
			return errors.New("connected to a closed port")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	v4 := func(a netip.Addr) netip.Addr { return netip.AddrFrom16(a.As16()) }
	var wants []flowWant
	for _, ev := range []Event{EventFlowEstablished, EventFlowDeleted} {
		wants = append(wants,
			flowWant{ev, true, false, 6, v4(l.A.V4), v4(l.B.V4), out4.Port(), 7001},
			flowWant{ev, true, false, 6, l.A.V6, l.B.V6, out6.Port(), 7001},
			flowWant{ev, false, false, 6, v4(l.A.V4), v4(l.B.V4), 7002, in4.Port()},
			flowWant{ev, true, true, 6, v4(lo), v4(lo), lo4.Port(), 7003},
			flowWant{ev, false, true, 6, v4(lo), v4(lo), 7003, lo4.Port()},
			flowWant{ev, true, true, 6, netip.IPv6Loopback(), netip.IPv6Loopback(), lo6.Port(), 7003},
			flowWant{ev, false, true, 6, netip.IPv6Loopback(), netip.IPv6Loopback(), 7003, lo6.Port()},
			flowWant{ev, true, false, 17, v4(l.A.V4), v4(l.B.V4), 0, 7004},
			flowWant{ev, false, false, 17, v4(l.A.V4), v4(l.B.V4), 7005, 0},
			flowWant{ev, true, false, 1, v4(l.A.V4), v4(l.B.V4), 8, 0},
			flowWant{ev, true, false, 58, l.A.V6, l.B.V6, 128, 0},
		)
	}
	half := len(wants) / 2
	got := flowEvents(t, h, 10*time.Second, func(g []Address) bool { return allFound(g, wants[:half]) })
	flushConntrack(t, l.A.NS)
	got = append(got, flowEvents(t, h, 10*time.Second, func(g []Address) bool { return allFound(slices.Concat(got, g), wants) })...)
	t.Logf("events:\n%s", fmtFlows(got))
	idx := findFlows(got, wants)
	for i := range half {
		e, d := got[idx[i]], got[idx[half+i]]
		if e.Flow != d.Flow || e.Timestamp > d.Timestamp {
			t.Errorf("established %s and deleted %s differ", fmtFlow(&e), fmtFlow(&d))
		}
	}
	// Every event is one of these: none for the refused connect, none twice.
	ids := map[[2]uint64]int{}
	for i := range got {
		ids[[2]uint64{got[i].Flow.EndpointID, uint64(got[i].Event)}]++
		if got[i].Flow.RemotePort == 7999 {
			t.Errorf("refused connect reported: %s", fmtFlow(&got[i]))
		}
		if got[i].Flow.LocalPort == 7998 {
			t.Errorf("UDP to a port without a socket reported: %s", fmtFlow(&got[i]))
		}
	}
	for k, n := range ids {
		if n != 1 {
			t.Errorf("endpoint %#x event %d reported %d times", k[0], k[1], n)
		}
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	noDivertTables(t, l.A.NS)
}

// TestFlowProcessListener: a connection not yet accepted has no
// process of its own: the listening socket's is reported.
func TestFlowProcessListener(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "flpl", 0)
	h := openFlowIn(t, l.A.NS, "tcp and inbound")
	ln, err := l.A.NS.ListenTCP(netip.AddrPortFrom(l.A.V4, 7050).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close() // never accepts
	tcpConnect(t, l.B.NS, netip.AddrPortFrom(l.A.V4, 7050))
	got := flowEvents(t, h, 5*time.Second, func(g []Address) bool { return len(g) > 0 })
	if got[0].Flow.LocalPort != 7050 || got[0].Flow.ProcessID != uint32(os.Getpid()) {
		t.Fatalf("event %s, want pid %d", fmtFlow(&got[0]), os.Getpid())
	}
}

// TestFlowForwardedNotReported: a router's handle reports its own flows,
// not those it forwards.
func TestFlowForwardedNotReported(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "flf", 0)
	h := openFlowIn(t, r.Router(), "true")
	tcpListen(t, r.RightHost(), netip.AddrPortFrom(r.Right.B.V4, 7010))
	tcpConnect(t, r.LeftHost(), netip.AddrPortFrom(r.Right.B.V4, 7010))
	if n, _ := r.LeftHost().Ping(r.Right.B.V6, 1, 2*time.Second); n != 1 {
		t.Fatal("forwarded ping unanswered")
	}
	// The router's own flow, last.
	routerPingOnly(t, r, h)
}

// TestFlowFilter: the handle's filter narrows the events in user space.
func TestFlowFilter(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "flt", 0)
	hPort := openFlowIn(t, l.A.NS, "tcp and remotePort == 7021 and event == ESTABLISHED")
	hOut := openFlowIn(t, l.A.NS, fmt.Sprintf("outbound and not loopback and processId == %d", os.Getpid()))
	tcpListen(t, l.B.NS, netip.AddrPortFrom(l.B.V4, 7020))
	tcpListen(t, l.B.NS, netip.AddrPortFrom(l.B.V4, 7021))
	tcpListen(t, l.A.NS, netip.AddrPortFrom(l.A.V4, 7022))
	tcpListen(t, l.A.NS, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 7023))
	tcpConnect(t, l.A.NS, netip.AddrPortFrom(l.B.V4, 7020))
	p21 := tcpConnect(t, l.A.NS, netip.AddrPortFrom(l.B.V4, 7021))
	tcpConnect(t, l.B.NS, netip.AddrPortFrom(l.A.V4, 7022))
	tcpConnect(t, l.A.NS, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 7023))
	// Last: an outbound flow both filters take, the marker that every
	// earlier one has been judged.
	tcpConnect(t, l.A.NS, netip.AddrPortFrom(l.B.V4, 7021))
	a4, b4 := netip.AddrFrom16(l.A.V4.As16()), netip.AddrFrom16(l.B.V4.As16())
	got := flowEvents(t, hPort, 10*time.Second, func(g []Address) bool { return len(g) >= 2 })
	for i := range got {
		if got[i].Flow.RemotePort != 7021 || got[i].Event != EventFlowEstablished {
			t.Errorf("port filter passed %s", fmtFlow(&got[i]))
		}
	}
	if !(flowWant{EventFlowEstablished, true, false, 6, a4, b4, p21.Port(), 7021}).match(&got[0]) {
		t.Errorf("first event %s", fmtFlow(&got[0]))
	}
	got = flowEvents(t, hOut, 10*time.Second, func(g []Address) bool {
		n := 0
		for i := range g {
			if g[i].Flow.RemotePort == 7021 {
				n++
			}
		}
		return n >= 2
	})
	ports := map[uint16]bool{}
	for i := range got {
		if !got[i].Outbound || got[i].Loopback {
			t.Errorf("outbound filter passed %s", fmtFlow(&got[i]))
		}
		ports[got[i].Flow.RemotePort] = true
	}
	if !ports[7020] || ports[7023] || len(ports) != 2 {
		t.Errorf("outbound filter: remote ports %v", ports)
	}
	st, _ := hOut.Stats()
	if st.Passed < 3 || st.Received != uint64(len(got)) {
		t.Errorf("stats %+v after %d events", st, len(got))
	}
}

// TestFlowHandleStates: deadline, Shutdown (drain, then ErrShutdown),
// Send refused, Close during Recv.
func TestFlowHandleStates(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "fls", 0)
	h := openFlowIn(t, l.A.NS, "udp")
	var a Address
	if _, err := h.Send([]byte{0x45}, &a); !errors.Is(err, os.ErrInvalid) {
		t.Errorf("Send: %v", err)
	}
	h.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	start := time.Now()
	if _, err := h.Recv(nil, &a); !errors.Is(err, os.ErrDeadlineExceeded) || time.Since(start) > 5*time.Second {
		t.Fatalf("Recv with a deadline: %v after %v", err, time.Since(start))
	}
	h.SetReadDeadline(time.Time{})
	_, _ = udpSink(t, l, 7030)
	for i := range 3 {
		c, err := l.A.NS.DialUDP(netip.AddrPortFrom(l.B.V4, uint16(7030)))
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte{byte(i)})
		c.Close()
	}
	// Wait until the three are queued, then shut down: they drain.
	deadline := time.Now().Add(5 * time.Second)
	for {
		b := h.b.(*flowBackend)
		b.mu.Lock()
		n := b.n
		b.mu.Unlock()
		if n == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d events queued, want 3", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := h.Shutdown(ShutdownRecv); err != nil {
		t.Fatal(err)
	}
	h.SetReadDeadline(time.Now().Add(-time.Second)) // drained whatever the deadline
	for i := range 3 {
		if _, err := h.Recv(nil, &a); err != nil || a.Event != EventFlowEstablished {
			t.Fatalf("drain %d: %v %+v", i, err, a)
		}
	}
	if _, err := h.Recv(nil, &a); !errors.Is(err, ErrShutdown) {
		t.Fatalf("after the drain: %v", err)
	}
	// Shut down, not closed: params are still set (the event socket is
	// gone: its buffer has nothing left to hold).
	if err := h.SetParam(ParamQueueSize, QueueSizeDefault/2); err != nil {
		t.Errorf("SetParam after Shutdown: %v", err)
	}

	// Close while Recv waits.
	h2 := openFlowIn(t, l.A.NS, "true")
	errc := make(chan error, 2)
	for range 2 {
		go func() {
			var a Address
			_, err := h2.Recv(nil, &a)
			errc <- err
		}()
	}
	time.Sleep(50 * time.Millisecond)
	if err := h2.Close(); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		select {
		case err := <-errc:
			if !errors.Is(err, net.ErrClosed) {
				t.Fatalf("Recv during Close: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Recv still blocked after Close")
		}
	}
	if _, err := h2.Recv(nil, &a); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Recv after Close: %v", err)
	}
	h.Close()
	noDivertTables(t, l.A.NS)
}

// TestFlowOverflow: events the program does not read fill the queue
// (ParamQueueLength) and the rest are counted, not kept.
func TestFlowOverflow(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "flo", 0)
	h := openFlowIn(t, l.A.NS, "udp and outbound")
	if err := h.SetParam(ParamQueueLength, QueueLengthMin); err != nil {
		t.Fatal(err)
	}
	const flows = 2 * QueueLengthMin
	for i := range flows {
		c, err := l.A.NS.DialUDP(netip.AddrPortFrom(l.B.V4, uint16(7100+i)))
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte{1})
		c.Close()
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, _ := h.Stats()
		if st.Overflows >= flows-QueueLengthMin {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("stats %+v: want %d overflows", st, flows-QueueLengthMin)
		}
		time.Sleep(20 * time.Millisecond)
	}
	ms := make([]Message, BatchMax)
	h.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	n, err := h.RecvBatch(ms)
	if n != QueueLengthMin || err != nil {
		t.Fatalf("RecvBatch: %d %v, want %d", n, err, QueueLengthMin)
	}
}

// TestFlowEventsDisabled: with conntrack's events off in the namespace,
// Open fails (ErrNotSupported) instead of returning a handle that never
// reports, and leaves no table.
func TestFlowEventsDisabled(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "fld")
	if err := ns.Sysctl("net.netfilter.nf_conntrack_events", "0"); err != nil {
		t.Fatal(err)
	}
	err := ns.Do(func() error {
		h, err := Open("true", LayerFlow, 0, FlagSniff|FlagRecvOnly)
		if err == nil {
			h.Close()
		}
		return err
	})
	if !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "nf_conntrack_events") {
		t.Fatalf("Open: %v", err)
	}
	noDivertTables(t, ns)
}

// TestFlowNoPermission: a process without CAP_NET_ADMIN over the
// namespace (root of a user namespace of its own) is refused with an error
// wrapping os.ErrPermission that says what is missing.
func TestFlowNoPermission(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "flp")
	s := netnstest.UserNSChild(t, ns, flowChildEnv+"=userns")
	t.Logf("child: %s", s)
	if !strings.Contains(s, "perm=true") || !strings.Contains(s, "CAP_NET_ADMIN") {
		t.Fatalf("child said: %s", s)
	}
}

// TestFlowOpenArgs: what Open refuses at LayerFlow before it sets
// anything up, and OpenQueues' handles, which share one event queue.
func TestFlowOpenArgs(t *testing.T) {
	for _, f := range []Flag{0, FlagSniff, FlagRecvOnly} {
		if _, err := Open("true", LayerFlow, 0, f); !errors.Is(err, os.ErrInvalid) {
			t.Errorf("flags %#x: %v, want os.ErrInvalid (FlagSniff|FlagRecvOnly needed)", uint64(f), err)
		}
	}
	if _, err := Open("true", LayerFlow, 0, FlagSniff|FlagRecvOnly|FlagReassemble); !errors.Is(err, ErrNotSupported) {
		t.Errorf("FlagReassemble: %v, want ErrNotSupported", err)
	}
	if _, err := Open("true", LayerFlow, 0, FlagSniff|FlagRecvOnly|FlagFragments); !errors.Is(err, os.ErrInvalid) {
		t.Errorf("FlagFragments: %v, want os.ErrInvalid", err)
	}
	var fe *FilterError
	if _, err := Open("tcp.DstPort == 80", LayerFlow, 0, FlagSniff|FlagRecvOnly); !errors.As(err, &fe) {
		t.Errorf("a network-layer field: %v, want a FilterError", err)
	}
}

func TestFlowOpenQueues(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "flq", 0)
	var hs []*Handle
	if err := l.A.NS.Do(func() (err error) {
		hs, err = OpenQueues("udp", LayerFlow, 0, FlagSniff|FlagRecvOnly, 2)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if tabs := nftTables(t, l.A.NS); len(tabs) != 1 {
		t.Errorf("tables for two handles: %v", tabs)
	}
	_, _ = udpSink(t, l, 7040)
	if err := l.A.NS.SendUDP(netip.AddrPortFrom(l.B.V4, 7040), []byte("u"), 1, 0); err != nil {
		t.Fatal(err)
	}
	got := flowEvents(t, hs[1], 5*time.Second, func(g []Address) bool { return len(g) > 0 })
	if got[0].Flow.RemotePort != 7040 {
		t.Errorf("event %s", fmtFlow(&got[0]))
	}
	for _, h := range hs {
		if err := h.Close(); err != nil {
			t.Fatal(err)
		}
	}
	noDivertTables(t, l.A.NS)
}

const flowChildEnv = "DIVERT_FLOW_TEST_CHILD"

// TestMain lets the test binary act as TestFlowNoPermission's child.
func TestMain(m *testing.M) {
	if os.Getenv(flowChildEnv) == "userns" {
		_, err := Open("true", LayerFlow, 0, FlagSniff|FlagRecvOnly)
		fmt.Printf("perm=%v err=%v\n", errors.Is(err, os.ErrPermission), err)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// FuzzCtEvent: whatever a netfilter netlink message holds, decoding it
// (ti-mo/conntrack's Event.Unmarshal, then ctEventOf) and tracking it
// neither panics nor reports a flow without a local label; ctSkip skips
// no message the tracker acts on, and the event socket's filter
// (ctFilter) drops none that ctSkip keeps.
func FuzzCtEvent(f *testing.F) {
	f.Add(uint16(0x0100), uint16(0x0600), []byte{2, 0, 0, 0})
	f.Add(uint16(0x0102), uint16(0), []byte{10, 0, 0, 0, 0x14, 0, 0x01, 0x80, 0x0c, 0, 0x01, 0x80, 8, 0, 1, 0, 10, 0, 0, 1})
	// A DESTROY whose CTA_ID has high type bits (0x300c) the decoder
	// drops (its attribute types are a byte): found by the fuzzer when
	// ctSkip masked only the two flag bits.
	f.Add(uint16(258), uint16(0), []byte("00004\x00\x01\x80\x14\x00\x010\b\x00\x010\n\x00\x00\x01\b\x00\x020\n\x00\x00\x02\x1c\x00\x020\x05\x00\x010\x11000\x06\x00\x020\x00\x0100\x06\x00\x030\x00\x0200\b\x00\f0\x00\x00\x00\x05"))
	// Kernel-shaped events about the flows the target remembers (ids 5
	// and 6) and others.
	src, dst := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	for _, m := range []netlink.Message{
		ctMessage(f, false, 9, src, dst, 7, 8, nftrules.LabelOut),
		ctMessage(f, false, 9, src, dst, 7, 8, 0),
		ctMessage(f, true, 5, src, dst, 1, 2, 0),
		ctMessage(f, true, 6, src, dst, 3, 4, 0),
		ctMessage(f, true, 9, src, dst, 7, 8, 0),
	} {
		f.Add(uint16(m.Header.Type), uint16(m.Header.Flags), m.Data)
	}
	// For the socket filter: two CTA_LABELS (the last counts), labels
	// with high type bits, a CTA_ID of the wrong size.
	fwd := ctMessage(f, false, 9, src, dst, 7, 8, 0)
	for _, extra := range [][]byte{
		slices.Concat(labelsAttr(22, nftrules.LabelOut), labelsAttr(22, 0)),
		slices.Concat(labelsAttr(22, 0), labelsAttr(22, nftrules.LabelIn)),
		labelsAttr(0x0116, nftrules.LabelOut),
		attr(12, 0, 0, 0, 0, 0, 0),
	} {
		f.Add(uint16(fwd.Header.Type), uint16(fwd.Header.Flags), slices.Concat(fwd.Data, extra))
	}
	f.Fuzz(func(t *testing.T, typ, flags uint16, data []byte) {
		m := netlink.Message{Header: netlink.Header{Type: netlink.HeaderType(typ), Flags: netlink.HeaderFlags(flags)}, Data: data}
		// The event socket's filter never drops what ctSkip keeps
		// (whatever the tracker remembers: it drops no UPDATE or
		// DESTROY).
		if ctFilterDrops(t, ctWire(m)) && !ctSkip(m, func(uint32) bool { return true }) {
			t.Fatalf("the socket filter drops a message ctSkip keeps: %+v", m)
		}
		var cev conntrack.Event
		if cev.Unmarshal(m) != nil {
			return
		}
		e, ok := ctEventOf(&cev)
		if !ok {
			return
		}
		l := newTrackerLog(4)
		// Remembered before: an established UDP flow (id 5) and a TCP
		// connect not yet established (id 6), so that an UPDATE or
		// DESTROY of theirs is acted on.
		l.t.handle(ev(ctNew, 5, 17, tup("10.0.0.1", "10.0.0.2", 1, 2), nftrules.LabelOut, -1), 0)
		l.t.handle(ev(ctNew, 6, 6, tup("10.0.0.1", "10.0.0.2", 3, 4), nftrules.LabelOut, tcpSynSent), 0)
		l.take()
		skip := ctSkip(m, l.t.tracked)
		before := len(l.t.flows)
		l.t.handle(&e, 1)
		if e.kind == ctNew && e.labels&(nftrules.LabelOut|nftrules.LabelIn) == 0 && len(l.got) != 0 {
			t.Fatalf("unlabelled NEW event reported: %+v", l.got)
		}
		// ctSkip never skips an event the tracker acts on.
		if skip && (len(l.got) != 0 || len(l.t.flows) != before) {
			t.Fatalf("ctSkip skipped an event the tracker acted on (%+v): %d events, flows %d -> %d", e, len(l.got), before, len(l.t.flows))
		}
	})
}

// TestCtSkip: the reader's pre-check skips a NEW event without the
// handle's labels and an UPDATE or DESTROY of an id it does not remember,
// and nothing else: messages it cannot read go to the decoder.
func TestCtSkip(t *testing.T) {
	src, dst := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	tracked := func(id uint32) bool { return id == 7 }
	upd := ctMessage(t, false, 7, src, dst, 1, 2, 0)
	upd.Header.Flags = 0
	updOther := ctMessage(t, false, 8, src, dst, 1, 2, 0)
	updOther.Header.Flags = 0
	short := ctMessage(t, true, 8, src, dst, 1, 2, 0)
	short.Data = short.Data[:len(short.Data)-3] // an attribute cut short
	other := ctMessage(t, true, 8, src, dst, 1, 2, 0)
	other.Header.Type = 0x101 // IPCTNL_MSG_CT_GET: not an event
	for _, c := range []struct {
		name string
		m    netlink.Message
		skip bool
	}{
		{"new-out", ctMessage(t, false, 8, src, dst, 1, 2, nftrules.LabelOut), false},
		{"new-in", ctMessage(t, false, 8, src, dst, 1, 2, nftrules.LabelIn), false},
		{"new-loop-only", ctMessage(t, false, 8, src, dst, 1, 2, nftrules.LabelLoop), true},
		{"new-forwarded", ctMessage(t, false, 8, src, dst, 1, 2, 0), true},
		{"update-tracked", upd, false},
		{"update-other", updOther, true},
		{"destroy-tracked", ctMessage(t, true, 7, src, dst, 1, 2, 0), false},
		{"destroy-other", ctMessage(t, true, 8, src, dst, 1, 2, 0), true},
		{"malformed", short, false},
		{"not-an-event", other, false},
	} {
		if got := ctSkip(c.m, tracked); got != c.skip {
			t.Errorf("%s: ctSkip %v, want %v", c.name, got, c.skip)
		}
		// Whatever ctSkip says, the message decodes as the kernel's would.
		var e conntrack.Event
		if err := e.Unmarshal(c.m); err != nil && c.name != "malformed" && c.name != "not-an-event" {
			t.Errorf("%s: does not decode: %v", c.name, err)
		}
	}
}

// failingSocket is a netlink socket whose Receive waits until Close, and
// whose Close fails.
type failingSocket struct {
	netlink.Socket // not called
	closed         chan struct{}
	once           sync.Once
}

var errTestClose = errors.New("test: close failed")

func (s *failingSocket) Close() error {
	s.once.Do(func() { close(s.closed) })
	return errTestClose
}

func (s *failingSocket) ReceiveIter() iter.Seq2[netlink.Message, error] {
	return func(yield func(netlink.Message, error) bool) {
		<-s.closed
		yield(netlink.Message{}, net.ErrClosed)
	}
}

// TestFlowCloseAfterShutdown: Shutdown closes the event socket and
// returns its error; Close, with no socket left to close, does not
// return it again.
func TestFlowCloseAfterShutdown(t *testing.T) {
	h, b := bareFlow(t, "true", 32)
	b.conn = netlink.NewConn(&failingSocket{closed: make(chan struct{})}, 0)
	b.tr = newFlowTracker(16, b.deliver, b.forgot)
	b.started = true
	go b.read()
	if err := h.Shutdown(ShutdownRecv); !errors.Is(err, errTestClose) {
		t.Fatalf("Shutdown: %v, want the close's error", err)
	}
	if err := h.Close(); err != nil {
		t.Fatalf("Close after Shutdown: %v, want nil", err)
	}
}

// TestFlowOverflowCountedOnce: a flow the tracker forgets at its bound
// after the event socket overflowed (ENOBUFS, counted) may have lost its
// DESTROY to that overflow: it is not counted a second time. A flow added
// after the overflow still is.
func TestFlowOverflowCountedOnce(t *testing.T) {
	h, b := bareFlow(t, "true", 32)
	b.tr = newFlowTracker(1, b.deliver, b.forgot)
	b.tr.handle(outUDP(1), 1)
	b.overflowed()            // the reader's ENOBUFS
	b.tr.handle(outUDP(2), 2) // forgets flow 1, whose DESTROY the overflow may have taken
	if st, _ := h.Stats(); st.Overflows != 1 {
		t.Fatalf("stats %+v: want 1 overflow (the ENOBUFS), not 2", st)
	}
	b.tr.handle(outUDP(3), 3) // forgets flow 2, added after the overflow
	if st, _ := h.Stats(); st.Overflows != 2 {
		t.Fatalf("stats %+v: want 2 overflows (the ENOBUFS, then flow 2 forgotten)", st)
	}
}

// TestFlowResyncAfterOverflow: events lost to a real overflow of the
// event socket (ENOBUFS: a minimal receive buffer, the reader held, a
// burst of flows) are made up for by a dump of conntrack's table: a UDP
// flow and a TCP connection whose events were all lost are still
// reported established, then deleted; a flow whose DESTROY was lost is
// reported deleted; none is reported twice. A TCP connection older than
// the handle, which conntrack picked up in mid-stream and labelled, is
// not reported from the dump either.
func TestFlowResyncAfterOverflow(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "flr", 0)
	// Before conntrack runs in the namespace (the handle's table starts
	// it): a connection it will pick up in mid-stream.
	tcpListen(t, l.B.NS, netip.AddrPortFrom(l.B.V4, 7063))
	var old net.Conn
	if err := l.A.NS.Do(func() (err error) {
		old, err = net.DialTimeout("tcp", netip.AddrPortFrom(l.B.V4, 7063).String(), 2*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	var hold sync.Mutex
	flowRecvHook = func() { hold.Lock(); hold.Unlock() }
	t.Cleanup(func() { flowRecvHook = nil }) // also if the open fails
	h := openFlowIn(t, l.A.NS, "not loopback")
	flowRecvHook = nil
	b := h.b.(*flowBackend)
	if _, err := old.Write([]byte("p")); err != nil { // picked up, labelled
		t.Fatal(err)
	}
	_, _ = udpSink(t, l, 7060)
	tcpListen(t, l.B.NS, netip.AddrPortFrom(l.B.V4, 7061))
	a4, b4 := netip.AddrFrom16(l.A.V4.As16()), netip.AddrFrom16(l.B.V4.As16())

	// D: established and read; its DESTROY will be lost.
	udpSend(t, l.A.NS, netip.AddrPortFrom(l.B.V4, 7060))
	dEst := flowWant{EventFlowEstablished, true, false, 17, a4, b4, 0, 7060}
	got := flowEvents(t, h, 5*time.Second, func(g []Address) bool { return allFound(g, []flowWant{dEst}) })

	// The smallest buffer the kernel gives (SOCK_MIN_RCVBUF), and the
	// reader held at its next receive.
	if err := setRecvBuf(b.conn, 0); err != nil {
		t.Fatal(err)
	}
	hold.Lock()
	held := true
	defer func() {
		if held {
			hold.Unlock()
		}
	}()
	// A burst of flows fills the buffer: the events past it are lost.
	udpBurst(t, l.A.NS, l.B.V4, 7200, 200)
	// Every entry deleted (D's DESTROY lost), then a UDP flow and a TCP
	// connection whose events are lost; the old connection is picked up
	// again.
	flushConntrack(t, l.A.NS)
	if _, err := old.Write([]byte("p")); err != nil { // picked up again
		t.Fatal(err)
	}
	udpSend(t, l.A.NS, netip.AddrPortFrom(l.B.V4, 7062))
	tc := tcpConnect(t, l.A.NS, netip.AddrPortFrom(l.B.V4, 7061))
	hold.Unlock()
	held = false

	wants := []flowWant{
		{EventFlowDeleted, true, false, 17, a4, b4, 0, 7060},
		{EventFlowEstablished, true, false, 17, a4, b4, 0, 7062},
		{EventFlowEstablished, true, false, 6, a4, b4, tc.Port(), 7061},
	}
	got = append(got, flowEvents(t, h, 10*time.Second, func(g []Address) bool { return allFound(g, wants) })...)
	if st, _ := h.Stats(); st.Overflows == 0 {
		t.Fatalf("stats %+v: no overflow; the test provoked none", st)
	}
	// Their DESTROY events are read as usual.
	flushConntrack(t, l.A.NS)
	wants = append(wants,
		flowWant{EventFlowDeleted, true, false, 17, a4, b4, 0, 7062},
		flowWant{EventFlowDeleted, true, false, 6, a4, b4, tc.Port(), 7061})
	got = append(got, flowEvents(t, h, 10*time.Second, func(g []Address) bool { return allFound(slices.Concat(got, g), wants) })...)
	idx := findFlows(got, wants)
	for i, j := range []int{1, 2} {
		if e, d := got[idx[j]], got[idx[3+i]]; e.Flow != d.Flow {
			t.Errorf("established %s and deleted %s differ", fmtFlow(&e), fmtFlow(&d))
		}
	}
	ids := map[[2]uint64]int{}
	for i := range got {
		ids[[2]uint64{got[i].Flow.EndpointID, uint64(got[i].Event)}]++
	}
	for k, n := range ids {
		if n != 1 {
			t.Errorf("endpoint %#x event %d reported %d times", k[0], k[1], n)
		}
	}
	for i := range got {
		if got[i].Flow.RemotePort == 7063 {
			t.Errorf("a connection older than the handle reported: %s", fmtFlow(&got[i]))
		}
	}
	st, _ := h.Stats()
	t.Logf("%d events, stats %+v", len(got), st)
}

// TestFlowTrackerResync: after an overflow, a dump of conntrack's table
// makes up for lost events: a pending TCP connection the dump shows
// established is established; labelled flows never seen are added (TCP
// established, or pending until its UPDATE; not a connection picked up in
// mid-stream, nor a closed one); flows the dump lacks are deleted. A NEW
// event read after the dump does not report a flow again; an UPDATE or
// DESTROY acts as usual.
func TestFlowTrackerResync(t *testing.T) {
	l := newTrackerLog(16)
	tcpEv := func(kind ctKind, id uint32, port uint16, labels byte, state int) *ctEvent {
		return ev(kind, id, 6, tup("10.0.0.1", "10.0.0.2", port, 80), labels, state)
	}
	udp := func(kind ctKind, id uint32, port uint16, labels byte) *ctEvent {
		return ev(kind, id, 17, tup("10.0.0.1", "10.0.0.2", port, 53), labels, -1)
	}
	out := nftrules.LabelOut
	// Known before the overflow: a pending TCP connect (1), an
	// established UDP flow (2) whose DESTROY is lost, one (3) alive.
	l.t.handle(tcpEv(ctNew, 1, 1001, out, tcpSynSent), 1)
	l.t.handle(udp(ctNew, 2, 1002, out), 1)
	l.t.handle(udp(ctNew, 3, 1003, out), 1)
	l.take()
	l.t.overflowed()
	l.t.beginSync()
	for _, e := range []*ctEvent{
		tcpEv(ctUpdate, 1, 1001, out, tcpEstab),    // its UPDATE lost
		udp(ctUpdate, 3, 1003, out),                // alive
		udp(ctUpdate, 4, 1004, out),                // its NEW lost
		tcpEv(ctUpdate, 5, 1005, out, 4),           // FIN_WAIT: established, all lost
		tcpEv(ctUpdate, 6, 1006, out, tcpSynRecv),  // handshake under way
		tcpEv(ctUpdate, 7, 1007, out, 8),           // CLOSE: refused or reset
		udp(ctUpdate, 8, 1008, 0),                  // not the handle's
		udp(ctUpdate, 9, 1009, nftrules.LabelLoop), // only the loopback bit
	} {
		l.t.dumped(e, 2)
	}
	picked := tcpEv(ctUpdate, 10, 1010, out, tcpEstab)
	picked.pickedUp = true
	l.t.dumped(picked, 2)
	l.t.endSync(2)
	var evs []string
	for _, x := range l.take() {
		evs = append(evs, fmt.Sprintf("%v:%d@%d", x.Event, x.Flow.LocalPort, x.Timestamp))
	}
	want := []string{"ESTABLISHED:1001@2", "ESTABLISHED:1004@2", "ESTABLISHED:1005@2", "DELETED:1002@2"}
	if !slices.Equal(evs, want) {
		t.Fatalf("after the dump: %v, want %v", evs, want)
	}
	// Events read after the dump: the NEW of flow 4 (read late), the
	// UPDATE that establishes 6, the DESTROY of 2 (already deleted),
	// of 4 and of 5.
	l.t.handle(udp(ctNew, 4, 1004, out), 3)
	l.t.handle(tcpEv(ctNew, 6, 1006, out, tcpSynSent), 3)
	l.t.handle(tcpEv(ctUpdate, 6, 1006, out, tcpEstab), 3)
	l.t.handle(udp(ctDestroy, 2, 1002, 0), 4)
	l.t.handle(udp(ctDestroy, 4, 1004, 0), 4)
	l.t.handle(tcpEv(ctDestroy, 5, 1005, 0, -1), 4)
	evs = nil
	for _, x := range l.take() {
		evs = append(evs, fmt.Sprintf("%v:%d@%d", x.Event, x.Flow.LocalPort, x.Timestamp))
	}
	want = []string{"ESTABLISHED:1006@3", "DELETED:1004@4", "DELETED:1005@4"}
	if !slices.Equal(evs, want) {
		t.Fatalf("after the dump, events: %v, want %v", evs, want)
	}
	if l.lost != 0 {
		t.Errorf("%d counted lost", l.lost)
	}
}

// TestFlowOverflowResynced: once a complete dump followed an overflow,
// the flows it found were alive: one forgotten at the bound later is
// counted lost again.
func TestFlowOverflowResynced(t *testing.T) {
	h, b := bareFlow(t, "true", 32)
	b.tr = newFlowTracker(1, b.deliver, b.forgot)
	b.tr.handle(outUDP(1), 1)
	b.overflowed()
	b.tr.beginSync()
	b.tr.dumped(outUDP(1), 2)
	b.tr.endSync(2)
	b.tr.handle(outUDP(2), 3) // forgets flow 1, alive at the dump
	if st, _ := h.Stats(); st.Overflows != 2 {
		t.Fatalf("stats %+v: want 2 overflows (the ENOBUFS, then flow 1 forgotten)", st)
	}
}

// TestCtEventPickedUp: a TCP connection conntrack picked up in mid-stream
// has IP_CT_TCP_FLAG_BE_LIBERAL in its original direction's flags
// (CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, struct nf_ct_tcp_flags {flags, mask}
// as the kernel dumps it: the mask 0); one that began with a SYN has not.
func TestCtEventPickedUp(t *testing.T) {
	for _, c := range []struct {
		flags  byte
		picked bool
	}{{0x0a, true}, {0x08, true}, {0x03, false}, {0, false}} {
		m := ctMessage(t, false, 9, netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2"), 1, 2, nftrules.LabelOut)
		m.Header.Flags = netlink.Multi // as a dump's entry
		ae := netlink.NewAttributeEncoder()
		ae.Nested(4, func(ae *netlink.AttributeEncoder) error { // CTA_PROTOINFO
			ae.Nested(1, func(ae *netlink.AttributeEncoder) error { // CTA_PROTOINFO_TCP
				ae.Uint8(1, tcpEstab)           // CTA_PROTOINFO_TCP_STATE
				ae.Bytes(4, []byte{c.flags, 0}) // CTA_PROTOINFO_TCP_FLAGS_ORIGINAL
				ae.Bytes(5, []byte{c.flags, 0}) // CTA_PROTOINFO_TCP_FLAGS_REPLY
				return nil
			})
			return nil
		})
		pi, err := ae.Encode()
		if err != nil {
			t.Fatal(err)
		}
		m.Data = append(m.Data, pi...)
		var cev conntrack.Event
		if err := cev.Unmarshal(m); err != nil {
			t.Fatal(err)
		}
		e, ok := ctEventOf(&cev)
		if !ok || e.kind != ctUpdate || e.tcpState != tcpEstab || e.pickedUp != c.picked || e.labels != nftrules.LabelOut {
			t.Errorf("flags %#x: %+v %v, want picked up %v", c.flags, e, ok, c.picked)
		}
	}
}

// TestFlowCloseEndsDump: Close (Shutdown too) closes the dump socket, so
// that a dump under way (a receive on it) ends at once and the reader
// with it.
func TestFlowCloseEndsDump(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "flcd")
	for _, shut := range []bool{false, true} {
		var h *Handle
		if err := ns.Do(func() (err error) {
			h, err = Open("true", LayerFlow, 0, FlagSniff|FlagRecvOnly)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		b := h.b.(*flowBackend)
		ended := make(chan error, 1)
		go func() {
			for _, err := range b.dump.ReceiveIter() { // as resync waits for the kernel
				if err != nil {
					ended <- err
					return
				}
			}
			ended <- nil
		}()
		time.Sleep(20 * time.Millisecond) // let it wait (it ends either way)
		if shut {
			if err := h.Shutdown(ShutdownRecv); err != nil {
				t.Fatal(err)
			}
		}
		if err := h.Close(); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-ended:
			if err == nil {
				t.Errorf("shutdown %v: the dump's receive ended without an error", shut)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("shutdown %v: the dump's receive still waits after Close", shut)
		}
	}
	noDivertTables(t, ns)
}

// TestFlowTrackerResyncForgotten: a flow the tracker forgot at its bound
// after reporting its establishment is not reported established again
// when a dump after an overflow finds it alive (nor deleted: its deletion
// was counted lost); once a complete dump no longer has it, a flow of the
// same key is a new one.
func TestFlowTrackerResyncForgotten(t *testing.T) {
	l := newTrackerLog(1)
	udp := func(kind ctKind, id uint32) *ctEvent {
		return ev(kind, id, 17, tup("10.0.0.1", "10.0.0.2", uint16(1000+id), 53), nftrules.LabelOut, -1)
	}
	l.t.handle(udp(ctNew, 1), 1)
	l.t.handle(udp(ctNew, 2), 1) // forgets flow 1
	if l.lost != 1 {
		t.Fatalf("%d counted lost, want 1", l.lost)
	}
	l.take()
	l.t.overflowed()
	l.t.beginSync()
	l.t.dumped(udp(ctUpdate, 1), 2) // alive, forgotten
	l.t.dumped(udp(ctUpdate, 2), 2)
	l.t.endSync(2)
	if g := l.take(); len(g) != 0 {
		t.Fatalf("after the dump: %s, want nothing (flow 1 was reported, flow 2 is known)", fmtFlows(g))
	}
	// Flow 1 ends; a dump no longer has it; a flow of its key later is new.
	l.t.overflowed()
	l.t.beginSync()
	l.t.dumped(udp(ctUpdate, 2), 3)
	l.t.endSync(3)
	if len(l.t.forgotten) != 0 {
		t.Fatalf("%d forgotten flows remembered after a dump without them", len(l.t.forgotten))
	}
	l.t.handle(udp(ctDestroy, 2), 4)
	l.t.handle(udp(ctNew, 1), 5)
	var evs []string
	for _, x := range l.take() {
		evs = append(evs, fmt.Sprintf("%v:%d@%d", x.Event, x.Flow.LocalPort, x.Timestamp))
	}
	if want := []string{"DELETED:1002@4", "ESTABLISHED:1001@5"}; !slices.Equal(evs, want) {
		t.Fatalf("events %v, want %v", evs, want)
	}
}

// TestFlowOverflowSeenInDump: a flow the dump under way found alive,
// forgotten at the bound by a flow the same dump adds, lost no DESTROY to
// the overflow before the dump: its deletion, now unreported, is counted.
func TestFlowOverflowSeenInDump(t *testing.T) {
	l := newTrackerLog(1)
	udp := func(kind ctKind, id uint32) *ctEvent {
		return ev(kind, id, 17, tup("10.0.0.1", "10.0.0.2", uint16(1000+id), 53), nftrules.LabelOut, -1)
	}
	l.t.handle(udp(ctNew, 1), 1)
	l.t.overflowed()
	l.t.beginSync()
	l.t.dumped(udp(ctUpdate, 1), 2) // alive after the overflow
	l.t.dumped(udp(ctUpdate, 2), 2) // its NEW lost: added, forgets flow 1
	if l.lost != 1 {
		t.Fatalf("%d counted lost, want 1 (flow 1, alive at the dump)", l.lost)
	}
	// One the dump did not find (yet) may have lost its DESTROY to the
	// overflow, counted already.
	l = newTrackerLog(1)
	l.t.handle(udp(ctNew, 1), 1)
	l.t.overflowed()
	l.t.beginSync()
	l.t.dumped(udp(ctUpdate, 2), 2)
	if l.lost != 0 {
		t.Fatalf("%d counted lost, want 0 (flow 1 not found alive since the overflow)", l.lost)
	}
}

// dumpSocket is a netlink socket that answers a dump request with the
// datagrams given, then fails. Its file (for drainDump) is an empty UDP
// socket's, on loopback.
type dumpSocket struct {
	netlink.Socket // not called
	datagrams      [][]netlink.Message
	empty          *net.UDPConn
}

func newDumpSocket(t *testing.T, datagrams ...[]netlink.Message) *dumpSocket {
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &dumpSocket{datagrams: datagrams, empty: c}
}

func (s *dumpSocket) Send(netlink.Message) error { return nil }

func (s *dumpSocket) SyscallConn() (syscall.RawConn, error) { return s.empty.SyscallConn() }

func (s *dumpSocket) ReceiveIter() iter.Seq2[netlink.Message, error] {
	return func(yield func(netlink.Message, error) bool) {
		if len(s.datagrams) == 0 {
			yield(netlink.Message{}, net.ErrClosed)
			return
		}
		d := s.datagrams[0]
		s.datagrams = s.datagrams[1:]
		for _, m := range d {
			if !yield(m, nil) {
				return
			}
		}
	}
}

// dumpEntry is m as a dump's entry.
func dumpEntry(m netlink.Message) netlink.Message {
	m.Header.Flags = netlink.Multi
	return m
}

var dumpDone = netlink.Message{Header: netlink.Header{Type: netlink.Done, Flags: netlink.Multi}, Data: make([]byte, 4)}

// TestFlowResyncKnownUnlabelled: a flow the handle reported whose labels
// the dump does not show (cleared since, as conntrack -U can) is alive
// all the same: the dump does not delete it. An unknown connection
// without labels is still not the handle's.
func TestFlowResyncKnownUnlabelled(t *testing.T) {
	_, b := bareFlow(t, "true", 32)
	b.tr = newFlowTracker(16, b.deliver, b.forgot)
	src, dst := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	b.tr.handle(ev(ctNew, 5, 17, tup("10.0.0.1", "10.0.0.2", 1000, 53), nftrules.LabelOut, -1), 1)
	b.dump = netlink.NewConn(newDumpSocket(t, []netlink.Message{
		dumpEntry(ctMessage(t, false, 5, src, dst, 1000, 53, 0)),
		dumpEntry(ctMessage(t, false, 6, src, dst, 1001, 53, 0)),
		dumpDone,
	}), 0)
	b.overflowed()
	if err := b.resync(); err != nil {
		t.Fatal(err)
	}
	var got []string
	b.mu.Lock()
	for a := (Address{}); b.popLocked(&a); {
		got = append(got, fmt.Sprintf("%v:%d", a.Event, a.Flow.LocalPort))
	}
	b.mu.Unlock()
	if want := []string{"ESTABLISHED:1000"}; !slices.Equal(got, want) || len(b.tr.flows) != 1 {
		t.Fatalf("events %v, %d flows remembered; want %v, 1", got, len(b.tr.flows), want)
	}
}

// TestFlowResyncAfterBrokenDump: a dump broken off after its first
// datagram (as when a receive on the dump socket fails: the kernel's dump
// goes on) is not taken for the next one's answer, which would lack the
// connections of that datagram and delete their live flows.
func TestFlowResyncAfterBrokenDump(t *testing.T) {
	netnstest.RequireRoot(t)
	const flows = 200 // several datagrams
	fb := dumpBackend(t, "flbd", flows, func(i int) (uint16, uint16, bool) { return uint16(1024 + i), 53, true })
	var established, deleted int
	fb.tr = newFlowTracker(flowTrackMax, func(a *Address, _ *atomic.Bool) bool {
		if a.Event == EventFlowDeleted {
			deleted++
		} else {
			established++
		}
		return true
	}, func(*Address) {})
	if err := fb.resync(); err != nil {
		t.Fatal(err)
	}
	if established != flows {
		t.Fatalf("first dump: %d established, want %d", established, flows)
	}
	// A dump request whose answer is read up to its first datagram only.
	if _, err := fb.dump.Send(ctDumpRequest()); err != nil {
		t.Fatal(err)
	}
	raw, err := fb.dump.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var rerr error
	if err := raw.Read(func(fd uintptr) bool {
		var b [64 << 10]byte
		n, _, rerr = unix.Recvfrom(int(fd), b[:], unix.MSG_DONTWAIT)
		return rerr != unix.EAGAIN
	}); err != nil || rerr != nil {
		t.Fatal(err, rerr)
	}
	if err := fb.resync(); err != nil {
		t.Fatal(err)
	}
	if deleted != 0 || len(fb.tr.flows) != flows {
		t.Fatalf("after a dump broken off after %d bytes: %d deleted, %d remembered; want 0, %d", n, deleted, len(fb.tr.flows), flows)
	}
}

// outUDP is the NEW event of an outbound UDP flow of the handle, conntrack
// id id, from port 1000+id to port 53.
func outUDP(id uint32) *ctEvent {
	return ev(ctNew, id, 17, tup("10.0.0.1", "10.0.0.2", uint16(1000+id), 53), nftrules.LabelOut, -1)
}

// dumpBackend makes a namespace whose conntrack table holds n UDP
// connections from 10.0.0.1 to 10.0.0.2, the ports and labels of the i-th
// (the handle's LabelOut when labelled) given by conn, a flow table
// running there, and a flowBackend with only a dump socket (as the
// handle's: ctConfig) in it, for resync; its tracker is the caller's.
func dumpBackend(tb testing.TB, name string, n int, conn func(i int) (sport, dport uint16, labelled bool)) *flowBackend {
	tb.Helper()
	ns := netnstest.NewT(tb, name)
	var fb *flowBackend
	if err := ns.Do(func() error {
		rules, err := nftrules.InstallFlowTrack() // conntrack, and labels
		if err != nil {
			return err
		}
		tb.Cleanup(func() { rules.Close() })
		c, err := conntrack.Dial(nil)
		if err != nil {
			return err
		}
		defer c.Close()
		src, dst := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
		for i := range n {
			sport, dport, labelled := conn(i)
			f := conntrack.NewFlow(unix.IPPROTO_UDP, 0, src, dst, sport, dport, 600, 0)
			if labelled {
				f.Labels, f.LabelsMask = make([]byte, 16), make([]byte, 16)
				f.Labels[nftrules.LabelByte], f.LabelsMask[nftrules.LabelByte] = nftrules.LabelOut, nftrules.LabelOut
			}
			if err := c.Create(f); err != nil {
				return fmt.Errorf("create connection %d: %w", i, err)
			}
		}
		dump, err := netlink.Dial(unix.NETLINK_NETFILTER, ctConfig)
		if err != nil {
			return err
		}
		tb.Cleanup(func() { dump.Close() })
		fb = &flowBackend{dump: dump}
		return nil
	}); err != nil {
		tb.Fatal(err)
	}
	return fb
}

// routerPingOnly pings from r's router, after the forwarded traffic a
// test made, and fails t unless h, the router's flow handle, reports that
// ping's flow and nothing else: the forwarded flows, established before,
// would have come first.
func routerPingOnly(t *testing.T, r *netnstest.Routed, h *Handle) {
	t.Helper()
	if n, _ := r.Router().Ping(r.Left.A.V4, 1, 2*time.Second); n != 1 {
		t.Fatal("router's ping unanswered")
	}
	own := flowWant{EventFlowEstablished, true, false, 1, netip.AddrFrom16(r.Left.B.V4.As16()), netip.AddrFrom16(r.Left.A.V4.As16()), 8, 0}
	got := flowEvents(t, h, 10*time.Second, func(g []Address) bool { return allFound(g, []flowWant{own}) })
	if len(got) != 1 {
		t.Fatalf("forwarded flows reported:\n%s", fmtFlows(got))
	}
}

// udpSocket opens an IPv4 UDP socket in ns, on an ephemeral port, open
// until the test ends.
func udpSocket(t *testing.T, ns *netnstest.NS) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	if err := ns.Do(func() (err error) {
		c, err = net.ListenUDP("udp4", nil)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// udpBurst sends one datagram from ns to each of n ports of dst from
// port on, from one socket, open until the test ends: n UDP flows at once.
func udpBurst(t *testing.T, ns *netnstest.NS, dst netip.Addr, port uint16, n int) {
	t.Helper()
	c := udpSocket(t, ns)
	for i := range n {
		if _, err := c.WriteToUDPAddrPort([]byte("b"), netip.AddrPortFrom(dst, port+uint16(i))); err != nil {
			t.Fatal(err)
		}
	}
}

// TestFlowResyncWaitsForEmptySocket: after an overflow of the event
// socket, the dump runs only once a receive has found the socket empty,
// however late the reader comes back to it. Until the socket is emptied
// the kernel reports no further overflow, and an event still queued when
// the dump ran was read after it: the NEW of a flow that ended during the
// overflow (its DESTROY lost) was reported established, and its deletion
// never. Here the reader, after reading the overflow's ENOBUFS, is held
// 30 ms before its next receive (far past resyncDrain); every flow
// reported established must then be reported deleted, the dump having
// found them all gone.
func TestFlowResyncWaitsForEmptySocket(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "flq", 0)
	var hold sync.Mutex
	atHook := make(chan struct{}, 1)
	var sleepNext atomic.Int32 // 2: sleep at the second call from now
	flowRecvHook = func() {
		select {
		case atHook <- struct{}{}:
		default:
		}
		hold.Lock()
		hold.Unlock()
		if !sleepNext.CompareAndSwap(2, 1) && sleepNext.CompareAndSwap(1, 0) {
			time.Sleep(30 * time.Millisecond)
		}
	}
	t.Cleanup(func() { flowRecvHook = nil }) // also if the open fails
	h := openFlowIn(t, l.A.NS, "not loopback")
	flowRecvHook = nil
	b := h.b.(*flowBackend)
	if err := setRecvBuf(b.conn, 0); err != nil {
		t.Fatal(err)
	}
	// waitHook waits for the reader to come back to its receive, calling
	// poke (when not nil) each second meanwhile. Once, in a CI run, the
	// reader did not come back within 5 s of the first flow's datagram
	// (cause not found; 40 runs under two busy loops passed): another
	// flow each second tells a lost event from a stuck reader, and the
	// failure reports the handle's counters.
	waitHook := func(poke func()) {
		t.Helper()
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		deadline := time.After(5 * time.Second)
		for {
			select {
			case <-atHook:
				return
			case <-tick.C:
				if poke != nil {
					poke()
				}
			case <-deadline:
				st, _ := h.Stats()
				t.Fatalf("the reader never came back to its receive; stats %+v", st)
			}
		}
	}
	waitHook(nil) // its first receive
	// The reader held at its next receive, after the event of a first flow.
	hold.Lock()
	held := true
	defer func() {
		if held {
			hold.Unlock()
		}
	}()
	udpSend(t, l.A.NS, netip.AddrPortFrom(l.B.V4, 7060))
	pokes := 0
	waitHook(func() {
		pokes++
		t.Logf("no receive yet: another flow (%d)", pokes)
		udpSend(t, l.A.NS, netip.AddrPortFrom(l.B.V4, 7060+uint16(pokes)))
	})
	// A burst overflows the socket; every flow then ends, unseen.
	udpBurst(t, l.A.NS, l.B.V4, 7200, 200)
	flushConntrack(t, l.A.NS)
	sleepNext.Store(2) // the receive after the one that reads ENOBUFS waits 30 ms
	hold.Unlock()
	held = false

	// Every flow reported established is reported deleted.
	est := map[uint64]Address{}
	del := map[uint64]bool{}
	var got []Address
	deadline := time.Now().Add(5 * time.Second)
	for {
		ms := make([]Message, 16)
		h.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		n, err := h.RecvBatch(ms)
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatal(err)
		}
		for _, m := range ms[:n] {
			got = append(got, m.Addr)
			switch m.Addr.Event {
			case EventFlowEstablished:
				est[m.Addr.Flow.EndpointID] = m.Addr
			case EventFlowDeleted:
				del[m.Addr.Flow.EndpointID] = true
			}
		}
		missing := 0
		for id := range est {
			if !del[id] {
				missing++
			}
		}
		if n == 0 && len(est) > 0 && missing == 0 && sleepNext.Load() == 0 {
			break
		}
		if time.Now().After(deadline) {
			for id, a := range est {
				if !del[id] {
					t.Errorf("established and never deleted: %s", fmtFlow(&a))
				}
			}
			t.Fatalf("after 5 s, %d events:\n%s", len(got), fmtFlows(got))
		}
	}
	if st, _ := h.Stats(); st.Overflows == 0 {
		t.Fatalf("stats %+v: no overflow; the test provoked none", st)
	}
}

// TestFlowResyncDuringSteadyEvents: after an overflow, the dump does not
// wait for a quiet moment of the event socket: with a new flow every
// 0.5 ms it runs once a receive emptied the socket, while the flows keep
// coming. The wait for a quiet moment is made 10 s here, so that only an
// emptied socket can start the dump within the stream's 2 s.
func TestFlowResyncDuringSteadyEvents(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "flz", 0)
	var dumps atomic.Int32
	flowResyncHook = func() { dumps.Add(1) }
	drain := resyncDrain
	resyncDrain = 10 * time.Second
	t.Cleanup(func() { flowResyncHook, resyncDrain = nil, drain }) // after the handle's Close
	h := openFlowIn(t, l.A.NS, "not loopback")
	b := h.b.(*flowBackend)
	if err := setRecvBuf(b.conn, 0); err != nil {
		t.Fatal(err)
	}
	steady := udpSocket(t, l.A.NS)
	// The handle's queue is read meanwhile, so that it never fills.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		ms := make([]Message, 64)
		for {
			select {
			case <-stop:
				return
			default:
			}
			h.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			h.RecvBatch(ms)
		}
	}()
	defer func() { close(stop); wg.Wait() }()
	const steadyFor = 2 * time.Second
	end := time.Now().Add(steadyFor)
	var during int32 = -1
	for i := 0; time.Now().Before(end); i++ {
		if i == 100 {
			udpBurst(t, l.A.NS, l.B.V4, 7200, 200) // the overflow
		}
		if _, err := steady.WriteToUDPAddrPort([]byte("s"), netip.AddrPortFrom(l.B.V4, uint16(10000+i%20000))); err != nil {
			t.Fatal(err)
		}
		time.Sleep(500 * time.Microsecond)
		if i > 100 && during < 0 && dumps.Load() > 0 {
			during = int32(i)
		}
	}
	st, _ := h.Stats()
	if st.Overflows == 0 {
		t.Fatalf("stats %+v: no overflow; the test provoked none", st)
	}
	if during < 0 {
		t.Fatalf("no dump while the flows kept coming (%d dumps in all, stats %+v)", dumps.Load(), st)
	}
	t.Logf("first dump by flow %d of the steady stream; %d dumps, stats %+v", during, dumps.Load(), st)
}
