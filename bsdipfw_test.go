//go:build freebsd || linux

package divert

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/netdivert/divert/internal/ipfw"
)

// fakeIPFW models /sbin/ipfw and its kernel ruleset for ipfwSys, as
// FreeBSD 14's ipfw2.c ipfw_delete and delete_range behave: "delete set
// S" succeeds whatever the set holds; "set S delete N" deletes the set's
// rules numbered N and, when there are none, exits with EX_UNAVAILABLE
// after "ipfw: rule N not found" (nothing printed with -q). It also
// models the flock: the seams check what runs with it held.
type fakeIPFW struct {
	t     *testing.T
	rules []fakeRule
	held  bool
	locks int
	log   []string // commands run, "+lock", "-lock" and "pause"
	// before, when set, runs before a command, and may change the rules
	// (another process) or fail it (a non-nil error is returned as is).
	before func(args []string) error
	// needLock: a command that changes the ruleset, or lists it, run
	// without the lock fails the test.
	needLock bool
}

type fakeRule struct {
	number uint32
	set    uint8
	body   string // after "set S": action, body, "// tag"
}

func newFakeIPFW(t *testing.T, listing string) *fakeIPFW {
	f := &fakeIPFW{t: t, needLock: true}
	for _, line := range strings.Split(listing, "\n") {
		fs := strings.Fields(line)
		if len(fs) < 4 || fs[1] != "set" {
			continue
		}
		n, _ := strconv.ParseUint(fs[0], 10, 32)
		s, _ := strconv.ParseUint(fs[2], 10, 8)
		f.rules = append(f.rules, fakeRule{uint32(n), uint8(s), strings.Join(fs[3:], " ")})
	}
	return f
}

func (f *fakeIPFW) sys(pid int, alive func(ipfw.Listed) bool) *ipfwSys {
	if alive == nil {
		alive = func(r ipfw.Listed) bool { return r.PID == pid }
	}
	return &ipfwSys{
		run:  f.run,
		lock: f.lock,
		pause: func(int) {
			f.log = append(f.log, "pause")
			if f.held {
				f.t.Error("a pause between deletion attempts with the ipfw lock held")
			}
		},
		alive: alive,
		pid:   pid,
		live:  new(liveSets),
		left:  new(leftSets),
	}
}

func (f *fakeIPFW) lock() (func(), error) {
	if f.held {
		f.t.Fatal("the ipfw lock taken twice (flock would deadlock)")
	}
	f.held = true
	f.locks++
	f.log = append(f.log, "+lock")
	return func() {
		if !f.held {
			f.t.Error("unlocking a lock not held")
		}
		f.held = false
		f.log = append(f.log, "-lock")
	}, nil
}

// exitErr is a failed run as runIPFW reports it.
func exitErr(args []string, status int, out string) error {
	return &ipfwError{args: args, out: out, status: status, err: fmt.Errorf("exit status %d", status)}
}

func (f *fakeIPFW) listing() string {
	var b strings.Builder
	for _, r := range f.rules {
		fmt.Fprintf(&b, "%05d set %d %s\n", r.number, r.set, r.body)
	}
	return b.String()
}

