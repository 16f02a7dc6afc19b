package divert

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// routeQuery asks the routing table of the namespace it was opened in,
// over rtnetlink, which interface a packet received on one interface is
// forwarded through ("ip route get DST from SRC iif IIF"). A datagram that
// LayerNetworkForward reassembles in user space was taken fragment by
// fragment at prerouting, before the kernel routed it, so its outgoing
// interface, the forward layer's IfIdx (as WinDivert reports it, and as
// the forward hook gives it for whole packets), comes from here.
type routeQuery struct {
	mu  sync.Mutex
	fd  int // -1 once closed
	seq uint32
	req []byte
	buf []byte
}

// routeQueryTimeout bounds the wait for the kernel's answer (it answers
// within the request's syscall; the bound is a safety net).
const routeQueryTimeout = time.Second

// newRouteQuery opens an rtnetlink socket in the calling thread's network
// namespace.
func newRouteQuery() (*routeQuery, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("divert: open a route socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("divert: bind a route socket: %w", err)
	}
	tv := unix.NsecToTimeval(int64(routeQueryTimeout))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("divert: route socket timeout: %w", err)
	}
	return &routeQuery{fd: fd, req: make([]byte, 0, 128), buf: make([]byte, 8192)}, nil
}

func (q *routeQuery) close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.fd >= 0 {
		unix.Close(q.fd)
		q.fd = -1
	}
}

// outIf returns the interface the namespace forwards a packet from src to
// dst, received on interface iif, through: with its IPv4 TOS and its mark,
// which policy routing rules (ip rule ... tos, fwmark) may select on.
func (q *routeQuery) outIf(src, dst netip.Addr, iif uint32, tos byte, mark uint32) (uint32, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.fd < 0 {
		return 0, net.ErrClosed
	}
	q.seq++
	q.req = appendRouteGet(q.req[:0], q.seq, src, dst, iif, tos, mark)
	if err := unix.Sendto(q.fd, q.req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return 0, fmt.Errorf("route request: %w", err)
	}
	for {
		n, _, err := unix.Recvfrom(q.fd, q.buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("route answer: %w", err)
		}
		oif, done, err := parseRouteAnswer(q.buf[:n], q.seq)
		if done {
			return oif, err
		}
	}
}

// appendRouteGet appends an RTM_GETROUTE request for the route a packet
// from src to dst received on iif takes, with IPv4 TOS tos (IPv6 has no
// such field in the request) and mark (none when 0).
func appendRouteGet(b []byte, seq uint32, src, dst netip.Addr, iif uint32, tos byte, mark uint32) []byte {
	family, bits := byte(unix.AF_INET), byte(32)
	if dst.Is6() {
		family, bits, tos = unix.AF_INET6, 128, 0
	}
	start := len(b)
	b = binary.NativeEndian.AppendUint32(b, 0) // length, set below
	b = binary.NativeEndian.AppendUint16(b, unix.RTM_GETROUTE)
	b = binary.NativeEndian.AppendUint16(b, unix.NLM_F_REQUEST)
	b = binary.NativeEndian.AppendUint32(b, seq)
	b = binary.NativeEndian.AppendUint32(b, 0) // port: the kernel
	// struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
	b = append(b, family, bits, bits, tos, 0, 0, 0, 0)
	b = binary.NativeEndian.AppendUint32(b, 0)
	b = appendRouteAttr(b, unix.RTA_DST, dst.AsSlice())
	b = appendRouteAttr(b, unix.RTA_SRC, src.AsSlice())
	b = appendRouteAttr(b, unix.RTA_IIF, binary.NativeEndian.AppendUint32(nil, iif))
	if mark != 0 {
		b = appendRouteAttr(b, unix.RTA_MARK, binary.NativeEndian.AppendUint32(nil, mark))
	}
	binary.NativeEndian.PutUint32(b[start:], uint32(len(b)-start))
	return b
}

func appendRouteAttr(b []byte, typ uint16, v []byte) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(unix.SizeofRtAttr+len(v)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, v...)
	for len(b)%unix.NLMSG_ALIGNTO != 0 {
		b = append(b, 0)
	}
	return b
}

var errNoOIF = errors.New("the route has no output interface")

// parseRouteAnswer reads the answer to request seq from the datagram b:
// done reports whether b held it (a route or an error).
func parseRouteAnswer(b []byte, seq uint32) (oif uint32, done bool, err error) {
	msgs, err := syscall.ParseNetlinkMessage(b)
	if err != nil {
		return 0, true, fmt.Errorf("route answer: %w", err)
	}
	for _, m := range msgs {
		if m.Header.Seq != seq {
			continue // a late answer to an earlier request
		}
		switch m.Header.Type {
		case unix.NLMSG_ERROR:
			if len(m.Data) < 4 {
				return 0, true, errors.New("route answer: short error")
			}
			if e := int32(binary.NativeEndian.Uint32(m.Data)); e != 0 {
				return 0, true, unix.Errno(-e)
			}
			return 0, true, errNoOIF
		case unix.RTM_NEWROUTE:
			if len(m.Data) < unix.SizeofRtMsg {
				return 0, true, errors.New("route answer: short message")
			}
			attrs, err := syscall.ParseNetlinkRouteAttr(&m)
			if err != nil {
				return 0, true, fmt.Errorf("route answer: %w", err)
			}
			for _, a := range attrs {
				if a.Attr.Type == unix.RTA_OIF && len(a.Value) >= 4 {
					return binary.NativeEndian.Uint32(a.Value), true, nil
				}
			}
			return 0, true, errNoOIF
		}
	}
	return 0, false, nil
}
