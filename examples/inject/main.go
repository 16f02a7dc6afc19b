// Command inject builds one packet from its flags — an ICMP echo request, a
// UDP datagram or a TCP SYN, IPv4 or IPv6 — and injects it with a send-only
// divert handle (filter "false": nothing is intercepted). By default the
// packet goes out as if this host sent it; with -in it is delivered to this
// host as if received on interface -ifidx.
//
//	sudo inject -proto icmp -dst 10.0.0.1                       # ping without ping
//	sudo inject -proto udp -dst 10.0.0.1 -dport 53 -payload hi
//	sudo inject -in -proto udp -src 192.0.2.7 -dst 10.0.0.2 -dport 9000 -payload hello
package main

import (
	"context"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"time"

	"github.com/netdivert/divert"
	"github.com/netdivert/divert/examples/internal/exutil"
)

const prog = "inject"

// config is the command line.
type config struct {
	spec
	in      bool
	ifIdx   uint32
	count   int
	gap     time.Duration
	verbose bool
}

func parseFlags(args []string) (*config, error) {
	fs := flag.NewFlagSet(prog, flag.ContinueOnError)
	c := &config{}
	fs.StringVar(&c.proto, "proto", "icmp", "packet to build: icmp (echo request), udp or tcp (SYN)")
	src := fs.String("src", "", "source address (outbound default: the address the route to -dst uses)")
	dst := fs.String("dst", "", "destination address (required)")
	sport := fs.Uint("sport", 0, "UDP/TCP source port (0 = random 49152..65535)")
	dport := fs.Uint("dport", 0, "UDP/TCP destination port (required for udp and tcp)")
	payload := fs.String("payload", "", "payload text")
	payloadHex := fs.String("payload-hex", "", "payload as hex (instead of -payload)")
	ttl := fs.Uint("ttl", 64, "IPv4 TTL or IPv6 hop limit")
	id := fs.Uint("id", 0, "ICMP echo identifier (0 = random)")
	fs.BoolVar(&c.in, "in", false, "inject inbound: deliver to this host as if received on -ifidx")
	ifIdx := fs.Uint("ifidx", 0, "interface index for -in (0 = the interface holding -dst)")
	fs.IntVar(&c.count, "count", 1, "packets to send (ICMP sequence numbers count up)")
	fs.DurationVar(&c.gap, "gap", 100*time.Millisecond, "pause between packets")
	fs.BoolVar(&c.verbose, "v", false, "print each packet in hex")
	if err := exutil.ParseArgs(fs, args); err != nil {
		return nil, err
	}
	var err error
	if *dst == "" {
		return nil, errors.New("-dst is required")
	}
	if c.dst, err = netip.ParseAddr(*dst); err != nil {
		return nil, fmt.Errorf("-dst: %w", err)
	}
	c.dst = c.dst.Unmap()
	if *src != "" {
		if c.src, err = netip.ParseAddr(*src); err != nil {
			return nil, fmt.Errorf("-src: %w", err)
		}
		c.src = c.src.Unmap()
	} else if c.in {
		return nil, errors.New("-in needs -src (the remote host the packet seems to come from)")
	}
	switch c.proto {
	case "icmp":
	case "udp", "tcp":
		if *dport == 0 {
			return nil, fmt.Errorf("-proto %s needs -dport", c.proto)
		}
	default:
		return nil, fmt.Errorf("-proto %q: want icmp, udp or tcp", c.proto)
	}
	if *sport > 0xffff || *dport > 0xffff || *id > 0xffff || *ttl > 255 || *ttl == 0 || *ifIdx > 0xffffffff {
		return nil, errors.New("-sport, -dport and -id must fit 16 bits, -ttl 1..255, -ifidx 32 bits")
	}
	if c.src.IsValid() && c.src.Is4() != c.dst.Is4() {
		return nil, fmt.Errorf("-src %v and -dst %v: one address family, please", c.src, c.dst)
	}
	if c.count < 1 || c.count > 100000 {
		return nil, fmt.Errorf("-count %d outside 1..100000", c.count)
	}
	if c.gap < 0 {
		return nil, errors.New("-gap must not be negative")
	}
	c.sport, c.dport, c.ttl, c.id, c.ifIdx = uint16(*sport), uint16(*dport), uint8(*ttl), uint16(*id), uint32(*ifIdx)
	if c.sport == 0 {
		c.sport = uint16(49152 + rand.IntN(16384))
	}
	if c.id == 0 {
		c.id = uint16(1 + rand.IntN(0xffff))
	}
	switch c.proto {
	case "tcp":
		c.seq = rand.Uint32()
	case "icmp":
		c.seq = 1 // echo sequence numbers start at 1, as ping's do
	}
	c.ipid = uint16(rand.Uint32())
	if *payloadHex != "" {
		if c.payload, err = hex.DecodeString(*payloadHex); err != nil {
			return nil, fmt.Errorf("-payload-hex: %w", err)
		}
	} else {
		c.payload = []byte(*payload)
	}
	return c, nil
}

