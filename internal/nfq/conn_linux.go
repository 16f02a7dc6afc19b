package nfq

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
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
	DefaultSlots  = 16   // datagrams per recvmmsg
	DefaultMaxLen = 4096 // queue length
	slotOverhead  = 1024 // netlink, nfgenmsg and attribute headers around the payload
	sendLimit     = 256 << 10
	sndBuf        = 1 << 20
	// maxWait bounds one ppoll of a blocking read: a safety net only, as
	// Close and SetReadDeadline wake the waiter through the eventfd.
	maxWait = 500 * time.Millisecond
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
	// (0 means DefaultSlots).
	Slots int
}

// Conn is a NETLINK_NETFILTER socket bound to one NFQUEUE queue, in the
// network namespace of the thread that opened it. Next honours
// SetReadDeadline, and Close unblocks it.
//
// A blocking Next that finds the socket empty does not park in the Go
// runtime poller: it waits in a blocking ppoll(2) on the socket and an
// eventfd, on its own thread (the runtime hands the P to other goroutines
// meanwhile), so that the kernel wakes the waiting thread directly when a
// packet arrives — one scheduler hop less than the poller's epoll wakeup.
// Close and SetReadDeadline write the eventfd, so a waiter notices them at
// once. The socket is in blocking mode, outside the runtime poller; every
// read is MSG_DONTWAIT.
//
// Next, Buffered and the receive state must be used by one goroutine at a
// time; Send likewise; Next and Send may run concurrently.
type Conn struct {
	f     *os.File
	rc    syscall.RawConn
	queue uint16
	cfg   QueueConfig
	seq   atomic.Uint32

	// receive state
	slots   [][]byte
	hdrs    []unix.Mmsghdr
	iovs    []unix.Iovec
	count   int // datagrams received in the last read
	cur     int // datagram being decoded
	off     int // offset in it
	prvCur  int // position before the last packet Next returned
	prvOff  int
	flushFn func() // called before Next blocks in a read
	stopped bool   // StopQueueing was called (send side state)
	rn      int
	rerr    syscall.Errno
	// drained: the last read returned fewer datagrams than it had slots,
	// so the socket was empty then; the first non-blocking fill after it
	// reports ErrNoData without a syscall (once), unless a message went
	// to the kernel since (sendGen moved: its answer may be waiting).
	drained    bool
	drainedGen uint32
	ctlFn      func(fd uintptr)

	// blocking wait (see pollWait)
	efd      int // eventfd that Close and SetReadDeadline write
	pfds     [2]unix.PollFd
	pts      unix.Timespec
	ebuf     [8]byte
	werr     error
	waitFn   func(fd uintptr)
	waiting  atomic.Bool  // a Next is in pollWait: wake it on changes
	deadline atomic.Int64 // read deadline on the mono clock; 0: none
	emu      sync.Mutex   // guards efdOpen and efdUsers
	efdOpen  bool         // Close has not let go of efd
	efdUsers int          // pollWait calls using efd; the last one out after Close closes it

	// send state
	sbuf    []byte
	serr    syscall.Errno
	writeFn func(fd uintptr) bool

	sendGen atomic.Uint32 // bumped after every completed Send

	closed    atomic.Bool
	reads     atomic.Uint64
	emptyRds  atomic.Uint64
	polls     atomic.Uint64
	sends     atomic.Uint64
	enobufs   atomic.Uint64
	truncs    atomic.Uint64
	kernErrs  atomic.Uint64
	lastErrno atomic.Uint32
}

