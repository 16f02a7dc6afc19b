package divert

// FreeBSD backend: a native divert(4) socket, fed by ipfw rules the handle
// installs from its filter.
//
// Socket: socket(PF_DIVERT=44, SOCK_RAW, 0) on FreeBSD 14 and later, else
// socket(AF_INET, SOCK_RAW, IPPROTO_DIVERT=258). One socket carries IPv4 and
// IPv6. Packets move with raw recvmsg/sendto on the non-blocking descriptor
// through the runtime poller (deadlines, Close unblocks), so that the
// sockaddr survives whole: rule number in sin_port, interface name in
// sin_zero (x/sys's Recvfrom drops the name and byte-swaps the rule).
//
// Rules: Open lowers the filter (package internal/ipfw) to rules
// "ipfw add NUM set SET divert PORT ...", runs /sbin/ipfw to install them,
// and deletes the set on Close (only the rules carrying the handle's tag:
// after an "ipfw flush" the set may be another handle's; see Close below). NUM comes from the priority (1000 for
// PriorityHighest, 31000 for 0, 61000 for PriorityLowest; every rule of
// the handle shares it; see below for equal priorities), SET is a set of
// 1..30 that holds no rules (one per handle, so at most 30 handles with
// rules at once), and every rule carries the comment "netdivert pid=PID
// port=PORT prio=PRIORITY start=START", START being when the process
// started (microseconds of uptime). Sets holding only such rules of
// processes that no longer run are deleted at the next Open (in a set that
// also holds another program's rule, such rules are, by number, unless one
// of that program's has their number: ipfw.PlanSets): a process
// that has the PID but another start is another process (ownerAlive), and
// a rule of the opening process's own PID without a start (an earlier
// release's tag) is its own only when its set and port are among the
// process's rules (ruleAlive). No new handle's socket is bound to a port
// that such rules divert to (busyPorts): until they are deleted it would
// receive their packets. The port is chosen from a listing taken under the
// ipfw lock (below) and bound before the lock is released
// (ipfwSys.choosePort); an OpenPort handle, which installs no rules, needs
// the lock neither to open nor to shut down, and its Shutdown takes it
// only when it can (ipfwSys.choosePortNoRules). Rule changes are serialised between processes with flock on
// /var/run/netdivert-ipfw.lock; a deletion that finds its rules gone (ipfw's
// "rule N not found": something that does not take the lock deleted them
// since they were listed) has done its work (ipfwSys.deleteNumber). The IP_FW3 socket option would avoid the
// exec but its opcode stream is an internal ABI that changed in FreeBSD 15.
//
// The rules over-approximate the filter; unless they are exact, Recv
// evaluates the filter and writes packets it does not match straight back
// (resuming after the handle's rule), so the program never sees them.
//
// Semantics and limits:
//   - Layers: LayerNetwork and LayerNetworkForward. Inbound packets that
//     will be forwarded also reach a LayerNetwork handle (ipfw cannot tell
//     them apart before routing).
//   - FlagSniff installs "tee" rules. FlagDrop installs "deny" rules when
//     they match exactly what the filter does; otherwise divert rules, and
//     a goroutine of the handle drops the packets the filter matches and
//     writes the others back. ipfw divert reassembles fragments, so
//     FlagReassemble is native and FlagFragments is not supported; a tee
//     does not, so a FlagSniff handle gets fragments as they come (only a
//     first fragment can match a transport field). A term with transport
//     tests also gets "frag" and "frag mf" rules, which take every
//     fragmented datagram whatever its ports, so that it reaches the socket
//     whole; user space then judges it. A term that tests a protocol, port,
//     flag or type and can match IPv6 also gets rules that take, whatever
//     the filter, the IPv6 packets whose extension headers ipfw walks
//     otherwise than WinDivert (a Mobility header, every IPv6 fragment,
//     and, for the protocols of extension headers, every packet with one;
//     see package internal/ipfw): such a handle's rules are never exact,
//     and user space judges those packets. There is no fail-open:
//     FlagPassThrough and FlagFailOpen are not supported (with no reader,
//     packets are dropped).
//   - A handle opened while others of equal priority have rules gets the
//     first number above theirs (and below every handle of lower
//     priority), so that every one of them sees a packet the others write
//     back (WinDivert too orders equal priorities by open time, newest first,
//     though its documentation leaves the order undefined).
//     When the numbers are so packed that none fits, it shares the number
//     of the last handle of higher or equal priority, and then does not
//     see what that one writes back
//     (ipfw.PlanNumber).
//   - Send checks that a packet is one whole IP packet, and leaves out
//     bytes past its length, as WinDivert does (sendable): divert(4)
//     reports only some malformed packets.
//   - Params: ParamQueueSize sets SO_RCVBUF and SO_SNDBUF (bounded by
//     kern.ipc.maxsockbuf: Open takes the largest size allowed and Param
//     reports it; SetParam past it fails); ParamQueueLength and
//     ParamQueueTime have no kernel counterpart and are kept but not
//     enforced (a packet waits in the socket buffer until read).
//   - Address: Outbound comes from sin_addr (zero means outbound), except
//     for an inbound packet on an interface without an IPv4 address, to
//     which the kernel gives a zero sin_addr, as to a forwarded one, and
//     the interface's name, as to a forwarded one (divertInbound). At
//     LayerNetwork the handle's rules take outbound packets only when the
//     host made them, so such a packet is inbound; an OpenPort handle
//     takes it for inbound when the interface has no IPv4 address and
//     the destination is one of the host's addresses or link-scoped (never
//     forwarded), else for forwarded. It is reported and written back so.
//     IfIdx comes from the interface
//     name in sin_zero, which the kernel cuts to 7 bytes: a 7-byte name
//     may stand for several interfaces ("bridge1" for "bridge1" and
//     "bridge10"), and sin_addr, an inbound packet's interface's first
//     IPv4 address, tells them apart; IfIdx is 0 when it cannot. Written
//     back, the kernel looks the name up exactly (ifunit) and would take
//     "bridge1": such a packet goes back without its name, by its address,
//     and when the address cannot pick the interface either (none, or
//     another interface's too) Send refuses to send it back as received
//     (ErrNotSupported) and a packet written back unseen is lost
//     (bsdaddr.ResolveRecv). A forwarded packet's outbound sockaddr names
//     the interface it came in on (ipfw's recv option reads it); a cut
//     name that may stand for another interface is cleared.
//     Loopback is set for packets received on a loopback interface: a
//     packet from the host to itself is seen twice, outbound (Loopback
//     false: it has no receiving interface yet) and inbound on lo0
//     (WinDivert shows it once, outbound). Impostor is never set.
//     Timestamp is time.Now at receipt. TCPChecksum and UDPChecksum are
//     set for the outbound packets the host made, whose delayed checksums
//     divert_packet finishes, except IPv6 ones before FreeBSD 14, and
//     never for forwarded packets, whose checksums nobody checked;
//     IPChecksum for inbound IPv4 packets whose header checksum is right,
//     except on a loopback interface: the kernel verified most, but a
//     broadcast the host sent and loops back on its interface comes
//     marked verified without a header checksum (divertChecksums).
//   - New packets (a fresh Address, or a received one with Outbound
//     reversed) resume after the handle's rule number, so that its own
//     rules and those of higher priority skip them. An OpenPort handle
//     has no rules: its new packets resume after the highest rule number
//     its received packets of that direction carried (or, before any,
//     of the other direction), so that the administrator's rule does not
//     divert them back to it; before the handle has received a packet
//     they run the whole ruleset, and may come back to it
//     (resumePoints).
//   - Drop is a no-op: a received packet is gone unless written back.
//   - Shutdown(ShutdownRecv) removes the rules, then Recv drains the socket
//     and returns ErrShutdown. An OpenPort handle has no rules to remove:
//     its socket moves to a free divert port, keeping what is queued, and
//     a new socket bound to the rule's port writes back unchanged, until
//     Close, what the rule takes from then on (with FlagSniff, whose tee
//     rule lets the packets go on, none is needed), so that they pass
//     after the rule as they do on Linux (detachPort). FreeBSD 13 cannot
//     move a bound divert socket: there the rule's packets keep coming to
//     the handle's socket, and Recv returns them.
//   - Close removes the rules (after a Shutdown that is removing them at
//     the same time: setClaim; rules that Shutdown failed to remove are
//     tried again, and a failing ipfw up to closeAttempts times). Rules
//     it cannot remove stay installed, and what they divert is dropped
//     (divert_packet finds no socket on the port), until a later Open or
//     Close of the process removes them (leftSets); Close then returns
//     the error. Removal deletes the handle's set, or, when someone else
//     added rules to it, the set's rules numbered as the handle's; when
//     one of those others has the handle's number too, ipfw cannot delete
//     the handle's rules without it (it deletes by set and number only),
//     and they stay (ipfw.RemoveShared). Close then writes back unchanged
//     the packets left
//     unread in the socket (not for FlagSniff, whose packets are copies).
//     A packet the program holds (received, not sent back) is lost, as
//     with Drop.
//   - An Open whose rules ipfw refuses partway deletes the ones it added
//     as Close does, and those it cannot delete are left so too (and no
//     later handle binds their port): setClaim.addRules.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/filter"
	"github.com/netdivert/divert/internal/bsdaddr"
	"github.com/netdivert/divert/internal/ipfw"
)

