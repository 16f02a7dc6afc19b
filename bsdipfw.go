//go:build freebsd || linux

package divert

// The FreeBSD backend's ipfw commands and its cross-process lock, behind
// seams (ipfwSys) so that the sequences they run in are unit-tested on
// Linux too.

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/netdivert/divert/internal/ipfw"
)

// firstSet is the first ipfw set handles use: sets firstSet..30, one per
// handle.
const firstSet = 1

// ipfwSys is how the backend changes the ruleset: every change, and every
// listing a change or a divert port is chosen from, happens while lock is
// held, the flock that serialises them between the processes using this
// library. pause, between two attempts at a deletion, never runs with the
// lock held: the lock would stall every other process's Open and Close.
type ipfwSys struct {
	run   func(args ...string) (string, error) // runs ipfw (runIPFW); a failure it ran is an *ipfwError
	lock  func() (unlock func(), err error)    // takes the lock (lockIPFW)
	pause func(try int)                        // before the try-th new attempt at a deletion (closePause)
	alive func(r ipfw.Listed) bool             // whether one of our rules may be a live handle's (processAlive)
	pid   int                                  // this process's, as its tags name it
	live  *liveSets
	left  *leftSets
}

// ipfwError is a run of ipfw that failed: its arguments, what it printed
// (trimmed) and its exit status (-1 when it did not exit).
type ipfwError struct {
	args   []string
	out    string
	status int
	err    error // the run's (an *exec.ExitError)
}

func (e *ipfwError) Error() string {
	return fmt.Sprintf("divert: ipfw %s: %s: %v", strings.Join(e.args, " "), e.out, e.err)
}

func (e *ipfwError) Unwrap() error { return e.err }

// exUnavailable is sysexits.h's EX_UNAVAILABLE, ipfw's exit status when a
// deletion fails or finds nothing to delete (ipfw2.c ipfw_delete).
const exUnavailable = 69

// ruleGone reports whether err is ipfw's answer to "ipfw set S delete N"
// when set S holds no rule numbered number: ipfw2.c ipfw_delete asks the
// kernel to delete the range (IP_FW_XDEL), which succeeds and reports how
// many rules it deleted (delete_range, in new_set); for none, and a rule
// number rather than a whole set, ipfw exits with EX_UNAVAILABLE after
// warnx("rule %u not found"), which prints "ipfw: rule N not found" (the
// program's name, from argv[0]). A failed IP_FW_XDEL exits with
// EX_UNAVAILABLE too, but prints "ipfw: rule N: setsockopt(IP_FW_XDEL):"
// and the errno's text; with -q ipfw prints neither, so the deletions run
// without it.
func ruleGone(err error, number uint32) bool {
	var e *ipfwError
	return errors.As(err, &e) && e.status == exUnavailable && e.out == "ipfw: rule "+strconv.FormatUint(uint64(number), 10)+" not found"
}

// deleteSet deletes every rule of set ("ipfw delete set S"). A set that
// holds none is no error: ipfw reports an empty range only for rule
// numbers (ruleGone). The lock is held.
func (s *ipfwSys) deleteSet(set int) error {
	_, err := s.run("delete", "set", strconv.Itoa(set))
	return err
}

// deleteNumber deletes the rules of set numbered number ("ipfw set S
// delete N"). When there are none, someone deleted them since they were
// listed, and gone is what the deletion wants: not an error (ruleGone).
// Every other failure is. The lock is held; only what does not take it
// (an administrator's ipfw, another program) can have deleted them.
func (s *ipfwSys) deleteNumber(set int, number uint32) error {
	_, err := s.run("set", strconv.Itoa(set), "delete", strconv.FormatUint(uint64(number), 10))
	if err != nil && ruleGone(err, number) {
		return nil
	}
	return err
}

// listed returns the rules installed ("ipfw -S list"), or nil when they
// cannot be read (ipfw missing or not loaded: then no rule diverts).
func (s *ipfwSys) listed() []ipfw.Listed {
	out, err := s.run("-S", "list")
	if err != nil {
		return nil
	}
	return ipfw.ParseList(out)
}

