//go:build freebsd || linux

package divert

// The FreeBSD backend's bookkeeping of its ipfw set, kept free of FreeBSD
// system calls so that it is unit-tested on Linux too.

import (
	"errors"
	"fmt"
	"strings"
	"sync"
)

// setClaim is a handle's claim on its ipfw set. Shutdown and Close both
// remove the handle's rules, maybe at once from two goroutines: remove runs
// one deletion at a time, and a caller that comes while another deletes
// waits for it, so that Close does not close the socket (and drop what
// the rules still divert to it) before the rules are gone. The set is
// forgotten only once deleted, so that a deletion that failed at Shutdown
// is tried again at Close, or once Close gives up on it and hands it to
// the process's leftSets (removeAtClose).
type setClaim struct {
	// sem holds one token while the set is read or deleted (a channel
	// rather than a mutex, so that a test sees a waiter as blocked).
	sem  chan struct{}
	set  int       // guarded by sem; -1: none
	port uint16    // guarded by sem: the divert port the set's rules divert to (addRules)
	live *liveSets // guarded by sem: where the process records the set while claimed (addRules); nil: nowhere
}

func (c *setClaim) init() {
	c.sem = make(chan struct{}, 1)
	c.set = -1
}

// claim records the set the handle's rules are in (claimFor, recording
// it nowhere else).
func (c *setClaim) claim(set int) { c.claimFor(set, 0, nil) }

// claimFor records the set the handle's rules are in, and that they divert
// to port, and records both in live until the set is released (live may
// be nil).
func (c *setClaim) claimFor(set int, port uint16, live *liveSets) {
	c.sem <- struct{}{}
	c.set, c.port, c.live = set, port, live
	live.add(set, port)
	<-c.sem
}

// remove deletes the claimed set's rules with del, if a set is claimed,
// and forgets it once del succeeds.
func (c *setClaim) remove(del func(set int) error) error {
	c.sem <- struct{}{}
	defer func() { <-c.sem }()
	if c.set < 0 {
		return nil
	}
	if err := del(c.set); err != nil {
		return err
	}
	c.release()
	return nil
}

// release forgets the claimed set; c.sem is held.
func (c *setClaim) release() {
	c.live.drop(c.set, c.port)
	c.set = -1
}

// errRulesShared reports rules that cannot be deleted without another
// program's (ipfw.RemoveShared): trying again at once is useless.
var errRulesShared = errors.New("another rule of the set has the handle's rule number, and ipfw deletes by set and number only")

// sharedError is the error for the handle's rules in set, numbered
// number, that ipfw cannot delete without another program's rule of the
// same set and number (errRulesShared).
func sharedError(set int, number uint16) error {
	return fmt.Errorf("divert: ipfw set %d: %w (delete that rule, or all of set %d's rules numbered %d)", set, errRulesShared, set, number)
}

// leftError is Close's error when the handle's rules, numbered number,
// stay installed (removeAtClose); err, the deletion's, says why.
func leftError(number uint16, err error) error {
	return fmt.Errorf("divert: close: the handle's ipfw rules (number %d) are left installed, and what they divert is dropped until a later Open or Close of the process deletes them: %w", number, inner{err})
}

// inner is an error of this package told inside another one's message,
// which already starts with "divert: ": its text without that prefix.
// errors.Is and errors.As see the error itself.
type inner struct{ err error }

func (e inner) Error() string { return strings.TrimPrefix(e.err.Error(), "divert: ") }
func (e inner) Unwrap() error { return e.err }

// closeAttempts is how many times Close tries to delete the rules.
const closeAttempts = 3

// removeAtClose deletes the claimed set's rules with del (remove) at
// Close, trying up to attempts times while del fails other than with
// errRulesShared (pause runs between tries). When the rules are still
// there, their socket is about to close and what they divert would be
// dropped: the set goes to left, for the process's later Opens and Closes
// to try again (leftSets), and the error is returned.
func (c *setClaim) removeAtClose(del func(set int) error, attempts int, pause func(try int), left *leftSets, number, port uint16) error {
	var err error
	for try := 0; try < attempts; try++ {
		if try > 0 {
			pause(try)
		}
		if err = c.remove(del); err == nil || errors.Is(err, errRulesShared) {
			break
		}
	}
	if err == nil {
		return nil
	}
	c.sem <- struct{}{}
	defer func() { <-c.sem }()
	if c.set < 0 {
		// A concurrent remove (Shutdown) deleted them since the last
		// try: nothing is left.
		return nil
	}
	// Left before released: the process's records hold the set at every
	// moment (ownsRules).
	left.add(leftSet{set: c.set, number: number, port: port})
	c.release()
	return err
}

