//go:build linux

package inject

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Injector holds one raw socket per IP version. It is safe for concurrent
// use.
type Injector struct {
	mu       sync.RWMutex // Close takes it exclusively so no send uses a closed fd
	fd4, fd6 int          // -1 once closed
	mark     uint32

	// The routing table's answers for Inbound (see checkLocal).
	rmu  sync.Mutex // guards rt's requests and answers, rbuf, seq
	rt   int        // NETLINK_ROUTE socket of the namespace; -1 once closed
	rbuf []byte
	seq  uint32

	// RouteMTU's UDP sockets, connected to a destination to ask its
	// route's MTU, and the interface each is bound to (0: none).
	mmu            sync.Mutex
	mtu4, mtu6     int // -1 once closed
	mtuIf4, mtuIf6 uint32
}

// ErrNotLocal reports an Inbound packet whose destination is not an
// address of this host: delivered through the local stack it would not
// stay in, but be routed out like an outbound packet.
var ErrNotLocal = errors.New("inject: the destination is not an address of this host")

// ErrRefused reports a packet the kernel's output path refused (EPERM or
// EACCES from the send): a netfilter DROP, an xfrm policy, a prohibit
// route or a security module.
var ErrRefused = errors.New("inject: packet refused")

// New opens the raw sockets, in the network namespace of the calling
// thread, with SO_MARK mark (0 = no mark). Errors wrap os.ErrPermission when
// the caller lacks CAP_NET_RAW (sockets) or CAP_NET_ADMIN (mark).
func New(mark uint32) (*Injector, error) {
	i := &Injector{fd4: -1, fd6: -1, rt: -1, mtu4: -1, mtu6: -1, mark: mark}
	var err error
	if i.fd4, err = rawSocket(unix.AF_INET, mark); err != nil {
		return nil, err
	}
	if i.fd6, err = rawSocket(unix.AF_INET6, mark); err != nil {
		i.closeAll()
		return nil, err
	}
	if i.rt, err = routeSocket(); err != nil {
		i.closeAll()
		return nil, err
	}
	if i.mtu4, i.mtu6, err = mtuSockets(mark); err != nil {
		i.closeAll()
		return nil, err
	}
	i.rbuf = make([]byte, 0, 8192)
	return i, nil
}

// closeAll closes the sockets New opened so far.
func (i *Injector) closeAll() {
	for _, fd := range []int{i.fd4, i.fd6, i.rt, i.mtu4, i.mtu6} {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
}

// mtuSockets opens RouteMTU's UDP sockets, with the injector's mark
// (policy rules may route by it) and SO_BROADCAST (without it connecting to
// a broadcast address fails, EACCES).
func mtuSockets(mark uint32) (fd4, fd6 int, err error) {
	fd4, fd6 = -1, -1
	for _, f := range []struct {
		fd     *int
		family int
	}{{&fd4, unix.AF_INET}, {&fd6, unix.AF_INET6}} {
		if *f.fd, err = unix.Socket(f.family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
			err = fmt.Errorf("inject: open a route MTU socket: %w", os.NewSyscallError("socket", err))
			break
		}
		if f.family == unix.AF_INET {
			if err = unix.SetsockoptInt(*f.fd, unix.SOL_SOCKET, unix.SO_BROADCAST, 1); err != nil {
				err = wrap("set SO_BROADCAST", err, "")
				break
			}
		}
		if mark != 0 {
			if err = unix.SetsockoptInt(*f.fd, unix.SOL_SOCKET, unix.SO_MARK, int(mark)); err != nil {
				err = wrap("set SO_MARK", err, "CAP_NET_ADMIN")
				break
			}
		}
	}
	if err != nil {
		for _, fd := range []int{fd4, fd6} {
			if fd >= 0 {
				unix.Close(fd)
			}
		}
		return -1, -1, err
	}
	return fd4, fd6, nil
}

// routeSocket opens the rtnetlink socket that checkLocal asks, with a
// receive timeout as a safety net: the kernel answers inside the send.
func routeSocket() (int, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return -1, fmt.Errorf("inject: open route socket: %w", os.NewSyscallError("socket", err))
	}
	tv := unix.NsecToTimeval(int64(time.Second))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("inject: route socket: %w", os.NewSyscallError("setsockopt", err))
	}
	return fd, nil
}

