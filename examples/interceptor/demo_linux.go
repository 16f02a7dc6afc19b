package main

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/netdivert/divert"
	"github.com/netdivert/divert/internal/netnstest"
)

// Demo traffic, bounded: demoPings echo requests and demoDatagrams UDP
// datagrams per address family.
const (
	demoPings     = 4
	demoDatagrams = 4
	demoPort      = 9999
)

// runDemo makes two namespaces joined by a veth pair, diverts the
// receiver's ICMP echo and UDP traffic with the interceptor loop while the
// sender pings it and sends it datagrams, prints what was seen and checks
// that every packet was seen once and reinjected, every ping answered and
// every datagram delivered. It removes the namespaces (and with them the
// handle's rules) before returning.
func runDemo(ctx context.Context, c *config, out io.Writer) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("-demo creates network namespaces: %w", os.ErrPermission)
	}
	link, err := netnstest.NewLink("dvdemo", 0)
	if err != nil {
		return fmt.Errorf("demo: make namespaces: %w", err)
	}
	defer link.Close() // on the early returns; closing twice is harmless
	snd, rcv := &link.A, &link.B

	filter := defaultDemoFilter()
	if c.Filter != "true" {
		filter = c.Filter
	}
	res := &DemoResult{
		Sender:    fmt.Sprintf("%s (%s, %s)", snd.NS.Name, snd.V4, snd.V6),
		Receiver:  fmt.Sprintf("%s (%s, %s)", rcv.NS.Name, rcv.V4, rcv.V6),
		Filter:    filter,
		Pings:     demoPings,
		Datagrams: demoDatagrams,
	}
	if !c.json {
		fmt.Fprintf(out, "divert demo\n  sender   %s\n  receiver %s\n  diverting in the receiver with filter %q, priority %d, layer %v\n\n",
			res.Sender, res.Receiver, filter, c.Priority, c.Layer)
	}

	// Sockets and the handle opened inside Do stay in the receiver's
	// namespace for their whole life.
	udp4, err := rcv.NS.ListenUDP(netip.AddrPortFrom(rcv.V4, demoPort).String())
	if err != nil {
		return err
	}
	defer udp4.Close()
	udp6, err := rcv.NS.ListenUDP(netip.AddrPortFrom(rcv.V6, demoPort).String())
	if err != nil {
		return err
	}
	defer udp6.Close()
	var h *divert.Handle
	err = rcv.NS.Do(func() error {
		var err error
		h, err = divert.Open(filter, c.Layer, c.Priority, 0)
		return err
	})
	if err != nil {
		return fmt.Errorf("demo: open handle in %s: %w", rcv.NS.Name, err)
	}
	defer h.Close()

	st := newStats()
	loopCtx, stopLoop := context.WithCancel(ctx)
	defer stopLoop()
	loopErr := make(chan error, 1)
	go func() { loopErr <- intercept(loopCtx, h, c, c.packetOut(out), st) }()

	// Traffic, one step after another so that the output reads in order.
	var wg sync.WaitGroup
	var got4, got6 [][]byte
	var rerr4, rerr6 error
	wg.Add(2)
	go func() { defer wg.Done(); got4, rerr4 = netnstest.RecvUDP(udp4, demoDatagrams, 5*time.Second) }()
	go func() { defer wg.Done(); got6, rerr6 = netnstest.RecvUDP(udp6, demoDatagrams, 5*time.Second) }()
	var problems []string
	if res.Replies4, err = snd.NS.Ping(rcv.V4, demoPings, time.Second); err != nil {
		problems = append(problems, fmt.Sprintf("ping %s: %v", rcv.V4, err))
	}
	if res.Replies6, err = snd.NS.Ping(rcv.V6, demoPings, time.Second); err != nil {
		problems = append(problems, fmt.Sprintf("ping %s: %v", rcv.V6, err))
	}
	payload := []byte("hello from the divert demo")
	if err := snd.NS.SendUDP(netip.AddrPortFrom(rcv.V4, demoPort), payload, demoDatagrams, 20*time.Millisecond); err != nil {
		problems = append(problems, err.Error())
	}
	if err := snd.NS.SendUDP(netip.AddrPortFrom(rcv.V6, demoPort), payload, demoDatagrams, 20*time.Millisecond); err != nil {
		problems = append(problems, err.Error())
	}
	wg.Wait()
	for _, e := range []error{rerr4, rerr6} {
		if e != nil {
			problems = append(problems, e.Error())
		}
	}
	res.Delivered = len(got4) + len(got6)

	// Stop the loop: ShutdownRecv lets it drain, then it returns.
	stopLoop()
	if err := <-loopErr; err != nil {
		problems = append(problems, fmt.Sprintf("interceptor loop: %v", err))
	}
	if err := h.Close(); err != nil {
		problems = append(problems, fmt.Sprintf("close handle: %v", err))
	}
	if ctx.Err() != nil {
		problems = append(problems, "interrupted")
	}
	// Before the verdict, which says the namespaces are gone.
	if err := link.Close(); err != nil {
		problems = append(problems, fmt.Sprintf("remove namespaces: %v", err))
	}

	s := st.snapshot()
	problems = append(problems, checkDemo(res, &s)...)
	res.Problems = problems
	res.OK = len(problems) == 0
	if c.json {
		st.mu.Lock()
		st.s.Demo = res
		st.mu.Unlock()
		st.print(out, true)
	} else {
		st.print(out, false)
		fmt.Fprintf(out, "\nping IPv4 %d/%d replies, IPv6 %d/%d replies; UDP %d/%d datagrams delivered\n",
			res.Replies4, demoPings, res.Replies6, demoPings, res.Delivered, 2*demoDatagrams)
		for _, p := range problems {
			fmt.Fprintf(out, "PROBLEM: %s\n", p)
		}
	}
	if !res.OK {
		return fmt.Errorf("demo failed: %d problem(s)", len(problems))
	}
	if !c.json {
		fmt.Fprintln(out, "demo OK: every packet was diverted once, shown and reinjected; namespaces removed")
	}
	return nil
}

