package divert

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/filter"
	"github.com/netdivert/divert/internal/inject"
	"github.com/netdivert/divert/internal/nfq"
	"github.com/netdivert/divert/internal/nftrules"
)

// The Linux backend: nftables rules in a table owned by the handle queue the
// filter's packets to an NFQUEUE queue, read by internal/nfq; reinjection is
// an ACCEPT verdict (with the new bytes when the packet changed); new
// packets go out through internal/inject's marked raw sockets.
//
// Every queued packet gets exactly one verdict: packets handed to the
// program are tracked until Send, Drop, their ParamQueueTime (then DROP) or
// Close (then ACCEPT, as WinDivert reinjects on close). Packets the program
// never sees (a user-space filter miss, a FlagSniff copy, loopback on the
// input hook, a packet injected at its priority or above that an
// OpenPort rule queued) are accepted at once. Verdicts are collected and sent many per
// sendmsg — as one NFQNL_MSG_VERDICT_BATCH for every ACCEPT that precedes
// the oldest packet still held — before the receiver would block. Packets
// nobody reads are released by the reaper once they have waited
// ParamQueueTime (DROP; ACCEPT for FlagSniff).
//
// Send tells a changed packet from an unchanged one by comparing it with
// the bytes Recv handed over, byte for byte while they are still in the
// receive buffer (a batch sent back before the next read), else by length
// and a 64-bit maphash taken before the buffer was reused; only a changed
// packet travels back to the kernel (which then trusts its checksums as
// they are), so an unchanged one keeps its checksum offload state. A change
// that hashes equal (odds 2^-64) would be lost.
//
// A new packet (a fresh Address) whose IPChecksum, TCPChecksum or
// UDPChecksum bit is clear gets those checksums computed before it is sent,
// as WinDivert treats such packets as checksum-offloaded (a packet taken
// from a veth often carries an unfinished checksum); the caller's buffer is
// left as it is. One larger than its route's MTU is sent as fragments (see
// sendTooBig).
//
// Fragments: see frag_linux.go for what a handle sees at each layer and
// direction, with and without FlagFragments and FlagReassemble.
//
// OpenQueues: see queues_linux.go.
//
// LayerFlow: conntrack's events, see flow_linux.go. Not supported: the
// socket and reflect layers.

const (
	linuxVersionMajor = 1
	linuxVersionMinor = 0

	queueBase    = 0xD100 // first queue number tried by Open
	loIfIndex    = 1      // LOOPBACK_IFINDEX: lo is interface 1 in every namespace
	accInitCap   = 512
	pendMax      = 64
	trackInitCap = 128
)

// pendEntry is a packet a receive call took: to hold for the program, or
// to accept (a sniffed copy, or, passed, one the program does not see).
// pendAdd writes every field, one by one: a field added here must be
// written there too, or an entry would keep a stale value.
type pendEntry struct {
	id   uint32
	kind uint8
	t    int64
	orig []byte // pendHold: the bytes handed over, in the receive buffer
}

const (
	pendHold uint8 = iota
	pendAccept
	pendPass
)

// sysAddr is the Linux backend's reference to a queued packet.
type sysAddr struct {
	owner uint32 // serial of the handle that holds the packet; 0 for new packets
	id    uint32 // NFQUEUE packet id
	trunc bool   // the kernel copied less than the whole packet
	out   bool   // the Outbound Recv set: an Address whose Outbound differs names a new packet

	// A datagram reassembled in user space (see frag_linux.go): its
	// fragments are held in the queue, in the fragState slot dslot while
	// its generation is dgen; Send and Drop give them their verdicts.
	dgram   bool
	dslot   uint32
	dgen    uint32
	fragID  uint32 // identification to refragment with
	fragMTU uint32 // size of its largest fragment
	fragDF  bool   // IPv4: its largest fragment had DF (reassembly.Info.DF)
	dsum    uint64 // maphash (dgramSeed) of the datagram as handed over
}

var (
	handleSerial atomic.Uint32
)

type linuxBackend struct {
	serial   uint32
	layer    Layer
	flags    Flag
	filt     *filter.Filter // nil: every queued packet matches
	userSide bool           // the kernel rules over-approximate: finish with filt.Match

	conn  *nfq.Conn         // nil without a queue (FlagDrop, FlagSendOnly)
	rules *nftrules.Ruleset // nil for OpenPort and FlagSendOnly, and for a member of group
	group *queueGroup       // the rules OpenQueues' handles share; nil for Open
	inj   *inject.Injector  // nil with FlagRecvOnly
	frag  *fragState        // user-space reassembly (see frag_linux.go); nil without
	queue uint16
	// ownMark is nftrules.Mark of the handle's priority: a queued packet
	// whose mark lies in [nftrules.MarkMagic, ownMark] was injected by a
	// handle of this priority or a higher one, this one included, and is
	// accepted unseen. The library's own rules skip such packets in the
	// kernel already; an administrator's rule (OpenPort) does not, and
	// would hand the handle its own injections again.
	ownMark uint32
	// member counts a handle with a queue as a user of its network
	// namespace from open to close: while it is, no Ruleset of the
	// process closed there unregisters a hook, which would make the
	// kernel drop the packets the handle holds (see nftrules'
	// share_linux.go).
	member *nftrules.Member

	cmu   sync.Mutex // guards cbuf
	cbuf  []byte     // scratch for new packets whose checksums Send computes
	fsend fragSend   // Send's fragmenting (see frag_linux.go)

	queueTime atomic.Int64 // ns
	shutRecv  atomic.Bool
	shutting  atomic.Bool // Shutdown(ShutdownRecv) has begun
	shmu      sync.Mutex  // makes a concurrent Shutdown wait for the one stopping the queue
	dlmu      sync.Mutex  // orders SetReadDeadline after Shutdown's wake-up
	closed    atomic.Bool
	more      atomic.Bool // the receive buffer holds undecoded packets; cleared when a receive call is about to wait
	// recvCalls changes when a receive call starts (+1) and when it ends
	// (+1<<32 - 1): its low 32 bits are the calls in progress, and any
	// change says one started or ended (see recvStart, recvEnd).
	recvCalls atomic.Uint64
	// parked: the reaper waits on wake, with nothing to do until a
	// receive call ends (see parkReaper); the call's end sets wake to fire
	// reaperWakeDelay later.
	parked atomic.Bool
	wake   *time.Timer
	// wakeArmed: a receive call's end set wake; the next call's start may
	// do the look it is for and stop it (see lookAhead)
	wakeArmed atomic.Bool

	rmu  sync.Mutex // receive side: conn.Next, pkt, pend, vHeld
	pkt  nfq.Packet
	meta filter.Meta
	// vHeld: the receive side holds vmu (drainUnread), so refill must not
	// take it
	vHeld bool
	// What one receive call decided, applied under one vmu lock before it
	// returns (see applyPending).
	pend  [pendMax]pendEntry
	npend int

	vmu     sync.Mutex // verdicts and the tracker
	vbuf    []byte     // individual verdict messages (DROP, changed payloads)
	acc     []uint32   // ids to ACCEPT unchanged, in arrival order
	track   *nfq.Tracker
	lastID  uint32
	seenAny bool
	gaps    uint64 // packets missing from the id sequence (see noteID)
	passed  uint64 // Stats.Passed
	// FlagSniff: through which id the reaper's batch accepted the
	// originals (sniffAll says it did; see acceptSniffed and sniffed).
	sniffThrough uint32
	sniffAll     bool
	// released: Close gave every packet its verdict; nothing more is sent.
	released bool

	st linuxStats

	// reaper state
	procMu  sync.Mutex       // guards procQ's reads and close, procBuf, kstats
	procQ   *os.File         // /proc/net/netfilter/nfnetlink_queue of the namespace
	procFd  procFile         // procQ's descriptor, read with raw syscalls (see procFile)
	procBuf []byte           // grows to hold the whole file (about 55 bytes a queue)
	kstats  kernelQueueStats // the queue's line as last read
	ckpt    [256]checkpoint
	nckpt   int
	// recvCalls as the reaper last saw it, and when it saw it change
	lastCalls uint64
	lastCallT int64
	// FlagSniff: the kernel's last id at the previous tick
	sniffSeq  uint32
	sniffSeen bool
	// when the parked reaper last looked, woken by a receive call's end or
	// in the next call's start (see parkReaper, lookAhead)
	lastWake atomic.Int64
	// reapTick is the reaper's current tick, in ns (see reaper)
	reapTick atomic.Int64

	stop chan struct{}
	done chan struct{}
	// reaperTicks counts the reaper's ticks, reaperWakes the receive calls'
	// ends that woke it parked (for tests).
	reaperTicks atomic.Uint64
	reaperWakes atomic.Uint64
	// dropDone is closed when dropLoop ends; nil without one (FlagDrop
	// handles with a queue run it).
	dropDone chan struct{}
}