func rawSocket(family int, mark uint32) (int, error) {
	fd, err := unix.Socket(family, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return -1, wrap("open raw socket", err, "CAP_NET_RAW")
	}
	if family == unix.AF_INET {
		// Without it the kernel refuses a packet to a subnet's broadcast
		// address (EACCES); WinDivert injects such packets.
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_BROADCAST, 1); err != nil {
			unix.Close(fd)
			return -1, wrap("set SO_BROADCAST", err, "")
		}
	}
	if family == unix.AF_INET6 {
		// Implied by IPPROTO_RAW; explicit for clarity on kernels that
		// support the option (4.5+). Older kernels ignore nothing here:
		// IPPROTO_RAW is header-included already.
		_ = unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_HDRINCL, 1)
	}
	if mark != 0 {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(mark)); err != nil {
			unix.Close(fd)
			return -1, wrap("set SO_MARK", err, "CAP_NET_ADMIN")
		}
	}
	return fd, nil
}

func wrap(op string, err error, capability string) error {
	if errors.Is(err, os.ErrPermission) {
		return fmt.Errorf("inject: %s: %s is needed (run as root or grant the capability): %w", op, capability, err)
	}
	return fmt.Errorf("inject: %s: %w", op, os.NewSyscallError(op, err))
}

// Mark is the socket mark the injected packets carry.
func (i *Injector) Mark() uint32 { return i.mark }

// Outbound sends pkt (a whole IPv4 or IPv6 packet) as if this host sent it.
func (i *Injector) Outbound(pkt []byte) error { return i.send(pkt, false, 0) }

// OutboundOn is Outbound for a packet whose destination is scoped to one
// link (IPv6 and IPv4 link-local unicast, interface- or link-local
// multicast, the IPv4 limited broadcast 255.255.255.255): it leaves through
// interface ifIdx, where Outbound would take the first route that matches
// (or fail, ENETUNREACH, when none does, as for 255.255.255.255 without a
// default route). Other destinations go by their route, whatever ifIdx.
func (i *Injector) OutboundOn(pkt []byte, ifIdx uint32) error { return i.send(pkt, false, ifIdx) }

// Inbound delivers pkt (a whole IPv4 or IPv6 packet addressed to this host)
// to the local stack as if it had been received. The packet enters through
// lo, so this implementation does not use ifIdx (see the package
// documentation). A destination that is not one of the host's addresses
// (a route of type local in the namespace's routing table) gives an error
// wrapping ErrNotLocal, and nothing is sent.
func (i *Injector) Inbound(pkt []byte, ifIdx uint32) error {
	_ = ifIdx
	return i.send(pkt, true, 0)
}

func (i *Injector) send(pkt []byte, inbound bool, zone uint32) error {
	if len(pkt) == 0 {
		return errors.New("inject: empty packet")
	}
	i.mu.RLock()
	defer i.mu.RUnlock()
	if i.fd4 < 0 {
		return fmt.Errorf("inject: %w", net.ErrClosed)
	}
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) < 20 || int(pkt[0]&0xf)*4 < 20 || len(pkt) < int(pkt[0]&0xf)*4 {
			return fmt.Errorf("inject: IPv4 packet of %d bytes has no whole header", len(pkt))
		}
		var sa unix.RawSockaddrInet4
		sa.Family = unix.AF_INET
		copy(sa.Addr[:], pkt[16:20])
		if inbound {
			if err := i.checkLocal(netip.AddrFrom4(sa.Addr)); err != nil {
				return err
			}
		}
		if oif := outIf(netip.AddrFrom4(sa.Addr), zone); oif != 0 {
			return sendtoOn(i.fd4, pkt, &sa, oif)
		}
		return sendto(i.fd4, pkt, unsafe.Pointer(&sa), unix.SizeofSockaddrInet4)
	case 6:
		if len(pkt) < 40 {
			return fmt.Errorf("inject: IPv6 packet of %d bytes has no whole header", len(pkt))
		}
		if int(binary.BigEndian.Uint16(pkt[4:]))+40 != len(pkt) {
			return fmt.Errorf("inject: IPv6 payload length %d does not match the %d-byte packet", binary.BigEndian.Uint16(pkt[4:]), len(pkt))
		}
		var sa unix.RawSockaddrInet6
		sa.Family = unix.AF_INET6 // port must stay 0
		copy(sa.Addr[:], pkt[24:40])
		sa.Scope_id = outIf(netip.AddrFrom16(sa.Addr), zone)
		if inbound {
			if err := i.checkLocal(netip.AddrFrom16(sa.Addr)); err != nil {
				return err
			}
		}
		return sendto(i.fd6, pkt, unsafe.Pointer(&sa), unix.SizeofSockaddrInet6)
	}
	return fmt.Errorf("inject: IP version %d is neither 4 nor 6", pkt[0]>>4)
}

