//go:build linux

package inject

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Injector holds one raw socket per IP version. It is safe for concurrent
// use.
type Injector struct {
	mu       sync.RWMutex // Close takes it exclusively so no send uses a closed fd
	fd4, fd6 int          // -1 once closed
	mark     uint32
}

// New opens the raw sockets, in the network namespace of the calling
// thread, with SO_MARK mark (0 = no mark). Errors wrap os.ErrPermission when
// the caller lacks CAP_NET_RAW (sockets) or CAP_NET_ADMIN (mark).
func New(mark uint32) (*Injector, error) {
	i := &Injector{fd4: -1, fd6: -1, mark: mark}
	var err error
	if i.fd4, err = rawSocket(unix.AF_INET, mark); err != nil {
		return nil, err
	}
	if i.fd6, err = rawSocket(unix.AF_INET6, mark); err != nil {
		unix.Close(i.fd4)
		return nil, err
	}
	return i, nil
}

func rawSocket(family int, mark uint32) (int, error) {
	fd, err := unix.Socket(family, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return -1, wrap("open raw socket", err, "CAP_NET_RAW")
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
func (i *Injector) Outbound(pkt []byte) error { return i.send(pkt) }

// Inbound delivers pkt (a whole IPv4 or IPv6 packet addressed to this host)
// to the local stack as if it had been received. The packet enters through
// lo, so this implementation does not use ifIdx (see the package
// documentation).
func (i *Injector) Inbound(pkt []byte, ifIdx uint32) error {
	_ = ifIdx
	return i.send(pkt)
}

func (i *Injector) send(pkt []byte) error {
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
		return sendto(i.fd6, pkt, unsafe.Pointer(&sa), unix.SizeofSockaddrInet6)
	}
	return fmt.Errorf("inject: IP version %d is neither 4 nor 6", pkt[0]>>4)
}

// sendto is sendto(2) without the allocation that unix.Sendto makes for the
// address.
func sendto(fd int, p []byte, sa unsafe.Pointer, salen uintptr) error {
	for {
		_, _, e := unix.Syscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), 0, uintptr(sa), salen)
		switch e {
		case 0:
			return nil
		case unix.EINTR:
			continue
		case unix.EPERM, unix.EACCES:
			// Also what a netfilter DROP on the output path returns.
			return fmt.Errorf("inject: sendto: packet refused (dropped by a firewall rule, or CAP_NET_RAW missing): %w", os.NewSyscallError("sendto", e))
		}
		return fmt.Errorf("inject: %w", os.NewSyscallError("sendto", e))
	}
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
	i.fd4, i.fd6 = -1, -1
	if err := errors.Join(err4, err6); err != nil {
		return fmt.Errorf("inject: close: %w", err)
	}
	return nil
}