func openBackend(cfg *openConfig) (backend, error) {
	if err := checkLayer(cfg.layer); err != nil {
		return nil, err
	}
	if cfg.layer == LayerFlow {
		return openFlow(cfg) // conntrack's events: see flow_linux.go
	}
	b := newLinuxBackend(cfg)
	if err := b.open(cfg); err != nil {
		return nil, withCleanup(err, b.release())
	}
	b.start()
	return b, nil
}

// layerSupport refuses, before Open looks at anything else, a layer the OS
// has no counterpart of.
func layerSupport(l Layer) error { return checkLayer(l) }

func checkLayer(l Layer) error {
	switch l {
	case LayerNetwork, LayerNetworkForward, LayerFlow:
		return nil
	}
	return fmt.Errorf("divert: layer %v: %w: NFQUEUE sees packets only, conntrack flows (LayerFlow); socket and reflect events have no Linux counterpart", l, ErrNotSupported)
}

// newLinuxBackend makes a backend with no sockets yet.
func newLinuxBackend(cfg *openConfig) *linuxBackend {
	b := &linuxBackend{
		serial:  handleSerial.Add(1),
		layer:   cfg.layer,
		flags:   cfg.flags,
		filt:    cfg.filter,
		ownMark: nftrules.Mark(cfg.priority),
		acc:     make([]uint32, 0, accInitCap),
		vbuf:    make([]byte, 0, 16<<10),
		// The ring grows with the packets held (up to the queue length):
		// a loop that holds a batch at a time keeps it small and cached.
		track: nfq.NewTracker(trackInitCap),
	}
	if b.serial == 0 {
		b.serial = handleSerial.Add(1)
	}
	b.queueTime.Store(int64(cfg.params[ParamQueueTime]) * int64(time.Millisecond))
	return b
}

// start starts the reaper of a backend with a queue. Called on the
// caller's thread, in the namespace of the handle.
func (b *linuxBackend) start() {
	if b.conn == nil {
		return
	}
	// Opened here, on the caller's thread, the file shows the queues
	// of the caller's namespace whichever thread reads it later.
	if f, err := os.Open("/proc/thread-self/net/netfilter/nfnetlink_queue"); err == nil {
		if fd, ok := procFileOf(f); ok {
			b.procQ, b.procFd = f, fd
		} else {
			f.Close()
		}
	}
	b.lastCallT = monoNow()
	b.stop, b.done = make(chan struct{}), make(chan struct{})
	b.wake = time.NewTimer(time.Hour)
	b.wake.Stop()
	go b.reaper()
	if b.flags&FlagDrop != 0 {
		b.dropDone = make(chan struct{})
		go b.dropLoop()
	}
}

// dropLoop is the user-space half of a FlagDrop handle: the packets its
// kernel rules cannot judge as WinDivert would (all of them when the rules
// are not exact, else the IPv6 packets of v6Unclear) are queued; the ones
// the filter matches are dropped, the others pass (next accepts them). It
// ends when the handle is shut down or closed.
func (b *linuxBackend) dropLoop() {
	defer close(b.dropDone)
	buf := make([]byte, MTUMax)
	var a Address
	for {
		if _, err := b.recvUncounted(buf, &a); err != nil && !errors.Is(err, ErrTruncated) {
			if b.closed.Load() || b.shutRecv.Load() { // ErrShutdown among them
				return
			}
			time.Sleep(10 * time.Millisecond) // a transient error: not in a spin
			continue
		}
		_ = b.drop(&a)
	}
}

// queueConfig is the NFQUEUE configuration of a handle's queue.
func queueConfig(cfg *openConfig) nfq.Config {
	nc := nfq.Config{
		Queue:  queueBase,
		Auto:   cfg.port < 0,
		MaxLen: uint32(cfg.params[ParamQueueLength]),
		RcvBuf: int(cfg.params[ParamQueueSize]),
		// A sniffing handle's packets are copies: when its queue is full
		// the originals go on, and only the copies are lost.
		FailOpen: cfg.flags&(FlagFailOpen|FlagSniff) != 0,
	}
	if cfg.port >= 0 {
		nc.Queue = uint16(cfg.port)
	}
	return nc
}

// openInjector opens the injection sockets unless the handle only
// receives.
func (b *linuxBackend) openInjector(cfg *openConfig) error {
	if cfg.flags&FlagRecvOnly != 0 {
		return nil
	}
	var err error
	if b.inj, err = inject.New(nftrules.Mark(cfg.priority)); err != nil {
		return mapSetupError("open injection sockets", err)
	}
	return nil
}

// attach makes c the backend's queue.
func (b *linuxBackend) attach(c *nfq.Conn) {
	b.conn = c
	b.queue = c.Queue()
	c.SetRefill(b.refill)
}

// refill runs before a read replaces the receive buffer, with rmu held
// (see nfq.Conn.SetRefill): what the receive call took so far goes to the
// verdict side; the read goes to the receive area cur again unless the
// program holds packets in it, then to other, whose held packets get
// hashed first (see nfq.Tracker); and before a read that may block every
// collected verdict goes out (the passed packets among them must not wait
// for the next packet). It takes vmu unless the receive side holds it
// already (vHeld).
func (b *linuxBackend) refill(block bool, cur, other []byte) bool {
	if b.vHeld {
		return b.refillLocked(block, cur, other)
	}
	b.vmu.Lock()
	switchArea := b.refillLocked(block, cur, other)
	b.vmu.Unlock()
	return switchArea
}

// refillLocked is refill with vmu held.
func (b *linuxBackend) refillLocked(block bool, cur, other []byte) bool {
	b.applyPendingLocked()
	switchArea := b.track.HoldsIn(cur)
	if switchArea {
		b.track.Seal(other)
	}
	if block {
		// The call is about to wait: a Send from now on must not count on
		// it to flush, though the packets the last call left buffered set
		// more (this call took them, and may have handed none out).
		b.more.Store(false)
		b.flushLocked()
	}
	return switchArea
}

func (b *linuxBackend) open(cfg *openConfig) error {
	if err := b.openInjector(cfg); err != nil {
		return err
	}
	if cfg.flags&FlagSendOnly == 0 {
		// A FlagDrop handle has a queue too, for the packets its kernel
		// rules cannot judge (see dropLoop; OpenPort refuses FlagDrop).
		b.member = nftrules.Join() // before the queue can hold a packet
		c, err := nfq.Open(queueConfig(cfg))
		if err != nil {
			return mapSetupError("bind NFQUEUE queue", err)
		}
		b.attach(c)
	}
	if cfg.port >= 0 || cfg.flags&FlagSendOnly != 0 {
		return nil // OpenPort attaches to an external rule; send-only handles divert nothing
	}
	rc, reasm, ok := rulesConfig(cfg, b.queue, 1)
	if !ok {
		return nil
	}
	if cfg.flags&FlagDrop != 0 {
		if nftrules.WouldBeExact(rc) {
			rc.UnclearQueue = rc.IPv6
		} else {
			// Drop rules wider than the filter would drop packets it does
			// not match: queue what they select instead, and let dropLoop
			// judge. (Decided before any rule is in place: no moment of
			// over-dropping.)
			rc.Action = nftrules.ActionQueue
		}
	}
	var err error
	if b.rules, err = nftrules.Install(rc); err != nil {
		return mapSetupError("install nftables rules", err)
	}
	b.userSide = !b.rules.Exact()
	if reasm {
		if err := b.openFrag(rc, cfg.layer, time.Duration(cfg.params[ParamQueueTime])*time.Millisecond); err != nil {
			return err
		}
		b.userSide = true // the rules select every fragment
	}
	return nil
}