// choosePort runs f, which binds a divert socket to a port busy does not
// report (bindFree), with the lock held, busy being busyPorts of a listing
// taken under the same hold. The bind is exclusive only against sockets:
// rules outlive theirs (a process killed, a Close that ipfw failed), so a
// port no socket has may still be diverted to. Every process of this
// library adds rules under the lock, for its own bound port only: with
// the listing and the bind under one hold, rules that divert to the port
// were either listed, and the port avoided, or are added after the bind,
// by no one but the socket's handle. (An administrator's ipfw does not
// take the lock: a rule it adds after the listing that diverts to the
// port goes unseen. Nothing re-checks the ruleset after the handle's
// rules are added: that would catch such a rule only in those few
// milliseconds, not one added while the handle is open, which nothing in
// ipfw prevents; README's FreeBSD notes say so.)
func (s *ipfwSys) choosePort(f func(busy func(port uint16) bool) error) error {
	unlock, err := s.lock()
	if err != nil {
		return err
	}
	defer unlock()
	return f(busyPorts(s.listed(), s.left))
}

// choosePortNoRules is choosePort for a handle that installed no rules
// and adds none: an OpenPort handle's Shutdown, which moves its socket to
// a free port (detach). Its Open took no lock, and its Shutdown does not
// need it: a program that dropped its privileges after OpenPort, or runs
// where /var/run/netdivert-ipfw.lock cannot be opened (a read-only
// /var/run, capability mode), can still shut the handle down. The lock
// is taken when it can be; when it cannot, f runs all the same, busy
// coming from a listing taken without it (none when ipfw cannot be run
// either), and choosePort's race is open: a process of this library
// could bind the port, add its rules and lose its socket between that
// listing and the bind, and the moved socket would then receive those
// rules' packets, which Recv drains as the handle's until Close.
func (s *ipfwSys) choosePortNoRules(f func(busy func(port uint16) bool) error) error {
	if unlock, err := s.lock(); err == nil {
		defer unlock()
	}
	return f(busyPorts(s.listed(), s.left))
}

// bindAuto binds sock to a divert port of the auto range that no rule
// diverts to, trying them from start on (choosePort, bindFree).
func (s *ipfwSys) bindAuto(sock portSock, start int) (uint16, error) {
	var port uint16
	err := s.choosePort(func(busy func(uint16) bool) error {
		var err error
		port, err = bindFree(sock, start, busy)
		return err
	})
	return port, err
}

// deleteRules deletes the rules numbered number that this process's
// handle on divert port port installed in set, and only those
// (ipfw.PlanRemoval); the lock is held.
func (s *ipfwSys) deleteRules(set int, number, port uint16) error {
	// Only what is still ours: after "ipfw flush" the set may be another
	// handle's (PlanSets hands out empty sets).
	list, err := s.run("-S", "list")
	if err != nil {
		return err
	}
	switch ipfw.PlanRemoval(ipfw.ParseList(list), uint8(set), number, s.pid, port) {
	case ipfw.RemoveSet:
		return s.deleteSet(set)
	case ipfw.RemoveNumber:
		// Someone added rules to the set, with other numbers: delete the
		// handle's (they all have its number) and leave theirs (ipfw(8):
		// "ipfw set N delete").
		return s.deleteNumber(set, uint32(number))
	case ipfw.RemoveShared:
		return sharedError(set, number)
	}
	return nil
}

// lockedDelete returns a deletion of the handle's rules (deleteRules, for
// number and port) that takes the lock for itself, for setClaim's remove
// and removeAtClose, which pause between tries.
func (s *ipfwSys) lockedDelete(number, port uint16) func(set int) error {
	return func(set int) error {
		unlock, err := s.lock()
		if err != nil {
			return err
		}
		defer unlock()
		return s.deleteRules(set, number, port)
	}
}

// retryLeft tries again to delete the rules that closed handles of the
// process left (leftSets); the lock is held.
func (s *ipfwSys) retryLeft() {
	s.left.retry(func(l leftSet) error { return s.deleteRules(l.set, l.number, l.port) })
}

// remove deletes the claimed set's rules of the handle numbered number on
// port (Shutdown: setClaim.remove).
func (s *ipfwSys) remove(c *setClaim, number, port uint16) error {
	return c.remove(s.lockedDelete(number, port))
}

