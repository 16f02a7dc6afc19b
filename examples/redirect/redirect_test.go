//go:build linux

package main

import (
	"fmt"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/netdivert/divert/examples/internal/extest"
	"github.com/netdivert/divert/examples/internal/exutil"
	"github.com/netdivert/divert/internal/netnstest"
)

func TestMain(m *testing.M) { extest.Main(m) }

// offloadOff turns checksum offload off on both ends of l (ethtool -K dev
// tx off rx off, inside the namespaces): senders then compute every TCP and
// UDP checksum in software, and the veth hands packets to the receiving
// stack unverified (CHECKSUM_NONE), which checks each checksum and counts
// a wrong one in InCsumErrors. With offload on, a veth passes its packets
// on marked verified or with the checksum left to finish, and a wrong
// incremental update would go unnoticed.
func offloadOff(t *testing.T, l *netnstest.Link) {
	t.Helper()
	if _, err := exec.LookPath("ethtool"); err != nil {
		t.Fatalf("ethtool is needed to turn checksum offload off (.ci/run installs it): %v", err)
	}
	for _, e := range []*netnstest.End{&l.A, &l.B} {
		if out, err := e.NS.Run(t.Context(), "ethtool", "-K", e.If, "tx", "off", "rx", "off"); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		out, err := e.NS.Run(t.Context(), "ethtool", "-k", e.If)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range []string{"rx-checksumming: off", "tx-checksumming: off"} {
			if !strings.Contains(string(out), f) {
				t.Fatalf("%s in %s: no %q after ethtool -K:\n%s", e.If, e.NS.Name, f, out)
			}
		}
	}
}

// csumErrors returns the checksum error counters of ns: Tcp InCsumErrors
// and Udp InCsumErrors of /proc/net/snmp, Udp6InCsumErrors of
// /proc/net/snmp6 (the Tcp counters cover both families). They are read by
// a process inside the namespace (/proc/net follows the reading process's
// namespace).
func csumErrors(t *testing.T, ns *netnstest.NS) map[string]uint64 {
	t.Helper()
	m := map[string]uint64{}
	out, err := ns.Run(t.Context(), "cat", "/proc/net/snmp")
	if err != nil {
		t.Fatal(err)
	}
	// Pairs of lines: "Tcp: name name ..." then "Tcp: value value ...".
	lines := strings.Split(string(out), "\n")
	for i := 0; i+1 < len(lines); i += 2 {
		names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		if len(names) == 0 || len(names) != len(values) || names[0] != values[0] {
			continue
		}
		for j := 1; j < len(names); j++ {
			if names[j] == "InCsumErrors" && (names[0] == "Tcp:" || names[0] == "Udp:") {
				v, err := strconv.ParseUint(values[j], 10, 64)
				if err != nil {
					t.Fatalf("%s %s: %v", names[0], names[j], err)
				}
				m[strings.TrimSuffix(names[0], ":")+" InCsumErrors"] = v
			}
		}
	}
	out, err = ns.Run(t.Context(), "cat", "/proc/net/snmp6")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "Udp6InCsumErrors" {
			v, err := strconv.ParseUint(f[1], 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			m[f[0]] = v
		}
	}
	if len(m) != 3 {
		t.Fatalf("checksum error counters of %s: found %v, want Tcp, Udp and Udp6", ns.Name, m)
	}
	return m
}