const (
	afDivert     = 44 // PF_DIVERT, FreeBSD 14+ (x/sys lacks it)
	ipfwPath     = "/sbin/ipfw"
	ipfwLockPath = "/var/run/netdivert-ipfw.lock"
)

// bsdIPFW runs ipfw and takes the lock (ipfwSys).
var bsdIPFW = &ipfwSys{
	run:   runIPFW,
	lock:  lockIPFW,
	pause: closePause,
	alive: processAlive,
	pid:   os.Getpid(),
	live:  &bsdLive,
	left:  &bsdLeft,
}

// sysAddr is the sockaddr a packet was received with.
type sysAddr struct {
	owner uint32 // serial of the handle that received the packet (userStats); 0 for new packets
	out   bool   // the Outbound it was received with (userStats)
	sa    bsdaddr.Sockaddr
	ifIdx uint32          // IfIdx reported at Recv
	fix   bsdaddr.NameFix // what sa's interface name needed (sa has it done; NameRefuse: sa cannot go back as received)
	valid bool
}

type bsdBackend struct {
	f      *os.File
	rc     syscall.RawConn
	filt   *filter.Filter // nil: every packet matches (OpenPort, or exact rules)
	layer  Layer
	flags  Flag
	rule   uint16 // resume point for new packets: the handle's rule number, or 0
	port   uint16
	major  uint64 // FreeBSD major release (0: unknown), for the checksum bits
	ifs    ifCache
	states sync.Pool // *bsdIO

	sets     setClaim // our ipfw set (see setClaim)
	shutRecv atomic.Bool
	closed   atomic.Bool // close has begun (see mapErr)
	// ownNamed: the handle's own LayerNetwork rules divert inbound packets
	// ("in") and locally generated outbound ones ("out not recv *"), so a
	// packet that carries a receiving interface's name is inbound even when
	// sin_addr is zero (an interface without an IPv4 address).
	ownNamed bool

	userStats // divert(4) counts nothing for a socket
	// dropper: FlagDrop with rules that are not exact diverts instead, and
	// this goroutine drops what the filter matches and writes the rest
	// back (see install). Closed when it ends; nil without one.
	dropper chan struct{}

	// openPort: an administrator's rule, not the handle's, feeds the
	// socket (OpenPort). Shutdown then moves the socket off the rule's
	// port (detach). New packets resume after the rules seen feeding the
	// handle (resumePoints).
	openPort bool
	seen     resumePoints
	mu       sync.Mutex
	detached bool    // guarded by mu: detach has run
	closing  bool    // guarded by mu: close has begun, detach must not start a passer
	passer   *passer // guarded by mu: see detachPort; nil if none
}

// passer is the socket bound to an OpenPort handle's divert port after
// Shutdown(ShutdownRecv), with the goroutine that writes back what it
// receives (see detachPort).
type passer struct {
	f    *os.File
	rc   syscall.RawConn
	stop atomic.Bool   // close has begun: write back what is queued, then end
	done chan struct{} // closed when the goroutine ends
}

// layerSupport refuses, before Open looks at anything else, a layer the OS
// has no counterpart of.
func layerSupport(l Layer) error {
	switch l {
	case LayerNetwork, LayerNetworkForward:
		return nil
	}
	return fmt.Errorf("%w: layer %v on freebsd", ErrNotSupported, l)
}

