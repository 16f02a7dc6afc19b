package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/netdivert/divert/internal/netnstest"
)

// The demo's and the tests' traffic: an echo server on the redirection's
// port To in one namespace and a client in another that talks to port From,
// both bounded in count and time.

// maxMessages bounds an exchange; serverIdle bounds how long the server
// waits on one connection.
const (
	maxMessages = 100
	serverIdle  = 10 * time.Second
)

// served is one message the echo server received.
type served struct {
	local, remote netip.AddrPort // as the server's socket saw them
	msg           string
}

// echoServer answers every message ("hello N") with "echo: " and the
// message, on TCP (a line per message) or UDP (a datagram per message),
// and records what it received.
type echoServer struct {
	ln net.Listener   // TCP
	pc *net.UDPConn   // UDP
	wg sync.WaitGroup // the accept loop and the connections' handlers

	mu    sync.Mutex
	seen  []served
	conns map[net.Conn]bool
}

// startServer starts an echo server for proto ("tcp" or "udp") in ns on
// port, on every address of both families.
func startServer(ns *netnstest.NS, proto string, port uint16) (*echoServer, error) {
	s := &echoServer{conns: map[net.Conn]bool{}}
	addr := fmt.Sprintf(":%d", port)
	err := ns.Do(func() error {
		var err error
		if proto == "udp" {
			var a *net.UDPAddr
			if a, err = net.ResolveUDPAddr("udp", addr); err == nil {
				s.pc, err = net.ListenUDP("udp", a)
			}
		} else {
			s.ln, err = net.Listen("tcp", addr)
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("echo server on %s port %d in %s: %w", proto, port, ns.Name, err)
	}
	s.wg.Add(1)
	if s.pc != nil {
		go s.serveUDP()
	} else {
		go s.acceptTCP()
	}
	return s, nil
}

func (s *echoServer) record(local, remote netip.AddrPort, msg string) {
	s.mu.Lock()
	s.seen = append(s.seen, served{local: unmapPort(local), remote: unmapPort(remote), msg: msg})
	s.mu.Unlock()
}

func (s *echoServer) serveUDP() {
	defer s.wg.Done()
	local := s.pc.LocalAddr().(*net.UDPAddr).AddrPort()
	buf := make([]byte, 2048)
	for {
		n, from, err := s.pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			return // closed
		}
		msg := string(buf[:n])
		s.record(local, from, msg)
		s.pc.WriteToUDPAddrPort([]byte("echo: "+msg), from)
	}
}

func (s *echoServer) acceptTCP() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return // closed
		}
		s.mu.Lock()
		s.conns[c] = true
		s.mu.Unlock()
		s.wg.Add(1)
		go s.serveTCP(c)
	}
}

// serveTCP answers one connection's lines until the client closes it (or
// serverIdle passes without a line), then closes it.
func (s *echoServer) serveTCP(c net.Conn) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		c.Close()
	}()
	local := c.LocalAddr().(*net.TCPAddr).AddrPort()
	remote := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	r := bufio.NewReader(c)
	for {
		c.SetDeadline(time.Now().Add(serverIdle))
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		msg := strings.TrimSuffix(line, "\n")
		s.record(local, remote, msg)
		if _, err := fmt.Fprintf(c, "echo: %s\n", msg); err != nil {
			return
		}
	}
}

// Served returns what the server received so far.
func (s *echoServer) Served() []served {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]served(nil), s.seen...)
}

// Close stops the server, closes its connections and waits for its
// goroutines.
func (s *echoServer) Close() error {
	var err error
	if s.pc != nil {
		err = s.pc.Close()
	} else {
		err = s.ln.Close()
		s.mu.Lock()
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
	}
	s.wg.Wait()
	return err
}

// exchange is the client: from ns it sends n messages ("hello 1" ...) to
// dst over proto, one at a time, waiting up to wait for each reply, and
// returns how many right replies came back. TCP: one connection, a line per
// message, closed in order at the end (the client waits for the server's
// close). UDP: a connected socket, which takes replies from dst alone. The
// first failure ends it and is returned.
func exchange(ns *netnstest.NS, proto string, dst netip.AddrPort, n int, wait time.Duration) (replies int, err error) {
	if n < 1 || n > maxMessages || wait <= 0 || wait > 5*time.Second {
		return 0, fmt.Errorf("exchange: %d messages, wait %v: outside 1..%d, (0, 5s]", n, wait, maxMessages)
	}
	var c net.Conn
	err = ns.Do(func() error {
		var err error
		d := net.Dialer{Timeout: wait}
		c, err = d.Dial(proto, dst.String())
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("%s client in %s: connect to %s: %w", proto, ns.Name, dst, err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	buf := make([]byte, 2048)
	for i := 1; i <= n; i++ {
		msg := fmt.Sprintf("hello %d", i)
		c.SetDeadline(time.Now().Add(wait))
		var reply string
		if proto == "udp" {
			if _, err = c.Write([]byte(msg)); err == nil {
				var k int
				k, err = c.Read(buf)
				reply = string(buf[:k])
			}
		} else {
			if _, err = fmt.Fprintf(c, "%s\n", msg); err == nil {
				reply, err = r.ReadString('\n')
				reply = strings.TrimSuffix(reply, "\n")
			}
		}
		if err != nil {
			return replies, fmt.Errorf("%s client in %s: message %d to %s: %w", proto, ns.Name, i, dst, err)
		}
		if reply != "echo: "+msg {
			return replies, fmt.Errorf("%s client in %s: message %d to %s: reply %q", proto, ns.Name, i, dst, reply)
		}
		replies++
	}
	if tc, ok := c.(*net.TCPConn); ok {
		// An orderly close, so that the FIN exchange too goes through the
		// redirection while it still runs.
		c.SetDeadline(time.Now().Add(wait))
		if err := tc.CloseWrite(); err != nil {
			return replies, fmt.Errorf("tcp client in %s: close: %w", ns.Name, err)
		}
		if _, err := r.ReadByte(); !errors.Is(err, io.EOF) {
			return replies, fmt.Errorf("tcp client in %s: waiting for the server's close: %v", ns.Name, err)
		}
	}
	return replies, nil
}

// unmapPort unmaps an IPv4-mapped address (a dual-stack socket's view of
// an IPv4 peer).
func unmapPort(a netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
}