// rulesConfig is the nftables configuration of Open's rules, queueing to
// count queues from queue (spread by flow when count > 1). reasm says
// whether user space reassembles (openFrag is needed); ok is
// false when the filter needs no rules at all.
func rulesConfig(cfg *openConfig, queue, count uint16) (rc nftrules.Config, reasm, ok bool) {
	an := cfg.filter.Analyze()
	lw := cfg.filter.Lower()
	if an.None || len(lw.Terms) == 0 {
		return rc, false, false // the filter matches nothing: no rules, Recv just waits
	}
	rc = nftrules.Config{
		IPv4:        an.IPv4,
		IPv6:        an.IPv6,
		Priority:    cfg.priority,
		Lowered:     lw,
		Action:      nftrules.ActionQueue,
		QueueNum:    queue,
		QueueCount:  count,
		FlowBalance: count > 1,
		Bypass:      cfg.flags&FlagPassThrough != 0,
		KeepNDP:     !asksNDP(lw),
	}
	if cfg.flags&FlagDrop != 0 {
		rc.Action = nftrules.ActionDrop
	}
	// User-space reassembly: asked for, or WinDivert's default for
	// LayerNetwork (the IPv6 input hook sees fragments unless conntrack
	// runs; see frag_linux.go).
	reasm = rc.Action == nftrules.ActionQueue && (cfg.flags&FlagReassemble != 0 ||
		cfg.layer == LayerNetwork && cfg.flags&FlagFragments == 0)
	if reasm {
		// The fragments are taken by a chain that queues them all,
		// reassembled here, and the filter judges the datagram: in the
		// same table, or in openFrag's for LayerNetworkForward, whose
		// fragments are taken at prerouting (see fragRulesConfig).
		rc.Fragments = nftrules.FragNone
		rc.QueueFragments = cfg.layer != LayerNetworkForward
	}
	if cfg.layer == LayerNetworkForward {
		rc.Hooks = []nftrules.Hook{nftrules.HookForward}
	} else {
		if an.Inbound && cfg.flags&FlagFragments != 0 {
			// Before reassembly (conntrack's at -400, local delivery's
			// after input), only what the host will deliver to itself.
			rc.Hooks = append(rc.Hooks, nftrules.HookPrerouting)
			rc.Dest = nftrules.DestLocal
		} else if an.Inbound {
			rc.Hooks = append(rc.Hooks, nftrules.HookInput)
		}
		if an.Outbound {
			rc.Hooks = append(rc.Hooks, nftrules.HookOutput)
		}
	}
	if len(rc.Hooks) == 0 || !(rc.IPv4 || rc.IPv6) {
		return rc, false, false
	}
	return rc, reasm, true
}

// mapSetupError wraps a setup error so that errors.Is finds
// ErrNotSupported for a kernel without NFQUEUE or nf_tables, and
// os.ErrPermission (already in the chain) for missing privileges, or for
// a table another netlink socket owns, which no privilege lets the
// handle change (the error says so; no hint about privileges is added).
func mapSetupError(what string, err error) error {
	if errors.Is(err, nfq.ErrUnsupported) || errors.Is(err, nftrules.ErrUnsupported) {
		return fmt.Errorf("divert: %s: %w: %w", what, ErrNotSupported, err)
	}
	if errors.Is(err, os.ErrPermission) && !errors.Is(err, nftrules.ErrTableOwned) {
		return fmt.Errorf("divert: %s (needs root or CAP_NET_ADMIN and CAP_NET_RAW): %w", what, err)
	}
	return fmt.Errorf("divert: %s: %w", what, err)
}

// release undoes what a failed open set up, and returns the errors of
// doing so, joined, for the caller to report with the open's error (see
// withCleanup), as close reports its own. Nothing is retried: a socket
// whose close failed is closed all the same, and a Member that failed to
// delete the tables parked in its namespace has left it.
func (b *linuxBackend) release() error {
	var errs []error
	if b.member != nil {
		errs = append(errs, leaveNamespace(b.member))
	}
	if b.frag != nil {
		errs = append(errs, b.frag.close())
	}
	if b.group != nil {
		errs = append(errs, b.group.leave())
	}
	if b.rules != nil {
		errs = append(errs, b.rules.Close())
	}
	if b.conn != nil {
		errs = append(errs, closeQueue(b.conn))
	}
	if b.inj != nil {
		errs = append(errs, b.inj.Close())
	}
	return errors.Join(errs...)
}

// withCleanup adds to err, the error of a failed open, the errors of
// undoing what it had set up, if any.
func withCleanup(err, cleanup error) error {
	if cleanup == nil {
		return err
	}
	return fmt.Errorf("%w (and cleaning up: %w)", err, cleanup)
}

// leaveNamespace ends a handle's membership of its network namespace
// (a variable for tests).
var leaveNamespace = (*nftrules.Member).Leave

// asksNDP reports whether the filter asks for ICMPv6 neighbour discovery
// explicitly: some Term tests icmpv6.Type and admits one of the types
// 133..137. Broad filters ("true", "icmpv6") do not, so their rules leave
// neighbour discovery alone and a stalled program cannot cut the host off.
func asksNDP(lw *filter.Lowered) bool {
	for i := range lw.Terms {
		if explicitNDP(lw.Terms[i].Conds) {
			return true
		}
	}
	return false
}

func explicitNDP(conds []filter.Cond) bool {
	tested := false
	for typ := uint64(133); typ <= 137; typ++ {
		ok := true
		for _, c := range conds {
			if c.Field == filter.FieldICMPv6Type {
				tested = true
				ok = ok && compare(typ, c.Op, c.Value)
			}
		}
		if tested && ok {
			return true
		}
		if !tested {
			return false
		}
	}
	return false
}

// compare evaluates "x op v" for a non-negative x below 2^64.
func compare(x uint64, op filter.Op, v filter.Value) bool {
	c := 0 // sign of x - v
	switch {
	case v.Neg:
		c = 1
	case v.Hi != 0 || v.Lo > x:
		c = -1
	case v.Lo < x:
		c = 1
	}
	return op.Holds(c)
}

// --- receive ---------------------------------------------------------------

func (b *linuxBackend) recv(buf []byte, a *Address) (int, error) {
	n, err := b.recvUncounted(buf, a)
	if err == nil || errors.Is(err, ErrTruncated) {
		b.st.received.Add(1)
	}
	return n, err
}

// recvUncounted is recv without Stats.Received: dropLoop hands nothing
// to the program.
func (b *linuxBackend) recvUncounted(buf []byte, a *Address) (int, error) {
	if b.conn == nil {
		return 0, b.noQueueError()
	}
	if b.deadlinePassed() {
		return 0, errDeadline
	}
	b.recvStart()
	b.rmu.Lock()
	if b.deadlinePassed() {
		// It passed while another receive call held rmu: fail as Go's
		// reads do once they have their lock, even with packets buffered.
		b.rmu.Unlock()
		b.recvEnd()
		return 0, errDeadline
	}
	n, err := b.next(buf, a, true)
	b.applyPending()
	b.more.Store(b.conn.Buffered())
	b.rmu.Unlock()
	b.recvEnd()
	return n, err
}

// deadlinePassed reports whether a receive call must fail at once: its read
// deadline has passed, which fails the call even with packets buffered, as
// Go's deadlines do (after Shutdown the handle drains instead). One atomic
// load when no deadline is set.
func (b *linuxBackend) deadlinePassed() bool {
	return b.conn.Expired() && !b.shutRecv.Load()
}

var errDeadline = fmt.Errorf("divert: recv: %w", os.ErrDeadlineExceeded)

// recvStart and recvEnd bracket a receive call (see recvCalls). recvEnd
// wakes a parked reaper, reaperWakeDelay later: the call may have left
// packets held, or left the handle with no receive call running. A call
// that starts before then may do the reaper's look itself (lookAhead).
func (b *linuxBackend) recvStart() {
	b.recvCalls.Add(1)
	if b.wakeArmed.Load() {
		b.lookAhead()
	}
}

func (b *linuxBackend) recvEnd() {
	b.recvCalls.Add(1<<32 - 1)
	if b.parked.Load() && b.parked.CompareAndSwap(true, false) {
		b.wake.Reset(reaperWakeDelay)
		b.wakeArmed.Store(true)
	}
}

// lookAhead does, in a receive call that starts while the wake-up armed by
// the last call's end is pending, the look the reaper would take when it
// fires (see parkReaper): if the reaper would look rather than work (its
// last look was a quarter of a tick ago or more) and nothing is held, the
// reaper has nothing to do while this call runs, so the call stops the
// wake-up and leaves the reaper parked. A lone packet that the program sends
// back before receiving again then costs no wake-up of the reaper at all,
// where that wake-up, its timer and the reaper's look took 15% of the
// packet's CPU (internal/benchadapter/simul.sh with LONE, side by side).
// Packets coming faster still wake the reaper, which then works and ticks.
func (b *linuxBackend) lookAhead() {
	if !b.wakeArmed.CompareAndSwap(true, false) {
		return
	}
	calls := b.recvCalls.Load()
	now := monoNow()
	if now-b.lastWake.Load() < b.reapTick.Load()/4 || !b.reaperIdle() || !b.wake.Stop() {
		return // the reaper wakes as armed, or is awake
	}
	b.lastWake.Store(now)
	b.parked.Store(true)
	// A call that ended since the Load of calls found the reaper awake and
	// did not wake it: wake it as that call would have, since it may have
	// left packets held.
	if b.recvCalls.Load() != calls && b.parked.CompareAndSwap(true, false) {
		b.wake.Reset(reaperWakeDelay)
		b.wakeArmed.Store(true)
	}
}