func openBackend(cfg *openConfig) (backend, error) {
	if err := layerSupport(cfg.layer); err != nil {
		return nil, err
	}
	if cfg.flags&FlagFragments != 0 {
		return nil, fmt.Errorf("%w: FlagFragments on freebsd (ipfw divert always reassembles)", ErrNotSupported)
	}
	if cfg.flags&(FlagPassThrough|FlagFailOpen) != 0 {
		return nil, fmt.Errorf("%w: FlagPassThrough/FlagFailOpen on freebsd (divert(4) has no fail-open)", ErrNotSupported)
	}
	fd, err := divertSocket()
	if err != nil {
		return nil, err
	}
	b := &bsdBackend{layer: cfg.layer, flags: cfg.flags, openPort: cfg.port >= 0}
	b.sets.init()
	b.major, _ = b.version()
	b.userStats.init(cfg.flags)
	b.states.New = func() any { return newBSDIO(b) }
	// The default QueueSize exceeds kern.ipc.maxsockbuf on stock systems
	// (FreeBSD has no SO_RCVBUFFORCE): the handle then gets the largest
	// buffers the limit allows, and Param reports what is in force
	// (SetParam past the limit is an error).
	cfg.params[ParamQueueSize] = fitBuffers(fd, int(cfg.params[ParamQueueSize]))
	if cfg.port >= 0 {
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: cfg.port}); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("divert: bind divert port %d: %w", cfg.port, os.NewSyscallError("bind", err))
		}
		b.port = uint16(cfg.port)
	} else if b.port, err = bindAuto(fd); err != nil {
		unix.Close(fd)
		return nil, err
	}
	b.f = os.NewFile(uintptr(fd), "divert:"+strconv.Itoa(int(b.port)))
	if b.rc, err = b.f.SyscallConn(); err != nil {
		b.f.Close()
		return nil, fmt.Errorf("divert: %w", err)
	}
	if cfg.filter != nil {
		if err := b.install(cfg); err != nil {
			b.f.Close()
			return nil, err
		}
	}
	if b.dropper != nil {
		go b.drop1()
	}
	return b, nil
}

// drop1 is the user-space half of a FlagDrop handle whose filter ipfw
// cannot express exactly: its divert rules bring every packet that may
// match, recvOne writes back the ones the filter does not match, and the
// ones it returns are dropped by not writing them back. It ends when the
// handle is shut down or closed.
func (b *bsdBackend) drop1() {
	defer close(b.dropper)
	buf := make([]byte, MTUMax)
	var a Address
	for {
		if _, err := b.recvOne(buf, &a, true); err != nil && !errors.Is(err, ErrTruncated) {
			if b.closed.Load() || b.shutRecv.Load() || errors.Is(err, ErrShutdown) {
				return
			}
			// A transient error (ENOBUFS...): go on, but not in a spin.
			time.Sleep(10 * time.Millisecond)
			continue
		}
		b.dropped.Add(1) // not written back: dropped
	}
}

func divertSocket() (int, error) {
	const typ = unix.SOCK_RAW | unix.SOCK_NONBLOCK | unix.SOCK_CLOEXEC
	fd, err := unix.Socket(afDivert, typ, 0)
	if err == unix.EAFNOSUPPORT || err == unix.EPROTONOSUPPORT || err == unix.EPFNOSUPPORT {
		fd, err = unix.Socket(unix.AF_INET, typ, unix.IPPROTO_DIVERT)
	}
	if err != nil {
		if err == unix.EAFNOSUPPORT || err == unix.EPROTONOSUPPORT || err == unix.EPFNOSUPPORT {
			return -1, fmt.Errorf("%w: divert sockets unavailable (kldload ipdivert): %w", ErrNotSupported, os.NewSyscallError("socket", err))
		}
		return -1, fmt.Errorf("divert: open divert socket: %w", os.NewSyscallError("socket", err))
	}
	return fd, nil
}

func bindAuto(fd int) (uint16, error) {
	// Not a port that rules still divert to (a closed handle's left ones,
	// a dead process's stale ones): the handle would get their packets.
	// Chosen under the ipfw lock (ipfwSys.choosePort).
	return bsdIPFW.bindAuto(fdSock(fd), os.Getpid()%divertPorts)
}

// fdSock is a divert socket's descriptor as a portSock.
type fdSock int

func (s fdSock) bind(port uint16) error {
	return os.NewSyscallError("bind", unix.Bind(int(s), &unix.SockaddrInet4{Port: int(port)}))
}

func (s fdSock) close() error { return unix.Close(int(s)) }

// divertBufMin is the kernel's default divert socket buffer (DIVRCVQ,
// DIVSNDQ: 65536+100), room for one whole datagram and its sockaddr: a
// smaller ParamQueueSize (its minimum is 65535) gets it instead.
const divertBufMin = 65536 + 100

func setBuffers(fd, size int) error {
	size = max(size, divertBufMin)
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, size); err != nil {
		return os.NewSyscallError("setsockopt SO_RCVBUF", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, size); err != nil {
		return os.NewSyscallError("setsockopt SO_SNDBUF", err)
	}
	return nil
}

// fitBuffers sets both buffers to size, or else to the largest size the
// kernel accepts (a binary search: the limit derives from
// kern.ipc.maxsockbuf by a formula that has changed between releases), and
// returns the receive buffer's size then in force, within ParamQueueSize's
// range.
func fitBuffers(fd, size int) uint64 {
	if setBuffers(fd, size) != nil {
		lo, hi := 0, size // lo fits (0: none found yet), hi does not
		for try := divertBufMin; hi-lo > 4096; try = lo + (hi-lo)/2 {
			if setBuffers(fd, try) == nil {
				lo = try
			} else {
				hi = try
			}
			if lo == 0 && try == divertBufMin {
				break // not even one datagram's room: the kernel's defaults stay
			}
		}
	}
	got, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF)
	if err != nil {
		return uint64(size)
	}
	return uint64(min(max(got, QueueSizeMin), QueueSizeMax))
}