// needsZone reports whether a destination is scoped to one link, so that
// only an interface says where a packet to it goes: link-local unicast
// (IPv6 fe80::/10, IPv4 169.254.0.0/16), multicast of interface- or
// link-local scope (ff01::/16, ff02::/16, IPv4 224.0.0.0/24), and the IPv4
// limited broadcast 255.255.255.255.
func needsZone(a netip.Addr) bool {
	return a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast() || a.IsInterfaceLocalMulticast() ||
		a == netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

// outIf returns the interface OutboundOn(pkt, ifIdx) sends a packet to dst
// through: ifIdx when dst is scoped to one link (see OutboundOn), else 0,
// the route's choice.
func outIf(dst netip.Addr, ifIdx uint32) uint32 {
	if ifIdx != 0 && needsZone(dst) {
		return ifIdx
	}
	return 0
}

// pktinfo4 is a control message IP_PKTINFO, laid out as CMSG_SPACE says.
type pktinfo4 struct {
	h unix.Cmsghdr
	i unix.Inet4Pktinfo
}

// sendtoOn is sendto for an IPv4 packet that must leave through interface
// ifIdx: a sendmsg with an IP_PKTINFO control message, whose ipi_ifindex
// raw_sendmsg takes as the output interface (ipi_spec_dst stays 0: the
// header's source, or the interface's address when it is 0).
func sendtoOn(fd int, p []byte, sa *unix.RawSockaddrInet4, ifIdx uint32) error {
	var cm pktinfo4
	cm.h.Level = unix.IPPROTO_IP
	cm.h.Type = unix.IP_PKTINFO
	cm.h.SetLen(unix.CmsgLen(unix.SizeofInet4Pktinfo))
	cm.i.Ifindex = int32(ifIdx)
	iov := unix.Iovec{Base: &p[0]}
	iov.SetLen(len(p))
	msg := unix.Msghdr{
		Name:    (*byte)(unsafe.Pointer(sa)),
		Namelen: unix.SizeofSockaddrInet4,
		Iov:     &iov,
		Control: (*byte)(unsafe.Pointer(&cm)),
	}
	msg.SetIovlen(1)
	msg.SetControllen(int(unsafe.Sizeof(cm)))
	for {
		_, _, e := unix.Syscall(unix.SYS_SENDMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), 0)
		if e != unix.EINTR {
			return sendError(e, "sendmsg")
		}
	}
}

// sendto is sendto(2) without the allocation that unix.Sendto makes for the
// address.
func sendto(fd int, p []byte, sa unsafe.Pointer, salen uintptr) error {
	for {
		_, _, e := unix.Syscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), 0, uintptr(sa), salen)
		if e != unix.EINTR {
			return sendError(e, "sendto")
		}
	}
}

// sendError is the error of a send that returned errno e (0: none).
func sendError(e unix.Errno, call string) error {
	switch e {
	case 0:
		return nil
	case unix.EPERM, unix.EACCES:
		// What the output path returns for a netfilter DROP, an xfrm
		// policy, a prohibit route or a security module (the raw
		// socket is open, so no privilege is missing). Not wrapped:
		// errors.Is must not take it for os.ErrPermission.
		return fmt.Errorf("%w by the kernel's output path: a netfilter or xfrm rule, a prohibit route or a security module (%s: %v)", ErrRefused, call, e)
	}
	return fmt.Errorf("inject: %w", os.NewSyscallError(call, e))
}