// TestRedirect runs the built command in the server's namespace of a veth
// pair with checksum offload off, for TCP and UDP, and talks to the
// redirected port from the other namespace over IPv4 and IPv6: every
// message is answered through port From, the server received them on port
// To from the client's addresses, the receiving stacks of both namespaces
// counted no checksum error (a wrong incremental update would show there,
// and would stall the exchange), and once the command has exited (Ctrl-C)
// port From is closed again.
func TestRedirect(t *testing.T) {
	netnstest.RequireRoot(t)
	bin := extest.Build(t)
	const from, to, messages = 8080, 9090, 4
	for _, proto := range []string{"tcp", "udp"} {
		t.Run(proto, func(t *testing.T) {
			l := netnstest.Pair(t, "dvrd"+proto[:1], 0)
			cli, srv := &l.A, &l.B
			offloadOff(t, l)
			before := map[*netnstest.NS]map[string]uint64{cli.NS: csumErrors(t, cli.NS), srv.NS: csumErrors(t, srv.NS)}

			server, err := startServer(srv.NS, proto, to)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { server.Close() })
			p := extest.Start(t, srv.NS, 30*time.Second, bin, "-proto", proto, "-from", strconv.Itoa(from), "-to", strconv.Itoa(to), "-json")
			p.WaitReady(t)
			var problems []string
			for _, dst := range []netip.Addr{srv.V4, srv.V6} {
				got, err := exchange(cli.NS, proto, netip.AddrPortFrom(dst, from), messages, 2*time.Second)
				if err != nil || got != messages {
					problems = append(problems, fmt.Sprintf("client to %v port %d: %d/%d replies: %v", dst, from, got, messages, err))
				}
			}
			time.Sleep(100 * time.Millisecond) // the end of a TCP close
			if err := p.Interrupt(); err != nil {
				t.Fatal(err)
			}
			out, errOut, err := p.Wait()
			if err != nil {
				t.Fatalf("redirect: %v\n%s", err, errOut)
			}
			// No checksum error in either namespace (checked first: when
			// the exchange failed, this says whether a checksum was why).
			for _, ns := range []*netnstest.NS{cli.NS, srv.NS} {
				after := csumErrors(t, ns)
				for k, v := range after {
					if v != before[ns][k] {
						t.Errorf("%s: %s went from %d to %d", ns.Name, k, before[ns][k], v)
					}
				}
			}
			if len(problems) > 0 {
				t.Fatalf("%s\nredirect's output:\n%s", strings.Join(problems, "\n"), errOut)
			}
			s := extest.DecodeJSON[Summary](t, out)
			t.Logf("%s: %d packets: %d inbound, %d outbound rewritten; checksums %d incremental, %d recomputed", proto, s.Packets, s.Inbound, s.Outbound, s.Incremental, s.Recomputed)
			if s.Inbound < messages*2 || s.Outbound < messages*2 || s.Malformed+s.Unexpected+s.Unfinished+s.SendFailed != 0 {
				t.Errorf("summary %+v", s)
			}
			// The client's segments and datagrams reach the server with
			// finished checksums (offload off), so every inbound rewrite
			// is the setter's incremental update alone, which the
			// server's stack verifies. (The server's own TCP segments
			// come out of its stack with the checksum left to the device,
			// and are recomputed; its UDP datagrams are updated
			// incrementally too.)
			inc := strings.Count(errOut, fmt.Sprintf("dst port %d -> %d, checksum updated\n", from, to))
			if uint64(inc) != s.Inbound {
				t.Errorf("%d inbound packets updated incrementally, want all %d: the test would not check the incremental update\n%s", inc, s.Inbound, errOut)
			}

			// The server saw every message on its own port, from the client.
			seen := server.Served()
			if len(seen) != 2*messages {
				t.Errorf("server got %d messages, want %d", len(seen), 2*messages)
			}
			for _, m := range seen {
				if m.local.Port() != to || (m.remote.Addr() != cli.V4 && m.remote.Addr() != cli.V6) {
					t.Errorf("server got %q from %s on port %d; want from the client on %d", m.msg, m.remote, m.local.Port(), to)
				}
			}
			// Without the redirection, port From is closed: nothing
			// else made the exchange work.
			if got, err := exchange(cli.NS, proto, netip.AddrPortFrom(srv.V4, from), 1, 500*time.Millisecond); err == nil || got != 0 {
				t.Errorf("after redirect exited, port %d still answers (%d replies)", from, got)
			}
		})
	}
}