// install adds the handle's ipfw rules.
func (b *bsdBackend) install(cfg *openConfig) error {
	// New packets resume after the handle's rule number, so that handles
	// of equal or higher priority do not take them (a send-only handle
	// too: its priority still places its injections).
	b.rule = ipfw.RuleNumber(cfg.priority)
	if cfg.flags&FlagSendOnly != 0 {
		return nil // an injection-only handle diverts nothing
	}
	action := ipfw.Divert
	switch {
	case cfg.flags&FlagSniff != 0:
		action = ipfw.Tee
	case cfg.flags&FlagDrop != 0:
		action = ipfw.Deny
	}
	lowered := cfg.filter.Lower()
	var res ipfw.Result
	number, err := bsdIPFW.install(&b.sets, cfg.priority, b.port, func(number uint16, set uint8) ([]ipfw.Rule, error) {
		lcfg := ipfw.Config{
			Number:  number,
			Set:     set,
			Port:    b.port,
			Action:  action,
			Forward: cfg.layer == LayerNetworkForward,
			IfName:  ifName,
			Tag:     ipfw.Tag(os.Getpid(), ownStart(), b.port, cfg.priority),
		}
		var err error
		res, err = ipfw.Lower(lowered, lcfg)
		if err == nil && action == ipfw.Deny && !res.Exact {
			// Deny rules wider than the filter would drop packets it does
			// not match: divert instead, and drop in user space
			// (startDropper).
			lcfg.Action = ipfw.Divert
			res, err = ipfw.Lower(lowered, lcfg)
			b.dropper = make(chan struct{})
		}
		if err != nil {
			return nil, fmt.Errorf("divert: %w", err)
		}
		return res.Rules, nil
	})
	b.rule = number
	if err != nil {
		return err
	}
	if !res.Exact {
		b.filt = cfg.filter
	}
	b.ownNamed = cfg.layer == LayerNetwork
	if len(res.Rules) == 0 {
		// The filter matches nothing: no rules, and no set claimed.
		b.dropper = nil
	}
	return nil
}

// removeRules deletes the handle's rules, once: a Shutdown and a Close at
// once delete them one after the other, and the second waits for the
// first (setClaim).
func (b *bsdBackend) removeRules() error {
	return bsdIPFW.remove(&b.sets, b.rule, b.port)
}

// removeRulesAtClose deletes the handle's rules at Close, trying again
// when ipfw fails; rules it cannot delete are left to the process's later
// Opens and Closes (ipfwSys.removeAtClose).
func (b *bsdBackend) removeRulesAtClose() error {
	return bsdIPFW.removeAtClose(&b.sets, b.rule, b.port)
}

// closePause is the pause before the try-th new attempt at deleting
// rules (removeAtClose); the ipfw lock is not held.
func closePause(try int) { time.Sleep(time.Duration(try) * 20 * time.Millisecond) }

func lockIPFW() (func(), error) {
	f, err := os.OpenFile(ipfwLockPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("divert: ipfw lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("divert: ipfw lock: %w", os.NewSyscallError("flock", err))
	}
	return func() { f.Close() }, nil
}

func runIPFW(args ...string) (string, error) {
	out, err := exec.Command(ipfwPath, args...).CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if errors.Is(err, exec.ErrNotFound) || errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("%w: %s not found: %w", ErrNotSupported, ipfwPath, err)
		}
		if strings.Contains(msg, "ermission denied") || strings.Contains(msg, "not permitted") {
			return "", fmt.Errorf("divert: ipfw %s: %s: %w", strings.Join(args, " "), msg, os.ErrPermission)
		}
		if strings.Contains(msg, "Protocol not available") {
			return "", fmt.Errorf("%w: ipfw is not loaded (kldload ipfw): %s", ErrNotSupported, msg)
		}
		status := -1
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			status = exit.ExitCode()
		}
		return "", &ipfwError{args: args, out: msg, status: status, err: err}
	}
	return string(out), nil
}

// processAlive reports whether rule r, one of our tags, may be a live
// handle's (ruleAlive).
func processAlive(r ipfw.Listed) bool {
	return ruleAlive(r, os.Getpid(), func(set int, port uint16) bool {
		return ownsRules(&bsdLive, &bsdLeft, set, port)
	}, processStart)
}

// ownStart is this process's start for its tags (processStart), 0 when
// unknown.
var ownStart = sync.OnceValue(func() int64 {
	s, _, known := processStart(os.Getpid())
	if !known {
		return 0
	}
	return s
})

// Offsets in struct kinfo_proc (sys/sys/user.h) of ki_pid and ki_start:
// after two ints and eight pointers, and after the fields up to ki_runtime
// (336 bytes on LP64; 280 on i386, whose segsz_t, vm_size_t and pointers
// are 4 bytes and whose uint64_t is 4-aligned). KINFO_PROC_SIZE, the
// struct's size, checks the layout: 1088 on amd64 and arm64, 768 on i386.
const (
	ptrSize           = int(unsafe.Sizeof(uintptr(0)))
	kinfoPIDOff       = 8 + 8*ptrSize
	kinfoStartOff     = 336*(ptrSize/8) + 280*(1-ptrSize/8)
	kinfoProcSize     = 1088*(ptrSize/8) + 768*(1-ptrSize/8)
	microsecondsInSec = 1_000_000
)

// processStart returns when process pid started, in microseconds of
// uptime: ki_start (kern.proc.pid) is the uptime at fork plus boottime,
// which a clock step moves, so boottime is taken off again, read on both
// sides so that a step between the reads is seen (uptimeStart). exists is
// false when there is no such process; known is false when the start
// cannot be read.
func processStart(pid int) (start int64, exists, known bool) {
	return uptimeStart(func() (int64, bool, bool) { return kinfoStart(pid) }, bootTime)
}

// kinfoStart returns ki_start, process pid's start in wall-clock
// microseconds (see processStart).
func kinfoStart(pid int) (wall int64, exists, known bool) {
	kp, err := unix.SysctlRaw("kern.proc.pid", pid)
	if err != nil || len(kp) == 0 {
		if err == unix.ESRCH || err == nil {
			return 0, false, false
		}
		kerr := unix.Kill(pid, 0)
		return 0, kerr == nil || kerr == unix.EPERM, false
	}
	if len(kp) < kinfoProcSize || int(binary.NativeEndian.Uint32(kp)) != kinfoProcSize ||
		int(int32(binary.NativeEndian.Uint32(kp[kinfoPIDOff:]))) != pid {
		return 0, true, false // another layout
	}
	var sec, usec int64
	if ptrSize == 8 {
		sec = int64(binary.NativeEndian.Uint64(kp[kinfoStartOff:]))
		usec = int64(binary.NativeEndian.Uint64(kp[kinfoStartOff+8:]))
	} else {
		sec = int64(int32(binary.NativeEndian.Uint32(kp[kinfoStartOff:])))
		usec = int64(int32(binary.NativeEndian.Uint32(kp[kinfoStartOff+4:])))
	}
	if usec < 0 || usec >= microsecondsInSec {
		return 0, true, false
	}
	return sec*microsecondsInSec + usec, true, true
}

