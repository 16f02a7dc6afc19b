package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/ti-mo/conntrack"

	"github.com/netdivert/divert"
	"github.com/netdivert/divert/internal/netnstest"
)

const (
	demoPortOut  = 8001 // the peer's server: the host connects out
	demoPortIn   = 8002 // the host's server: the peer connects in
	demoPortUDP  = 8003
	demoPortLoop = 8004 // a server on the host's loopback
	demoWait     = 5 * time.Second
)

// demoFlow is a flow the demo makes and expects to see.
type demoFlow struct {
	name      string
	proto     uint8
	out, loop bool
	port      uint16 // the server's port (remote when out, else local); the ICMP type
}

func (d demoFlow) match(a *divert.Address) bool {
	f := &a.Flow
	port := f.RemotePort
	if !a.Outbound {
		port = f.LocalPort
	}
	if d.proto == 1 || d.proto == 58 {
		port = f.LocalPort // the type
	}
	return f.Protocol == d.proto && a.Outbound == d.out && a.Loopback == d.loop && port == d.port
}

// runDemo makes two namespaces joined by a veth pair, tracks the flows of
// one of them (the host) while it talks with the other (the peer) and with
// itself, deletes the host's conntrack entries (as conntrack -F) so that
// the deletions come at once rather than after conntrack's timeouts, and
// checks that every flow was reported established and deleted. It removes
// the namespaces (and with them the handle's table) before returning.
func runDemo(ctx context.Context, c *config, out io.Writer) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("-demo creates network namespaces: %w", os.ErrPermission)
	}
	link, err := netnstest.NewLink("dvflow", 0)
	if err != nil {
		return fmt.Errorf("demo: make namespaces: %w", err)
	}
	defer link.Close()
	host, peer := &link.A, &link.B
	res := &DemoResult{
		Host:   fmt.Sprintf("%s (%s, %s)", host.NS.Name, host.V4, host.V6),
		Peer:   fmt.Sprintf("%s (%s, %s)", peer.NS.Name, peer.V4, peer.V6),
		Filter: c.filter,
	}
	evOut := c.eventOut(out)
	if !c.json {
		fmt.Fprintf(out, "flowtrack demo\n  host %s\n  peer %s\n  tracking the host's flows with filter %q\n\n", res.Host, res.Peer, c.filter)
	}
	var h *divert.Handle
	if err := host.NS.Do(func() (err error) { h, err = open(c.filter); return err }); err != nil {
		return fmt.Errorf("demo: in %s: %w", host.NS.Name, err)
	}
	defer h.Close()

	var mu sync.Mutex
	var got []divert.Address
	var s Summary
	loopCtx, stopLoop := context.WithCancel(ctx)
	defer stopLoop()
	loopErr := make(chan error, 1)
	go func() {
		loopErr <- track(loopCtx, h, 0, evOut, &s, func(a *divert.Address) {
			mu.Lock()
			got = append(got, *a)
			mu.Unlock()
		})
	}()

	lo := netip.MustParseAddr("127.0.0.1")
	var problems []string
	for _, srv := range []struct {
		ns *netnstest.NS
		ap netip.AddrPort
	}{{peer.NS, netip.AddrPortFrom(peer.V4, demoPortOut)}, {host.NS, netip.AddrPortFrom(host.V4, demoPortIn)}, {host.NS, netip.AddrPortFrom(lo, demoPortLoop)}} {
		stop, err := serveTCP(srv.ns, srv.ap)
		if err != nil {
			return err
		}
		defer stop()
	}
	flows := []demoFlow{
		{"TCP out", 6, true, false, demoPortOut},
		{"TCP in", 6, false, false, demoPortIn},
		{"TCP loopback, client", 6, true, true, demoPortLoop},
		{"TCP loopback, server", 6, false, true, demoPortLoop},
		{"UDP out", 17, true, false, demoPortUDP},
		{"ICMP echo", 1, true, false, 8},
		{"ICMPv6 echo", 58, true, false, 128},
	}
	step := func(err error) {
		if err != nil {
			problems = append(problems, err.Error())
		}
	}
	// The connections and the UDP socket stay open until the flows are
	// reported, so that their process can be found (see the README).
	var conns []io.Closer
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	talk := func(c io.Closer, err error) {
		if c != nil {
			conns = append(conns, c)
		}
		step(err)
	}
	talk(dialTCP(host.NS, netip.AddrPortFrom(peer.V4, demoPortOut)))
	talk(dialTCP(peer.NS, netip.AddrPortFrom(host.V4, demoPortIn)))
	talk(dialTCP(host.NS, netip.AddrPortFrom(lo, demoPortLoop)))
	talk(sendUDP(host.NS, netip.AddrPortFrom(peer.V4, demoPortUDP)))
	for _, dst := range []netip.Addr{peer.V4, peer.V6} {
		if n, err := host.NS.Ping(dst, 1, time.Second); n != 1 {
			problems = append(problems, fmt.Sprintf("ping %s: no reply (%v)", dst, err))
		}
	}
	seenAll := func(ev divert.Event) []string {
		mu.Lock()
		defer mu.Unlock()
		var missing []string
		for _, f := range flows {
			found := false
			for i := range got {
				if got[i].Event == ev && f.match(&got[i]) {
					found = true
					break
				}
			}
			if !found {
				missing = append(missing, f.name)
			}
		}
		return missing
	}
	wait := func(ev divert.Event) {
		end := time.Now().Add(demoWait)
		for len(seenAll(ev)) > 0 && time.Now().Before(end) && ctx.Err() == nil {
			time.Sleep(20 * time.Millisecond)
		}
		if m := seenAll(ev); len(m) > 0 {
			problems = append(problems, fmt.Sprintf("no %v event within %v for: %v", ev, demoWait, m))
		}
	}
	wait(divert.EventFlowEstablished)
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	if !c.json {
		fmt.Fprintf(out, "\ndeleting the host's conntrack entries (as conntrack -F does) rather than waiting out their timeouts\n\n")
	}
	step(host.NS.Do(flushConntrack))
	wait(divert.EventFlowDeleted)

	stopLoop()
	if err := <-loopErr; err != nil {
		problems = append(problems, fmt.Sprintf("flowtrack loop: %v", err))
	}
	// The same flow both times: each deletion has its establishment.
	mu.Lock()
	for i := range got {
		if got[i].Event != divert.EventFlowDeleted {
			continue
		}
		paired := false
		for j := range got[:i] {
			if got[j].Event == divert.EventFlowEstablished && got[j].Flow == got[i].Flow {
				paired = true
			}
		}
		if !paired {
			problems = append(problems, "a deletion without its establishment: "+formatEvent(&got[i]))
		}
	}
	mu.Unlock()
	s.print(io.Discard, h, false) // fills s.Overflows
	if s.Overflows != 0 {
		problems = append(problems, fmt.Sprintf("%d events lost", s.Overflows))
	}
	if err := h.Close(); err != nil {
		problems = append(problems, fmt.Sprintf("close: %v", err))
	}
	if err := link.Close(); err != nil {
		problems = append(problems, err.Error())
	}
	res.Problems = problems
	res.OK = len(problems) == 0 && ctx.Err() == nil
	s.Demo = res
	if c.json {
		s.print(out, h, true)
	} else {
		fmt.Fprintf(out, "\n%d established, %d deleted\n", s.Established, s.Deleted)
		for _, p := range problems {
			fmt.Fprintf(out, "problem: %s\n", p)
		}
		if res.OK {
			fmt.Fprintln(out, "demo OK: every flow reported established, then deleted with the same 5-tuple")
		}
	}
	if !res.OK {
		return errors.New("demo failed")
	}
	return nil
}