// addRules claims set for the handle's rules, records it and port in live
// until they are deleted or left (ownsRules), and adds them, n of them,
// with add. When one fails, it returns add's error and how many were added
// before, and the set stays claimed: the caller deletes them (undoAdd).
func (c *setClaim) addRules(set, n int, add func(i int) error, live *liveSets, port uint16) (int, error) {
	c.claimFor(set, port, live) // before the rules: none is ever the process's unrecorded
	for i := range n {
		if err := add(i); err != nil {
			return i, err
		}
	}
	return n, nil
}

// undoAdd deletes the rules, added of them, that an Open added before ipfw
// refused one with err (addRules): their socket is about to close with
// the failed Open. They are deleted as at Close (removeAtClose, with del,
// attempts and pause), and those that cannot be are left to the process's
// later Opens and Closes (left), as a closed handle's are, and no new
// handle binds their port. The error is err, and tells the deletion's
// too when the rules stay.
func (c *setClaim) undoAdd(err error, added int, del func(set int) error, attempts int, pause func(try int), left *leftSets, number, port uint16) error {
	if derr := c.removeAtClose(del, attempts, pause, left, number, port); derr != nil {
		return fmt.Errorf("%w (and the %d rules added before it are left installed, what they divert dropped, until a later Open or Close of the process deletes them: %w)", err, added, inner{derr})
	}
	return err
}

// bsdLive holds the sets that the process's open handles have rules in
// (liveSets).
var bsdLive liveSets

// liveSets records, for the whole process, the ipfw sets that its open
// handles have rules in, each with the divert port its rules divert to
// (setClaim.addRules), from before the rules are added until they are
// deleted or handed to leftSets.
type liveSets struct {
	mu sync.Mutex
	m  map[setPort]struct{}
}

type setPort struct {
	set  int
	port uint16
}

// add records set and port; l may be nil (a test's claim), to record
// nothing.
func (l *liveSets) add(set int, port uint16) {
	if l == nil {
		return
	}
	l.mu.Lock()
	if l.m == nil {
		l.m = make(map[setPort]struct{})
	}
	l.m[setPort{set, port}] = struct{}{}
	l.mu.Unlock()
}

// drop undoes add (an open handle's port is its own: no two claims
// record the same pair).
func (l *liveSets) drop(set int, port uint16) {
	if l == nil {
		return
	}
	l.mu.Lock()
	delete(l.m, setPort{set, port})
	l.mu.Unlock()
}

// has reports whether set and port are recorded.
func (l *liveSets) has(set int, port uint16) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, ok := l.m[setPort{set, port}]
	return ok
}

// ownsRules reports whether the process has rules in set that divert to
// port: an open handle's (live) or a closed one's it could not delete
// (left). live is asked first: a set goes to left before it leaves live
// (removeAtClose), so that it is seen in one or the other whenever it is
// looked at.
func ownsRules(live *liveSets, left *leftSets, set int, port uint16) bool {
	return live.has(set, port) || left.has(set, port)
}

// bsdLeft holds the sets of closed handles whose rules are still
// installed (leftSets). No socket of a new handle is bound to a port their
// rules divert to (bindAuto, detachPort).
var bsdLeft leftSets

// leftSet is a set whose rules a closed handle failed to delete.
type leftSet struct {
	set          int
	number, port uint16
}

// leftSets records, for the whole process, the sets of closed handles
// whose rules are still installed. The process's rules count as alive
// (ruleAlive: by their tag's start, or by this record), so no other Open
// deletes them: the process's own later Opens and Closes try again.
type leftSets struct {
	mu   sync.Mutex
	sets []leftSet
}

func (l *leftSets) add(s leftSet) {
	l.mu.Lock()
	l.sets = append(l.sets, s)
	l.mu.Unlock()
}

// empty reports whether no set is recorded.
func (l *leftSets) empty() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.sets) == 0
}

// has reports whether set is recorded with rules that divert to port.
func (l *leftSets) has(set int, port uint16) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, s := range l.sets {
		if s.set == set && s.port == port {
			return true
		}
	}
	return false
}

// holds reports whether rules of a recorded set divert to port: a new
// handle bound to it would receive their packets.
func (l *leftSets) holds(port uint16) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, s := range l.sets {
		if s.port == port {
			return true
		}
	}
	return false
}

// retry runs del on every recorded set and forgets the ones it deleted.
func (l *leftSets) retry(del func(leftSet) error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	kept := l.sets[:0]
	for _, s := range l.sets {
		if del(s) != nil {
			kept = append(kept, s)
		}
	}
	clear(l.sets[len(kept):])
	l.sets = kept
}