// bootTime returns kern.boottime in wall-clock microseconds.
func bootTime() (int64, bool) {
	boot, err := unix.SysctlTimeval("kern.boottime")
	if err != nil || boot.Usec < 0 || int64(boot.Usec) >= microsecondsInSec {
		return 0, false
	}
	return int64(boot.Sec)*microsecondsInSec + int64(boot.Usec), true
}

func ifName(idx uint32) (string, bool) {
	ifc, err := net.InterfaceByIndex(int(idx))
	if err != nil {
		return "", false
	}
	return ifc.Name, true
}

// ifCache maps interface names from sin_zero to the interfaces they may
// stand for (bsdaddr.Candidate: a name cut to 7 bytes may stand for
// several, with their IPv4 addresses to tell them apart) without allocating
// on a hit. An entry is looked up again after ifCacheTTL, so that an
// interface destroyed and made again (a new index) is seen.
type ifCache struct {
	mu sync.RWMutex
	m  map[string]ifEntry
}

type ifEntry struct {
	cands []bsdaddr.Candidate // read-only once stored
	at    time.Time
}

const ifCacheTTL = 5 * time.Second

func (c *ifCache) lookup(name []byte) []bsdaddr.Candidate {
	c.mu.RLock()
	e, hit := c.m[string(name)]
	c.mu.RUnlock()
	if hit && time.Since(e.at) < ifCacheTTL {
		return e.cands
	}
	e = ifEntry{cands: candidates(name), at: time.Now()}
	c.mu.Lock()
	if c.m == nil {
		c.m = make(map[string]ifEntry)
	}
	c.m[string(name)] = e
	c.mu.Unlock()
	return e.cands
}

// candidates lists the interfaces a name from sin_zero may stand for
// (bsdaddr.Matches), with their IPv4 addresses.
func candidates(name []byte) []bsdaddr.Candidate {
	cand := func(ifc *net.Interface) bsdaddr.Candidate {
		return bsdaddr.Candidate{Name: ifc.Name, Index: uint32(ifc.Index), Loopback: ifc.Flags&net.FlagLoopback != 0}
	}
	all, err := net.Interfaces()
	if err != nil {
		return nil
	}
	var cands []bsdaddr.Candidate
	var ifcs []*net.Interface
	for i := range all {
		if bsdaddr.Matches(name, all[i].Name) {
			cands = append(cands, cand(&all[i]))
			ifcs = append(ifcs, &all[i])
		}
	}
	if len(cands) == 0 {
		return nil
	}
	// Their addresses tell them apart, whether the kernel's lookup by
	// address (ifa_ifwithaddr) finds only one interface, and whether an
	// inbound packet would carry one (divertInbound).
	owners := make(map[[4]byte]int)
	lists := make([][][4]byte, len(cands))
	for i, ifc := range ifcs {
		lists[i] = ipv4Addrs(ifc)
	}
	for _, ifc := range all {
		for _, a := range ipv4Addrs(&ifc) {
			owners[a]++
		}
	}
	for i := range cands {
		for _, a := range lists[i] {
			cands[i].Addrs = append(cands[i].Addrs, bsdaddr.CandidateAddr{Addr: a, Unique: owners[a] == 1})
		}
	}
	return cands
}

// ipv4Addrs lists an interface's IPv4 addresses.
func ipv4Addrs(ifc *net.Interface) [][4]byte {
	addrs, err := ifc.Addrs()
	if err != nil {
		return nil
	}
	var r [][4]byte
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if v4 := n.IP.To4(); v4 != nil {
				r = append(r, [4]byte(v4))
			}
		}
	}
	return r
}

// recvIface resolves the interface a received sockaddr names, as it will
// be written back, inbound or not, and clears the name when the kernel
// would take it for another interface (bsdaddr.ResolveRecv). It returns
// nil when the interface cannot be told.
func (b *bsdBackend) recvIface(sa *bsdaddr.Sockaddr, inbound bool) (*bsdaddr.Candidate, bsdaddr.NameFix) {
	name := sa.Name()
	if len(name) == 0 {
		return nil, bsdaddr.NameKeep
	}
	cands := b.ifs.lookup(name)
	i, fix := bsdaddr.ResolveRecv(name, sa.Addr(), inbound, cands)
	if fix == bsdaddr.NameClear {
		sa.ClearName()
	}
	if i < 0 {
		return nil, fix
	}
	return &cands[i], fix
}

// backAsIs prepares a sockaddr read with a packet that is written straight
// back, unseen by the program (the passer, Close): it reports false when
// the kernel could not be told the packet's interface (NameRefuse).
func (b *bsdBackend) backAsIs(sa *bsdaddr.Sockaddr, pkt []byte) bool {
	if _, fix := b.recvIface(sa, b.inbound(sa, pkt)); fix == bsdaddr.NameRefuse {
		return false
	}
	b.writeBack(sa, pkt)
	return true
}

func ifaceForInject(idx uint32) (bsdaddr.Iface, error) {
	ifc, err := net.InterfaceByIndex(int(idx))
	if err != nil {
		return bsdaddr.Iface{}, err
	}
	r := bsdaddr.Iface{Name: []byte(ifc.Name)}
	addrs, err := ifc.Addrs()
	if err != nil {
		return r, err
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if v4 := n.IP.To4(); v4 != nil {
				r.Addr = [4]byte(v4)
				break
			}
		}
	}
	return r, nil
}

// bsdIO is the per-call state of a receive or send: kept in a pool so that
// the raw-conn closures and the msghdr do not allocate per packet.
type bsdIO struct {
	b     *bsdBackend
	sa    bsdaddr.Sockaddr
	iov   unix.Iovec
	msg   unix.Msghdr
	buf   []byte
	n     int
	trunc bool
	errno syscall.Errno
	block bool // wait for readiness (false: one try, for draining)
	rfn   func(fd uintptr) bool
	wfn   func(fd uintptr) bool
	cfn   func(fd uintptr) // one non-blocking receive
	meta  filter.Meta
	big   []byte // scratch for evaluating the filter on a whole packet
}