// reaperIdle reports whether the reaper has nothing to do while a receive
// call runs: no packet held, no fragment waiting, no verdict collected.
func (b *linuxBackend) reaperIdle() bool {
	b.vmu.Lock()
	idle := b.track.Len() == 0 && (b.frag == nil || len(b.frag.pending) == 0) &&
		len(b.acc) == 0 && len(b.vbuf) == 0
	b.vmu.Unlock()
	return idle
}

// reaperWakeDelay is how long after a receive call's end the parked reaper
// wakes. Not at once: the program is likely sending the packets back then,
// and with one P a reaper woken at once ran at the reader's next yield,
// between a packet's verdict and the wait, while what the verdict woke
// waited for the CPU (side by side with the build before, lone round trips
// were 4 µs shorter when it woke at once and re-parked, 16-23 µs shorter
// with the delay; internal/benchadapter's log). What the reaper does
// (expiry, draining) counts in ticks of 10 ms or more.
const reaperWakeDelay = time.Millisecond

func (b *linuxBackend) recvBatch(ms []Message) (int, error) {
	if b.conn == nil {
		return 0, b.noQueueError()
	}
	if b.deadlinePassed() {
		return 0, errDeadline
	}
	b.recvStart()
	b.rmu.Lock()
	if b.deadlinePassed() { // as in recvUncounted
		b.rmu.Unlock()
		b.recvEnd()
		return 0, errDeadline
	}
	var err, terr error
	k := 0
	for k < len(ms) && len(ms[k].Buf) > 0 { // an empty Buf ends the batch (RecvBatch)
		if k > 0 && b.conn.Drained() {
			break // the usual end of a batch, told without a call to next
		}
		var n int
		n, err = b.next(ms[k].Buf, &ms[k].Addr, k == 0)
		if err != nil {
			if err == nfq.ErrNoData && k > 0 {
				err = nil // drained: the batch ends here
				break
			}
			if !errors.Is(err, ErrTruncated) {
				if k > 0 {
					err = nil // report what was received; the error comes back next call
				}
				break
			}
			terr = err
			err = nil
		}
		ms[k].N = n
		k++
	}
	b.applyPending()
	if m := b.conn.Buffered(); m != b.more.Load() {
		b.more.Store(m) // a locked write only when it changes
	}
	b.rmu.Unlock()
	b.recvEnd()
	if k > 0 {
		b.st.received.Add(uint64(k)) // one add for the batch
	}
	if err != nil {
		return 0, err
	}
	return k, terr
}

func (b *linuxBackend) noQueueError() error {
	if b.shutRecv.Load() {
		return ErrShutdown
	}
	return errors.New("divert: handle has no queue to receive from")
}

// pendAdd records what to do with packet id once the receive call ends
// (see applyPending). Called with rmu held.
func (b *linuxBackend) pendAdd(id uint32, kind uint8, t int64, orig []byte) {
	if b.npend == len(b.pend) {
		b.applyPending()
	}
	// Field by field: a composite literal is built on the stack and copied
	// with wide loads that cannot take the narrow stores just made (a
	// store-forwarding stall, measured as 8% of BenchmarkLinuxUserPathMem).
	e := &b.pend[b.npend]
	e.id, e.kind, e.t, e.orig = id, kind, t, orig
	b.npend++
}

// applyPending hands the packets a receive call took to the verdict side,
// in arrival order, under one vmu lock: held ones to the tracker, the
// others to the ACCEPTs to send. Until it runs, no ACCEPT of a later id is
// collected either, so a batch verdict never covers a packet about to be
// held. Called with rmu held, before the call returns the packets and
// before anything else takes vmu for a packet of the call (reassemble).
func (b *linuxBackend) applyPending() {
	if b.npend == 0 {
		return
	}
	b.vmu.Lock()
	b.applyPendingLocked()
	b.vmu.Unlock()
}

// applyPendingLocked is applyPending with vmu held.
func (b *linuxBackend) applyPendingLocked() {
	for i := range b.pend[:b.npend] {
		e := &b.pend[i]
		switch e.kind {
		case pendHold:
			b.track.AddHeld(e.id, e.t, e.orig)
			e.orig = nil
			b.noteID(e.id)
		case pendPass:
			b.passed++
			b.acceptOnceLocked(e.id)
		default:
			b.acceptOnceLocked(e.id)
		}
	}
	b.npend = 0
}

// next delivers the next packet the program should see. With block false
// it returns nfq.ErrNoData instead of waiting. Called with rmu held; the
// caller calls applyPending before it returns.
func (b *linuxBackend) next(buf []byte, a *Address, block bool) (int, error) {
	p := &b.pkt
	for {
		shut := b.shutRecv.Load()
		err := b.conn.Next(p, block && !shut) // flushes verdicts before it blocks
		if err == nfq.ErrNoData {
			// The end of every batch: compared first, without errors.Is.
			if shut {
				return 0, ErrShutdown
			}
			return 0, err
		}
		if err != nil {
			switch {
			case errors.Is(err, nfq.ErrNoData):
				if shut {
					return 0, ErrShutdown
				}
				return 0, err
			case errors.Is(err, os.ErrClosed):
				return 0, errClosed
			case errors.Is(err, os.ErrDeadlineExceeded):
				if b.shutRecv.Load() {
					continue // woken by Shutdown: drain without blocking
				}
				return 0, fmt.Errorf("divert: recv: %w", os.ErrDeadlineExceeded)
			case errors.Is(err, nfq.ErrMalformed):
				continue
			}
			if b.closed.Load() {
				return 0, errClosed
			}
			return 0, fmt.Errorf("divert: recv: %w", err)
		}
		if p.Mark >= nftrules.MarkMagic && p.Mark <= b.ownMark {
			// Injected by this handle or one of equal or higher
			// priority: queued by a rule that does not skip the
			// marks (OpenPort's).
			b.pendAdd(p.ID, pendPass, 0, nil)
			continue
		}
		// When the batch left the kernel: one clock read per read syscall.
		now := b.conn.ReadTime()
		if b.frag != nil {
			b.applyPending() // reassemble takes vmu for this packet
			n, handled, delivered, err := b.reassemble(p, buf, a, now)
			if delivered {
				return n, err
			}
			if handled {
				continue
			}
		}
		ts := p.Timestamp
		if ts == 0 {
			ts = now
		}
		outbound := p.Hook == nfq.HookOutput || p.Hook == nfq.HookPostrouting
		ifIdx := p.InDev
		if outbound || p.Hook == nfq.HookForward {
			ifIdx = p.OutDev
		}
		loopback := p.InDev == loIfIndex || p.OutDev == loIfIndex
		ipv6 := len(p.Payload) > 0 && p.Payload[0]>>4 == 6
		csumOK := p.SkbInfo&nfq.SkbCsumNotReady == 0

		// Packets the program must not see: accept at once.
		if b.layer == LayerNetwork && loopback && !outbound {
			b.pendAdd(p.ID, pendPass, 0, nil) // loopback is seen outbound only, as in WinDivert
			continue
		}
		if b.filt != nil && (b.userSide || ipv6 && v6HasExt(p.Payload)) {
			b.meta = filter.Meta{
				Layer:     filter.Layer(b.layer),
				Outbound:  outbound,
				Loopback:  loopback,
				IPv6:      ipv6,
				IfIdx:     ifIdx,
				Timestamp: ts,
			}
			if !b.filt.Match(p.Payload, &b.meta) {
				b.pendAdd(p.ID, pendPass, 0, nil)
				continue
			}
		}

		n := copy(buf, p.Payload)
		// Zeroed in place, then the fields set: a composite literal would be
		// built on the stack and copied (176 bytes) for every packet.
		*a = Address{}
		a.Timestamp = ts
		a.Layer = b.layer
		a.Event = EventNetworkPacket
		a.Outbound = b.addrOutbound(outbound)
		a.Loopback = loopback
		a.IPv6 = ipv6
		a.IPChecksum = true
		a.TCPChecksum = csumOK
		a.UDPChecksum = csumOK
		a.IfIdx = ifIdx
		if b.flags&FlagSniff != 0 {
			a.Sniffed = true
			b.pendAdd(p.ID, pendAccept, 0, nil) // unless the reaper's batch did (acceptOnceLocked)
		} else {
			a.sys.owner = b.serial
			a.sys.id = p.ID
			a.sys.trunc = p.Truncated()
			a.sys.out = a.Outbound
			b.pendAdd(p.ID, pendHold, now, p.Payload[:n])
		}
		if n < len(p.Payload) {
			return n, ErrTruncated
		}
		if p.Truncated() {
			return n, errKernelTruncated
		}
		return n, nil
	}
}