func (f *fakeIPFW) run(args ...string) (string, error) {
	f.log = append(f.log, strings.Join(args, " "))
	if f.needLock && !f.held {
		f.t.Errorf("ipfw %s run without the lock", strings.Join(args, " "))
	}
	if f.before != nil {
		if err := f.before(args); err != nil {
			return "", err
		}
	}
	a := args
	quiet := false
	if len(a) > 0 && a[0] == "-q" {
		quiet, a = true, a[1:]
	}
	switch {
	case slices.Equal(a, []string{"-S", "list"}):
		return f.listing(), nil
	case slices.Equal(a, []string{"set", "show"}):
		return "enable 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31", nil
	case len(a) == 3 && a[0] == "delete" && a[1] == "set":
		s, _ := strconv.Atoi(a[2])
		f.rules = slices.DeleteFunc(f.rules, func(r fakeRule) bool { return int(r.set) == s })
		return "", nil
	case len(a) == 4 && a[0] == "set" && a[2] == "delete":
		s, _ := strconv.Atoi(a[1])
		n, _ := strconv.ParseUint(a[3], 10, 32)
		before := len(f.rules)
		f.rules = slices.DeleteFunc(f.rules, func(r fakeRule) bool { return int(r.set) == s && r.number == uint32(n) })
		if len(f.rules) == before {
			out := ""
			if !quiet {
				out = "ipfw: rule " + a[3] + " not found"
			}
			return "", exitErr(args, exUnavailable, out)
		}
		return "", nil
	case len(a) > 4 && a[0] == "add" && a[2] == "set":
		n, _ := strconv.ParseUint(a[1], 10, 32)
		s, _ := strconv.ParseUint(a[3], 10, 8)
		f.rules = append(f.rules, fakeRule{uint32(n), uint8(s), strings.Join(a[4:], " ")})
		return "", nil
	}
	f.t.Fatalf("fake ipfw: unexpected command %q", args)
	return "", nil
}

// fakeRules returns rules for install's build: two divert rules to port,
// tagged as process pid's.
func fakeRules(pid int, port uint16) func(number uint16, set uint8) ([]ipfw.Rule, error) {
	return func(number uint16, set uint8) ([]ipfw.Rule, error) {
		tag := ipfw.Tag(pid, 0, port, 0)
		var rules []ipfw.Rule
		for _, dir := range []string{"in", "out"} {
			rules = append(rules, ipfw.Rule{"add", strconv.Itoa(int(number)), "set", strconv.Itoa(int(set)),
				"divert", strconv.Itoa(int(port)), "ip", "from", "any", "to", "any", dir, "//", tag})
		}
		return rules, nil
	}
}