func newBSDIO(b *bsdBackend) any {
	s := &bsdIO{b: b}
	s.rfn = s.recvmsg
	s.wfn = s.sendto
	s.cfn = func(fd uintptr) { s.recvmsg(fd) }
	return s
}

func (s *bsdIO) recvmsg(fd uintptr) bool {
	s.sa = bsdaddr.Sockaddr{}
	buf := s.buf
	var dummy [1]byte
	if len(buf) == 0 {
		buf = dummy[:]
	}
	s.iov.Base = &buf[0]
	s.iov.SetLen(len(buf))
	s.msg = unix.Msghdr{Name: &s.sa[0], Namelen: bsdaddr.Size, Iov: &s.iov}
	s.msg.SetIovlen(1)
	r, _, e := unix.Syscall(unix.SYS_RECVMSG, fd, uintptr(unsafe.Pointer(&s.msg)), 0)
	if e == unix.EAGAIN && s.block {
		return false
	}
	s.errno = e
	s.n = int(r)
	s.trunc = s.msg.Flags&unix.MSG_TRUNC != 0
	if len(s.buf) == 0 {
		s.n = 0
	}
	return true
}

func (s *bsdIO) sendto(fd uintptr) bool {
	r, _, e := unix.Syscall6(unix.SYS_SENDTO, fd, uintptr(unsafe.Pointer(&s.buf[0])), uintptr(len(s.buf)), 0,
		uintptr(unsafe.Pointer(&s.sa[0])), bsdaddr.Size)
	if e == unix.EAGAIN {
		return false
	}
	s.errno = e
	s.n = int(r)
	return true
}

func (b *bsdBackend) getIO() *bsdIO  { return b.states.Get().(*bsdIO) }
func (b *bsdBackend) putIO(s *bsdIO) { s.buf = nil; b.states.Put(s) }

func (b *bsdBackend) mapErr(op string, err error) error {
	switch {
	case b.closed.Load() || errors.Is(err, os.ErrClosed):
		// A call blocked in the poller when Close ran gets internal/poll's
		// "use of closed file", which wraps nothing: the flag tells.
		return errClosed
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("divert: %s: %w", op, os.ErrDeadlineExceeded)
	}
	return fmt.Errorf("divert: %s: %w", op, err)
}

// recvOne receives one packet the program is to see into p.
func (b *bsdBackend) recvOne(p []byte, a *Address, block bool) (int, error) {
	s := b.getIO()
	defer b.putIO(s)
	for {
		// With an inexact filter, read whole packets so that the filter
		// sees them and a non-matching one can be written back intact.
		whole := b.filt != nil && len(p) < MTUMax
		if whole {
			if s.big == nil {
				s.big = make([]byte, MTUMax)
			}
			s.buf = s.big
		} else {
			s.buf = p
		}
		s.block = block && !b.shutRecv.Load()
		var err error
		if s.block {
			err = b.rc.Read(s.rfn)
		} else {
			err = b.rc.Control(s.cfn)
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && b.shutRecv.Load() && block {
				block = false // Shutdown woke us: drain what is queued
				continue
			}
			return 0, b.mapErr("recv", err)
		}
		if s.errno != 0 {
			if s.errno == unix.EAGAIN {
				if b.shutRecv.Load() {
					return 0, ErrShutdown
				}
				return 0, fmt.Errorf("divert: recv: %w", os.ErrDeadlineExceeded)
			}
			return 0, fmt.Errorf("divert: recv: %w", os.NewSyscallError("recvmsg", s.errno))
		}
		r, err := bsdaddr.Parse(&s.sa, binary.NativeEndian, nil)
		if err != nil {
			return 0, fmt.Errorf("divert: recv: %w", err)
		}
		pkt := s.buf[:s.n]
		b.fill(a, pkt, &s.sa, r)
		if b.filt != nil && !b.filt.Match(pkt, s.metaOf(a)) {
			if b.flags&(FlagSniff) == 0 {
				// Not ours: straight back, resuming after our rule.
				if a.sys.fix == bsdaddr.NameRefuse {
					b.lost.Add(1) // no sockaddr brings it in where it came from
					continue
				}
				b.writeBack(&s.sa, pkt)
				s.buf = pkt
				if err := b.rc.Write(s.wfn); err != nil {
					return 0, b.mapErr("reinject", err)
				}
				if s.errno != 0 {
					// Lost (ENOBUFS...): counted, not an error of this
					// call, whose program never saw the packet.
					b.lost.Add(1)
					continue
				}
			}
			b.passedOne()
			continue
		}
		n := copy(p, pkt)
		if whole {
			if n < len(pkt) {
				return n, ErrTruncated
			}
			return n, nil
		}
		if s.trunc {
			return n, ErrTruncated
		}
		return n, nil
	}
}

// metaOf fills the scratch Meta from a and returns it.
func (s *bsdIO) metaOf(a *Address) *filter.Meta {
	s.meta = a.Meta()
	return &s.meta
}

func (b *bsdBackend) fill(a *Address, pkt []byte, sa *bsdaddr.Sockaddr, r bsdaddr.Received) {
	// An OpenPort handle notes the rule each packet came from, by the
	// direction it is reported in (recvOutbound).
	var seen *resumePoints
	if b.openPort {
		seen = &b.seen
	}
	*a = Address{
		Timestamp: time.Now().UnixNano(),
		Layer:     b.layer,
		Event:     EventNetworkPacket,
		Sniffed:   b.flags&FlagSniff != 0,
		Outbound:  recvOutbound(sa, pkt, r.Rule, b.ownNamed, b.ifV4, hostAddrs.has, seen),
		IPv6:      len(pkt) > 0 && pkt[0]>>4 == 6,
	}
	// An outbound packet with a receiving interface was forwarded (read
	// before recvIface may clear the name).
	forwarded := a.Outbound && len(sa.Name()) > 0
	// The name may be cut: sa's address tells, and sa loses a name that
	// written back would pick another interface (recvIface).
	ifc, fix := b.recvIface(sa, !a.Outbound)
	if ifc != nil {
		a.IfIdx = ifc.Index
		a.Loopback = ifc.Loopback
	}
	// The kernel verified the IPv4 header of most inbound packets (not on
	// loopback, nor its own looped-back broadcasts: checked again) and
	// finalised the transport checksums of the outbound ones the host
	// made (IPv6's only since FreeBSD 14; a forwarded packet's are as they
	// came in): divertChecksums.
	a.IPChecksum, a.TCPChecksum = divertChecksums(pkt, a.Outbound, forwarded, a.Loopback, b.major)
	a.UDPChecksum = a.TCPChecksum
	a.sys = sysAddr{sa: *sa, ifIdx: a.IfIdx, fix: fix, valid: true}
}

