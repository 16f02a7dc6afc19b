package nfq

import (
	"errors"
	"fmt"
	"math"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/internal/netcap"
)

// ErrUnsupported is wrapped by errors that say the kernel has no NFQUEUE
// (nfnetlink or nfnetlink_queue missing).
var ErrUnsupported = errors.New("nfq: NFQUEUE not supported by the kernel")

// ErrQueueBusy is wrapped by the error of binding a queue number that
// another socket owns.
var ErrQueueBusy = errors.New("nfq: queue number in use by another socket")

// ErrNoData is returned by a non-blocking Next when nothing is queued.
var ErrNoData = errors.New("nfq: no packet ready")

// Defaults.
const (
	DefaultSlots  = 8    // datagrams per recvmmsg (in each of the two areas)
	DefaultMaxLen = 4096 // queue length
	slotOverhead  = 1024 // netlink, nfgenmsg and attribute headers around the payload
	sendLimit     = 256 << 10
	sndBuf        = 1 << 20
	// maxWait bounds one cold wait (a deadline in the runtime poller): a
	// safety net only. Close closes the poller's descriptor, a read
	// deadline set before the wait is the wait's own deadline, and one set
	// during it wakes the waiter (see SetReadDeadline). Every timer wakes
	// a thread or two of an idle process (the poller's, and sysmon, which
	// sleeps until the next timer): at 500 ms an idle Conn cost 0.4 ms of
	// CPU a second, and a lone packet 14% more CPU (measured side by side,
	// internal/benchadapter/simul.sh with LONE).
	maxWait = 30 * time.Second
	// hotWait bounds a receive that waits holding its P (see Conn), the
	// socket's SO_RCVTIMEO. The kernel counts it in ticks, rounded up, and
	// its timer wheel may fire a tick later still: with HZ=250 a 1 ms
	// receive timeout ended after 4.7 ms (median of 50) and up to 8.8 ms
	// on the README's VM. "At most hotWait" below means that.
	hotWait = time.Millisecond
	// yieldEvery is how often, at most, a reader on the only P yields
	// before a hot wait once another goroutine has sent while it waited
	// (see Conn).
	yieldEvery = int64(50 * time.Microsecond)
	// yieldAlone is how often, at most, it yields until then: no longer than a
	// hot wait may hold the P anyway.
	yieldAlone = int64(hotWait)
)

// Config says how to open a Conn.
type Config struct {
	// Queue is the queue number to bind; with Auto, the first number tried.
	Queue uint16
	// Auto binds the first free queue number at or above Queue.
	Auto bool
	// CopyRange is how many packet bytes the kernel copies (0 means
	// MaxCopyRange, the whole packet up to 65531 bytes).
	CopyRange uint32
	// MaxLen is the queue length (0 means DefaultMaxLen).
	MaxLen uint32
	// FailOpen accepts packets instead of dropping them when the queue or
	// the socket buffer is full.
	FailOpen bool
	// RcvBuf is the socket receive buffer in bytes (0 leaves the default).
	RcvBuf int
	// Slots is how many datagrams one receive syscall can take
	// (0 means DefaultSlots). The Conn has two receive areas of Slots
	// datagrams each (see recvArea).
	Slots int
}