// errKernelTruncated reports a packet longer than NFQUEUE hands over.
var errKernelTruncated = fmt.Errorf("%w: the kernel's queue hands over at most %d bytes of a packet", ErrTruncated, nfq.MaxCopyRange)

// v6HasExt reports whether pkt, an IPv6 packet, has an extension header
// that WinDivert walks, or nothing past its fixed header. Exact kernel
// rules still queue such packets whatever the filter (nftrules'
// v6Unclear: where the kernel and WinDivert find different transport
// headers, or the kernel none), so the filter decides on them here.
func v6HasExt(pkt []byte) bool {
	if len(pkt) <= 40 {
		return true // too short to tell, or nothing after the header
	}
	switch pkt[6] {
	case 0, 43, 44, 51, 60, 135: // hop-by-hop, routing, fragment, AH, destination, mobility
		return true
	}
	return false
}

// --- verdicts --------------------------------------------------------------

// noteID notes the id of a packet read from the queue, in arrival order.
// The kernel numbers the packets it queues one by one, so a gap is packets
// it could not put in the receive buffer (Stats.Overflows). Called with
// vmu held.
func (b *linuxBackend) noteID(id uint32) {
	if !b.seenAny || int32(id-b.lastID) > 0 {
		if b.seenAny {
			b.gaps += uint64(id - b.lastID - 1)
		}
		b.lastID, b.seenAny = id, true
	}
}

func (b *linuxBackend) acceptLocked(id uint32) {
	b.noteID(id)
	b.acc = append(b.acc, id)
	if len(b.acc) >= accInitCap {
		b.flushLocked()
	}
}

// acceptOnceLocked accepts a packet read from the queue unless a sniffing
// handle's reaper accepted it already (then it only notes the id): the
// kernel refuses a second verdict (ENOENT), which Stats.RefusedVerdicts
// would count as a packet lost. Decided here, under vmu, where the reaper
// moves sniffThrough, not when the packet is read: a batch sent between
// the two would be missed. Called with vmu held.
func (b *linuxBackend) acceptOnceLocked(id uint32) {
	if b.sniffed(id) {
		b.noteID(id)
		return
	}
	b.acceptLocked(id)
}

// sniffed reports whether the reaper's batch accepted packet id (FlagSniff,
// see acceptSniffed). Called with vmu held.
func (b *linuxBackend) sniffed(id uint32) bool {
	return b.sniffAll && int32(id-b.sniffThrough) <= 0
}

// flush sends the collected verdicts.
func (b *linuxBackend) flush() {
	b.vmu.Lock()
	b.flushLocked()
	b.vmu.Unlock()
}

// flushLocked sends every collected verdict in one sendmsg: the individual
// messages first, then the plain ACCEPTs — as one batch verdict up to the
// last id below the oldest packet still held (the kernel's batch covers
// every queued id up to it, and each of those is being accepted here), the
// rest one by one. Called with vmu held.
func (b *linuxBackend) flushLocked() error {
	if len(b.acc) == 0 && len(b.vbuf) == 0 {
		return nil
	}
	if b.released {
		// Close's batch accepted every packet: what a receive call still
		// running collects since would only be refused (ENOENT), and
		// counted in Stats.RefusedVerdicts as packets lost.
		b.acc, b.vbuf = b.acc[:0], b.vbuf[:0]
		return nil
	}
	oldest, _, held := b.track.Oldest()
	var maxBatch uint32
	batch := false
	for _, id := range b.acc {
		if held && int32(id-oldest) >= 0 {
			b.vbuf = nfq.AppendVerdict(b.vbuf, b.queue, id, nfq.Accept, nil)
			continue
		}
		if !batch || int32(id-maxBatch) > 0 {
			maxBatch, batch = id, true
		}
	}
	if batch {
		b.vbuf = nfq.AppendVerdictBatch(b.vbuf, b.queue, maxBatch, nfq.Accept)
	}
	err := b.conn.Send(b.vbuf)
	b.vbuf = b.vbuf[:0]
	b.acc = b.acc[:0]
	if err != nil && !b.closed.Load() {
		return fmt.Errorf("divert: send verdicts: %w", err)
	}
	return err
}

// verdict releases a held packet with verdict v (payload non-nil replaces
// it) and sends it now, unless hold is set (SendBatch flushes at its end) or
// the receiver is about to read more packets and will flush before it
// blocks.
func (b *linuxBackend) verdict(a *Address, v nfq.Verdict, pkt []byte, hold bool) (int, error) {
	b.vmu.Lock()
	defer b.vmu.Unlock()
	return b.verdictLocked(a, v, pkt, hold)
}

// verdictLocked is verdict with vmu held.
// For an ACCEPT, pkt is what the program sends back: the packet's payload
// is replaced only if pkt differs from what it received, and then, as
// WinDivert's driver does, with the checksums a's clear bits say are
// unfinished computed (the kernel takes a replaced payload's as they are).
// It returns what Send reports sent: pkt's IP length.
func (b *linuxBackend) verdictLocked(a *Address, v nfq.Verdict, pkt []byte, hold bool) (int, error) {
	s := &a.sys
	if b.closed.Load() {
		return 0, errClosed
	}
	i, ok := b.track.Lookup(s.id)
	if !ok {
		return 0, fmt.Errorf("%w: id %d (already sent, dropped, or expired after %v)", ErrNotQueued, s.id, time.Duration(b.queueTime.Load()))
	}
	n := len(pkt) // unchanged: the kernel's own packet, whole
	var payload []byte
	fix := false
	if v == nfq.Accept && !b.track.Unchanged(i, pkt) {
		if s.trunc {
			// ErrTruncated, as Recv reported it: only the whole original
			// can go back (unchanged); the packet stays held.
			return 0, fmt.Errorf("divert: cannot reinject a changed packet: %w", errKernelTruncated)
		}
		if len(pkt) > nfq.MaxCopyRange {
			// The verdict's payload attribute has a 16-bit length.
			return 0, fmt.Errorf("divert: cannot reinject a changed packet of %d bytes: NFQUEUE takes at most %d: %w", len(pkt), nfq.MaxCopyRange, ErrNotSupported)
		}
		// The kernel takes any bytes; the packet stays held, for the
		// program to send corrected or drop.
		var err error
		if payload, err = sendable(pkt); err != nil {
			return 0, err
		}
		n = len(payload)
		fix = !(a.IPChecksum && a.TCPChecksum && a.UDPChecksum)
	}
	b.track.ReleaseAt(i)
	switch {
	case v == nfq.Accept && payload == nil:
		b.acc = append(b.acc, s.id)
	case fix:
		// Computed in the verdict message itself, as for a new packet.
		var room []byte
		b.vbuf, room = nfq.AppendVerdictRoom(b.vbuf, b.queue, s.id, v, len(payload))
		copy(room, payload)
		_ = CalcChecksums(room, nil, unfinished(a))
	default:
		b.vbuf = nfq.AppendVerdict(b.vbuf, b.queue, s.id, v, payload)
	}
	if (hold || b.more.Load()) && len(b.vbuf) < nfq.SendLimit/2 && len(b.acc) < accInitCap {
		return n, nil
	}
	return n, b.flushLocked()
}

// mine reports whether a is an Address this handle's receive filled, its
// direction unchanged. A copy whose Outbound was flipped describes a new
// packet, as everywhere in WinDivert: its netfilter sample answers a
// packet with a TCP reset or ICMP error sent with the received Address,
// direction reversed. Reinjecting that answer in place of the received
// packet would take it where the received packet was going.
func (b *linuxBackend) mine(a *Address) bool {
	return a.sys.owner == b.serial && a.sys.out == a.Outbound
}

// addrOutbound is the Outbound of a received packet's Address: the
// direction the packet took at LayerNetwork, and always set at
// LayerNetworkForward, where a routed packet leaves the host (WinDivert's
// forward classify sets it too, and FreeBSD's forward rules take packets
// on their way out).
func (b *linuxBackend) addrOutbound(outbound bool) bool {
	return outbound && b.layer == LayerNetwork || b.layer == LayerNetworkForward
}