// inbound reports whether pkt, read with sa, came in (divertInbound: sa's
// zero sin_addr may be an inbound packet's on an interface without an
// IPv4 address).
func (b *bsdBackend) inbound(sa *bsdaddr.Sockaddr, pkt []byte) bool {
	return divertInbound(sa, pkt, b.ownNamed, b.ifV4, hostAddrs.has)
}

// ifV4 reports whether the interfaces a name from sin_zero stands for
// have an IPv4 address (known: all of them do, or none).
func (b *bsdBackend) ifV4(name []byte) (has, known bool) {
	with, without := 0, 0
	for _, c := range b.ifs.lookup(name) {
		if len(c.Addrs) > 0 {
			with++
		} else {
			without++
		}
	}
	return with > 0 && without == 0, (with > 0) != (without > 0)
}

// writeBack prepares the sockaddr a packet was read with for writing the
// packet straight back where it was: an inbound packet whose sin_addr is
// zero needs a non-zero one, else the kernel would send it out.
func (b *bsdBackend) writeBack(sa *bsdaddr.Sockaddr, pkt []byte) {
	if b.inbound(sa, pkt) {
		sa.MarkInbound()
	}
}

// hostAddrs caches the host's addresses for divertInbound, looked up again
// after ifCacheTTL.
var hostAddrs addrCache

type addrCache struct {
	mu    sync.RWMutex
	addrs map[netip.Addr]struct{}
	at    time.Time
}

func (c *addrCache) has(a netip.Addr) bool {
	c.mu.RLock()
	m, at := c.addrs, c.at
	c.mu.RUnlock()
	if m == nil || time.Since(at) >= ifCacheTTL {
		m = make(map[netip.Addr]struct{})
		if addrs, err := net.InterfaceAddrs(); err == nil {
			for _, x := range addrs {
				if n, ok := x.(*net.IPNet); ok {
					if ip, ok := netip.AddrFromSlice(n.IP); ok {
						m[ip.Unmap()] = struct{}{}
					}
				}
			}
		}
		c.mu.Lock()
		c.addrs, c.at = m, time.Now()
		c.mu.Unlock()
	}
	_, ok := m[a.WithZone("")]
	return ok
}

func (b *bsdBackend) recv(p []byte, a *Address) (int, error) {
	n, err := b.recvOne(p, a, true)
	b.gotOne(a, err)
	return n, err
}

func (b *bsdBackend) recvBatch(ms []Message) (int, error) {
	n, err := b.recvOne(ms[0].Buf, &ms[0].Addr, true)
	if err != nil && !errors.Is(err, ErrTruncated) {
		return 0, err
	}
	ms[0].N = n
	trunc := err != nil
	i := 1
	for ; i < len(ms) && len(ms[i].Buf) > 0; i++ { // an empty Buf ends the batch
		n, err := b.recvOne(ms[i].Buf, &ms[i].Addr, false)
		if err != nil && !errors.Is(err, ErrTruncated) {
			break // nothing more queued now (or an error the next call reports)
		}
		ms[i].N = n
		trunc = trunc || err != nil
	}
	b.gotBatch(ms, i)
	if trunc {
		return i, ErrTruncated
	}
	return i, nil
}

func (b *bsdBackend) send(p []byte, a *Address) (int, error) {
	// div_output refuses only an IPv4 length past the end; a packet sent
	// inbound goes to ip_input, which drops or trims it without a word.
	p, err := sendable(p)
	if err != nil {
		return 0, err
	}
	s := b.getIO()
	defer b.putIO(s)
	var recv *bsdaddr.Sockaddr
	if a.sys.valid {
		recv = &a.sys.sa
		if a.sys.fix == bsdaddr.NameRefuse && bsdaddr.SendsBack(a.Outbound, a.IfIdx, recv, a.sys.ifIdx) {
			return 0, fmt.Errorf("divert: send: %w: the packet came in on an interface whose name divert(4) cut to %q, another interface's name, and its address %v does not tell the kernel which (give Address.IfIdx another interface, or send it outbound)",
				ErrNotSupported, recv.Name(), netip.AddrFrom4(recv.Addr()))
		}
	}
	rule := newPacketRule(b.openPort, b.rule, &b.seen, a.Outbound)
	if err := bsdaddr.Target(&s.sa, binary.NativeEndian, a.Outbound, a.IfIdx, rule, recv, a.sys.ifIdx, ifaceForInject); err != nil {
		return 0, fmt.Errorf("divert: send: %w", err)
	}
	s.buf = p
	if err := b.rc.Write(s.wfn); err != nil {
		return 0, b.mapErr("send", err)
	}
	if s.errno != 0 {
		return 0, fmt.Errorf("divert: send: %w", os.NewSyscallError("sendto", s.errno))
	}
	b.sentOne(a)
	return s.n, nil
}

func (b *bsdBackend) sendBatch(ms []Message) (int, error) {
	for i := range ms {
		if _, err := b.send(ms[i].Buf[:ms[i].N], &ms[i].Addr); err != nil {
			return i, err
		}
	}
	return len(ms), nil
}

// drop only counts: a received packet is gone unless sent back.
func (b *bsdBackend) drop(a *Address) error {
	b.droppedOne(a)
	return nil
}

func (b *bsdBackend) shutdown(how ShutdownHow) error {
	if how&ShutdownRecv == 0 {
		return nil
	}
	if err := b.removeRules(); err != nil {
		return err
	}
	if err := b.detach(); err != nil {
		return err
	}
	b.shutRecv.Store(true)
	// Wake blocked readers; they drain the socket and report ErrShutdown.
	if err := b.f.SetReadDeadline(pastDeadline); err != nil {
		return b.mapErr("shutdown", err) // Close won: net.ErrClosed, as everywhere
	}
	return nil
}