// Conn is a NETLINK_NETFILTER socket bound to one NFQUEUE queue, in the
// network namespace of the thread that opened it. Next honours
// SetReadDeadline, and Close unblocks it.
//
// A blocking Next that finds nothing buffered while packets keep coming
// does not park in the Go runtime poller: it calls recvmmsg(2) with
// MSG_WAITFORONE on the socket, which is in blocking mode and outside the
// poller, so one syscall on its own thread both waits and reads the batch,
// and the kernel wakes that thread directly when a packet arrives: no epoll
// wakeup, no separate poll or EAGAIN read (see readInto).
// Close and the read deadline wake the waiter by asking the kernel for an
// acknowledgement (an NLMSG_NOOP with NLM_F_ACK): the answer lands in the
// socket, the receive returns, and Next skips it and looks at the state.
// Such an answer is no packet: the wait after a read that brought answers
// only is cold (see below). A cold wait has the read deadline as its own
// and is ended by Close without that message too.
//
// While packets keep coming, a waiting receive keeps its P: it is a raw
// syscall, bounded by a receive timeout of hotWait, and a timeout hands
// the wait back to the scheduler until packets come again: a cold wait,
// which parks the goroutine in the runtime poller (see coldPoll), bounded
// by maxWait as a safety net. A wait in a normal blocking syscall would
// have the runtime take the P from its thread after 20 µs, hand it off and
// wake sysmon and another thread when the packet arrives: several context
// switches per wakeup, measured as the main cost of an idle round trip and
// a tenth of the CPU under load.
// With one P (GOMAXPROCS 1) the reader yields before a hot wait
// (runtime.Gosched), so that goroutines it made runnable, such as a worker
// it just handed a packet to, and expired timers run first. A yield is not
// free: about 80 ns when hot, but 1.3-1.9 µs on average right after a wait
// (measured on the README's VM), and it lies between a packet's verdict
// and the wait, while the program the verdict woke waits for the CPU: with
// queues measured side by side (internal/benchadapter/simul.sh), idle round
// trips through a reader that yielded before every wait had a median p50
// 6 µs above those through one that yields as below. So the reader yields before a
// wait at most every yieldAlone (1 ms, no longer than a hot wait may hold the
// P anyway) until a Send runs while it waits: another goroutine then
// verdicts the packets (the pipeline pattern), and from then on the reader
// yields at most every yieldEvery (50 µs), that is before every wait when
// packets come one at a time, so that the worker it hands each packet to
// runs before the next packet. The first packets of a pipeline may wait for
// a yield or for the end of a hot wait (hotWait at most) before the Send that
// switches the reader over. A goroutine made runnable between yields waits
// for the end of the wait, which the next packet brings (hotWait at most).
// With more Ps it does not yield: the
// runtime already hands what the reader makes runnable to an idle P, and a
// Gosched there would wake another thread and move the reader to it
// (measured: 25% more CPU). A signal (preemption, GC) interrupts a hot
// wait. What becomes runnable during one waits for its end, at most
// hotWait, when no other P is free. So hot waits never hold every P: with
// more Conns reading than Ps less one (several handles, OpenQueues), the
// others wait cold (see takeHot); otherwise a goroutine that the next
// packet depends on could wait hotWait for every packet.
// The verdict write and the non-blocking reads never block and are raw
// syscalls too.
//
// Next, Buffered and the receive state must be used by one goroutine at a
// time; Send likewise; Next and Send may run concurrently.
type Conn struct {
	sfd   *sysfd
	queue uint16
	cfg   QueueConfig
	seq   atomic.Uint32

	// receive state: the area being decoded, of the two
	areas  [2]recvArea
	area   int
	slots  [][]byte       // areas[area].slots
	hdrs   []unix.Mmsghdr // areas[area].hdrs
	count  int            // datagrams received in the last read
	cur    int            // datagram being decoded
	off    int            // offset in it
	prvCur int            // position before the last packet Next returned
	prvOff int
	// refillFn is called before a read replaces the buffer (SetRefill).
	refillFn func(block bool, cur, other []byte) bool
	stopped  bool // StopQueueing was called (send side state)
	rn       int
	rerr     syscall.Errno
	// drained: the last read returned fewer datagrams than it asked for,
	// so the socket was empty then; the first non-blocking fill after it reports ErrNoData
	// without a syscall (once), unless a message went to the kernel since
	// (sends moved: its answer may be waiting).
	drained    bool
	drainedGen uint64

	// blocking wait (see wake)
	rflags   uintptr     // flags of the next read: MSG_DONTWAIT or MSG_WAITFORONE
	rfirst   int         // first slot the next read fills
	rmax     int         // most datagrams the next read takes
	hot      bool        // SO_RCVTIMEO is hotWait and waits are raw syscalls
	hotData  bool        // the last wait was hot and brought datagrams
	holdsHot atomic.Bool // c holds one of the process's hot slots (takeHot)
	wantHot  bool        // what the next blocking read should be
	// pktRead: a packet came with the last read that returned data, not
	// only answers (a wake-up's acknowledgement, verdict errors): no sign
	// of traffic, so the next wait is cold (see Next)
	pktRead  bool
	soloP    bool         // GOMAXPROCS was 1 when the reader last turned hot
	yieldT   int64        // rtime of the read after the last yield before a hot wait
	shared   atomic.Bool  // a Send ran while a Next waited: yield every yieldEvery (see Conn)
	rtime    int64        // mono time of the last read that returned data
	waiting  atomic.Bool  // a Next may be in a blocking read: wake it on changes
	deadline atomic.Int64 // read deadline on the mono clock; 0: none
	dmu      sync.Mutex   // guards dtimer
	dtimer   *time.Timer  // wakes a waiting Next when the deadline passes

	fake *Fake // replaces the syscalls (SetFake)

	// cold is where cold waits wait (see coldPoll); inSet: where the socket
	// stands in its epoll set (receive state).
	cold  coldPoll
	inSet coldSet

	closed      atomic.Bool
	nbReads     atomic.Uint64 // non-blocking reads; blocking ones are waits
	emptyRds    atomic.Uint64
	coldWaits   atomic.Uint64
	intrs       atomic.Uint64
	hotWaits    atomic.Uint64
	yields      atomic.Uint64
	sends       atomic.Uint64 // completed Sends; also the receive side's hint generation (drained)
	enobufs     atomic.Uint64
	truncs      atomic.Uint64
	kernErrs    atomic.Uint64
	verdictErrs atomic.Uint64
	lastErrno   atomic.Uint32
}

// fill sets the defaults of the zero fields.
func (cfg *Config) fill() {
	if cfg.CopyRange == 0 || cfg.CopyRange > MaxCopyRange {
		cfg.CopyRange = MaxCopyRange
	}
	if cfg.MaxLen == 0 {
		cfg.MaxLen = DefaultMaxLen
	}
	if cfg.Slots <= 0 {
		cfg.Slots = DefaultSlots
	}
}

// Open opens a socket and binds a queue as cfg says.
func Open(cfg Config) (*Conn, error) {
	cfg.fill()
	// A blocking socket, outside the runtime poller, whose epoll would
	// otherwise wake a thread for every packet that finds the socket
	// empty, in parallel with the waiting Next (see Conn); cold waits
	// reach the poller through an epoll instance of their own (see
	// coldPoll). Non-blocking reads are MSG_DONTWAIT; writes to the kernel
	// never wait for the peer.
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, socketError("open netlink socket", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("nfq: bind netlink socket: %w", err)
	}
	// Best effort options: NO_ENOBUFS keeps an overflow from becoming a
	// socket error; ext-ack off keeps error answers small.
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_NO_ENOBUFS, 1)
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_EXT_ACK, 0)
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, sndBuf); err != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, sndBuf)
	}
	c, err := newConn(fd, &cfg)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	if cfg.RcvBuf > 0 {
		if err := c.SetReadBuffer(cfg.RcvBuf); err != nil {
			c.Close()
			return nil, err
		}
	}
	if err := c.bind(cfg.Queue, cfg.Auto); err != nil {
		c.Close()
		return nil, err
	}
	if err := c.configure(&c.cfg); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// newConn makes the Conn of fd, a socket in blocking mode, as cfg says