func (b *linuxBackend) held(a *Address) bool {
	return b.mine(a) && b.conn != nil
}

func (b *linuxBackend) send(pkt []byte, a *Address) (int, error) {
	fresh := b.fresh(a)
	n, err := b.send1(pkt, a, false)
	if err == nil {
		b.st.sent.Add(1)
		if fresh {
			b.st.injected.Add(1)
		}
	}
	return n, err
}

// fresh reports whether Send injects a as a new packet rather than
// reinjecting one the handle holds.
func (b *linuxBackend) fresh(a *Address) bool {
	return !(a.sys.dgram && b.mine(a) && b.frag != nil) && !b.held(a)
}

func (b *linuxBackend) send1(pkt []byte, a *Address, hold bool) (int, error) {
	if a.sys.dgram && b.mine(a) && b.frag != nil {
		return b.sendDgram(pkt, a, hold)
	}
	if b.held(a) {
		n, err := b.verdict(a, nfq.Accept, pkt, hold)
		if err != nil {
			return 0, err
		}
		a.sys = sysAddr{}
		return n, nil
	}
	return b.inject(pkt, a)
}

func (b *linuxBackend) inject(pkt []byte, a *Address) (int, error) {
	if b.inj == nil {
		return 0, errors.New("divert: handle cannot inject")
	}
	// A raw IPv4 send would rewrite the total length silently.
	pkt, err := sendable(pkt)
	if err != nil {
		return 0, err
	}
	n := len(pkt) // the IP length, as WinDivertSend counts
	b.flushBeforeRaw()
	out := pkt
	if !(a.IPChecksum && a.TCPChecksum && a.UDPChecksum) {
		// Checksum-offloaded, as WinDivert reads the clear bits: finish
		// the missing checksums in a copy.
		b.cmu.Lock()
		defer b.cmu.Unlock()
		b.cbuf = append(b.cbuf[:0], pkt...)
		out = b.cbuf
		// A packet that does not parse, or a fragment whose transport
		// checksum covers bytes it lacks, goes out with what could be done.
		_ = CalcChecksums(out, nil, unfinished(a))
	}
	if a.Outbound || b.layer == LayerNetworkForward {
		err = b.inj.OutboundOn(out, a.IfIdx) // the link of a link-scoped destination
		if err != nil && errors.Is(err, unix.EMSGSIZE) {
			// Larger than its route's MTU: fragmented as the host's own.
			err = b.sendTooBig(out, a.IfIdx, err)
			if err != nil {
				return 0, err
			}
			return n, nil
		}
	} else {
		err = b.inj.Inbound(out, a.IfIdx)
	}
	if err != nil {
		return 0, injectError(err)
	}
	return n, nil
}

// flushBeforeRaw sends the verdicts collected so far (see verdictLocked:
// a Send or SendBatch may leave a reinjected packet's verdict for later)
// before a packet goes out through the raw sockets, so that packets leave
// in the order the program sent them, as WinDivertSend's do. A verdict
// that fails to go is not this send's error (flush ignores it too).
func (b *linuxBackend) flushBeforeRaw() {
	if b.conn == nil {
		return
	}
	b.vmu.Lock()
	if len(b.vbuf) > 0 || len(b.acc) > 0 {
		_ = b.flushLocked()
	}
	b.vmu.Unlock()
}

// injectError wraps an error of the injector; an inbound packet that is
// not for this host (see Handle.Send) is not supported.
func injectError(err error) error {
	if errors.Is(err, inject.ErrNotLocal) {
		return fmt.Errorf("%w: inject inbound: Linux delivers new inbound packets through the local stack only (%w)", ErrNotSupported, err)
	}
	return fmt.Errorf("divert: %w", err) // err says "inject: ..."
}

func (b *linuxBackend) sendBatch(ms []Message) (int, error) {
	// Collect every verdict of the batch, then send them in one sendmsg.
	// Runs of held packets are released under one vmu lock.
	locked := false
	var sent, injected uint64 // added once for the batch
	defer func() {
		if b.conn != nil {
			if !locked {
				b.vmu.Lock()
			}
			b.flushLocked()
			b.vmu.Unlock()
		} else if locked {
			b.vmu.Unlock()
		}
		if sent > 0 {
			b.st.sent.Add(sent)
		}
		if injected > 0 {
			b.st.injected.Add(injected)
		}
	}()
	for i := range ms {
		if a := &ms[i].Addr; !a.sys.dgram && b.held(a) {
			// The common case: reinject a packet this handle holds.
			if !locked {
				b.vmu.Lock()
				locked = true
			}
			if _, err := b.verdictLocked(a, nfq.Accept, ms[i].Buf[:ms[i].N], true); err != nil {
				return i, fmt.Errorf("divert: message %d: %w", i, err)
			}
			a.sys = sysAddr{}
			sent++
			continue
		}
		if locked {
			b.vmu.Unlock()
			locked = false
		}
		fresh := b.fresh(&ms[i].Addr)
		if _, err := b.send1(ms[i].Buf[:ms[i].N], &ms[i].Addr, true); err != nil {
			return i, fmt.Errorf("divert: message %d: %w", i, err)
		}
		sent++
		if fresh {
			injected++
		}
	}
	return len(ms), nil
}

func (b *linuxBackend) drop(a *Address) error {
	if a.sys.dgram {
		if !b.mine(a) || b.frag == nil {
			return nil // a copy answering it: a new packet, nothing queued
		}
		if err := b.dropDgram(a); err != nil {
			return err
		}
		b.st.dropped.Add(1)
		a.sys = sysAddr{}
		return nil
	}
	if !b.held(a) {
		return nil // a copy or a new packet: nothing is queued
	}
	if _, err := b.verdict(a, nfq.Drop, nil, false); err != nil {
		return err
	}
	b.st.dropped.Add(1)
	a.sys = sysAddr{}
	return nil
}

// reaper drops packets held longer than ParamQueueTime and sends verdicts
// that a Send left for a receiver that did not come back.
func (b *linuxBackend) reaper() {
	defer close(b.done)
	for {
		tick := time.Duration(b.queueTime.Load()) / 10
		tick = min(max(tick, 10*time.Millisecond), 100*time.Millisecond)
		if b.flags&FlagSniff != 0 {
			tick = 10 * time.Millisecond // see acceptSniffed
		}
		b.reapTick.Store(int64(tick))
		select {
		case <-b.stop:
			return
		case <-time.After(tick):
		}
		b.reaperTicks.Add(1)
		if !b.parkReaper(int64(tick)) {
			return
		}
		now := monoNow()
		qt := b.queueTime.Load()
		b.vmu.Lock()
		b.expireLocked(now, qt)
		b.flushLocked()
		b.vmu.Unlock()
		ks, ok := b.kernelStats() // once a tick, for both
		if !ok {
			continue
		}
		if b.flags&FlagSniff != 0 {
			b.acceptSniffed(ks)
		}
		b.drainUnread(now, qt, ks.idSeq)
	}
}

// expireLocked drops the held packets that have waited qt by now (and
// forgets the datagrams whose fragments they were). Called with vmu held;
// the caller flushes.
func (b *linuxBackend) expireLocked(now, qt int64) {
	var expired int64
	for {
		id, at, ok := b.track.Oldest()
		if !ok || now-at < qt {
			break
		}
		b.track.PopOldest()
		b.vbuf = nfq.AppendVerdict(b.vbuf, b.queue, id, nfq.Drop, nil)
		expired++
	}
	if b.frag != nil {
		// A datagram's fragments count once (see expirePending).
		expired += b.expirePending(now, qt)
	}
	if expired > 0 {
		b.st.expired.Add(uint64(expired))
	}
}