// serveTCP accepts connections on ap in ns, reads each to its end and
// closes it, until stop.
func serveTCP(ns *netnstest.NS, ap netip.AddrPort) (stop func(), err error) {
	ln, err := ns.ListenTCP(ap.String())
	if err != nil {
		return nil, fmt.Errorf("demo: %w", err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(demoWait))
			io.Copy(io.Discard, c)
			c.Close()
		}
	}()
	return func() { ln.Close(); wg.Wait() }, nil
}

// dialTCP connects from ns to ap and sends a line.
func dialTCP(ns *netnstest.NS, ap netip.AddrPort) (c net.Conn, err error) {
	err = ns.Do(func() error {
		if c, err = net.DialTimeout("tcp", ap.String(), demoWait); err != nil {
			return fmt.Errorf("demo: connect to %s: %w", ap, err)
		}
		_, err = c.Write([]byte("flowtrack demo\n"))
		return err
	})
	return c, err
}

// sendUDP sends a datagram from ns to ap.
func sendUDP(ns *netnstest.NS, ap netip.AddrPort) (*net.UDPConn, error) {
	c, err := ns.DialUDP(ap)
	if err != nil {
		return nil, err
	}
	_, err = c.Write([]byte("flowtrack demo\n"))
	return c, err
}

// flushConntrack deletes every conntrack entry of the calling thread's
// network namespace.
func flushConntrack() error {
	c, err := conntrack.Dial(nil)
	if err != nil {
		return fmt.Errorf("demo: conntrack: %w", err)
	}
	defer c.Close()
	if err := c.Flush(); err != nil {
		return fmt.Errorf("demo: flush conntrack: %w", err)
	}
	return nil
}
