//go:build linux

package netnstest

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"testing"
	"time"
)

// End is one side of a veth link: its namespace, interface and addresses.
type End struct {
	NS    *NS
	If    string     // interface name inside NS
	IfIdx int        // interface index inside NS
	V4    netip.Addr // 10.x address on If
	V6    netip.Addr // fd00::/8 address on If
}

// Link is two namespaces joined by one veth pair, each end with an IPv4 and
// an IPv6 address in the same /24 and /64.
type Link struct {
	A, B End
}

// subnet hands out a distinct third octet per link so that addresses in
// failure messages say which link they belong to.
func subnet() uint8 { return uint8(counter.Add(1)%250 + 1) }

// NewLink makes two namespaces (prefix+"a", prefix+"b") joined by a veth pair
// with MTU mtu (0 = default): A has 10.201.N.1/24 and fd00:c9:N::1/64
// (0xc9 = 201), B has .2 and ::2. The caller closes both namespaces (Link.Close).
func NewLink(prefix string, mtu int) (*Link, error) {
	a, err := New(prefix + "a")
	if err != nil {
		return nil, err
	}
	b, err := New(prefix + "b")
	if err != nil {
		a.Close()
		return nil, err
	}
	l, err := link(a, b, 201, mtu)
	if err != nil {
		a.Close()
		b.Close()
		return nil, err
	}
	return l, nil
}

// link joins a and b with a veth in 10.<net>.N.0/24 and fd00:<net>:N::/64.
func link(a, b *NS, net uint8, mtu int) (*Link, error) {
	n := subnet()
	l := &Link{
		A: End{NS: a, V4: netip.AddrFrom4([4]byte{10, net, n, 1}), V6: v6(net, n, 1)},
		B: End{NS: b, V4: netip.AddrFrom4([4]byte{10, net, n, 2}), V6: v6(net, n, 2)},
	}
	ifA, ifB, err := Veth(a, b, l.A.V4.String()+"/24", l.B.V4.String()+"/24", mtu)
	if err != nil {
		return nil, err
	}
	l.A.If, l.B.If = ifA, ifB
	for _, e := range []*End{&l.A, &l.B} {
		if err := ipCmd("-n", e.NS.Name, "-6", "addr", "add", e.V6.String()+"/64", "dev", e.If, "nodad"); err != nil {
			return nil, fmt.Errorf("netnstest: %w", err)
		}
		if e.IfIdx, err = e.NS.IfIndex(e.If); err != nil {
			return nil, err
		}
	}
	for _, e := range []*End{&l.A, &l.B} {
		if err := e.NS.waitLocal6(e.V6); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// waitLocal6 waits until the kernel has installed the local route of the
// IPv6 address a (the address work runs asynchronously, after the carrier
// comes up; before that, packets to a are dropped as unroutable).
func (n *NS) waitLocal6(a netip.Addr) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
		out, err := exec.CommandContext(ctx, "ip", "-n", n.Name, "-6", "route", "show", "table", "local", a.String()).CombinedOutput()
		cancel()
		if err != nil {
			return fmt.Errorf("netnstest: local route of %s in %s: %w: %s", a, n.Name, err, out)
		}
		if len(bytes.TrimSpace(out)) > 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("netnstest: %s in %s never became usable", a, n.Name)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func v6(net, n, host uint8) netip.Addr {
	return netip.AddrFrom16([16]byte{0: 0xfd, 3: net, 5: n, 15: host})
}

// Close removes both namespaces. A second Close does nothing (NS.Close).
func (l *Link) Close() error {
	err1 := l.A.NS.Close()
	err2 := l.B.NS.Close()
	if err1 != nil {
		return err1
	}
	return err2
}

// Pair is NewLink for tests: it fails t on error and removes both namespaces
// when the test ends.
func Pair(t testing.TB, prefix string, mtu int) *Link {
	t.Helper()
	l, err := NewLink(prefix, mtu)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("netnstest: %v", err)
		}
	})
	return l
}

// Routed is three namespaces in a line, Left — Router — Right, with IPv4 and
// IPv6 forwarding on in Router and routes so that Left and Right reach each
// other through it.
type Routed struct {
	Left, Right *Link // Left.A is the left host, Left.B and Right.A are the router's ends, Right.B the right host
}

// LeftHost is the namespace left of the router.
func (r *Routed) LeftHost() *NS { return r.Left.A.NS }

// Router is the namespace that forwards between the two hosts.
func (r *Routed) Router() *NS { return r.Left.B.NS }

// RightHost is the namespace right of the router.
func (r *Routed) RightHost() *NS { return r.Right.B.NS }

// NewRouted makes the three namespaces: the left link is in 10.202.N.0/24
// and fd00:ca:N::/64, the right link in 10.203.M.0/24 and fd00:cb:M::/64;
// the router has .1/::1 on the left and .1/::1 on the right (as Right.A).
func NewRouted(prefix string, mtu int) (*Routed, error) {
	left, err := New(prefix + "l")
	if err != nil {
		return nil, err
	}
	router, err := New(prefix + "r")
	if err != nil {
		left.Close()
		return nil, err
	}
	right, err := New(prefix + "h")
	if err != nil {
		left.Close()
		router.Close()
		return nil, err
	}
	r, err := routed(left, router, right, mtu)
	if err != nil {
		left.Close()
		router.Close()
		right.Close()
		return nil, err
	}
	return r, nil
}

func routed(left, router, right *NS, mtu int) (*Routed, error) {
	// In link(), A gets .1; here the router must be .1 on both sides so
	// build the left link with the router as A and swap the ends.
	l, err := link(router, left, 202, mtu)
	if err != nil {
		return nil, err
	}
	l.A, l.B = l.B, l.A
	rl, err := link(router, right, 203, mtu)
	if err != nil {
		return nil, err
	}
	r := &Routed{Left: l, Right: rl}
	for _, kv := range [][2]string{
		{"net.ipv4.ip_forward", "1"},
		{"net.ipv6.conf.all.forwarding", "1"},
	} {
		if err := router.Sysctl(kv[0], kv[1]); err != nil {
			return nil, err
		}
	}
	if err := left.AddRoute("default", l.B.V4.String()); err != nil {
		return nil, err
	}
	if err := left.AddRoute("default", l.B.V6.String()); err != nil {
		return nil, err
	}
	if err := right.AddRoute("default", rl.A.V4.String()); err != nil {
		return nil, err
	}
	if err := right.AddRoute("default", rl.A.V6.String()); err != nil {
		return nil, err
	}
	return r, nil
}

// Close removes the three namespaces.
func (r *Routed) Close() error {
	var first error
	for _, n := range []*NS{r.LeftHost(), r.Router(), r.RightHost()} {
		if err := n.Close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// Route is NewRouted for tests: it fails t on error and removes the
// namespaces when the test ends.
func Route(t testing.TB, prefix string, mtu int) *Routed {
	t.Helper()
	r, err := NewRouted(prefix, mtu)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("netnstest: %v", err)
		}
	})
	return r
}