// parkReaper waits, instead of ticking, while the reaper has nothing to
// do: no packet held, no fragment waiting for its datagram, and a receive
// call in progress, which takes what the kernel queues (no unread packet
// to drain) and flushed the verdicts before it blocked. The call's end
// wakes it (recvEnd): packets the call took are held from then on, and
// with FlagSniff the originals of packets queued after it must be accepted
// by the tick (acceptSniffed) if no call takes them. So the reaper no
// longer wakes the process while an idle handle's program waits in Recv.
// Woken a quarter of a tick or more after the last wake-up, it looks
// again, and parks again if nothing changed but the call: a lone packet
// that the program sent back, waiting in Recv again, by the time the
// reaper woke (reaperWakeDelay) then costs it no tick, whose work (the
// kernel's queue table read from /proc among it) made such a packet cost
// 0.1-0.2 ms of CPU more. Woken sooner, packets are coming: it returns, to
// work and tick as before, rather than be woken by every receive call
// (each wake-up costs a goroutine switch, with more Ps a thread's wake-up).
// It returns false when the handle is closing.
func (b *linuxBackend) parkReaper(tick int64) bool {
	for {
		calls := b.recvCalls.Load()
		if uint32(calls) == 0 {
			return true // no receive call in progress
		}
		if !b.reaperIdle() {
			return true
		}
		b.parked.Store(true)
		// A call that ended since the Load above either changed recvCalls,
		// seen here, or saw parked set and armed wake (both atomics are
		// sequentially consistent), so no wake-up is lost.
		waited := false
		if b.recvCalls.Load() == calls {
			select {
			case <-b.stop:
				return false
			case <-b.wake.C:
				waited = true
				b.wakeArmed.Store(false) // fired: nothing for lookAhead to stop
				b.reaperWakes.Add(1)
			}
		}
		b.parked.Store(false)
		b.wake.Stop() // a wake-up set after the change was seen
		if !waited {
			return true
		}
		now := monoNow()
		last := b.lastWake.Swap(now)
		if now-last < tick/4 {
			return true
		}
	}
}

// acceptSniffed lets the originals of sniffed packets go on without
// waiting for a reader: every tick, one batch ACCEPT covers every packet
// the kernel had queued by the previous tick, which a reader had a tick
// to take itself. The packets stay in the socket, copies for Recv, until
// drainUnread drops the ones left unread for ParamQueueTime. A sniffing
// handle holds nothing (sniffed fragments go on too), so the batch cannot
// release a held packet.
//
// Each packet gets one verdict: the ACCEPTs the receive side collected go
// first, and the batch is sent only when a packet up to the previous
// tick's id has not been read (the reader's own ACCEPTs cover the
// others); packets read but not yet handed to the verdict side, and those
// read later, are not accepted again (acceptOnceLocked). The batch can
// still find none of its packets queued, when the kernel could not put
// their ids in the socket (Stats.Overflows): its refusal is not a packet
// lost and is not counted (nfq.AppendVerdictBatchQuiet).
func (b *linuxBackend) acceptSniffed(ks kernelQueueStats) {
	seq, total := ks.idSeq, ks.total
	prev, seen := b.sniffSeq, b.sniffSeen
	b.sniffSeq, b.sniffSeen = seq, true
	if !seen || total == 0 {
		return // nothing queued
	}
	b.vmu.Lock()
	defer b.vmu.Unlock()
	if b.sniffed(prev) || int32(prev-b.lastID) <= 0 {
		// Accepted already, by the last batch or by the reader (lastID
		// starts at 0: the kernel numbers a new queue's packets from 1).
		return
	}
	b.flushLocked()
	b.vbuf = nfq.AppendVerdictBatchQuiet(b.vbuf, b.queue, prev, nfq.Accept)
	b.flushLocked()
	b.sniffThrough, b.sniffAll = prev, true
}

// drainUnread releases the packets left unread in the socket for at least
// ParamQueueTime while no Recv runs: DROP, or ACCEPT for FlagSniff (whose
// packets must not wait for a reader). A packet's age comes from the
// kernel's queue id sequence, sampled at ticks (b.ckpt): ids up to the
// sequence seen QueueTime ago were queued at least that long ago; seq is
// the last id the kernel gave out, read this tick. A sample is kept at
// most every qt/128, so that the ring reaches twice the queue time back
// whatever the tick (FlagSniff ticks every 10 ms: 256 samples of each tick
// reached 2.56 s back, and packets left unread under a longer queue time
// were never released).
func (b *linuxBackend) drainUnread(now, qt int64, seq uint32) {
	if c := b.recvCalls.Load(); c != b.lastCalls {
		b.lastCalls, b.lastCallT = c, now // a Recv started or ended since the last tick
	}
	if last := b.ckpt[(b.nckpt+len(b.ckpt)-1)%len(b.ckpt)]; b.nckpt == 0 || now-last.t >= qt/int64(len(b.ckpt)/2) {
		b.ckpt[b.nckpt%len(b.ckpt)] = checkpoint{seq: seq, t: now}
		b.nckpt++
	}
	var limit uint32
	found := false
	for i := range b.ckpt {
		c := b.ckpt[i]
		if c.t != 0 && now-c.t >= qt && (!found || int32(c.seq-limit) > 0) {
			limit, found = c.seq, true
		}
	}
	if !found || now-b.lastCallT < qt || !b.rmu.TryLock() {
		return // nothing old enough, or a Recv is (or was just) running
	}
	defer b.rmu.Unlock()
	p := &b.pkt
	b.vmu.Lock()
	defer b.vmu.Unlock()
	b.vHeld = true
	defer func() { b.vHeld = false }()
	var expired uint64
	defer func() {
		if expired > 0 {
			b.st.expired.Add(expired)
		}
	}()
	for {
		if err := b.conn.Next(p, false); err != nil {
			if errors.Is(err, nfq.ErrMalformed) {
				continue
			}
			break
		}
		if int32(p.ID-limit) > 0 {
			b.conn.Unread() // young enough to wait for a reader
			break
		}
		b.noteID(p.ID)
		expired++
		if b.flags&FlagSniff != 0 {
			if !b.sniffed(p.ID) {
				b.acc = append(b.acc, p.ID) // else acceptSniffed did
			}
		} else {
			b.vbuf = nfq.AppendVerdict(b.vbuf, b.queue, p.ID, nfq.Drop, nil)
		}
		if len(b.acc) >= accInitCap || len(b.vbuf) >= nfq.SendLimit/2 {
			b.flushLocked()
		}
	}
	b.flushLocked()
	b.more.Store(b.conn.Buffered())
}

type checkpoint struct {
	seq uint32
	t   int64
}

// kernelStats reads the queue's line of /proc/net/netfilter/nfnetlink_queue
// of the handle's namespace (opened by Open on the namespace's thread).
func (b *linuxBackend) kernelStats() (kernelQueueStats, bool) {
	b.procMu.Lock()
	defer b.procMu.Unlock()
	ok := b.readKernelLocked()
	return b.kstats, ok
}

// readWhole reads f from its start into buf, grown (doubled) until the
// whole file fits, and returns the buffer and the file's length.
func readWhole[F io.ReaderAt](f F, buf []byte) ([]byte, int, error) {
	if len(buf) == 0 {
		buf = make([]byte, 4096)
	}
	for {
		n, err := f.ReadAt(buf, 0)
		if errors.Is(err, io.EOF) || (err == nil && n < len(buf)) {
			return buf, n, nil
		}
		if err != nil {
			return buf, 0, err
		}
		buf = make([]byte, 2*len(buf)) // full: there may be more
	}
}

// procFile is the descriptor of a procfs file, read with raw pread(2)
// syscalls, which the Go scheduler does not see. A normal syscall tells
// the runtime it may block, and when every P was idle, as when a reader has
// just been woken from a cold wait in the poller, that wakes the runtime's
// monitor thread (sysmon), which then polls every 20 µs for a millisecond
// or more (it bets that more syscalls follow). The reaper reads the queue's
// line after each pause in the traffic, so every pause paid that (about 300
// wake-ups of sysmon for 4,000 packets in alternating blocks of 500, 5 ms of
// CPU; 20 with raw reads). Reading this file never waits: the kernel
// prints a line per queue from memory.
type procFile int

// procFileOf returns f's descriptor, valid while f is open.
func procFileOf(f *os.File) (procFile, bool) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, false
	}
	fd := procFile(-1)
	if rc.Control(func(d uintptr) { fd = procFile(d) }) != nil || fd < 0 {
		return 0, false
	}
	return fd, true
}

// ReadAt reads len(p) bytes from off, as io.ReaderAt says: fewer only at
// the end of the file, with io.EOF. (A procfs file gives whole lines per
// pread, so a read can end short of the buffer before the end.)
func (fd procFile) ReadAt(p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) {
		m, _, e := unix.RawSyscall6(unix.SYS_PREAD64, uintptr(fd), uintptr(unsafe.Pointer(&p[n])), uintptr(len(p)-n), uintptr(off+int64(n)), 0, 0)
		switch {
		case e == unix.EINTR:
			continue
		case e != 0:
			return n, &os.PathError{Op: "pread", Path: "nfnetlink_queue", Err: e}
		case m == 0:
			return n, io.EOF
		}
		n += int(m)
	}
	return n, nil
}