// (its defaults filled in by Config.fill). On error fd is left open.
func newConn(fd int, cfg *Config) (*Conn, error) {
	// Only hot waits block in the kernel (see Conn).
	tv := unix.NsecToTimeval(int64(hotWait))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return nil, fmt.Errorf("nfq: set receive timeout: %w", err)
	}
	ep, err := newColdPoll()
	if err != nil {
		return nil, err
	}
	c := &Conn{
		cold: ep,
		sfd:  newSysfd(fd),
		cfg: QueueConfig{
			CopyRange: cfg.CopyRange,
			MaxLen:    cfg.MaxLen,
			Flags:     FlagGSO,
			Mask:      FlagFailOpen | FlagGSO | FlagConntrack,
		},
	}
	if cfg.FailOpen {
		c.cfg.Flags |= FlagFailOpen
	}
	// A Conn dropped without Close still lets go of its socket (and so of
	// its queue); the epoll instance's os.File has its own cleanup.
	runtime.AddCleanup(c, func(s *sysfd) { s.close() }, c.sfd)
	c.initRecv(cfg.Slots, int(cfg.CopyRange)+slotOverhead)
	return c, nil
}

// Wrap makes a Conn of fd, a datagram socket in blocking mode that the
// caller opened, as if it were the socket of queue cfg.Queue, already bound
// and configured: Next reads packet messages from fd, and Send writes
// verdicts to it. It is the seam of benchmarks that measure the user-space
// path alone, the other end of a socketpair playing the kernel. The Conn
// owns fd from then on, also on error. cfg.Auto and cfg.RcvBuf are not
// used.
func Wrap(fd int, cfg Config) (*Conn, error) {
	cfg.fill()
	c, err := newConn(fd, &cfg)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	c.queue = cfg.Queue
	return c, nil
}

func socketError(what string, err error) error {
	switch {
	case errors.Is(err, unix.EPROTONOSUPPORT), errors.Is(err, unix.EAFNOSUPPORT):
		return fmt.Errorf("nfq: %s: %w (%w)", what, ErrUnsupported, err)
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return fmt.Errorf("nfq: %s: %w (NFQUEUE needs CAP_NET_ADMIN)", what, err)
	}
	return fmt.Errorf("nfq: %s: %w", what, err)
}

// netAdmin reports whether the caller has CAP_NET_ADMIN over the network
// namespace of c's socket.
func (c *Conn) netAdmin() bool {
	if !c.sfd.acquire() {
		return netcap.Effective()
	}
	defer c.sfd.release()
	return netcap.Over(c.sfd.fd)
}

func (c *Conn) bind(queue uint16, auto bool) error {
	for q := int(queue); q <= 0xffff; q++ {
		err := c.request(appendCmd(nil, c.seq.Add(1), uint16(q), cmdBind))
		if err == nil {
			c.queue = uint16(q)
			return nil
		}
		// EPERM is the answer both for a queue another socket holds and
		// for a sender without CAP_NET_ADMIN over the namespace, which a
		// process with every capability in a user namespace of its own
		// may lack (see netcap.Over).
		busy := errors.Is(err, unix.EBUSY) || (errors.Is(err, unix.EPERM) && c.netAdmin())
		switch {
		case busy && auto:
			continue
		case busy:
			// The kernel says EPERM for a queue another socket holds; not
			// wrapped, so that errors.Is does not take it for a missing
			// privilege.
			return fmt.Errorf("nfq: bind queue %d: %w (%v)", q, ErrQueueBusy, err)
		case errors.Is(err, unix.EPERM):
			return fmt.Errorf("nfq: bind queue %d: %w (NFQUEUE needs CAP_NET_ADMIN over this network namespace, not only in a user namespace of its own)", q, err)
		case errors.Is(err, unix.EINVAL), errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.ENOENT):
			return fmt.Errorf("nfq: bind queue %d: %w (nfnetlink_queue missing: %w)", q, ErrUnsupported, err)
		}
		return fmt.Errorf("nfq: bind queue %d: %w", q, err)
	}
	return fmt.Errorf("nfq: bind: %w: every queue number from %d up is taken", ErrQueueBusy, queue)
}

func (c *Conn) configure(qc *QueueConfig) error {
	if err := c.request(appendConfig(nil, c.seq.Add(1), c.queue, qc, true)); err != nil {
		return fmt.Errorf("nfq: configure queue %d: %w", c.queue, err)
	}
	return nil
}

// request sends one message with NLM_F_ACK and waits for its answer. Queued
// packets that arrive first stay buffered for Next; the answer is blanked
// out of the buffer. It must not run concurrently with Next.
func (c *Conn) request(msg []byte) error {
	// An answer is no sign of traffic: keep the next wait cold.
	defer func() { c.wantHot = false }()
	seq := ne.Uint32(msg[8:12])
	if err := c.Send(msg); err != nil {
		return err
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		// Look through what is buffered.
		keep := false // something buffered is still for Next
		for i := c.cur; i < c.count; i++ {
			off := 0
			if i == c.cur {
				off = c.off
			}
			d := c.slots[i][:c.hdrs[i].Len]
			for off < len(d) {
				var ke KernelError
				var p Packet
				n, kind, err := Decode(d[off:], &p, &ke)
				if err != nil || n == 0 {
					break
				}
				if (kind == KindAck || kind == KindError) && ke.Seq == seq {
					ne.PutUint16(d[off+4:], nlmsgNoop) // consumed
					if kind == KindError {
						return ke.Errno
					}
					return nil
				}
				if kind != KindOther {
					keep = true
				}
				off += n
			}
		}
		if !keep {
			// Only answers consumed before, or nothing: free the slots,
			// or every request would take one for good.
			c.count, c.cur, c.off = 0, 0, 0
		}
		if c.count == len(c.slots) {
			return fmt.Errorf("nfq: no answer to request %d among %d buffered datagrams", seq, c.count)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nfq: no answer to request %d: %w", seq, os.ErrDeadlineExceeded)
		}
		if err := c.fill(true); err != nil && !errors.Is(err, ErrNoData) {
			return err
		}
	}
}