// Open opens a socket and binds a queue as cfg says.
func Open(cfg Config) (*Conn, error) {
	if cfg.CopyRange == 0 || cfg.CopyRange > MaxCopyRange {
		cfg.CopyRange = MaxCopyRange
	}
	if cfg.MaxLen == 0 {
		cfg.MaxLen = DefaultMaxLen
	}
	if cfg.Slots <= 0 {
		cfg.Slots = DefaultSlots
	}
	// A blocking socket: os.NewFile then leaves it out of the runtime
	// poller, whose epoll would otherwise wake a thread for every packet
	// that finds the socket empty, in parallel with the waiting Next
	// (see pollWait). Reads are MSG_DONTWAIT; writes to the kernel never
	// wait for the peer.
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
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("nfq: eventfd: %w", err)
	}
	c := &Conn{
		efd:     efd,
		efdOpen: true,
		f:       os.NewFile(uintptr(fd), "nfqueue"),
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
	if c.rc, err = c.f.SyscallConn(); err != nil {
		c.Close()
		return nil, fmt.Errorf("nfq: %w", err)
	}
	if cfg.RcvBuf > 0 {
		if err := c.SetReadBuffer(cfg.RcvBuf); err != nil {
			c.Close()
			return nil, err
		}
	}
	c.initRecv(cfg.Slots, int(cfg.CopyRange)+slotOverhead)
	c.sbuf = make([]byte, 0, 64<<10)
	c.writeFn = c.write

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

func socketError(what string, err error) error {
	switch {
	case errors.Is(err, unix.EPROTONOSUPPORT), errors.Is(err, unix.EAFNOSUPPORT):
		return fmt.Errorf("nfq: %s: %w (%w)", what, ErrUnsupported, err)
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return fmt.Errorf("nfq: %s: %w (NFQUEUE needs CAP_NET_ADMIN)", what, err)
	}
	return fmt.Errorf("nfq: %s: %w", what, err)
}

// hasNetAdmin reports whether the effective capability set holds
// CAP_NET_ADMIN.
func hasNetAdmin() bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return os.Geteuid() == 0
	}
	return data[0].Effective&(1<<unix.CAP_NET_ADMIN) != 0
}

func (c *Conn) bind(queue uint16, auto bool) error {
	for q := int(queue); q <= 0xffff; q++ {
		err := c.request(appendCmd(nil, c.seq.Add(1), uint16(q), cmdBind))
		if err == nil {
			c.queue = uint16(q)
			return nil
		}
		busy := errors.Is(err, unix.EBUSY) || (errors.Is(err, unix.EPERM) && hasNetAdmin())
		switch {
		case busy && auto:
			continue
		case busy:
			return fmt.Errorf("nfq: bind queue %d: %w (%w)", q, ErrQueueBusy, err)
		case errors.Is(err, unix.EPERM):
			return fmt.Errorf("nfq: bind queue %d: %w (NFQUEUE needs CAP_NET_ADMIN)", q, err)
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
	seq := ne.Uint32(msg[8:12])
	if err := c.Send(msg); err != nil {
		return err
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		// Look through what is buffered.
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
				off += n
			}
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

func (c *Conn) initRecv(n, size int) {
	arena := make([]byte, n*size)
	c.slots = make([][]byte, n)
	c.hdrs = make([]unix.Mmsghdr, n)
	c.iovs = make([]unix.Iovec, n)
	for i := range c.slots {
		c.slots[i] = arena[i*size : (i+1)*size : (i+1)*size]
		c.iovs[i].Base = &c.slots[i][0]
		c.iovs[i].SetLen(size)
		c.hdrs[i].Hdr.Iov = &c.iovs[i]
		c.hdrs[i].Hdr.SetIovlen(1)
	}
	c.ctlFn = c.read
	c.waitFn = func(fd uintptr) { c.werr = c.pollWait(int32(fd)) }
}

// read is one non-blocking recvmmsg into c.hdrs.
func (c *Conn) read(fd uintptr) {
	for i := range c.hdrs {
		c.hdrs[i].Len = 0
		c.hdrs[i].Hdr.Flags = 0
	}
	n, _, e := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&c.hdrs[0])), uintptr(len(c.hdrs)), unix.MSG_DONTWAIT, 0, 0)
	c.reads.Add(1)
	if e == unix.EAGAIN {
		c.emptyRds.Add(1)
	}
	c.rn, c.rerr = int(n), e
}