// TestRuleGone: only ipfw's own report that "set S delete N" found no
// rule N (EX_UNAVAILABLE and "ipfw: rule N not found") counts as the rules
// being gone; a failed IP_FW_XDEL (same status, another message), the
// message for another number, another status, a silent failure (-q) and
// an error that is not ipfw's exit do not.
func TestRuleGone(t *testing.T) {
	args := []string{"set", "3", "delete", "31000"}
	for _, c := range []struct {
		err  error
		want bool
	}{
		{exitErr(args, 69, "ipfw: rule 31000 not found"), true},
		{fmt.Errorf("wrapped: %w", exitErr(args, 69, "ipfw: rule 31000 not found")), true},
		{exitErr(args, 69, "ipfw: rule 31000: setsockopt(IP_FW_XDEL): Operation not permitted"), false},
		{exitErr(args, 69, "ipfw: rule 31001 not found"), false},
		{exitErr(args, 69, "ipfw: no rules rules in 31000-31001 range"), false},
		{exitErr(args, 69, ""), false}, // -q: ipfw says nothing, whatever failed
		{exitErr(args, 1, "ipfw: rule 31000 not found"), false},
		{exitErr(args, 64, "ipfw: rule 31000 not found extra"), false},
		{errors.New("ipfw: rule 31000 not found"), false},
		{&exec.Error{Name: "/sbin/ipfw", Err: exec.ErrNotFound}, false},
		{nil, false},
	} {
		if got := ruleGone(c.err, 31000); got != c.want {
			t.Errorf("ruleGone(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}

// TestInstallStaleGoneMeanwhile: Open deletes a dead process's stale rules
// (by number, in a set that also holds an administrator's rule) and a
// stale set; when something else deleted them since the listing, ipfw
// reports the number not found, which is what the deletion wanted: Open
// goes on and installs its rules. Any other failure of the deletion fails
// Open.
func TestInstallStaleGoneMeanwhile(t *testing.T) {
	const listing = `00500 set 3 allow ip from any to any // an administrator's
31000 set 3 divert 40000 ip from any to any in // netdivert pid=42 port=40000 prio=0
31000 set 4 divert 40001 ip from any to any in // netdivert pid=42 port=40001 prio=0
`
	gone := func(f *fakeIPFW) func([]string) error {
		return func(args []string) error {
			if len(args) > 0 && (args[len(args)-1] == "31000" || slices.Equal(args, []string{"delete", "set", "4"})) {
				// Another process deleted the dead rules first.
				f.rules = slices.DeleteFunc(f.rules, func(r fakeRule) bool { return r.number == 31000 })
			}
			return nil
		}
	}
	f := newFakeIPFW(t, listing)
	f.before = gone(f)
	s := f.sys(7, nil)
	var c setClaim
	c.init()
	number, err := s.install(&c, 0, 40500, fakeRules(7, 40500))
	if err != nil {
		t.Fatalf("install with the stale rules gone meanwhile: %v", err)
	}
	if number != 31000 || !slices.Contains(f.log, "set 3 delete 31000") || !slices.Contains(f.log, "delete set 4") {
		t.Fatalf("number %d, commands %q", number, f.log)
	}
	if got := f.listing(); strings.Count(got, "port=40500") != 2 || strings.Contains(got, "pid=42") {
		t.Fatalf("ruleset after install:\n%s", got)
	}

	// Other failures of the deletion fail Open, before any rule is added.
	for _, fail := range []error{
		exitErr([]string{"set", "3", "delete", "31000"}, 69, "ipfw: rule 31000: setsockopt(IP_FW_XDEL): Operation not permitted"),
		exitErr([]string{"set", "3", "delete", "31000"}, 69, ""),
		exitErr([]string{"set", "3", "delete", "31000"}, 71, "ipfw: socket: Protocol not supported"),
	} {
		f := newFakeIPFW(t, listing)
		f.before = func(args []string) error {
			if args[len(args)-1] == "31000" {
				return fail
			}
			return nil
		}
		var c setClaim
		c.init()
		if _, err := f.sys(7, nil).install(&c, 0, 40500, fakeRules(7, 40500)); !errors.Is(err, fail) {
			t.Errorf("install with the deletion failing with %v: %v", fail, err)
		}
		if strings.Contains(f.listing(), "port=40500") {
			t.Errorf("rules added after the deletion failed with %v", fail)
		}
	}
}

// TestInstallNoPauseUnderLock: when ipfw refuses a rule partway and the
// rules added before cannot be deleted at once, Open tries again after
// pauses, as Close does, and never pauses while it holds the ipfw lock,
// which every other process's Open and Close would wait for.
func TestInstallNoPauseUnderLock(t *testing.T) {
	f := newFakeIPFW(t, "")
	adds, dels := 0, 0
	refused := exitErr([]string{"add"}, 65, "ipfw: bad rule")
	stuck := exitErr([]string{"delete", "set", "1"}, 69, "ipfw: rule 0: setsockopt(IP_FW_XDEL): Resource temporarily unavailable")
	f.before = func(args []string) error {
		switch {
		case len(args) > 1 && args[1] == "add":
			if adds++; adds == 2 {
				return refused
			}
		case args[0] == "delete":
			if dels++; dels < 3 {
				return stuck
			}
		}
		return nil
	}
	s := f.sys(7, nil)
	var c setClaim
	c.init()
	_, err := s.install(&c, 0, 40500, fakeRules(7, 40500))
	if !errors.Is(err, refused) || errors.Is(err, stuck) {
		t.Fatalf("install = %v; want add's error alone (the rules deleted at the third try)", err)
	}
	if dels != 3 || strings.Count(strings.Join(f.log, "\n"), "pause") != 2 {
		t.Fatalf("%d deletions; commands %q", dels, f.log)
	}
	if f.listing() != "" || !s.left.empty() {
		t.Fatalf("left installed:\n%s, left %v", f.listing(), s.left.sets)
	}
	if f.held {
		t.Fatal("the lock still held")
	}
}

// TestRemoveAtCloseNoPauseUnderLock: Close's retries pause without the
// lock too.
func TestRemoveAtCloseNoPauseUnderLock(t *testing.T) {
	f := newFakeIPFW(t, "")
	s := f.sys(7, nil)
	var c setClaim
	c.init()
	if _, err := s.install(&c, 0, 40500, fakeRules(7, 40500)); err != nil {
		t.Fatal(err)
	}
	dels := 0
	f.before = func(args []string) error {
		if args[0] == "delete" {
			if dels++; dels < closeAttempts {
				return exitErr(args, 69, "ipfw: rule 0: setsockopt(IP_FW_XDEL): Resource temporarily unavailable")
			}
		}
		return nil
	}
	if err := s.removeAtClose(&c, 31000, 40500); err != nil || f.listing() != "" {
		t.Fatalf("removeAtClose = %v, left:\n%s", err, f.listing())
	}
	if !slices.Contains(f.log, "pause") {
		t.Fatalf("no pause between tries: %q", f.log)
	}
}

// TestBindAutoUnderLock: the listing that busy ports come from and the
// bind happen under one hold of the ipfw lock, so that no process of the
// library adds rules diverting to the port in between: a port rules
// divert to (here, a killed process's, whose socket is gone) is never
// bound.
func TestBindAutoUnderLock(t *testing.T) {
	f := newFakeIPFW(t, "31000 set 2 divert 40007 ip from any to any in // netdivert pid=42 port=40007 prio=0\n")
	k := newFakeDivert()
	var held []bool
	sock := &lockCheckSock{fakeSock: fakeSock{k: k}, bound: func(port uint16) {
		held = append(held, f.held)
		if !f.held {
			// Unserialised, another process of the library could have
			// bound the port since the listing, added its rules and been
			// killed (its socket gone, its rules not): as if so.
			f.rules = append(f.rules, fakeRule{31000, 5, fmt.Sprintf("divert %d ip from any to any in // netdivert pid=43 port=%d prio=0", port, port)})
		}
	}}
	s := f.sys(7, nil)
	port, err := s.bindAuto(sock, 7)
	if err != nil || port != 40008 {
		t.Fatalf("bindAuto = %d, %v; want 40008, past the rules' port", port, err)
	}
	for _, r := range ipfw.ParseList(f.listing()) {
		if r.Divert == port {
			t.Errorf("bound port %d, which a rule diverts to: %+v", port, r)
		}
	}
	if len(held) == 0 || slices.Contains(held, false) || f.locks != 1 {
		t.Fatalf("binds with the lock held: %v; %d lock holds (want 1); log %q", held, f.locks, f.log)
	}
	if i := slices.Index(f.log, "-S list"); i < 0 || slices.Index(f.log, "-lock") < i {
		t.Fatalf("log %q: the listing is not under the lock", f.log)
	}
}

// TestShutdownPortLock: Shutdown of an OpenPort handle, which installed
// no rules (detach: detachPort with the port chosen by
// choosePortNoRules), does not need the ipfw lock that Open does. When the
// lock can be taken, the listing and the bind happen under it, as for
// Open's port; when it cannot (its file cannot be opened: a program that
// dropped its privileges), the handle's socket still moves, to a port past
// one the ruleset diverts to (a listing taken without the lock), and its
// passer takes the rule's port. An Open's port (bindAuto) still needs the
// lock.
func TestShutdownPortLock(t *testing.T) {
	const rulePort = 8668
	const listing = "31000 set 2 divert 40007 ip from any to any in // netdivert pid=42 port=40007 prio=0\n" +
		"02000 set 0 divert 8668 ip from any to any in\n"
	errLock := fmt.Errorf("divert: ipfw lock: open /var/run/netdivert-ipfw.lock: %w", os.ErrPermission)
	for _, c := range []struct {
		name   string
		lockOK bool
	}{{"lock", true}, {"no-lock", false}} {
		t.Run(c.name, func(t *testing.T) {
			f := newFakeIPFW(t, listing)
			s := f.sys(7, nil)
			if !c.lockOK {
				f.needLock = false
				s.lock = func() (func(), error) { f.log = append(f.log, "lock failed"); return nil, errLock }
			}
			k := newFakeDivert()
			h := &lockCheckSock{fakeSock: fakeSock{k: k}}
			if err := h.fakeSock.bind(rulePort); err != nil {
				t.Fatal(err)
			}
			var held []bool
			h.bound = func(uint16) { held = append(held, f.held) }
			var p portSock
			var derr error
			err := s.choosePortNoRules(func(busy func(uint16) bool) error {
				p, derr = detachPort(h, rulePort, 7, false, busy, k.open)
				return nil
			})
			if err != nil || derr != nil || p == nil {
				t.Fatalf("Shutdown's move: %v, %v, passer %v; log %q", err, derr, p, f.log)
			}
			if h.port != 40008 || k.owner[rulePort] != p {
				t.Errorf("handle's socket on port %d (want 40008, past the rules' 40007), passer on the rule's port: %v", h.port, k.owner[rulePort] == p)
			}
			if i := slices.Index(f.log, "-S list"); i < 0 {
				t.Errorf("log %q: no listing", f.log)
			}
			if c.lockOK && (f.locks != 1 || slices.Contains(held, false) || len(held) == 0) {
				t.Errorf("binds with the lock held: %v; %d lock holds (want 1); log %q", held, f.locks, f.log)
			}
			if !c.lockOK {
				// Open's port needs the lock all the same.
				if _, err := s.bindAuto(&fakeSock{k: k}, 7); !errors.Is(err, errLock) {
					t.Errorf("bindAuto without the lock: %v, want the lock's error", err)
				}
			}
		})
	}
}

// lockCheckSock is a fakeSock that reports each bind.
type lockCheckSock struct {
	fakeSock
	bound func(port uint16)
}

func (s *lockCheckSock) bind(port uint16) error {
	s.bound(port)
	return s.fakeSock.bind(port)
}

// TestCloseDeletesOnlyOwn: handles that share a rule number (the numbers
// were packed, PlanNumber) are in sets of their own, and deletion is by
// set: one handle's Close deletes its rules and no other's, whether its
// set holds only its rules ("delete set") or also an administrator's rule
// with another number ("set S delete N"); a rule of another program with
// the handle's number in its set keeps the handle's rules (ipfw cannot
// delete them without it).
func TestCloseDeletesOnlyOwn(t *testing.T) {
	const listing = `31000 set 1 divert 40001 ip from any to any in // netdivert pid=7 port=40001 prio=0
31000 set 2 divert 40002 ip from any to any in // netdivert pid=7 port=40002 prio=0
31000 set 3 divert 40003 ip from any to any in // netdivert pid=8 port=40003 prio=0
00500 set 2 allow ip from any to any // an administrator's
31000 set 4 divert 40004 ip from any to any in // netdivert pid=7 port=40004 prio=0
31000 set 4 count ip from any to any // an administrator's, with the number
`
	f := newFakeIPFW(t, listing)
	s := f.sys(7, nil)
	for _, c := range []struct {
		set  int
		port uint16
		gone string
		err  error
	}{
		{1, 40001, "port=40001", nil},
		{2, 40002, "port=40002", nil},
		{4, 40004, "", errRulesShared},
	} {
		var claim setClaim
		claim.init()
		claim.claim(c.set)
		before := f.listing()
		err := s.removeAtClose(&claim, 31000, c.port)
		if !errors.Is(err, c.err) || (c.err == nil) != (err == nil) {
			t.Fatalf("set %d: removeAtClose = %v, want %v", c.set, err, c.err)
		}
		after := f.listing()
		for _, line := range strings.Split(before, "\n") {
			if want := c.gone == "" || !strings.Contains(line, c.gone); want != strings.Contains(after, line) {
				t.Errorf("set %d: %q kept %v, want %v", c.set, line, !want, want)
			}
		}
	}
}
