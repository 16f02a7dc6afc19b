package divert

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// The process of a flow (LayerFlow on Linux). Conntrack knows none, so
// for a TCP or UDP flow the handle asks the kernel for the local socket of
// the flow's tuple (sock_diag: SOCK_DIAG_BY_FAMILY with the exact tuple,
// as ss does), takes its inode, and finds the process holding a descriptor
// of it in /proc/<pid>/fd. It does so once, when the flow is established;
// the deletion carries the same ProcessID.
//
// A socket the last scan of /proc did not see makes the next lookup read
// /proc again, unless that scan began after the event was read (then no
// process held the socket): one scan for each event of a new socket, or
// for a batch of them read together. A scan costs tens of µs a process
// (30 ms with 700 processes), and a host that opens sockets faster than
// that (a resolver's new UDP socket a query, a client's a connect, a
// server's an accept) would keep the reader scanning, its events lost to
// the socket's buffer: so past half a second of them, scans take at most a
// quarter of the reader's time (scanShare), and a socket new while that
// budget is spent gets 0.
//
// It is best effort: 0 when the socket is gone already (a connection
// closed before its establishment was read), when no process holds it
// (an accepted connection not yet accept()ed: the listening socket's
// process is taken then), when it is new while the scans' budget is spent
// (above), or when /proc cannot be read. When several
// processes hold the socket (inherited across fork), the lowest PID is
// taken. PIDs are those of the /proc the process sees (its PID
// namespace's when /proc was mounted there).
//
// The same lookup tells the tracker when an inbound UDP datagram had no
// socket to go to (the kernel answers ENOENT for its tuple): a port
// nobody listens on, as a port scan's. That is no flow, at WinDivert's
// flow layer either, and it is not reported.

// sockOwner finds flows' processes. The reader goroutine uses it.
type sockOwner struct {
	diag    *netlink.Conn     // NETLINK_SOCK_DIAG in the handle's namespace
	pids    map[uint64]uint32 // socket inode → PID, as of the last scan
	scanned int64             // when the last scan began (monoNow)
	// The scans' budget: debt is the time spent scanning not yet paid
	// back (at 1/scanShare of the time that passes, since paid); no scan
	// begins while it exceeds burst.
	debt, paid, burst int64
	req               []byte
	scanFn            func()      // a test's, instead of scan
	quit              atomic.Bool // the handle stops: a scan ends
}

// scanShare bounds the reader's time in scans of /proc: past a burst
// (scanBurst of scanning), they take at most 1/scanShare of its time, when
// new sockets come faster than it can scan for each. A flow whose socket
// is new while the budget is spent gets ProcessID 0.
const (
	scanShare = 4
	scanBurst = int64(500 * time.Millisecond)
)

func newSockOwner() (*sockOwner, error) {
	c, err := netlink.Dial(unix.NETLINK_SOCK_DIAG, nil)
	if err != nil {
		return nil, err
	}
	return &sockOwner{diag: c, pids: make(map[uint64]uint32), burst: scanBurst, req: make([]byte, 0, 72)}, nil
}

func (o *sockOwner) close() error { return o.diag.Close() }

// process returns the PID of the process that owns a's local socket, 0
// when none is found. Only TCP and UDP are looked up. noSocket is set for
// an inbound UDP view when the kernel answers that no socket has the
// flow's tuple (ENOENT): its datagram was for a port nobody listens on.
func (o *sockOwner) process(a *Address) (pid uint32, noSocket bool) {
	f := &a.Flow
	if f.Protocol != unix.IPPROTO_TCP && f.Protocol != unix.IPPROTO_UDP {
		return 0, false
	}
	local, remote := netip.AddrFrom16(f.LocalAddr), netip.AddrFrom16(f.RemoteAddr)
	ino, none := o.inode(f.Protocol, local, f.LocalPort, remote, f.RemotePort)
	if ino == 0 && f.Protocol == unix.IPPROTO_TCP && !a.Outbound {
		// Not accepted yet: the connection's socket has no inode.
		// The listening socket's process is the one that accepts.
		ino, _ = o.inode(f.Protocol, local, f.LocalPort, netip.IPv6Unspecified(), 0)
	}
	if ino == 0 {
		return 0, none && f.Protocol == unix.IPPROTO_UDP && !a.Outbound
	}
	return o.pidOf(ino, a.Timestamp), false
}