// RouteMTU returns the MTU of the route a packet to pkt's destination
// takes when sent by Outbound (ifIdx 0) or OutboundOn(pkt, ifIdx): the
// route's MTU, or the path MTU the kernel learned for that destination. It
// asks the namespace's routing table by connecting a UDP socket there
// (IP_MTU, IPV6_MTU).
func (i *Injector) RouteMTU(pkt []byte, ifIdx uint32) (int, error) {
	if len(pkt) == 0 {
		return 0, errors.New("inject: empty packet")
	}
	i.mu.RLock()
	defer i.mu.RUnlock()
	if i.fd4 < 0 {
		return 0, fmt.Errorf("inject: %w", net.ErrClosed)
	}
	i.mmu.Lock()
	defer i.mmu.Unlock()
	var mtu int
	var err error
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) < 20 {
			return 0, fmt.Errorf("inject: IPv4 packet of %d bytes has no whole header", len(pkt))
		}
		sa := &unix.SockaddrInet4{Port: 9}
		copy(sa.Addr[:], pkt[16:20])
		err = bindTo(i.mtu4, &i.mtuIf4, outIf(netip.AddrFrom4(sa.Addr), ifIdx))
		if err == nil {
			err = unix.Connect(i.mtu4, sa)
		}
		if err == nil {
			mtu, err = unix.GetsockoptInt(i.mtu4, unix.IPPROTO_IP, unix.IP_MTU)
		}
	case 6:
		if len(pkt) < 40 {
			return 0, fmt.Errorf("inject: IPv6 packet of %d bytes has no whole header", len(pkt))
		}
		sa := &unix.SockaddrInet6{Port: 9}
		copy(sa.Addr[:], pkt[24:40])
		sa.ZoneId = outIf(netip.AddrFrom16(sa.Addr), ifIdx)
		err = bindTo(i.mtu6, &i.mtuIf6, sa.ZoneId)
		if err == nil {
			err = unix.Connect(i.mtu6, sa)
		}
		if err == nil {
			mtu, err = unix.GetsockoptInt(i.mtu6, unix.IPPROTO_IPV6, unix.IPV6_MTU)
		}
	default:
		return 0, fmt.Errorf("inject: IP version %d is neither 4 nor 6", pkt[0]>>4)
	}
	if err != nil {
		return 0, fmt.Errorf("inject: ask the route MTU: %w", err)
	}
	return mtu, nil
}

// bindTo binds the UDP socket fd to interface ifIdx (0: none) unless it is
// bound there already (*cur). Connecting to a destination with a zone binds
// the socket to that interface, and a bound socket refuses another zone
// (EINVAL) and routes everything through its interface: so the binding is
// set for every connect, the zone's or none.
func bindTo(fd int, cur *uint32, ifIdx uint32) error {
	if *cur == ifIdx {
		return nil
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_BINDTOIFINDEX, int(ifIdx)); err != nil {
		return os.NewSyscallError("setsockopt SO_BINDTOIFINDEX", err)
	}
	*cur = ifIdx
	return nil
}

// Close closes the sockets. It is idempotent.
func (i *Injector) Close() error {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.fd4 < 0 {
		return nil
	}
	err4 := unix.Close(i.fd4)
	err6 := unix.Close(i.fd6)
	errRt := unix.Close(i.rt)
	// Under mmu: a RouteMTU may be using them (it holds mu read-locked
	// too, so none runs now; the lock orders the fields' writes).
	i.mmu.Lock()
	errM4 := unix.Close(i.mtu4)
	errM6 := unix.Close(i.mtu6)
	i.fd4, i.fd6, i.rt, i.mtu4, i.mtu6 = -1, -1, -1, -1, -1
	i.mmu.Unlock()
	if err := errors.Join(err4, err6, errRt, errM4, errM6); err != nil {
		return fmt.Errorf("inject: close: %w", err)
	}
	return nil
}