// recvArea is a receive buffer of n datagram slots with the recvmmsg
// headers that point into it.
//
// A Conn has two areas. It reads into the same one as long as the program
// holds none of the packets in it, which is the usual loop (a batch is sent
// back before the next is received): the same memory stays in the cache.
// When a batch spans reads (the first filled every slot), the next read
// goes to the other area, so that the packets the program holds from the
// first stay intact; otherwise the tracker would have to hash them before
// they are overwritten, to tell later whether they come back changed (see
// SetRefill).
type recvArea struct {
	arena []byte
	slots [][]byte
	hdrs  []unix.Mmsghdr
	iovs  []unix.Iovec
}

func (c *Conn) initRecv(n, size int) {
	for k := range c.areas {
		a := &c.areas[k]
		a.arena = make([]byte, n*size)
		a.slots = make([][]byte, n)
		a.hdrs = make([]unix.Mmsghdr, n)
		a.iovs = make([]unix.Iovec, n)
		for i := range a.slots {
			a.slots[i] = a.arena[i*size : (i+1)*size : (i+1)*size]
			a.iovs[i].Base = &a.slots[i][0]
			a.iovs[i].SetLen(size)
			a.hdrs[i].Hdr.Iov = &a.iovs[i]
			a.hdrs[i].Hdr.SetIovlen(1)
		}
	}
	c.area = 0
	c.slots, c.hdrs = c.areas[0].slots, c.areas[0].hdrs
}

// read is one recvmmsg into c.hdrs with c.rflags: non-blocking, or
// waiting for the first datagram and taking whatever else is queued then.
// A wait is a raw syscall when hot (see Conn).
func (c *Conn) read(fd uintptr) {
	// The kernel sets msg_len and msg_flags of every header it fills; the
	// others are not looked at.
	hdrs := c.hdrs[c.rfirst : c.rfirst+c.rmax]
	if c.fake != nil {
		c.rn, c.rerr = c.fake.Read(hdrs, c.slots[c.rfirst:c.rfirst+c.rmax], c.rflags&unix.MSG_WAITFORONE != 0)
		return
	}
	var n uintptr
	var e syscall.Errno
	p, vlen := uintptr(unsafe.Pointer(&hdrs[0])), uintptr(len(hdrs))
	if c.rflags&unix.MSG_WAITFORONE == 0 {
		if vlen == 1 {
			n, e = c.recvOne(fd)
		} else {
			n, _, e = unix.RawSyscall6(unix.SYS_RECVMMSG, fd, p, vlen, c.rflags, 0, 0)
		}
		c.nbReads.Add(1)
		if e == unix.EAGAIN {
			c.emptyRds.Add(1)
		}
	} else {
		// Turning hot takes one of the process's hot slots (see takeHot);
		// without one the wait stays cold.
		if c.hot != c.wantHot {
			if !c.wantHot {
				c.hot, c.hotData = false, false
				c.releaseHot()
			} else if c.takeHot() {
				c.hot = true
				c.soloP = runtime.GOMAXPROCS(0) == 1
			}
		}
		switch {
		case c.hot:
			if c.inSet != setOut {
				c.hotOut(fd)
			}
			n, _, e = unix.RawSyscall6(unix.SYS_RECVMMSG, fd, p, vlen, c.rflags, 0, 0)
		case c.inSet == setArmed || c.coldIn(fd):
			n, e = c.cold.recv(fd, p, vlen, c.coldLimit())
		default:
			// The epoll set refused the socket (out of memory, or
			// max_user_watches): wait in a blocking syscall, in hotWait
			// slices.
			n, _, e = unix.Syscall6(unix.SYS_RECVMMSG, fd, p, vlen, c.rflags, 0, 0)
		}
		if c.hot {
			c.hotWaits.Add(1)
		} else {
			c.coldWaits.Add(1)
		}
	}
	c.rn, c.rerr = int(n), e
}

// hotOut keeps the epoll set of cold waits (see coldPoll) from reacting to
// packets that come while c waits hot: each would run the set's callback,
// and with more Ps the callback wakes the thread the runtime's poller
// sleeps in. Once hot waits bring packets the socket leaves the set. At the
// first hot wait after a cold one it stays: with one P as it is, since no
// thread sleeps in the poller while the reader holds the only P, and with
// more masked (no event). A lone packet is followed by a hot wait that
// times out and a cold wait again, and taking the socket out of the set and
// putting it back cost two epoll_ctl calls per lone packet (an epitem
// allocated, hooked into the socket's wait queue, unhooked and freed): 14%
// of its CPU, measured side by side (internal/benchadapter/simul.sh with
// LONE). Left in the set unmasked with two Ps, it made the second packet of
// a pair come back about 26 µs later (the set's callback wakes the poller's
// thread when another P is idle). With one P the unmasked socket costs that
// second packet the set's callback, about 3 µs, and masking it 5% more CPU
// per lone packet; it stays unmasked.
func (c *Conn) hotOut(fd uintptr) {
	switch {
	case c.hotData:
		c.cold.remove(fd)
		c.inSet = setOut
	case c.inSet == setArmed && !c.soloP:
		if c.cold.mask(fd) {
			c.inSet = setMasked
		} else {
			c.cold.remove(fd)
			c.inSet = setOut
		}
	}
}