// pollWait blocks the calling thread in ppoll(2) until the socket fd is
// readable (nil), the Conn is closed (os.ErrClosed) or the read deadline
// passes (os.ErrDeadlineExceeded). It runs inside rc.Control, whose
// reference keeps fd from being closed under it; efd is kept open by
// efdUsers.
func (c *Conn) pollWait(fd int32) error {
	c.emu.Lock()
	if !c.efdOpen {
		c.emu.Unlock()
		return os.ErrClosed
	}
	c.efdUsers++
	c.emu.Unlock()
	defer func() {
		c.emu.Lock()
		c.efdUsers--
		if !c.efdOpen && c.efdUsers == 0 {
			unix.Close(c.efd)
		}
		c.emu.Unlock()
	}()
	// waiting is set before the state is checked, and Close and
	// SetReadDeadline change the state before they look at waiting: either
	// the check below sees the change, or they write the eventfd.
	c.waiting.Store(true)
	defer c.waiting.Store(false)
	for {
		if c.closed.Load() {
			return os.ErrClosed
		}
		timeout := int64(maxWait)
		if dl := c.deadline.Load(); dl != 0 {
			rem := dl - mono()
			if rem <= 0 {
				return os.ErrDeadlineExceeded
			}
			timeout = min(rem, timeout)
		}
		c.pfds[0] = unix.PollFd{Fd: fd, Events: unix.POLLIN}
		c.pfds[1] = unix.PollFd{Fd: int32(c.efd), Events: unix.POLLIN}
		c.pts = unix.NsecToTimespec(timeout)
		_, _, e := unix.Syscall6(unix.SYS_PPOLL, uintptr(unsafe.Pointer(&c.pfds[0])), 2, uintptr(unsafe.Pointer(&c.pts)), 0, 0, 0)
		c.polls.Add(1)
		switch e {
		case 0:
		case unix.EINTR:
			continue
		default:
			return fmt.Errorf("ppoll: %w", e)
		}
		if c.pfds[1].Revents != 0 {
			// Woken: reset the eventfd, then check the state again.
			unix.Syscall(unix.SYS_READ, uintptr(c.efd), uintptr(unsafe.Pointer(&c.ebuf[0])), uintptr(len(c.ebuf)))
			continue
		}
		if c.pfds[0].Revents != 0 {
			return nil // readable, or an error the read reports
		}
	}
}

// wake makes a Next waiting in pollWait check the state again.
func (c *Conn) wake() {
	if !c.waiting.Load() {
		return
	}
	c.emu.Lock()
	if c.efdOpen {
		one := [8]byte{1}
		unix.Write(c.efd, one[:])
	}
	c.emu.Unlock()
}

// epoch anchors mono.
var epoch = time.Now()

// mono is nanoseconds on the monotonic clock since the package started.
func mono() int64 { return int64(time.Since(epoch)) }

// expired reports whether the read deadline has passed.
func (c *Conn) expired() bool {
	dl := c.deadline.Load()
	return dl != 0 && mono() >= dl
}

// fill reads datagrams into the buffer. With datagrams still buffered
// (request looking for its answer) it appends after them; otherwise the
// buffer is fully consumed and is reused from the start.
//
// A non-blocking fill right after a read that left slots free (the socket
// was empty at that moment) returns ErrNoData without a syscall: such a
// read would almost always fail with EAGAIN, and a batch receive loop
// issues one after every partial read. The shortcut is taken once per read
// and never after a Send completed since the read, so a caller that polls
// again, or that sent something drawing an answer, does read the socket.
func (c *Conn) fill(block bool) error {
	if !block && c.drained {
		c.drained = false
		if c.drainedGen == c.sendGen.Load() {
			return ErrNoData
		}
	}
	if c.cur < c.count {
		// request: keep what is buffered, read into the free slots.
		return c.readInto(c.count, block)
	}
	c.count, c.cur, c.off = 0, 0, 0
	return c.readInto(0, block)
}

func (c *Conn) readInto(first int, block bool) error {
	if first >= len(c.hdrs) {
		return ErrNoData
	}
	hdrs := c.hdrs
	c.hdrs = c.hdrs[first:]
	defer func() { c.hdrs = hdrs }()
	c.drained = false
	for {
		if block && c.expired() {
			// As a read in the runtime poller: a passed deadline fails a
			// blocking read even when data is queued.
			return c.ioError(os.ErrDeadlineExceeded)
		}
		// Loaded before the syscall: a Send completing after this point
		// moves sendGen, so its answer cannot hide behind the hint.
		gen := c.sendGen.Load()
		// A non-blocking read works even past the read deadline
		// (draining after Shutdown).
		if err := c.rc.Control(c.ctlFn); err != nil {
			return c.ioError(err)
		}
		switch c.rerr {
		case 0:
			for i := 0; i < c.rn; i++ {
				if c.hdrs[i].Hdr.Flags&unix.MSG_TRUNC != 0 {
					c.truncs.Add(1)
				}
			}
			c.count = first + c.rn
			c.drained, c.drainedGen = c.rn < len(c.hdrs), gen
			return nil
		case unix.EAGAIN:
			if !block {
				return ErrNoData
			}
			if err := c.rc.Control(c.waitFn); err != nil {
				return c.ioError(err)
			}
			if c.werr != nil {
				err := c.werr
				c.werr = nil
				return c.ioError(err)
			}
			continue
		case unix.EINTR:
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

// Buffered reports whether received datagrams are waiting to be decoded, so
// that Next will not need a syscall.
func (c *Conn) Buffered() bool {
	return c.cur < c.count
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
				return nil
			case KindError:
				c.kernErrs.Add(1)
				c.lastErrno.Store(uint32(ke.Errno))
			}
		}
		if block && c.flushFn != nil {
			c.flushFn()
		}
		if err := c.fill(block); err != nil {
			return err
		}
	}
}