// removeAtClose deletes them at Close, after the rules earlier handles
// left, trying again when ipfw fails; rules it cannot delete are left to
// the process's later Opens and Closes (setClaim.removeAtClose).
func (s *ipfwSys) removeAtClose(c *setClaim, number, port uint16) error {
	if !s.left.empty() {
		// Other handles' rules left before: maybe ipfw lets them go now.
		if unlock, err := s.lock(); err == nil {
			s.retryLeft()
			unlock()
		}
	}
	if err := c.removeAtClose(s.lockedDelete(number, port), closeAttempts, s.pause, s.left, number, port); err != nil {
		return leftError(number, err)
	}
	return nil
}

// deleteStale deletes what plan found stale (ipfw.PlanSets): sets, and
// rules by number. A set or rule already gone is no error (deleteSet,
// deleteNumber). The lock is held.
func (s *ipfwSys) deleteStale(plan ipfw.SetPlan) error {
	for _, set := range plan.Stale {
		if err := s.deleteSet(int(set)); err != nil {
			return err
		}
	}
	for _, r := range plan.StaleRules {
		if err := s.deleteNumber(int(r.Set), r.Number); err != nil {
			return err
		}
	}
	return nil
}

// install adds a handle's rules, diverting to port, with priority prio:
// with the lock held, it retries the rules closed handles left, deletes
// stale sets and rules, picks a free set and the rule number
// (ipfw.PlanSets, ipfw.PlanNumber), and adds the rules build returns for
// them (none: nothing is added, and no set claimed), claiming the set
// with c. It returns the number. When ipfw refuses a rule, the lock is
// released before the rules added before it are deleted as at Close
// (setClaim.undoAdd), whose tries pause between them.
func (s *ipfwSys) install(c *setClaim, prio int16, port uint16, build func(number uint16, set uint8) ([]ipfw.Rule, error)) (uint16, error) {
	unlock, err := s.lock()
	if err != nil {
		return ipfw.RuleNumber(prio), err
	}
	number, added, err := s.installLocked(c, prio, port, build)
	unlock()
	if err != nil && added >= 0 {
		return number, c.undoAdd(err, added, s.lockedDelete(number, port), closeAttempts, s.pause, s.left, number, port)
	}
	return number, err
}

// installLocked is install's part under the lock. added is -1 unless
// adding a rule failed; then it is how many were added before, and c
// still claims the set.
func (s *ipfwSys) installLocked(c *setClaim, prio int16, port uint16, build func(number uint16, set uint8) ([]ipfw.Rule, error)) (number uint16, added int, err error) {
	number = ipfw.RuleNumber(prio)
	// Rules that closed handles of the process could not delete: again.
	s.retryLeft()
	list, err := s.run("-S", "list")
	if err != nil {
		return number, -1, err
	}
	show, err := s.run("set", "show")
	if err != nil {
		return number, -1, err
	}
	disabled, err := ipfw.ParseSetShow(show)
	if err != nil {
		return number, -1, err
	}
	listed := ipfw.ParseList(list)
	plan := ipfw.PlanSets(listed, disabled, firstSet, s.alive)
	// After every live handle of higher or equal priority, before every
	// one of lower priority (see ipfw.PlanNumber).
	number = ipfw.PlanNumber(listed, prio, s.alive)
	if err := s.deleteStale(plan); err != nil {
		return number, -1, err
	}
	if plan.Free < 0 {
		return number, -1, fmt.Errorf("divert: no free ipfw set in [%d, %d] for the handle's rules", firstSet, ipfw.MaxSet)
	}
	rules, err := build(number, uint8(plan.Free))
	if err != nil || len(rules) == 0 {
		// No rules (the filter matches nothing): no set claimed either
		// (an empty set would be handed to the next handle, and this
		// one's Close would delete that handle's rules).
		return number, -1, err
	}
	n, err := c.addRules(plan.Free, len(rules), func(i int) error {
		_, err := s.run(append([]string{"-q"}, rules[i]...)...)
		return err
	}, s.live, port)
	if err != nil {
		return number, n, err
	}
	return number, -1, nil
}
