//go:build windows || freebsd

package divert

import (
	"errors"
	"sync/atomic"
)

// userStats are the Stats of a backend whose OS keeps no counters for it
// (WinDivert, divert(4)): what the handle's own calls observe. Expired,
// Overflows and the kernel's counters stay 0; Passed counts what the
// backend passes itself (see passedOne).
//
// A received packet's Address carries the handle's serial (sysAddr.owner),
// so that Send tells a reinjection from an injection and Drop a held
// packet from a new one, as on Linux: the serial is cleared once the
// packet is sent or dropped, so a second Send of the same Address counts
// as an injection and a second Drop is not counted.
type userStats struct {
	serial uint32 // ≠ 0
	sniff  bool   // FlagSniff: Drop drops nothing

	received, sent, injected, dropped, passed atomic.Uint64
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
		a.sys.owner = u.serial
		u.received.Add(1)
	}
}

// gotBatch counts the k messages a batch receive returned.
func (u *userStats) gotBatch(ms []Message, k int) {
	for i := range ms[:k] {
		ms[i].Addr.sys.owner = u.serial
	}
	if k > 0 {
		u.received.Add(uint64(k))
	}
}

// sentOne counts a sent packet (call it only when the send succeeded).
func (u *userStats) sentOne(a *Address) {
	if a.sys.owner != u.serial {
		u.injected.Add(1)
	}
	a.sys.owner = 0
	u.sent.Add(1)
}

// sentBatch counts the first n messages of ms, which a batch send sent.
func (u *userStats) sentBatch(ms []Message, n int) {
	var injected uint64
	for i := range ms[:n] {
		if ms[i].Addr.sys.owner != u.serial {
			injected++
		}
		ms[i].Addr.sys.owner = 0
	}
	if n > 0 {
		u.sent.Add(uint64(n))
		u.injected.Add(injected)
	}
}

// droppedOne counts a Drop of a.
func (u *userStats) droppedOne(a *Address) {
	if a.sys.owner == u.serial && !u.sniff {
		u.dropped.Add(1)
	}
	a.sys.owner = 0
}

// passedOne counts a packet the OS handed over that the backend let go on
// without the program seeing it.
func (u *userStats) passedOne() { u.passed.Add(1) }

func (u *userStats) stats() (Stats, error) {
	return Stats{
		Received: u.received.Load(),
		Sent:     u.sent.Load(),
		Injected: u.injected.Load(),
		Dropped:  u.dropped.Load(),
		Passed:   u.passed.Load(),
	}, nil
}