// SetFlush sets a function Next calls before every read that may block, so
// that verdicts collected meanwhile go out before the program waits. It
// must not call Next.
func (c *Conn) SetFlush(f func()) { c.flushFn = f }

// Unread puts back the packet the last Next returned, so that the next
// Next returns it again. Only one packet can be put back, and only before
// the buffer is refilled.
func (c *Conn) Unread() {
	c.cur, c.off = c.prvCur, c.prvOff
}

func (c *Conn) write(fd uintptr) bool {
	b := c.sbuf
	_, _, e := unix.Syscall(unix.SYS_WRITE, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
	if e == unix.EAGAIN {
		return false
	}
	c.serr = e
	return true
}

// Send sends b, one or more netlink messages, in one sendmsg. It must not
// run concurrently with itself.
func (c *Conn) Send(b []byte) error {
	if len(b) == 0 {
		return nil
	}
	c.sbuf = b
	for {
		if err := c.rc.Write(c.writeFn); err != nil {
			c.sbuf = nil
			return c.ioError(err)
		}
		if c.serr != unix.EINTR {
			break
		}
	}
	c.sbuf = nil
	c.sends.Add(1)
	// The kernel handled the messages inside the write, so any answer is
	// in the receive buffer now.
	c.sendGen.Add(1)
	if c.serr != 0 {
		return fmt.Errorf("nfq: send: %w", c.serr)
	}
	return nil
}

// SendLimit is the most bytes one Send should carry.
const SendLimit = sendLimit

// Queue returns the bound queue number.
func (c *Conn) Queue() uint16 { return c.queue }

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
	var err error
	cerr := c.rc.Control(func(fd uintptr) {
		err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, n)
		if err != nil {
			err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, n)
		}
	})
	if cerr != nil {
		return c.ioError(cerr)
	}
	if err != nil {
		return fmt.Errorf("nfq: set receive buffer: %w", err)
	}
	return nil
}

// SetReadDeadline sets the deadline of blocking Next calls; a zero t means
// none. It wakes a Next waiting meanwhile, which then fails with
// os.ErrDeadlineExceeded if t has passed.
func (c *Conn) SetReadDeadline(t time.Time) error {
	if c.closed.Load() {
		return fmt.Errorf("nfq: %w", os.ErrClosed)
	}
	var dl int64
	if !t.IsZero() {
		dl = max(mono()+int64(time.Until(t)), 1)
	}
	c.deadline.Store(dl)
	c.wake()
	return nil
}

// Stats are counters of a Conn.
type Stats struct {
	Reads        uint64        // receive syscalls (recvmmsg), EmptyReads included
	EmptyReads   uint64        // receive syscalls that found nothing (EAGAIN)
	Waits        uint64        // ppoll syscalls of blocking reads waiting for the socket (wakeups included)
	Sends        uint64        // send syscalls (one per Send)
	ENOBUFS      uint64        // receive overflows reported to the socket
	Truncated    uint64        // datagrams larger than a receive slot (skipped)
	KernelErrors uint64        // error answers to verdicts (e.g. ENOENT)
	LastErrno    syscall.Errno // the last such error
}

// Stats returns the counters.
func (c *Conn) Stats() Stats {
	return Stats{
		Reads:        c.reads.Load(),
		EmptyReads:   c.emptyRds.Load(),
		Waits:        c.polls.Load(),
		Sends:        c.sends.Load(),
		ENOBUFS:      c.enobufs.Load(),
		Truncated:    c.truncs.Load(),
		KernelErrors: c.kernErrs.Load(),
		LastErrno:    syscall.Errno(c.lastErrno.Load()),
	}
}

// Close closes the socket. The kernel destroys the queue and drops the
// packets still in it, so verdict them first. Blocked Next calls return an
// error wrapping os.ErrClosed.
func (c *Conn) Close() error {
	c.closed.Store(true)
	// Wake a waiting Next: it returns, letting go of the socket (closed
	// when the last reference to it ends) and of the eventfd (closed here
	// or, if a Next still uses it, by that Next).
	c.wake()
	err := c.f.Close()
	c.emu.Lock()
	if c.efdOpen {
		c.efdOpen = false
		if c.efdUsers == 0 {
			unix.Close(c.efd)
		}
	}
	c.emu.Unlock()
	if err != nil {
		return c.ioError(err)
	}
	return nil
}