// detach stops the administrator's rule of an OpenPort handle from
// queueing new packets to the handle's socket, which keeps those queued:
// the socket moves to a free port and a passer takes its place on the
// rule's port (see detachPort). Before FreeBSD 14 a bound socket cannot
// move: the rule's packets keep coming to it, and Recv returns them after
// those queued at the Shutdown.
func (b *bsdBackend) detach() error {
	if !b.openPort {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.detached || b.closing {
		return nil
	}
	var (
		p    portSock
		err  error
		cerr error
	)
	// The free port is chosen under the ipfw lock when it can be taken; a
	// handle that installed no rules does not need it
	// (ipfwSys.choosePortNoRules).
	if lerr := bsdIPFW.choosePortNoRules(func(busy func(uint16) bool) error {
		cerr = b.rc.Control(func(fd uintptr) {
			size, serr := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF)
			p, err = detachPort(fdSock(fd), b.port, os.Getpid()%divertPorts, b.flags&FlagSniff != 0, busy, func() (portSock, error) {
				nfd, err := divertSocket()
				if err == nil && serr == nil {
					_ = setBuffers(nfd, size) // as large as the handle's, if allowed
				}
				return fdSock(nfd), err
			})
		})
		return nil
	}); lerr != nil {
		return lerr
	}
	if cerr != nil {
		return b.mapErr("shutdown", cerr)
	}
	if errors.Is(err, errRebind) {
		b.detached = true
		return nil
	}
	if err != nil {
		return err
	}
	b.detached = true
	if p == nil {
		return nil // FlagSniff: no passer
	}
	f := os.NewFile(uintptr(p.(fdSock)), "divert-pass:"+strconv.Itoa(int(b.port)))
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return fmt.Errorf("divert: shutdown: %w", err)
	}
	b.passer = &passer{f: f, rc: rc, done: make(chan struct{})}
	go b.pass(b.passer)
	return nil
}

// pass is the passer's goroutine: it writes every packet the rule queues
// back unchanged, so that it goes on after the rule, until the handle
// closes; then it writes back what is still queued (a bounded number) and
// ends.
func (b *bsdBackend) pass(p *passer) {
	defer close(p.done)
	s := newBSDIO(b).(*bsdIO)
	buf := make([]byte, MTUMax)
	left := 1 << 16 // packets written back once stopped
	for left > 0 {
		s.buf = buf
		s.block = !p.stop.Load()
		var err error
		if s.block {
			err = p.rc.Read(s.rfn)
		} else {
			left--
			err = p.rc.Control(s.cfn)
		}
		switch {
		case err != nil && p.stop.Load() && errors.Is(err, os.ErrDeadlineExceeded):
			continue // woken by close: write back what is queued
		case err != nil, s.errno == unix.EAGAIN:
			return // closed, or stopped and drained
		case s.errno != 0:
			if p.stop.Load() {
				return
			}
			time.Sleep(10 * time.Millisecond) // ENOBUFS...: not in a spin
			continue
		}
		s.buf = buf[:s.n]
		if !b.backAsIs(&s.sa, s.buf) {
			b.lost.Add(1)
			continue
		}
		if err := p.rc.Write(s.wfn); err != nil {
			return
		}
		if s.errno != 0 {
			b.lost.Add(1)
		} else {
			b.passedOne()
		}
	}
}

func (b *bsdBackend) close() error {
	err := b.removeRulesAtClose()
	b.mu.Lock()
	b.closing = true
	p := b.passer
	b.mu.Unlock()
	if p != nil {
		p.stop.Store(true)
		_ = p.f.SetReadDeadline(pastDeadline)
		<-p.done
		if cerr := p.f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("divert: close: %w", cerr)
		}
	}
	switch {
	case b.dropper != nil:
		// Let the dropper finish what is queued (dropping or writing back
		// each packet as its filter says), as Shutdown does, then end.
		b.shutRecv.Store(true)
		_ = b.f.SetReadDeadline(pastDeadline)
		<-b.dropper
	case b.flags&FlagSniff == 0:
		b.reinjectUnread()
	}
	b.closed.Store(true)
	if cerr := b.f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("divert: close: %w", cerr)
	}
	return err
}

// reinjectUnread writes back, unchanged, the packets still unread in the
// socket when the handle closes, as WinDivert reinjects a closing handle's
// queue: each resumes after the rule that diverted it. The rules are
// mostly gone by then, so the socket gets nothing new; rules Close could
// not delete (leftSets) still divert to it, so the loop is bounded.
// FlagSniff's tee rules queued copies, which are not written back.
func (b *bsdBackend) reinjectUnread() {
	s := b.getIO()
	defer b.putIO(s)
	if s.big == nil {
		s.big = make([]byte, MTUMax)
	}
	s.block = false
	for range 1 << 16 {
		s.buf = s.big
		if err := b.rc.Control(s.cfn); err != nil || s.errno != 0 || s.trunc {
			return // EAGAIN: the socket is empty
		}
		s.buf = s.big[:s.n] // s.sa still holds the packet's divert address
		if !b.backAsIs(&s.sa, s.buf) {
			b.lost.Add(1)
			continue
		}
		if err := b.rc.Control(func(fd uintptr) { s.sendto(fd) }); err != nil {
			return
		}
	}
}

func (b *bsdBackend) setParam(p Param, v uint64) error {
	if p != ParamQueueSize {
		return nil // kept by Handle, not enforced (see the file comment)
	}
	var err error
	if cerr := b.rc.Control(func(fd uintptr) { err = setBuffers(int(fd), int(v)) }); cerr != nil {
		return b.mapErr("set param", cerr)
	}
	if err != nil {
		return fmt.Errorf("divert: %v %d: %w", p, v, err)
	}
	return nil
}

func (b *bsdBackend) setReadDeadline(t time.Time) error {
	return setDeadlineUnlessShut(&b.shutRecv, b.f.SetReadDeadline, t)
}

// version reports the FreeBSD major and minor release.
func (b *bsdBackend) version() (major, minor uint64) {
	rel, err := unix.Sysctl("kern.osrelease") // "14.1-RELEASE"
	if err != nil {
		return 0, 0
	}
	num, _, _ := strings.Cut(rel, "-")
	maj, min, _ := strings.Cut(num, ".")
	major, _ = strconv.ParseUint(maj, 10, 64)
	minor, _ = strconv.ParseUint(min, 10, 64)
	return major, minor
}
