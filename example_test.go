package divert_test

import (
	"errors"
	"fmt"
	"log"
	"net/netip"
	"os"
	"time"

	"github.com/netdivert/divert"
)

// The classic divert loop: take every inbound ICMP echo request out of the
// host's path, show it, and put it back.
func ExampleOpen() {
	h, err := divert.Open("inbound and icmp.Type == 8", divert.LayerNetwork, 0, 0)
	if errors.Is(err, os.ErrPermission) {
		log.Fatal("run as root (Linux, FreeBSD) or Administrator (Windows)")
	}
	if err != nil {
		log.Fatal(err)
	}
	defer h.Close()
	buf := make([]byte, divert.MTUMax)
	var addr divert.Address
	for i := 0; i < 10; i++ {
		n, err := h.Recv(buf, &addr)
		if err != nil {
			log.Fatal(err)
		}
		p, _ := divert.ParsePacket(buf[:n])
		fmt.Printf("%d bytes from interface %d, protocol %d\n", n, addr.IfIdx, p.Protocol)
		if _, err := h.Send(buf[:n], &addr); err != nil {
			log.Fatal(err)
		}
	}
}

// Watch the host's TCP connections come and go at the flow layer
// (Windows: WinDivert's; Linux: conntrack's events). An event carries no
// packet: Recv takes no buffer.
func ExampleOpen_flow() {
	h, err := divert.Open("tcp and not loopback", divert.LayerFlow, 0, divert.FlagSniff|divert.FlagRecvOnly)
	if err != nil {
		log.Fatal(err)
	}
	defer h.Close()
	var addr divert.Address
	for i := 0; i < 10; i++ {
		if _, err := h.Recv(nil, &addr); err != nil {
			log.Fatal(err)
		}
		f := &addr.Flow
		fmt.Printf("%v %v:%d -> %v:%d outbound=%v\n", addr.Event,
			netip.AddrFrom16(f.LocalAddr).Unmap(), f.LocalPort,
			netip.AddrFrom16(f.RemoteAddr).Unmap(), f.RemotePort, addr.Outbound)
	}
}

// Attach to a rule an administrator wrote, the way "ipchains -j DIVERT 1234"
// worked: on Linux "iptables -A INPUT -p icmp -j NFQUEUE --queue-num 1234".
func ExampleOpenPort() {
	h, err := divert.OpenPort(1234, 0)
	if err != nil {
		log.Fatal(err)
	}
	defer h.Close()
	buf := make([]byte, divert.MTUMax)
	var addr divert.Address
	h.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := h.Recv(buf, &addr)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return
	}
	if err != nil {
		log.Fatal(err)
	}
	h.Drop(&addr) // swallow it
	_ = n
}

// Inject a packet the program made, without intercepting anything.
func ExampleHandle_Send() {
	h, err := divert.Open("false", divert.LayerNetwork, 0, divert.FlagSendOnly)
	if err != nil {
		log.Fatal(err)
	}
	defer h.Close()
	pkt := []byte{ // IPv4 UDP 10.0.0.1:1000 -> 10.0.0.2:2000, payload "hi"
		0x45, 0, 0, 30, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
		0x03, 0xe8, 0x07, 0xd0, 0, 10, 0, 0, 'h', 'i',
	}
	addr := divert.Address{Outbound: true}
	if err := divert.CalcChecksums(pkt, &addr, 0); err != nil {
		log.Fatal(err)
	}
	if _, err := h.Send(pkt, &addr); err != nil {
		log.Fatal(err)
	}
}

// Several handles, one reader goroutine each: on Linux the kernel spreads
// the packets over their queues by address pair.
func ExampleOpenQueues() {
	hs, err := divert.OpenQueues("tcp", divert.LayerNetwork, 0, 0, 2)
	if err != nil {
		log.Fatal(err)
	}
	for _, h := range hs {
		go func(h *divert.Handle) {
			defer h.Close()
			buf := make([]byte, divert.MTUMax)
			var addr divert.Address
			for {
				n, err := h.Recv(buf, &addr)
				if err != nil {
					return
				}
				h.Send(buf[:n], &addr)
			}
		}(h)
	}
}