// pidOf returns the process holding the socket of inode ino, of an event
// read at read (monoNow), scanning /proc when the last scan did not see
// the socket and the budget allows (scanShare).
func (o *sockOwner) pidOf(ino uint64, read int64) uint32 {
	if pid, ok := o.pids[ino]; ok {
		return pid
	}
	if o.scanned >= read {
		// The last scan came after the event was read, when the
		// socket existed already: no process holds it.
		return 0
	}
	now := monoNow()
	if o.paid != 0 {
		o.debt = max(0, o.debt-(now-o.paid)/scanShare)
	}
	o.paid = now
	if o.debt > o.burst {
		return 0 // scanned too much of late
	}
	o.scanned = now
	if o.scanFn != nil {
		o.scanFn()
	} else {
		o.scan()
	}
	o.debt += monoNow() - now
	return o.pids[ino]
}

// inode asks sock_diag for the socket of the tuple and returns its inode
// (0: none found). none is set when the kernel answered that there is no
// such socket (ENOENT), not for another failure. A zero remote asks for
// the listening socket.
func (o *sockOwner) inode(proto uint8, local netip.Addr, lport uint16, remote netip.Addr, rport uint16) (ino uint64, none bool) {
	family := byte(unix.AF_INET6)
	if local.Is4In6() {
		family = unix.AF_INET
	}
	if proto == unix.IPPROTO_UDP {
		// udp_diag's lookup reads the request's source as the remote
		// end ("src and dst are swapped for historical reasons").
		local, lport, remote, rport = remote, rport, local, lport
	}
	o.req = appendDiagReq(o.req[:0], family, proto, local, lport, remote, rport)
	ms, err := o.diag.Execute(netlink.Message{
		Header: netlink.Header{Type: sockDiagByFamily, Flags: netlink.Request},
		Data:   o.req,
	})
	if err != nil || len(ms) == 0 {
		return 0, errors.Is(err, unix.ENOENT)
	}
	return diagInode(ms[0].Data), false
}

// sockDiagByFamily is SOCK_DIAG_BY_FAMILY.
const sockDiagByFamily = 20

// appendDiagReq appends a struct inet_diag_req_v2 asking for the socket
// of the tuple (any state, no cookie to check): src is the socket's own
// end for TCP (see inode for UDP); an unspecified address is all zeros.
func appendDiagReq(b []byte, family, proto uint8, local netip.Addr, lport uint16, remote netip.Addr, rport uint16) []byte {
	b = append(b, family, proto, 0, 0)
	b = binary.NativeEndian.AppendUint32(b, 0xFFFFFFFF) // idiag_states: all
	// struct inet_diag_sockid
	b = binary.BigEndian.AppendUint16(b, lport)
	b = binary.BigEndian.AppendUint16(b, rport)
	for _, ip := range []netip.Addr{local, remote} {
		var raw [16]byte
		switch {
		case ip.IsUnspecified():
		case family == unix.AF_INET:
			v4 := ip.Unmap().As4()
			copy(raw[:], v4[:])
		default:
			raw = ip.As16()
		}
		b = append(b, raw[:]...)
	}
	b = binary.NativeEndian.AppendUint32(b, 0)          // idiag_if
	b = binary.NativeEndian.AppendUint32(b, 0xFFFFFFFF) // idiag_cookie: INET_DIAG_NOCOOKIE
	return binary.NativeEndian.AppendUint32(b, 0xFFFFFFFF)
}

// diagInode reads idiag_inode from a struct inet_diag_msg.
func diagInode(b []byte) uint64 {
	const off = 4 + 48 + 4*4 // family..retrans, id, expires, rqueue, wqueue, uid
	if len(b) < off+4 {
		return 0
	}
	return uint64(binary.NativeEndian.Uint32(b[off:]))
}

// scan reads every process's descriptors and maps the socket inodes to
// the lowest PID holding each. It ends early once quit is set.
func (o *sockOwner) scan() {
	clear(o.pids)
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	pids := make([]uint32, 0, len(procs))
	for _, p := range procs {
		if pid, err := strconv.ParseUint(p.Name(), 10, 32); err == nil {
			pids = append(pids, uint32(pid))
		}
	}
	slices.Sort(pids)
	for _, pid := range pids {
		if o.quit.Load() {
			return
		}
		dir := "/proc/" + strconv.FormatUint(uint64(pid), 10) + "/fd/"
		fds, err := os.ReadDir(dir)
		if err != nil {
			continue // gone, or not ours to read
		}
		for _, fd := range fds {
			l, err := os.Readlink(dir + fd.Name())
			if err != nil || !strings.HasPrefix(l, "socket:[") || !strings.HasSuffix(l, "]") {
				continue
			}
			ino, err := strconv.ParseUint(l[len("socket:["):len(l)-1], 10, 64)
			if err != nil {
				continue
			}
			if _, ok := o.pids[ino]; !ok {
				o.pids[ino] = pid
			}
		}
	}
}