// TestDemo runs -demo for both protocols: it makes, uses and removes its
// own namespaces.
func TestDemo(t *testing.T) {
	netnstest.RequireRoot(t)
	bin := extest.Build(t)
	for _, proto := range []string{"tcp", "udp"} {
		out, err := exec.Command(bin, "-demo", "-proto", proto).CombinedOutput()
		if err != nil {
			t.Fatalf("demo %s: %v\n%s", proto, err, out)
		}
		text := string(out)
		for _, want := range []string{"demo OK", "client: 6/6 replies through port 8080; server: 6 messages on port 9090", "dst port 8080 -> 9090", "src port 9090 -> 8080"} {
			if !strings.Contains(text, want) {
				t.Errorf("demo %s output lacks %q:\n%s", proto, want, text)
			}
		}
		out, err = exec.Command(bin, "-demo", "-proto", proto, "-json", "-quiet").Output()
		if err != nil {
			t.Fatalf("demo %s -json: %v\n%s", proto, err, out)
		}
		s := extest.DecodeJSON[Summary](t, string(out))
		if s.Demo == nil || !s.Demo.OK || s.Demo.Replies != 6 || s.Demo.Served != 6 || s.Inbound == 0 || s.Outbound == 0 {
			t.Fatalf("demo %s summary: %+v demo %+v", proto, s, s.Demo)
		}
		// Nothing left behind: the demo's own namespaces are gone.
		extest.NoNamespaces(t, strings.Fields(s.Demo.Client)[0], strings.Fields(s.Demo.Server)[0])
	}
}

// TestNoPrivileges: without privileges it says so plainly.
func TestNoPrivileges(t *testing.T) {
	netnstest.RequireRoot(t)
	bin := extest.Build(t)
	ns := netnstest.NewT(t, "dvrdpriv")
	_, errOut, err := extest.Run(t, ns, 20*time.Second, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", bin, "-from", "8080", "-to", "9090")
	if err == nil {
		t.Fatal("ran without privileges")
	}
	if !strings.Contains(errOut, exutil.PrivilegeHint) {
		t.Fatalf("no plain privilege message:\n%s", errOut)
	}
}

// TestRedirectConntrack: on a host whose firewall drops the packets
// conntrack finds invalid, the rewrite must happen where conntrack sees
// port From both ways. Conntrack takes the client's SYN at prerouting, to
// port From, before the handle's input chain rewrites it; at output it runs
// at priority -200, so a handle of the default priority, 201, rewrites the
// server's replies before it and they fit the connection. (With -priority
// 0, conntrack sees a SYN-ACK from port To that fits no connection,
// invalid, and such a firewall drops it: this test then fails.)
func TestRedirectConntrack(t *testing.T) {
	netnstest.RequireRoot(t)
	if _, err := exec.LookPath("nft"); err != nil {
		t.Fatalf("nft is needed for the firewall (.ci/run installs nftables): %v", err)
	}
	bin := extest.Build(t)
	const from, to, messages = 8080, 9090, 3
	l := netnstest.Pair(t, "dvrdct", 0)
	cli, srv := &l.A, &l.B
	const ruleset = `table inet fw {
	chain in { type filter hook input priority 0; ct state invalid counter drop; }
	chain out { type filter hook output priority 0; ct state invalid counter drop; }
}
`
	cmd := exec.CommandContext(t.Context(), "ip", "netns", "exec", srv.NS.Name, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(ruleset)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v\n%s", err, out)
	}
	server, err := startServer(srv.NS, "tcp", to)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close() })
	p := extest.Start(t, srv.NS, 30*time.Second, bin, "-from", strconv.Itoa(from), "-to", strconv.Itoa(to), "-json")
	p.WaitReady(t)
	var problems []string
	for _, dst := range []netip.Addr{srv.V4, srv.V6} {
		if got, err := exchange(cli.NS, "tcp", netip.AddrPortFrom(dst, from), messages, 2*time.Second); err != nil || got != messages {
			problems = append(problems, fmt.Sprintf("client to %v port %d: %d/%d replies: %v", dst, from, got, messages, err))
		}
	}
	time.Sleep(100 * time.Millisecond) // the end of a TCP close
	p.Interrupt()
	_, errOut, err := p.Wait()
	if err != nil {
		problems = append(problems, fmt.Sprintf("redirect: %v", err))
	}
	out, err := srv.NS.Run(t.Context(), "nft", "list", "ruleset")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(string(out), "counter packets 0 bytes 0 drop") != 2 {
		problems = append(problems, "the firewall dropped packets conntrack found invalid:\n"+string(out))
	}
	if len(problems) > 0 {
		t.Fatalf("%s\nredirect's output:\n%s", strings.Join(problems, "\n"), errOut)
	}
}