// readKernelLocked reads the queue's line of
// /proc/net/netfilter/nfnetlink_queue into kstats. Called with procMu held.
func (b *linuxBackend) readKernelLocked() bool {
	if b.procQ == nil {
		return false
	}
	var n int
	var err error
	b.procBuf, n, err = readWhole(b.procFd, b.procBuf)
	if err != nil {
		return false
	}
	ks, ok := parseNfqueueProc(b.procBuf[:n], b.queue)
	if ok {
		b.kstats = ks
	}
	return ok
}

// linuxStats are the backend's counters (see Stats). Each is added to at
// most once per Recv, RecvBatch, Send, SendBatch, Drop or reaper tick.
// (Passed is counted under vmu, which accepting a packet takes anyway.)
type linuxStats struct {
	received, sent, injected, dropped, expired atomic.Uint64
}

func (b *linuxBackend) stats() (Stats, error) {
	s := Stats{
		Received: b.st.received.Load(),
		Sent:     b.st.sent.Load(),
		Injected: b.st.injected.Load(),
		Dropped:  b.st.dropped.Load(),
		Expired:  b.st.expired.Load(),
	}
	b.vmu.Lock()
	s.Passed = b.passed
	s.Overflows = b.gaps
	b.vmu.Unlock()
	if b.conn != nil {
		cs := b.conn.Stats()
		s.Overflows += cs.ENOBUFS
		s.RefusedVerdicts = cs.VerdictErrors
	}
	b.procMu.Lock()
	b.readKernelLocked() // the last values stay when the queue is gone
	s.KernelQueueDropped = b.kstats.dropped
	s.KernelUserDropped = b.kstats.userDropped
	b.procMu.Unlock()
	return s, nil
}

// --- control ---------------------------------------------------------------

// Removing a handle's rules unregisters its netfilter hooks, and the
// kernel then drops every packet queued in the namespace
// (nf_queue_nf_hook_drop). So the queue is stopped instead: queue length 0
// with fail-open accepts every new packet unqueued, while those queued stay
// for Recv (Shutdown) or for one last ACCEPT (Close) before the rules go.
// The rules' Close keeps the hooks (an emptied table) while another handle
// of the process is open in the namespace (b.member; nftrules'
// share_linux.go), so that its packets stay queued.

func (b *linuxBackend) shutdown(how ShutdownHow) error {
	if how&ShutdownRecv == 0 {
		return nil
	}
	var errs []error
	if b.conn != nil {
		// One call stops the queue; a concurrent one waits for it (under
		// shmu), so that neither returns, nor sets shutRecv, before new
		// packets stop.
		b.shmu.Lock()
		if !b.shutting.Swap(true) {
			// Stop new packets first, then mark the handle shut down, so
			// that a concurrent Recv cannot report ErrShutdown while
			// packets still arrive; then wake a blocked Recv so that it
			// drains.
			b.vmu.Lock()
			errs = append(errs, b.conn.StopQueueing())
			b.vmu.Unlock()
			// Under dlmu: a SetReadDeadline cannot put a later deadline
			// in place of the wake-up once shutRecv is set.
			b.dlmu.Lock()
			b.shutRecv.Store(true)
			errs = append(errs, b.conn.SetReadDeadline(time.Unix(1, 0)))
			b.dlmu.Unlock()
		}
		b.shmu.Unlock()
	}
	b.shutRecv.Store(true)
	if b.flags&FlagDrop != 0 {
		// Stop dropping, once dropLoop judged what was queued: removing
		// the rules' hooks makes the kernel drop every queued packet.
		if b.dropDone != nil {
			<-b.dropDone
			b.flush() // the ACCEPTs of what passed, before the hooks go
		}
		if b.member != nil {
			// The queue holds nothing now and takes no new packet: as a
			// user of the namespace the handle would only make its
			// rules' Close park their emptied table (hooks and all)
			// until Close when no other handle of the process is there.
			errs = append(errs, leaveNamespace(b.member))
		}
		if b.rules != nil {
			errs = append(errs, b.rules.Close())
		}
	}
	if err := errors.Join(errs...); err != nil {
		return closedAs(err, "divert: shutdown: %w")
	}
	return nil
}

func (b *linuxBackend) close() error {
	if b.dropDone != nil {
		// Let dropLoop judge what is queued, as Shutdown does (and waits
		// for it to end).
		_ = b.shutdown(ShutdownRecv)
	}
	b.closed.Store(true)
	if b.stop != nil {
		close(b.stop)
		<-b.done
	}
	var errs []error
	if b.conn != nil {
		// Reinject everything still queued: what the program holds, what
		// waits in the socket buffer, and what was accepted but not sent.
		b.vmu.Lock()
		if !b.shutRecv.Load() {
			errs = append(errs, b.conn.StopQueueing())
		}
		b.flushLocked()
		for b.track.Len() > 0 {
			b.track.PopOldest()
		}
		// The kernel's batch covers ids up to maxID in wrapping order
		// (maxID - id < 2^31): reach 2^30 beyond the newest id seen and as
		// far back; held ids are far younger than that. ENOENT when nothing
		// was queued: no packet lost, so quiet (a receive call still
		// running could read the answer into Stats.RefusedVerdicts).
		b.vbuf = nfq.AppendVerdictBatchQuiet(b.vbuf[:0], b.queue, b.lastID+1<<30, nfq.Accept)
		b.conn.Send(b.vbuf)
		b.vbuf = b.vbuf[:0]
		b.released = true
		b.vmu.Unlock()
	}
	if b.member != nil {
		// The handle holds nothing now: the rules closed below (its own,
		// or the last of its group) delete their tables unless another
		// handle of the process remains in the namespace.
		errs = append(errs, leaveNamespace(b.member))
	}
	if b.frag != nil {
		errs = append(errs, b.frag.close())
	}
	if b.rules != nil {
		errs = append(errs, b.rules.Close())
	}
	if b.group != nil {
		errs = append(errs, b.group.leave()) // the last handle of OpenQueues removes the rules
	}
	if b.conn != nil {
		b.procMu.Lock()
		b.readKernelLocked() // Stats after Close reports the final counts
		b.procMu.Unlock()
		errs = append(errs, b.conn.Close())
	}
	if b.inj != nil {
		errs = append(errs, b.inj.Close())
	}
	b.procMu.Lock()
	if b.procQ != nil {
		b.procQ.Close()
		b.procQ = nil
	}
	b.procMu.Unlock()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("divert: close: %w", err)
	}
	return nil
}

func (b *linuxBackend) setParam(p Param, v uint64) error {
	switch p {
	case ParamQueueTime:
		b.queueTime.Store(int64(v) * int64(time.Millisecond))
		if b.frag != nil {
			// The reassembler gives up on a datagram when the queue
			// would drop its fragments.
			b.frag.reasm.SetTimeout(time.Duration(v) * time.Millisecond)
		}
	case ParamQueueLength:
		if b.conn != nil {
			b.vmu.Lock()
			err := b.conn.SetMaxLen(uint32(v))
			b.vmu.Unlock()
			if err != nil {
				return closedAs(err, "divert: set queue length: %w")
			}
		}
	case ParamQueueSize:
		if b.conn != nil {
			if err := b.conn.SetReadBuffer(int(v)); err != nil {
				return closedAs(err, "divert: set queue size: %w")
			}
		}
	}
	return nil
}

func (b *linuxBackend) setReadDeadline(t time.Time) error {
	if b.conn == nil {
		return nil
	}
	b.dlmu.Lock()
	defer b.dlmu.Unlock()
	if b.shutRecv.Load() {
		return nil // Recv no longer blocks
	}
	if err := b.conn.SetReadDeadline(t); err != nil {
		return closedAs(err, "divert: set read deadline: %w")
	}
	return nil
}

// closedAs formats err with format, unless a concurrent Close caused it
// (the queue socket reports os.ErrClosed): then it is the handle's
// closed error, which wraps net.ErrClosed as documented.
func closedAs(err error, format string) error {
	if errors.Is(err, os.ErrClosed) {
		return errClosed
	}
	return fmt.Errorf(format, err)
}

func (b *linuxBackend) version() (major, minor uint64) {
	return linuxVersionMajor, linuxVersionMinor
}

// monoNow is nanoseconds since the Unix epoch read from the monotonic
// clock: the wall clock at start plus the monotonic time since, the clock
// of nfq.Conn.ReadTime. Queue-time ageing uses it, so a wall-clock step
// (NTP, a resumed VM) neither drops held packets early nor keeps them too
// long.
func monoNow() int64 { return nfq.Mono() }