// defaultDemoFilter selects the demo's traffic: echo requests and replies
// of both families (not IPv6 neighbour discovery) and the UDP datagrams.
func defaultDemoFilter() string {
	return fmt.Sprintf("icmp.Type == 8 or icmp.Type == 0 or icmpv6.Type == 128 or icmpv6.Type == 129 or udp.DstPort == %d", demoPort)
}

// checkDemo compares what the loop saw with the traffic that was sent.
func checkDemo(r *DemoResult, s *Summary) []string {
	var p []string
	if r.Replies4 != r.Pings || r.Replies6 != r.Pings {
		p = append(p, fmt.Sprintf("ping: %d+%d replies, want %d+%d", r.Replies4, r.Replies6, r.Pings, r.Pings))
	}
	if r.Delivered != 2*r.Datagrams {
		p = append(p, fmt.Sprintf("udp: %d datagrams delivered, want %d", r.Delivered, 2*r.Datagrams))
	}
	want := map[string]ProtoStats{
		"ICMP":   {In: uint64(r.Pings), Out: uint64(r.Pings)},
		"ICMPv6": {In: uint64(r.Pings), Out: uint64(r.Pings)},
		"UDP":    {In: uint64(2 * r.Datagrams)},
	}
	if r.Filter != defaultDemoFilter() {
		return p // a custom filter: the packet counts are the user's business
	}
	for name, w := range want {
		g := s.Protocols[name]
		if g == nil {
			g = &ProtoStats{}
		}
		if g.In != w.In || g.Out != w.Out || g.Reinjected != w.In+w.Out {
			p = append(p, fmt.Sprintf("%s: saw %d in, %d out, reinjected %d; want %d in, %d out, all reinjected",
				name, g.In, g.Out, g.Reinjected, w.In, w.Out))
		}
	}
	for name := range s.Protocols {
		if _, ok := want[name]; !ok {
			p = append(p, fmt.Sprintf("unexpected %s packets diverted", name))
		}
	}
	if s.Failed != 0 {
		p = append(p, fmt.Sprintf("%d reinjections failed", s.Failed))
	}
	return p
}
