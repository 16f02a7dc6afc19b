//go:build windows || freebsd

package divert

import (
	"errors"
	"sync/atomic"
)

// userStats are the Stats of a backend whose OS keeps no counters for it
// (WinDivert, divert(4)): what the handle's own calls observe. The kernel's
// counters stay 0; Passed, Expired and Overflows count what the backend
// does itself (FreeBSD's write-backs, Windows' reassembly).
//
// A received packet's Address carries the handle's serial (sysAddr.owner),
// so that Send tells a reinjection from an injection and Drop a held
// packet from a new one, as on Linux: the serial is cleared once the
// packet is sent or dropped, so a second Send of the same Address counts
// as an injection and a second Drop is not counted. A FlagSniff copy gets
// no serial: the original went on, so sending the copy injects a new
// packet and dropping it drops nothing. Nor is a copy whose Outbound was
// flipped the received packet (sysAddr.out keeps the direction it came
// with): the driver sends it the other way, as a new packet.
type userStats struct {
	serial uint32 // ≠ 0
	sniff  bool   // FlagSniff: copies, never held

	received, sent, injected, dropped, passed, expired, lost atomic.Uint64
}

var userSerial atomic.Uint32

func (u *userStats) init(flags Flag) {
	for u.serial == 0 {
		u.serial = userSerial.Add(1)
	}
	u.sniff = flags&FlagSniff != 0
}

// gotOne counts what a receive of one packet into a returned.
func (u *userStats) gotOne(a *Address, err error) {
	if err == nil || errors.Is(err, ErrTruncated) {
		if !u.sniff {
			a.sys.owner, a.sys.out = u.serial, a.Outbound
		}
		u.received.Add(1)
	}
}

// gotBatch counts the k messages a batch receive returned.
func (u *userStats) gotBatch(ms []Message, k int) {
	if !u.sniff {
		for i := range ms[:k] {
			ms[i].Addr.sys.owner, ms[i].Addr.sys.out = u.serial, ms[i].Addr.Outbound
		}
	}
	if k > 0 {
		u.received.Add(uint64(k))
	}
}

// mine reports whether a names a packet this handle received, in the
// direction it came.
func (u *userStats) mine(a *Address) bool {
	return a.sys.owner == u.serial && a.sys.out == a.Outbound
}

// sentOne counts a sent packet (call it only when the send succeeded).
func (u *userStats) sentOne(a *Address) {
	if !u.mine(a) {
		u.injected.Add(1)
	}
	a.sys.owner = 0
	u.sent.Add(1)
}

// sentBatch counts the first n messages of ms, which a batch send sent,
// less failed of them that the driver could not inject (it does not say
// which: the new ones are assumed sent).
func (u *userStats) sentBatch(ms []Message, n, failed int) {
	var injected uint64
	for i := range ms[:n] {
		if !u.mine(&ms[i].Addr) {
			injected++
		}
		ms[i].Addr.sys.owner = 0
	}
	if n -= failed; n > 0 {
		u.sent.Add(uint64(n))
		u.injected.Add(min(injected, uint64(n)))
	}
}

// droppedOne counts a Drop of a.
func (u *userStats) droppedOne(a *Address) {
	if u.mine(a) {
		u.dropped.Add(1)
	}
	a.sys.owner = 0
}

// passedOne counts a packet the OS handed over that the backend let go on
// without the program seeing it.
func (u *userStats) passedOne() { u.passed.Add(1) }

func (u *userStats) stats() (Stats, error) {
	return Stats{
		Received:  u.received.Load(),
		Sent:      u.sent.Load(),
		Injected:  u.injected.Load(),
		Dropped:   u.dropped.Load(),
		Expired:   u.expired.Load(),
		Passed:    u.passed.Load(),
		Overflows: u.lost.Load(),
	}, nil
}