// coldSet is where the queue socket stands in the epoll set of cold waits.
type coldSet uint8

const (
	setOut    coldSet = iota // not in the set
	setArmed                 // in it with EPOLLIN
	setMasked                // in it with no events (see hotOut)
)

// coldIn puts the socket in the cold epoll set, with EPOLLIN; it reports
// whether it is there.
func (c *Conn) coldIn(fd uintptr) bool {
	if c.inSet == setMasked {
		if c.cold.arm(fd) {
			c.inSet = setArmed
			return true
		}
		c.cold.remove(fd)
		c.inSet = setOut
	}
	if c.inSet == setOut && c.cold.add(fd) {
		c.inSet = setArmed
	}
	return c.inSet == setArmed
}

// coldLimit is how long a cold wait may last: maxWait, or less if the
// read deadline comes sooner.
func (c *Conn) coldLimit() time.Duration {
	d := maxWait
	if dl := c.deadline.Load(); dl != 0 {
		d = min(d, max(time.Duration(dl-mono()), 0))
	}
	return d
}

// recvOne is a non-blocking read for a single slot: one recvfrom into
// c.slots[c.rfirst], which the kernel serves with less work than a
// recvmmsg of one message (no message header or iovec to copy in, no
// lengths and flags to copy out). It fills the slot's header as recvmmsg
// would, Len and MSG_TRUNC, and returns 1 datagram or the error.
func (c *Conn) recvOne(fd uintptr) (uintptr, syscall.Errno) {
	b := c.slots[c.rfirst]
	p, l, f := uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), uintptr(unix.MSG_DONTWAIT|unix.MSG_TRUNC)
	n, _, e := unix.RawSyscall6(unix.SYS_RECVFROM, fd, p, l, f, 0, 0)
	if e != 0 {
		return 0, e
	}
	// With MSG_TRUNC the kernel returns the datagram's whole length.
	h := &c.hdrs[c.rfirst]
	h.Hdr.Flags = 0
	if n > l {
		h.Hdr.Flags, n = unix.MSG_TRUNC, l
	}
	h.Len = uint32(n)
	return 1, 0
}

// yieldInterval is how long a reader alone on the only P goes between
// yields before hot waits (see Conn).
func (c *Conn) yieldInterval() int64 {
	if c.shared.Load() {
		return yieldEvery
	}
	return yieldAlone
}

// hotConns counts the Conns of the process whose blocking reads are hot:
// each keeps a P while it waits (see Conn).
var hotConns atomic.Int32

// takeHot reserves a hot slot for c. Hot waits may hold every P but one,
// which stays for the goroutines the packets wake (a worker, the reader
// of a lower-priority handle, the rest of the program); with GOMAXPROCS 1
// a single Conn may wait hot, yielding before its waits. Without a slot c
// waits cold: the runtime takes its P back during the wait.
func (c *Conn) takeHot() bool {
	procs := int32(runtime.GOMAXPROCS(0))
	for {
		n := hotConns.Load()
		if n+1 >= procs && !(n == 0 && procs == 1) {
			return false
		}
		if hotConns.CompareAndSwap(n, n+1) {
			c.holdsHot.Store(true)
			return true
		}
	}
}

// releaseHot gives back c's hot slot, if it holds one.
func (c *Conn) releaseHot() {
	if c.holdsHot.CompareAndSwap(true, false) {
		hotConns.Add(-1)
	}
}

// wakeMsg asks the kernel to acknowledge a no-op: the answer wakes a
// receive waiting on the socket. Its sequence number is never used by a
// request, and Next skips acknowledgements.
var wakeMsg = finish(appendHdr(nil, nlmsgNoop, unix.NLM_F_REQUEST|unix.NLM_F_ACK, wakeSeq, unix.AF_UNSPEC, 0), 0)

// wakeSeq is the sequence number of wake messages; request numbers count
// up from 1 and never reach it.
const wakeSeq = 0xffffffff

// wake makes a Next that may be waiting in a blocking read check the state
// again. Callers change the state first.
func (c *Conn) wake() {
	if !c.waiting.Load() || !c.sfd.acquire() {
		return
	}
	// A message to the kernel never blocks. Should it fail, a hot wait
	// still ends within hotWait, and a cold one by its deadline or kick
	// (see SetReadDeadline and Close).
	sendto(uintptr(c.sfd.fd), wakeMsg)
	c.sfd.release()
}

// sendto sends b to the kernel (the socket's default destination), with
// sendto(2) rather than write(2), which would first go through the file
// layer (position lock, access checks). It never blocks: the kernel
// handles the messages inside the call.
func sendto(fd uintptr, b []byte) syscall.Errno {
	_, _, e := unix.RawSyscall6(unix.SYS_SENDTO, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), 0, 0, 0)
	return e
}

// epoch anchors mono.
var epoch = time.Now()

// mono is nanoseconds on the monotonic clock since the package started.
func mono() int64 { return int64(time.Since(epoch)) }

// Mono returns nanoseconds since the Unix epoch on the monotonic clock: the
// wall clock when the package started plus the monotonic time since. Wall
// clock steps do not move it. ReadTime uses the same clock.
func Mono() int64 { return epochUnix + mono() }

var epochUnix = epoch.UnixNano()

// Expired reports whether the read deadline has passed. A blocking Next
// checks it before it reads the socket, not before it returns a datagram
// already buffered.
func (c *Conn) Expired() bool { return c.expired() }

// expired reports whether the read deadline has passed.
func (c *Conn) expired() bool {
	dl := c.deadline.Load()
	return dl != 0 && mono() >= dl
}

