//go:build freebsd || linux

package divert

// The FreeBSD backend's handling of divert ports, kept free of FreeBSD
// system calls so that it is unit-tested on Linux too.

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/netdivert/divert/internal/ipfw"
)

// Auto-chosen divert ports: [divertPortMin, divertPortMin+divertPorts).
const (
	divertPortMin = 40000
	divertPorts   = 20000
)

// portSock is a divert socket as far as binding it to a port goes.
type portSock interface {
	// bind binds the socket to a divert port, or moves it there when it
	// is bound already (FreeBSD 14 and later: div_bind takes the socket
	// off its old port; FreeBSD 13's in_pcbbind refuses with EINVAL).
	bind(port uint16) error
	close() error
}

// errRebind reports a socket that cannot move to another port (FreeBSD
// before 14).
var errRebind = errors.New("divert: a bound divert socket cannot move to another port before FreeBSD 14")

// bindFree binds s to a divert port of the auto range that no other socket
// has, trying them from start on, and returns it. A port avoid reports
// (nil for none) is never taken.
func bindFree(s portSock, start int, avoid func(port uint16) bool) (uint16, error) {
	for i := 0; i < divertPorts; i++ {
		p := uint16(divertPortMin + (start+i)%divertPorts)
		if avoid != nil && avoid(p) {
			continue
		}
		err := s.bind(p)
		if err == nil {
			return p, nil
		}
		if !errors.Is(err, syscall.EADDRINUSE) {
			return 0, fmt.Errorf("divert: bind divert port %d: %w", p, err)
		}
	}
	return 0, fmt.Errorf("divert: no free divert port in [%d, %d)", divertPortMin, divertPortMin+divertPorts)
}

// busyPorts reports the divert ports that a socket of a new handle must
// not be bound to (bindFree's avoid), for rules already divert to them:
// those that rules of a closed handle of the process left divert to
// (left), and those that rules in the ruleset (listed, "ipfw -S list";
// nil when it cannot be read) divert or tee to: above all a dead
// process's stale rules, which only the next install deletes, and which
// until then would feed the handle their packets as its own, and an
// administrator's rules for a divert daemon that is not running (natd,
// say), whose packets the handle would take for its own too. A live
// handle's port is taken anyway (EADDRINUSE).
func busyPorts(listed []ipfw.Listed, left *leftSets) func(port uint16) bool {
	ports := make(map[uint16]struct{})
	for _, r := range listed {
		if r.Owned {
			ports[r.Port] = struct{}{}
		}
		if r.Divert != 0 {
			ports[r.Divert] = struct{}{}
		}
	}
	return func(p uint16) bool {
		_, ok := ports[p]
		return ok || left.holds(p)
	}
}

// detachPort stops an administrator's rule (OpenPort) from queueing new
// packets to s, bound to the rule's port: s moves to a free port (not one
// that busy reports), keeping
// the packets queued on it, so that Recv can drain them. A packet the rule
// takes after that finds no socket on its port and would be dropped
// (divert_packet: "noport"), so a fresh socket, the passer, is bound to
// the port in s's place and returned: its reader writes every packet back
// unchanged, so that it goes on after the rule, as if no handle were
// there (the Linux backend's Shutdown lets them pass too). With FlagSniff
// (a tee rule) there is no passer: the packet itself goes on after a tee
// rule, and the kernel discards the copy that finds no socket.
//
// The port is free only once s has left it (div_bind refuses a second
// socket on a port with EADDRINUSE), so a packet the rule takes between
// the two binds is dropped. A bind of s that fails with EINVAL (FreeBSD
// 13) leaves s where it was and returns errRebind. When the passer cannot
// be opened or bound, s goes back to the port and the error is returned.
func detachPort(s portSock, port uint16, start int, sniff bool, busy func(port uint16) bool, open func() (portSock, error)) (portSock, error) {
	// Not the rule's port, nor one that other rules divert to (busy:
	// busyPorts): Recv would drain their packets as the handle's.
	avoid := func(p uint16) bool { return p == port || busy(p) }
	if _, err := bindFree(s, start, avoid); err != nil {
		if errors.Is(err, syscall.EINVAL) {
			return nil, fmt.Errorf("%w: %w", errRebind, err)
		}
		return nil, err
	}
	if sniff {
		return nil, nil
	}
	p, err := open()
	if err == nil {
		if err = p.bind(port); err != nil {
			p.close()
			err = fmt.Errorf("divert: bind divert port %d for the packets after shutdown: %w", port, err)
		}
	}
	if err != nil {
		// No passer: the rule's packets would find no socket and be
		// dropped. Put s back, so that a failed Shutdown leaves the handle
		// as it was.
		if berr := s.bind(port); berr != nil {
			return nil, fmt.Errorf("%w (and the handle's socket cannot go back to port %d: %w)", err, port, berr)
		}
		return nil, err
	}
	return p, nil
}
