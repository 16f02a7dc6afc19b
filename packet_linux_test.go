//go:build linux

package divert

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/internal/netnstest"
)

// TestKernelChecksums checks CalcChecksums against checksums the Linux
// kernel computed: two namespaces joined by a veth pair with transmit
// checksum offload off (so the kernel computes every checksum in software),
// bounded ICMP, UDP and TCP traffic over IPv4 and IPv6, every packet on the
// wire captured with an AF_PACKET socket. With DIVERT_UPDATE_KERNEL_PACKETS=1
// it rewrites the testdata file that TestKernelPacketsTestdata replays.
func TestKernelChecksums(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dvpk", 0)
	for _, e := range []netnstest.End{l.A, l.B} {
		if err := txChecksumOff(e.NS, e.If); err != nil {
			t.Fatal(err)
		}
	}
	var fd int
	if err := l.B.NS.Do(func() error {
		var err error
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return fmt.Errorf("AF_PACKET socket: %w", err)
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: l.B.IfIdx}); err != nil {
			unix.Close(fd)
			return fmt.Errorf("bind AF_PACKET: %w", err)
		}
		tv := unix.NsecToTimeval(int64(300 * time.Millisecond))
		return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })

	// Bounded traffic, both directions, both IP versions.
	for _, dst := range []netip.Addr{l.B.V4, l.B.V6} {
		if n, err := l.A.NS.Ping(dst, 3, time.Second); err != nil || n == 0 {
			t.Fatalf("ping %v: %d replies, %v", dst, n, err)
		}
		for _, size := range []int{0, 1, 37, 1000} {
			if err := l.A.NS.SendUDP(netip.AddrPortFrom(dst, 9), make([]byte, size), 1, 0); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, dst := range []netip.Addr{l.A.V4, l.A.V6} {
		for i := 0; i < 2; i++ { // one per socket: the port unreachable refuses a second
			if err := l.B.NS.SendUDP(netip.AddrPortFrom(dst, 7), []byte("kernel checksum"), 1, 0); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, e := range []netip.Addr{l.B.V4, l.B.V6} {
		tcpExchange(t, l.A.NS, l.B.NS, e)
	}

	// Read what the wire carried: at most 2000 packets, at most 10 s.
	counts := map[string]int{}
	var keep []string
	withData := map[string]bool{}
	buf := make([]byte, 65536)
	deadline := time.Now().Add(10 * time.Second)
	for i, idle := 0, 0; i < 2000 && idle < 3 && time.Now().Before(deadline); i++ {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			idle++
			continue
		}
		if err != nil {
			t.Fatalf("recvfrom: %v", err)
		}
		idle = 0
		pkt := append([]byte(nil), buf[:n]...)
		p, err := ParsePacket(pkt)
		if err != nil {
			continue // not IP (ARP)
		}
		var kind string
		switch {
		case p.ICMP != nil:
			kind = "ipv4-icmp"
		case p.ICMPv6 != nil:
			kind = "ipv6-icmpv6"
		case p.UDP != nil:
			kind = "udp"
		case p.TCP != nil:
			kind = "tcp"
		default:
			continue
		}
		if kind == "udp" || kind == "tcp" {
			kind = map[bool]string{false: "ipv4-", true: "ipv6-"}[p.IsIPv6()] + kind
		}
		if len(p.Ext) > 0 {
			kind += "-ext" // e.g. MLD reports with a Hop-by-Hop header
		}
		checkKernelPacket(t, kind, pkt)
		counts[kind]++
		if counts[kind] <= 2 || len(p.Payload) > 100 && !withData[kind] {
			withData[kind] = withData[kind] || len(p.Payload) > 100
			keep = append(keep, kind+" "+fmt.Sprintf("%x", pkt))
		}
	}
	t.Logf("kernel-made packets checked: %v", counts)
	for _, k := range kernelKinds {
		if counts[k] == 0 {
			t.Errorf("no %s packet captured", k)
		}
	}
	if os.Getenv("DIVERT_UPDATE_KERNEL_PACKETS") == "1" && !t.Failed() {
		text := "# Packets the Linux kernel made (checksums computed in software, veth with tx\n" +
			"# checksum offload off), captured by TestKernelChecksums in packet_linux_test.go\n" +
			"# (DIVERT_UPDATE_KERNEL_PACKETS=1). Format: kind hex.\n" + strings.Join(keep, "\n") + "\n"
		if err := os.WriteFile(kernelPacketsFile, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// tcpExchange opens a TCP connection from a to b's address dst, moves a few
// bounded writes each way and closes it, and also dials a closed port
// (a SYN answered by a RST).
func tcpExchange(t *testing.T, a, b *netnstest.NS, dst netip.Addr) {
	t.Helper()
	var ln net.Listener
	if err := b.Do(func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(dst, 0).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 4096)
		for total := 0; total < 3*777; {
			n, err := c.Read(buf)
			if err != nil {
				done <- err
				return
			}
			total += n
			if _, err := c.Write(buf[:n]); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	var c net.Conn
	if err := a.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", ln.Addr().String(), 2*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	reply := make([]byte, 4096)
	for i := 0; i < 3; i++ {
		msg := []byte(strings.Repeat(string(rune('a'+i)), 777))
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		for got := 0; got < len(msg); {
			n, err := c.Read(reply)
			if err != nil {
				t.Fatal(err)
			}
			got += n
		}
	}
	c.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// A closed port: SYN, then RST from b's kernel.
	if err := a.Do(func() error {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(dst, 1).String(), time.Second)
		if err == nil {
			c.Close()
			return errors.New("port 1 unexpectedly open")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// txChecksumOff turns transmit checksum offload off on ifName inside ns
// (ethtool -K ifName tx off, through the SIOCETHTOOL ioctl).
func txChecksumOff(ns *netnstest.NS, ifName string) error {
	return ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		const ethtoolSTXCSUM = 0x17
		ev := struct{ cmd, data uint32 }{cmd: ethtoolSTXCSUM, data: 0}
		var ifr struct {
			name [unix.IFNAMSIZ]byte
			data unsafe.Pointer
			_    [16]byte
		}
		copy(ifr.name[:], ifName)
		ifr.data = unsafe.Pointer(&ev)
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr))); errno != 0 {
			return fmt.Errorf("ethtool -K %s tx off in %s: %w", ifName, ns.Name, errno)
		}
		return nil
	})
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