// fill reads datagrams into the buffer. With datagrams still buffered
// (request looking for its answer) it appends after them in the current
// area; otherwise that area is fully consumed and the read goes to its
// start, or to the other area's if the refill function says the program
// still holds packets in this one.
//
// A non-blocking fill right after a read that left slots free (the socket
// was empty at that moment) returns
// ErrNoData without a syscall: such a read would almost always fail with
// EAGAIN, and a batch receive loop issues one after every partial read.
// The shortcut is taken once per read and never after a Send completed
// since the read, so a caller that polls again, or that sent something
// drawing an answer, does read the socket.
func (c *Conn) fill(block bool) error {
	if !block && c.Drained() {
		return ErrNoData
	}
	if c.cur < c.count {
		// request: keep what is buffered, read into the free slots.
		return c.readInto(c.count, block)
	}
	if c.refillFn != nil && c.refillFn(block, c.areas[c.area].arena, c.areas[c.area^1].arena) {
		c.area ^= 1
		c.slots, c.hdrs = c.areas[c.area].slots, c.areas[c.area].hdrs
	}
	c.count, c.cur, c.off = 0, 0, 0
	return c.readInto(0, block)
}

// readInto reads into the slots from first on. A blocking read is one
// recvmmsg with MSG_WAITFORONE: it sleeps until the first datagram and
// takes whatever else is queued then, so a read that brings fewer than it
// asked for found the socket empty (see fill).
//
// An earlier version read one datagram only (a recvfrom) after a read
// that, by the clock, had slept and brought one: the recvmmsg's try for a
// second datagram is an EAGAIN read inside the call. Measured side by side
// (internal/benchadapter/simul.sh), that saved nothing on the idle round
// trip (median p50 0.5-1.3 µs higher with it, CPU per idle packet the
// same) and cost 3.3-3.5% more CPU per packet under bursty load, where a
// datagram read alone as the burst was arriving ended its batch: more
// batches, more wakeups. It also cost two clock reads per wait.
func (c *Conn) readInto(first int, block bool) error {
	if first >= len(c.hdrs) {
		return ErrNoData
	}
	c.rfirst = first
	c.rmax = len(c.hdrs) - first
	c.drained = false
	if block {
		// waiting is set before the state is checked, and Close and
		// SetReadDeadline change the state before they look at waiting:
		// either the checks below see the change, or they wake the read.
		c.waiting.Store(true)
		defer c.waiting.Store(false)
	}
	for {
		if block {
			if c.closed.Load() {
				return c.ioError(os.ErrClosed)
			}
			if c.expired() {
				// As a read in the runtime poller: a passed deadline fails
				// a blocking read even when data is queued.
				return c.ioError(os.ErrDeadlineExceeded)
			}
			c.rflags = unix.MSG_WAITFORONE
			if c.wantHot && c.soloP && c.rtime-c.yieldT >= c.yieldInterval() {
				// The wait will keep the only P: let what is runnable run
				// first.
				runtime.Gosched()
				c.yields.Add(1)
				c.yieldT = c.rtime
			}
		} else {
			// A non-blocking read works even past the read deadline
			// (draining after Shutdown).
			c.rflags = unix.MSG_DONTWAIT
		}
		// Loaded before the syscall: a Send completing after this point
		// moves sends, so its answer cannot hide behind the hint.
		gen := c.sends.Load()
		if !c.sfd.acquire() {
			return c.ioError(os.ErrClosed)
		}
		c.read(uintptr(c.sfd.fd))
		c.sfd.release()
		switch c.rerr {
		case 0:
			for i := first; i < first+c.rn; i++ {
				if c.hdrs[i].Hdr.Flags&unix.MSG_TRUNC != 0 {
					c.truncs.Add(1)
				}
			}
			c.count = first + c.rn
			c.pktRead = false // until Next decodes a packet of them
			c.drained, c.drainedGen = c.rn < c.rmax, gen
			c.rtime = epochUnix + mono()
			if block {
				c.wantHot = true // packets are coming
				c.hotData = c.hot
			}
			return nil
		case unix.EAGAIN:
			if !block {
				return ErrNoData
			}
			// SO_RCVTIMEO passed: traffic stopped (wait in the scheduler's
			// view from now on), or the safety net; check the state and
			// wait again.
			c.wantHot = false
			continue
		case unix.EINTR:
			c.intrs.Add(1)
			if c.hot {
				// Likely a preemption request or the GC: give way.
				runtime.Gosched()
			}
			continue
		case unix.ENOBUFS:
			// The kernel dropped packets for want of buffer space; they are
			// gone (or accepted with fail-open). Count and go on.
			c.enobufs.Add(1)
			continue
		}
		return fmt.Errorf("nfq: recvmmsg: %w", c.rerr)
	}
}

func (c *Conn) ioError(err error) error {
	switch {
	case c.closed.Load() || errors.Is(err, os.ErrClosed):
		// The raw conn reports internal/poll's "use of closed file".
		return fmt.Errorf("nfq: %w", os.ErrClosed)
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("nfq: read: %w", os.ErrDeadlineExceeded)
	}
	return fmt.Errorf("nfq: %w", err)
}

// ReadTime returns when the last read that returned data completed, in
// nanoseconds on the package's monotonic clock (Mono): the time the
// buffered packets left the kernel's queue, read once per batch.
func (c *Conn) ReadTime() int64 { return c.rtime }

// Buffered reports whether received datagrams are waiting to be decoded, so
// that Next will not need a syscall.
func (c *Conn) Buffered() bool {
	return c.cur < c.count
}