func main() {
	c, err := parseFlags(os.Args[1:])
	exutil.CheckFlags(prog, err)
	exutil.Run(prog, 0, func(ctx context.Context) error { return run(ctx, c, os.Stdout) })
}

func run(ctx context.Context, c *config, out io.Writer) error {
	if !c.src.IsValid() {
		src, err := routeSource(c.dst)
		if err != nil {
			return err
		}
		c.src = src
	}
	if c.in && c.ifIdx == 0 {
		idx, err := interfaceOf(c.dst)
		if err != nil {
			return err
		}
		c.ifIdx = idx
	}
	h, err := divert.Open("false", divert.LayerNetwork, 0, divert.FlagSendOnly)
	if err != nil {
		return fmt.Errorf("open a send-only handle: %w", err)
	}
	defer h.Close()

	dir := "outbound"
	if c.in {
		dir = fmt.Sprintf("inbound on interface %d", c.ifIdx)
		if runtime.GOOS == "linux" {
			dir = "inbound (through lo)" // see divert.Handle.Send
		}
	}
	for i := range c.count {
		if i > 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(c.gap):
			}
		}
		pkt, err := c.build()
		if err != nil {
			return err
		}
		addr := divert.Address{Layer: divert.LayerNetwork, Outbound: !c.in, IPv6: c.dst.Is6()}
		if c.in {
			addr.IfIdx = c.ifIdx
		}
		if err := divert.CalcChecksums(pkt, &addr, 0); err != nil {
			return fmt.Errorf("checksums: %w", err)
		}
		if _, err := h.Send(pkt, &addr); err != nil {
			return fmt.Errorf("send: %w", err)
		}
		p, _ := divert.ParsePacket(pkt)
		src, dst := exutil.Endpoints(&p)
		fmt.Fprintf(out, "sent %s %s -> %s len=%d %s", exutil.ProtoName(p.Protocol), src, dst, len(pkt), dir)
		if c.proto == "icmp" {
			fmt.Fprintf(out, " id=%d seq=%d", c.id, uint16(c.seq))
		}
		fmt.Fprintln(out)
		if c.verbose {
			fmt.Fprintf(out, "    %s\n", exutil.HexPrefix(pkt, len(pkt)))
		}
		if c.proto == "icmp" {
			c.seq++
		} else if c.proto == "tcp" {
			c.seq += 1 << 20 // a new connection attempt
		}
		c.ipid++
	}
	return nil
}

// routeSource returns the source address the host would use towards dst,
// found by connecting a UDP socket (which sends nothing).
func routeSource(dst netip.Addr) (netip.Addr, error) {
	conn, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, 9)))
	if err != nil {
		return netip.Addr{}, fmt.Errorf("no route to %v to pick a source address (give -src): %w", dst, err)
	}
	defer conn.Close()
	return conn.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap(), nil
}

// interfaceOf returns the index of the interface that holds addr.
func interfaceOf(addr netip.Addr) (uint32, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return 0, err
	}
	for _, ifi := range ifs {
		addrs, err := ifi.Addrs()
		if err != nil {
			continue
		}
		for _, a := range addrs {
			if pn, ok := a.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(pn.IP); ok && ip.Unmap() == addr {
					return uint32(ifi.Index), nil
				}
			}
		}
	}
	return 0, fmt.Errorf("no interface holds %v: give -ifidx", addr)
}
