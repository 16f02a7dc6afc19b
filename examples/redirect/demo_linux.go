package main

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"time"

	"github.com/netdivert/divert"
	"github.com/netdivert/divert/internal/netnstest"
)

// demoMessages is how many messages the demo's client sends per address
// family; demoWait bounds the wait for each reply.
const (
	demoMessages = 3
	demoWait     = 2 * time.Second
)

// runDemo makes two namespaces joined by a veth pair, starts an echo server
// on port c.to in one (the server) and the redirection in the same
// namespace, and has a client in the other talk to port c.from over IPv4
// and IPv6 (TCP: one connection each, exchanging demoMessages lines; UDP:
// demoMessages datagrams and their replies). It prints the rewritten
// packets and what the server saw, checks that every message was answered
// through port c.from and received on port c.to, and removes the
// namespaces (and with them the handle's rules) before returning.
func runDemo(ctx context.Context, c *config, out io.Writer) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("-demo creates network namespaces: %w", os.ErrPermission)
	}
	link, err := netnstest.NewLink("dvrdr", 0)
	if err != nil {
		return fmt.Errorf("demo: make namespaces: %w", err)
	}
	defer link.Close() // on the early returns; closing twice is harmless
	cli, srv := &link.A, &link.B

	res := &DemoResult{
		Client:   fmt.Sprintf("%s (%s, %s)", cli.NS.Name, cli.V4, cli.V6),
		Server:   fmt.Sprintf("%s (%s, %s)", srv.NS.Name, srv.V4, srv.V6),
		Messages: demoMessages,
	}
	if !c.json {
		fmt.Fprintf(out, "divert redirect demo (%s)\n  client %s\n  server %s, listening on port %d\n  redirecting in the server's namespace: port %d -> %d, filter %q\n\n",
			c.proto, res.Client, res.Server, c.to, c.from, c.to, c.redirect.filter(c.filter))
	}

	server, err := startServer(srv.NS, c.proto, c.redirect.to)
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	serverClosed := false
	defer func() {
		if !serverClosed {
			server.Close()
		}
	}()
	// The handle opened inside Do stays in the server's namespace.
	var h *divert.Handle
	if err := srv.NS.Do(func() error { var err error; h, err = c.open(); return err }); err != nil {
		return fmt.Errorf("demo: in %s: %w", srv.NS.Name, err)
	}
	defer h.Close()

	st := newStats(c)
	loopCtx, stopLoop := context.WithCancel(ctx)
	defer stopLoop()
	loopErr := make(chan error, 1)
	go func() { loopErr <- relay(loopCtx, h, c, c.packetOut(out), st) }()

	var problems []string
	for _, dst := range []netip.Addr{srv.V4, srv.V6} {
		if ctx.Err() != nil {
			break
		}
		to := netip.AddrPortFrom(dst, c.redirect.from)
		got, err := exchange(cli.NS, c.proto, to, demoMessages, demoWait)
		res.Replies += got
		if err != nil {
			problems = append(problems, err.Error())
		}
		if !c.json {
			fmt.Fprintf(c.packetOut(out), "-- client -> %s: %d/%d replies\n", to, got, demoMessages)
		}
	}
	// The last packets of a TCP close (the client's final ACK) may still
	// be on their way: let them pass through the redirection.
	time.Sleep(100 * time.Millisecond)

	// Stop the loop: ShutdownRecv lets it drain, then it returns.
	stopLoop()
	if err := <-loopErr; err != nil {
		problems = append(problems, fmt.Sprintf("redirect loop: %v", err))
	}
	if err := h.Close(); err != nil {
		problems = append(problems, fmt.Sprintf("close handle: %v", err))
	}
	serverClosed = true
	if err := server.Close(); err != nil {
		problems = append(problems, fmt.Sprintf("close server: %v", err))
	}
	if ctx.Err() != nil {
		problems = append(problems, "interrupted")
	}
	// Before the verdict, which says the namespaces are gone.
	if err := link.Close(); err != nil {
		problems = append(problems, fmt.Sprintf("remove namespaces: %v", err))
	}

	seen := server.Served()
	res.Served = len(seen)
	s := st.snapshot()
	problems = append(problems, checkDemo(c, res, seen, &s, []netip.Addr{cli.V4, cli.V6})...)
	res.Problems = problems
	res.OK = len(problems) == 0
	if c.json {
		st.mu.Lock()
		st.s.Demo = res
		st.mu.Unlock()
		st.print(out, true)
	} else {
		fmt.Fprintf(out, "\nthe server saw on its own port:\n")
		for _, m := range seen {
			fmt.Fprintf(out, "  %s -> port %d: %q\n", m.remote, m.local.Port(), m.msg)
		}
		st.print(out, false)
		fmt.Fprintf(out, "\nclient: %d/%d replies through port %d; server: %d messages on port %d\n",
			res.Replies, 2*demoMessages, c.from, res.Served, c.to)
		for _, p := range problems {
			fmt.Fprintf(out, "PROBLEM: %s\n", p)
		}
	}
	if !res.OK {
		return fmt.Errorf("demo failed: %d problem(s)", len(problems))
	}
	if !c.json {
		fmt.Fprintf(out, "demo OK: the client talked to port %d only, the server answered on port %d; namespaces removed\n", c.from, c.to)
	}
	return nil
}

// checkDemo compares what the server and the redirection saw with the
// traffic the client sent from the addresses clients.
func checkDemo(c *config, r *DemoResult, seen []served, s *Summary, clients []netip.Addr) []string {
	var p []string
	want := len(clients) * r.Messages
	if r.Replies != want {
		p = append(p, fmt.Sprintf("client: %d replies, want %d", r.Replies, want))
	}
	if len(seen) != want {
		p = append(p, fmt.Sprintf("server: %d messages, want %d", len(seen), want))
	}
	for _, m := range seen {
		from := false
		for _, a := range clients {
			from = from || m.remote.Addr() == a
		}
		if m.local.Port() != c.redirect.to || !from {
			p = append(p, fmt.Sprintf("server: message %q from %s to port %d, want from the client to port %d", m.msg, m.remote, m.local.Port(), c.redirect.to))
		}
	}
	if s.Inbound == 0 || s.Outbound == 0 {
		p = append(p, fmt.Sprintf("redirect: rewrote %d inbound and %d outbound packets, want both", s.Inbound, s.Outbound))
	}
	if s.Malformed+s.Unexpected+s.Unfinished+s.SendFailed != 0 {
		p = append(p, fmt.Sprintf("redirect: %d malformed, %d unexpected, %d with unfinished checksums, %d failed reinjections; want none",
			s.Malformed, s.Unexpected, s.Unfinished, s.SendFailed))
	}
	return p
}