// checkLocal asks the routing table of the injector's namespace how it
// would route a packet to addr with the injector's mark (RTM_GETROUTE, as
// "ip route get addr mark M" does) and
// returns nil if addr is one of the host's addresses (a route of type
// local), else an error wrapping ErrNotLocal. Broadcast and multicast
// destinations are not local: a raw send to them goes out on the wire as
// well. Called with mu read-locked.
func (i *Injector) checkLocal(dst netip.Addr) error {
	i.rmu.Lock()
	defer i.rmu.Unlock()
	i.seq++
	m := i.rbuf[:0]
	// nlmsghdr, rtmsg, RTA_DST
	family, alen := unix.AF_INET6, 16
	if dst.Is4() {
		family, alen = unix.AF_INET, 4
	}
	total := unix.SizeofNlMsghdr + unix.SizeofRtMsg + unix.SizeofRtAttr + alen
	if i.mark != 0 {
		total += unix.SizeofRtAttr + 4 // RTA_MARK: policy rules may select by mark
	}
	m = binary.NativeEndian.AppendUint32(m, uint32(total))
	m = binary.NativeEndian.AppendUint16(m, unix.RTM_GETROUTE)
	m = binary.NativeEndian.AppendUint16(m, unix.NLM_F_REQUEST)
	m = binary.NativeEndian.AppendUint32(m, i.seq)
	m = binary.NativeEndian.AppendUint32(m, 0)
	m = append(m, byte(family), byte(alen*8), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0) // family, dst_len, src_len, tos, table, protocol, scope, type, flags
	m = binary.NativeEndian.AppendUint16(m, uint16(unix.SizeofRtAttr+alen))
	m = binary.NativeEndian.AppendUint16(m, unix.RTA_DST)
	a16 := dst.As16()
	m = append(m, a16[16-alen:]...)
	if i.mark != 0 {
		m = binary.NativeEndian.AppendUint16(m, unix.SizeofRtAttr+4)
		m = binary.NativeEndian.AppendUint16(m, unix.RTA_MARK)
		m = binary.NativeEndian.AppendUint32(m, i.mark)
	}
	if err := sendto(i.rt, m, nil, 0); err != nil {
		return fmt.Errorf("inject: ask the route to %s: %w", dst, err)
	}
	buf := i.rbuf[:cap(i.rbuf)]
	for {
		// recvfrom(2) without the address, which unix.Recvfrom allocates.
		r, _, e := unix.Syscall6(unix.SYS_RECVFROM, uintptr(i.rt), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)), 0, 0, 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return fmt.Errorf("inject: read the route to %s: %w", dst, os.NewSyscallError("recvfrom", e))
		}
		n := int(r)
		for b := buf[:n]; len(b) >= unix.SizeofNlMsghdr; {
			l := int(binary.NativeEndian.Uint32(b))
			if l < unix.SizeofNlMsghdr || l > len(b) {
				break
			}
			typ, seq, body := binary.NativeEndian.Uint16(b[4:]), binary.NativeEndian.Uint32(b[8:]), b[unix.SizeofNlMsghdr:l]
			b = b[min(nlmAlign(l), len(b)):]
			if seq != i.seq {
				continue // a late answer to an earlier request
			}
			switch {
			case typ == unix.NLMSG_ERROR && len(body) >= 4:
				if e := -int32(binary.NativeEndian.Uint32(body)); e != 0 {
					// No route at all (ENETUNREACH, ...): not local either.
					return fmt.Errorf("%w: %s: no route (%w)", ErrNotLocal, dst, unix.Errno(e))
				}
			case typ == unix.RTM_NEWROUTE && len(body) >= unix.SizeofRtMsg:
				if t := body[7]; t != unix.RTN_LOCAL {
					return fmt.Errorf("%w: %s is routed as %s", ErrNotLocal, dst, routeType(t))
				}
				return nil
			}
		}
	}
}

func nlmAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }

func routeType(t uint8) string {
	switch t {
	case unix.RTN_UNICAST:
		return "unicast (a destination elsewhere)"
	case unix.RTN_BROADCAST:
		return "broadcast"
	case unix.RTN_MULTICAST:
		return "multicast"
	case unix.RTN_ANYCAST:
		return "anycast"
	case unix.RTN_UNREACHABLE, unix.RTN_BLACKHOLE, unix.RTN_PROHIBIT:
		return "unreachable"
	}
	return fmt.Sprintf("route type %d", t)
}