// Drained reports whether a non-blocking Next would return ErrNoData
// without a syscall: nothing is buffered, the last read found the socket
// empty, and no Send since may have drawn an answer (see fill). Like that
// Next, it uses the hint up, so the next non-blocking Next reads the
// socket; when it returns false, that Next does what it would have done.
func (c *Conn) Drained() bool {
	if c.cur < c.count || !c.drained {
		return false
	}
	c.drained = false
	return c.drainedGen == c.sends.Load()
}

// Next decodes the next queued packet into p; p.Payload aliases the
// receive buffer until the next call. When nothing is buffered it reads a
// batch of datagrams: waiting for one if block is set (honouring the read
// deadline and Close), else returning ErrNoData when nothing is queued.
// Kernel error answers (such as ENOENT for a stale verdict) are counted and
// skipped.
func (c *Conn) Next(p *Packet, block bool) error {
	for {
		for c.cur < c.count {
			h := &c.hdrs[c.cur]
			d := c.slots[c.cur][:h.Len]
			if c.off >= len(d) || h.Hdr.Flags&unix.MSG_TRUNC != 0 {
				c.cur++
				c.off = 0
				continue
			}
			var ke KernelError
			c.prvCur, c.prvOff = c.cur, c.off
			n, kind, err := Decode(d[c.off:], p, &ke)
			if err != nil || n == 0 {
				c.cur++
				c.off = 0
				if err != nil {
					return err
				}
				continue
			}
			c.off += n
			if c.off >= len(d) {
				c.cur++ // keep Buffered exact
				c.off = 0
			}
			switch kind {
			case KindPacket:
				c.pktRead = true
				return nil
			case KindError:
				c.kernErrs.Add(1)
				c.lastErrno.Store(uint32(ke.Errno))
				if (ke.Type == msgVerdict || ke.Type == msgVerdictBatch) && ke.Seq != QuietSeq {
					c.verdictErrs.Add(1)
				}
			}
		}
		if !c.pktRead {
			// The last read brought answers only (Close's or the read
			// deadline's wake-up, refused verdicts): no packets are
			// coming, so the wait is not to keep the P.
			c.wantHot = false
		}
		if err := c.fill(block); err != nil {
			return err
		}
	}
}

// SetRefill sets a function called before every read that replaces the
// buffered datagrams, which the payloads Next returned point into. cur is
// the receive area those came from (the last read went there), other the
// second area (see recvArea). The function returns false to have the read
// go to cur again, overwriting it, or true to have it go to other,
// overwriting that: whatever the program still needs from the area chosen
// must be saved first. block says whether the read may wait, so that
// verdicts collected meanwhile can go out before the program waits. It runs
// on the goroutine calling Next and must not call Next.
func (c *Conn) SetRefill(f func(block bool, cur, other []byte) bool) { c.refillFn = f }

// Unread puts back the packet the last Next returned, so that the next
// Next returns it again. Only one packet can be put back, and only before
// the buffer is refilled.
func (c *Conn) Unread() {
	c.cur, c.off = c.prvCur, c.prvOff
}

// Send sends b, one or more netlink messages, in one sendto(2), a raw
// syscall: the kernel handles the messages inside it, never waiting (see
// Conn). It must not run concurrently with itself.
func (c *Conn) Send(b []byte) error {
	if len(b) == 0 {
		return nil
	}
	if c.waiting.Load() && !c.shared.Load() {
		// Another goroutine verdicts while the reader waits: from now on
		// the reader yields to it before every hot wait (see Conn).
		c.shared.Store(true)
	}
	if !c.sfd.acquire() {
		return c.ioError(os.ErrClosed)
	}
	var e syscall.Errno
	if c.fake != nil {
		e = c.fake.Send(b)
	} else {
		for {
			if e = sendto(uintptr(c.sfd.fd), b); e != unix.EINTR {
				break
			}
		}
	}
	c.sfd.release()
	// The kernel handled the messages inside the call, so any answer is
	// in the receive buffer now: the count tells the receive side (see
	// drained).
	c.sends.Add(1)
	if e != 0 {
		return fmt.Errorf("nfq: send: %w", e)
	}
	return nil
}

// Fake stands in for the kernel in benchmarks of the user-space path: with
// it set (SetFake), reads and Sends call its functions instead of the
// socket's syscalls, so that what a benchmark measures is the code around
// them.
type Fake struct {
	// Read fills slots[i] and hdrs[i].Len for the datagrams it returns,
	// from the first on, and returns how many, or an errno (EAGAIN for
	// nothing queued). block says whether the read would wait.
	Read func(hdrs []unix.Mmsghdr, slots [][]byte, block bool) (int, syscall.Errno)
	// Send takes what Send would write to the socket.
	Send func(b []byte) syscall.Errno
}

// SetFake makes c's reads and Sends call f instead of the socket (see
// Fake). It must be called before c is used.
func (c *Conn) SetFake(f *Fake) { c.fake = f }

// SendLimit is the most bytes one Send should carry.
const SendLimit = sendLimit

// Queue returns the bound queue number.
func (c *Conn) Queue() uint16 { return c.queue }

// Fd returns the socket's descriptor, for measurement tools that read and
// write it themselves (internal/benchadapter's floor loops). The Conn still
// owns it: such a tool must be done with it before Close.
func (c *Conn) Fd() int { return c.sfd.fd }

// SetMaxLen sets the queue length while the queue runs. The kernel answers
// only on failure, and that answer is counted by Next. Like StopQueueing,
// it sends a message: it must not run concurrently with Send.
func (c *Conn) SetMaxLen(n uint32) error {
	c.cfg.MaxLen = n
	if c.stopped {
		return nil // stays stopped
	}
	return c.Send(appendConfig(make([]byte, 0, 64), c.seq.Add(1), c.queue, &c.cfg, false))
}

