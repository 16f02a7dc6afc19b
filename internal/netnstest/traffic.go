//go:build linux

package netnstest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/netdivert/divert/internal/packet"
)

// MaxCount bounds every traffic loop of this package.
const MaxCount = 100000

// MaxWait bounds every wait of this package.
const MaxWait = 30 * time.Second

func checkBounds(count int, wait time.Duration) error {
	if count < 0 || count > MaxCount {
		return fmt.Errorf("netnstest: count %d outside 0..%d", count, MaxCount)
	}
	if wait <= 0 || wait > MaxWait {
		return fmt.Errorf("netnstest: wait %v outside (0, %v]", wait, MaxWait)
	}
	return nil
}

// ListenUDP opens a UDP socket inside the namespace bound to addr, e.g.
// "10.201.1.2:9000" or "[fd00:c9:1::2]:0".
func (n *NS) ListenUDP(addr string) (*net.UDPConn, error) {
	var c *net.UDPConn
	err := n.Do(func() error {
		a, err := net.ResolveUDPAddr("udp", addr)
		if err != nil {
			return err
		}
		c, err = net.ListenUDP("udp", a)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("netnstest: listen udp %s in %s: %w", addr, n.Name, err)
	}
	return c, nil
}

// ListenTCP opens a TCP listener inside the namespace bound to addr, e.g.
// "10.201.1.2:9000" or "[fd00:c9:1::2]:0".
func (n *NS) ListenTCP(addr string) (net.Listener, error) {
	var ln net.Listener
	if err := n.Do(func() (err error) { ln, err = net.Listen("tcp", addr); return err }); err != nil {
		return nil, fmt.Errorf("netnstest: listen tcp %s in %s: %w", addr, n.Name, err)
	}
	return ln, nil
}

// DialUDP opens a UDP socket inside the namespace connected to raddr.
func (n *NS) DialUDP(raddr netip.AddrPort) (*net.UDPConn, error) {
	var c *net.UDPConn
	err := n.Do(func() error {
		var err error
		c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(raddr))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("netnstest: dial udp %s in %s: %w", raddr, n.Name, err)
	}
	return c, nil
}

// SendUDP sends count copies of payload to dst from a fresh socket inside
// the namespace, pausing gap between datagrams (0 = none).
func (n *NS) SendUDP(dst netip.AddrPort, payload []byte, count int, gap time.Duration) error {
	if err := checkBounds(count, time.Second); err != nil {
		return err
	}
	if gap < 0 || time.Duration(count)*gap > MaxWait {
		return fmt.Errorf("netnstest: %d datagrams with a gap of %v exceed %v", count, gap, MaxWait)
	}
	c, err := n.DialUDP(dst)
	if err != nil {
		return err
	}
	defer c.Close()
	for i := 0; i < count; i++ {
		c.SetWriteDeadline(time.Now().Add(time.Second))
		if _, err := c.Write(payload); err != nil {
			return fmt.Errorf("netnstest: send udp to %s from %s: %w", dst, n.Name, err)
		}
		if gap > 0 {
			time.Sleep(gap)
		}
	}
	return nil
}

// RecvUDP reads datagrams from c until it has max of them or wait has
// passed since the call, and returns their payloads (copies). A timeout is
// not an error: the caller compares len of the result with what it expected.
func RecvUDP(c *net.UDPConn, max int, wait time.Duration) ([][]byte, error) {
	if err := checkBounds(max, wait); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(wait)
	if err := c.SetReadDeadline(deadline); err != nil {
		return nil, err
	}
	defer c.SetReadDeadline(time.Time{})
	var got [][]byte
	buf := make([]byte, 65536)
	for len(got) < max {
		nr, err := c.Read(buf)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return got, nil
			}
			return got, fmt.Errorf("netnstest: receive udp: %w", err)
		}
		got = append(got, append([]byte(nil), buf[:nr]...))
	}
	return got, nil
}

// Ping sends count ICMP (or ICMPv6) echo requests to dst from inside the
// namespace, one at a time, waiting up to wait for each reply, and returns
// how many replies came back. Missing replies are not an error.
func (n *NS) Ping(dst netip.Addr, count int, wait time.Duration) (int, error) {
	if err := checkBounds(count, wait); err != nil {
		return 0, err
	}
	if time.Duration(count)*wait > MaxWait {
		return 0, fmt.Errorf("netnstest: %d pings waiting %v each exceed %v", count, wait, MaxWait)
	}
	dst = dst.Unmap()
	network, reqType, repType := "ip4:icmp", byte(8), byte(0)
	if dst.Is6() {
		network, reqType, repType = "ip6:ipv6-icmp", 128, 129
	}
	var c net.PacketConn
	err := n.Do(func() error {
		var err error
		c, err = net.ListenPacket(network, "")
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("netnstest: icmp socket in %s: %w", n.Name, err)
	}
	defer c.Close()

	id := uint16(os.Getpid()) ^ uint16(counter.Add(1))
	to := &net.IPAddr{IP: dst.AsSlice(), Zone: dst.Zone()}
	req := make([]byte, 8+16)
	copy(req[8:], "netnstest ping..")
	buf := make([]byte, 1500)
	replies := 0
	for seq := 1; seq <= count; seq++ {
		req[0], req[1] = reqType, 0
		binary.BigEndian.PutUint16(req[2:], 0)
		binary.BigEndian.PutUint16(req[4:], id)
		binary.BigEndian.PutUint16(req[6:], uint16(seq))
		if dst.Is4() {
			// The kernel computes ICMPv6 checksums of raw sockets itself.
			binary.BigEndian.PutUint16(req[2:], Checksum(req))
		}
		if _, err := c.WriteTo(req, to); err != nil {
			return replies, fmt.Errorf("netnstest: ping %s from %s: %w", dst, n.Name, err)
		}
		deadline := time.Now().Add(wait)
		c.SetReadDeadline(deadline)
		for {
			nr, from, err := c.ReadFrom(buf)
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) {
					break
				}
				return replies, fmt.Errorf("netnstest: ping %s from %s: %w", dst, n.Name, err)
			}
			ip, _ := netip.AddrFromSlice(from.(*net.IPAddr).IP)
			m := buf[:nr]
			if nr >= 8 && ip.Unmap() == dst && m[0] == repType && m[1] == 0 &&
				binary.BigEndian.Uint16(m[4:]) == id && binary.BigEndian.Uint16(m[6:]) == uint16(seq) {
				replies++
				break
			}
		}
	}
	return replies, nil
}

// Checksum is the Internet checksum (RFC 1071) of b, ready to store.
func Checksum(b []byte) uint16 { return ^packet.Checksum(b, 0) }