// StopQueueing makes the kernel queue no new packets while the queue keeps
// the packets it holds: queue length 0 with fail-open, so every new packet
// is accepted as if the queue were full. Once it returns, every packet ever
// to reach this socket is already in its receive buffer.
func (c *Conn) StopQueueing() error {
	c.stopped = true
	qc := c.cfg
	qc.MaxLen = 0
	qc.Flags |= FlagFailOpen
	return c.Send(appendConfig(make([]byte, 0, 64), c.seq.Add(1), c.queue, &qc, false))
}

// SetReadBuffer sets the socket receive buffer (SO_RCVBUFFORCE, else
// SO_RCVBUF).
func (c *Conn) SetReadBuffer(n int) error {
	if !c.sfd.acquire() {
		return c.ioError(os.ErrClosed)
	}
	err := SetRcvBuf(c.sfd.fd, n)
	c.sfd.release()
	if err != nil {
		return fmt.Errorf("nfq: set receive buffer: %w", err)
	}
	return nil
}

// SetRcvBuf sets socket fd's receive buffer to n bytes: SO_RCVBUFFORCE,
// which passes net.core.rmem_max with CAP_NET_ADMIN, else SO_RCVBUF, which
// the kernel caps at it.
func SetRcvBuf(fd, n int) error {
	err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, n)
	if err != nil {
		err = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, n)
	}
	return err
}

// SetReadDeadline sets the deadline of blocking Next calls; a zero t means
// none. It wakes a Next waiting meanwhile, which then fails with
// os.ErrDeadlineExceeded if t has passed.
func (c *Conn) SetReadDeadline(t time.Time) error {
	if c.closed.Load() {
		return fmt.Errorf("nfq: %w", os.ErrClosed)
	}
	var dl int64
	d := time.Duration(0)
	if !t.IsZero() {
		d = time.Until(t)
		dl = mono() + int64(d)
		if d > 0 && dl < 0 {
			// Too far ahead for the clock (time.Until saturates at
			// about 292 years, and mono() is added to it): no deadline
			// the process can reach, as Go's poller takes it.
			dl = math.MaxInt64
		}
		dl = max(dl, 1)
	}
	c.dmu.Lock()
	c.deadline.Store(dl)
	if c.dtimer != nil {
		c.dtimer.Stop()
	}
	if dl != 0 && d > 0 {
		// The timer runs after the deadline on the same monotonic clock,
		// so the woken Next sees it expired.
		if c.dtimer == nil {
			c.dtimer = time.AfterFunc(d, c.wake)
		} else {
			c.dtimer.Reset(d)
		}
	}
	c.dmu.Unlock()
	c.wake()
	// A cold wait also ends by its own deadline, the read deadline when it
	// started: end it now, so that it starts again with the new one, should
	// the message fail.
	if c.waiting.Load() {
		c.cold.kick()
	}
	return nil
}

// Stats are counters of a Conn.
type Stats struct {
	Reads        uint64        // receive syscalls (recvmmsg), EmptyReads included; a cold wait counts as one
	EmptyReads   uint64        // non-blocking receive syscalls that found nothing (EAGAIN)
	Waits        uint64        // waits for the first packet (a hot one is a blocking recvmmsg; see Conn), included in Reads
	HotWaits     uint64        // Waits that kept the P, while packets kept coming (see Conn)
	Yields       uint64        // times the reader, on the only P, yielded before a hot wait
	Shared       bool          // a Send ran while a Next waited, so the reader yields every yieldEvery
	Interrupted  uint64        // Waits a signal ended early (EINTR); each is followed by another wait
	Sends        uint64        // send syscalls (one per Send)
	ENOBUFS      uint64        // receive overflows reported to the socket
	Truncated    uint64        // datagrams larger than a receive slot (skipped)
	KernelErrors uint64        // error answers to the messages Send sent (e.g. ENOENT to a verdict)
	LastErrno    syscall.Errno // the last such error
	// VerdictErrors is the part of KernelErrors that answered verdicts:
	// the kernel no longer held the packet (ENOENT: its hook or queue
	// went away after the packet was read), or refused the verdict.
	// Refusals of batches sent with AppendVerdictBatchQuiet are not
	// counted.
	VerdictErrors uint64
}

// Stats returns the counters.
func (c *Conn) Stats() Stats {
	cold, hot := c.coldWaits.Load(), c.hotWaits.Load()
	return Stats{
		Reads:         c.nbReads.Load() + cold + hot,
		EmptyReads:    c.emptyRds.Load(),
		Waits:         cold + hot,
		HotWaits:      hot,
		Yields:        c.yields.Load(),
		Shared:        c.shared.Load(),
		Interrupted:   c.intrs.Load(),
		Sends:         c.sends.Load(),
		ENOBUFS:       c.enobufs.Load(),
		Truncated:     c.truncs.Load(),
		KernelErrors:  c.kernErrs.Load(),
		LastErrno:     syscall.Errno(c.lastErrno.Load()),
		VerdictErrors: c.verdictErrs.Load(),
	}
}

// Close closes the socket. The kernel destroys the queue and drops the
// packets still in it, so verdict them first. Blocked Next calls return an
// error wrapping os.ErrClosed.
func (c *Conn) Close() error {
	c.closed.Store(true)
	c.releaseHot()
	c.dmu.Lock()
	if c.dtimer != nil {
		c.dtimer.Stop()
	}
	c.dmu.Unlock()
	// Wake a waiting Next: it returns, letting go of the socket (closed
	// when the last reference to it ends).
	c.wake()
	c.cold.close()
	if !c.sfd.close() {
		return fmt.Errorf("nfq: close: %w", os.ErrClosed)
	}
	return nil
}
