package ipfw

import (
	"fmt"
	"strconv"
	"strings"
)

// TagPrefix starts the comment of every rule the divert backend installs.
const TagPrefix = "netdivert"

// Tag returns the comment that marks a rule as installed by process pid for
// divert port port, by a handle of priority prio. start is when the process
// started (any clock that a process's start keeps to, such as microseconds
// of uptime), so that a later process given the same PID is not taken for
// it; 0 leaves it out.
func Tag(pid int, start int64, port uint16, prio int16) string {
	if start == 0 {
		return fmt.Sprintf("%s pid=%d port=%d prio=%d", TagPrefix, pid, port, prio)
	}
	return fmt.Sprintf("%s pid=%d port=%d prio=%d start=%d", TagPrefix, pid, port, prio, start)
}

// Listed is one rule of "ipfw -S list" output.
type Listed struct {
	// Number is the rule number. It is read as 32 bits: rules this package
	// did not write may carry numbers above 65535 on systems whose ipfw has
	// 32-bit rule numbers, and their sets must still count as in use.
	Number uint32
	Set    uint8
	Owned  bool  // the comment is one of our tags
	PID    int   // from the tag
	Start  int64 // the process's start, from the tag; 0 if the tag has none
	Port   uint16
	Prio   int16 // the handle's priority, from the tag (or, in a tag without one, from Number)
	// Divert is the port of the rule's divert or tee action, whoever wrote
	// the rule; 0 for another action, or a port taken from a table
	// ("divert tablearg").
	Divert uint16
}

// ParseList parses the output of "ipfw -S list" (lines such as
// "31000 set 5 divert 40000 ip from any to any in // netdivert pid=7 port=40000").
// ipfw(8) OPTIONS, -S: "While listing rules, show the set each rule belongs
// to" (and list disabled rules too); ipfw2.c show_static_rule prints the
// rule number (zero-padded to five digits), then "set N ", then the rule,
// and a comment last as "// text", and puts "# DISABLED " before a rule
// of a disabled set. Lines it does not understand are skipped.
func ParseList(out string) []Listed {
	var rules []Listed
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimPrefix(line, disabledPrefix)
		f := strings.Fields(line)
		if len(f) < 3 || f[1] != "set" {
			continue
		}
		n, err := strconv.ParseUint(f[0], 10, 32)
		if err != nil {
			continue
		}
		s, err := strconv.ParseUint(f[2], 10, 8)
		if err != nil || s > 31 {
			continue
		}
		r := Listed{Number: uint32(n), Set: uint8(s), Divert: divertPort(f[3:])}
		if i := strings.Index(line, "// "); i >= 0 {
			r.PID, r.Start, r.Port, r.Prio, r.Owned = parseTag(strings.TrimSpace(line[i+3:]))
			if r.Owned && r.Prio == noPrio {
				r.Prio = priorityOf(r.Number)
			}
		}
		rules = append(rules, r)
	}
	return rules
}

// divertPort returns the port of a divert or tee action among the fields
// of a listed rule after its set: the action and its modifiers ("prob",
// "log", "tag" and the like) come before the body, which starts with the
// protocol and "from", and the comment comes last (ipfw2.c
// show_static_rule).
func divertPort(f []string) uint16 {
	for i, w := range f {
		if w == "from" || w == "//" {
			break
		}
		if (w == "divert" || w == "tee") && i+1 < len(f) {
			if p, err := strconv.ParseUint(f[i+1], 10, 16); err == nil {
				return uint16(p)
			}
			return 0
		}
	}
	return 0
}

// disabledPrefix starts a rule of a disabled set in "ipfw -S list" output
// (ipfw2.c show_static_rule).
const disabledPrefix = "# DISABLED "

// SetOwners counts the rules of set that carry the tag of process pid's
// handle on divert port port (ours) and the other rules of the set. A
// handle's set holds only its own rules unless someone else changed the
// ruleset: after "ipfw flush" the set is empty, and may then be another
// handle's, so that deleting it at Close would delete that handle's rules.
func SetOwners(rules []Listed, set uint8, pid int, port uint16) (ours, others int) {
	for _, r := range rules {
		switch {
		case r.Set != set:
		case r.Owned && r.PID == pid && r.Port == port:
			ours++
		default:
			others++
		}
	}
	return ours, others
}

// Removal is how the rules of a handle are deleted from its set
// (PlanRemoval).
type Removal uint8

// Removals.
const (
	// RemoveNone: none of the handle's rules is left in the set.
	RemoveNone Removal = iota
	// RemoveSet: the set holds the handle's rules only; "ipfw delete set
	// S" deletes them.
	RemoveSet
	// RemoveNumber: the set holds other rules too, none with the handle's
	// number; "ipfw set S delete N" deletes the handle's rules (which all
	// have N) and leaves the others.
	RemoveNumber
	// RemoveShared: another rule of the set has the handle's number.
	// ipfw cannot delete the handle's rules without it: deletion goes by
	// set and number only (ipfw2.c ipfw_delete fills an ipfw_range_tlv of
	// set and rule range; the kernel's IP_FW_XDEL has no finer key), and
	// "set move rule" moves by number too. Deleting it would delete
	// another program's rule, so the handle's rules stay.
	RemoveShared
)

// PlanRemoval says how to delete the rules that process pid's handle on
// divert port port installed in set with number number, given the rules
// installed ("ipfw -S list").
func PlanRemoval(rules []Listed, set uint8, number uint16, pid int, port uint16) Removal {
	ours, others := SetOwners(rules, set, pid, port)
	switch {
	case ours == 0:
		return RemoveNone
	case others == 0:
		return RemoveSet
	}
	for _, r := range rules {
		if r.Set == set && r.Number == uint32(number) && !(r.Owned && r.PID == pid && r.Port == port) {
			return RemoveShared
		}
	}
	return RemoveNumber
}

// noPrio marks a tag without a priority (one written before tags had it).
const noPrio = -32768

// parseTag reads a comment Tag wrote, or one of a release before tags had
// a priority or a start.
func parseTag(c string) (pid int, start int64, port uint16, prio int16, ok bool) {
	f := strings.Fields(c)
	if len(f) < 3 || len(f) > 5 || f[0] != TagPrefix || !strings.HasPrefix(f[1], "pid=") || !strings.HasPrefix(f[2], "port=") {
		return 0, 0, 0, 0, false
	}
	p, err := strconv.Atoi(f[1][4:])
	if err != nil || p <= 0 {
		return 0, 0, 0, 0, false
	}
	q, err := strconv.ParseUint(f[2][5:], 10, 16)
	if err != nil {
		return 0, 0, 0, 0, false
	}
	prio = noPrio
	if len(f) >= 4 {
		if !strings.HasPrefix(f[3], "prio=") {
			return 0, 0, 0, 0, false
		}
		v, err := strconv.ParseInt(f[3][5:], 10, 16)
		if err != nil || v < -30000 || v > 30000 {
			return 0, 0, 0, 0, false
		}
		prio = int16(v)
	}
	if len(f) == 5 {
		if !strings.HasPrefix(f[4], "start=") {
			return 0, 0, 0, 0, false
		}
		start, err = strconv.ParseInt(f[4][6:], 10, 64)
		if err != nil || start <= 0 {
			return 0, 0, 0, 0, false
		}
	}
	return p, start, uint16(q), prio, true
}

// priorityOf inverts RuleNumber.
func priorityOf(n uint32) int16 {
	p := 31000 - int64(n)
	return int16(max(-30000, min(30000, p)))
}

// PlanNumber picks the rule number of a new handle of priority prio, given
// the rules installed ("ipfw -S list") and which of our rules are a live
// handle's (alive, given one of them). A packet a handle writes back resumes after its number, so every handle of
// higher priority must have a lower number and every one of lower priority
// a higher one (RuleNumber gives that); a handle of equal priority opened
// before gets a lower one too, so that both see every packet (WinDivert
// also orders equal priorities by open time, newest first, though its
// documentation leaves the order undefined). The number is
// RuleNumber(prio) unless live handles of equal or higher priority already
// use it or higher; then the first number above them, if it stays below
// every live handle of lower priority. When no number fits, it is shared
// with the last handle of higher or equal priority (or is RuleNumber(prio)),
// which then does not see what the other writes back, and never comes
// before a handle of higher priority.
func PlanNumber(rules []Listed, prio int16, alive func(r Listed) bool) uint16 {
	base := uint32(RuleNumber(prio))
	var ge uint32             // highest number of a live handle of priority >= prio
	lt := uint32(MaxRule) + 1 // lowest number of a live handle of priority < prio
	for _, r := range rules {
		if !r.Owned || !alive(r) {
			continue
		}
		if r.Prio >= prio {
			ge = max(ge, r.Number)
		} else {
			lt = min(lt, r.Number)
		}
	}
	if n := max(base, ge+1); n < lt && n <= MaxRule {
		return uint16(n)
	}
	if ge >= base && ge < lt {
		// Packed: share the number of the last handle of higher or equal
		// priority rather than come before it.
		return uint16(ge)
	}
	return uint16(base)
}

// ParseSetShow parses "ipfw set show" ("disable 3 4 enable 0 1 2 5 ...";
// ipfw(8) SETS OF RULES)
// and returns the disabled sets as a bit mask.
func ParseSetShow(out string) (disabled uint32, err error) {
	mode := ""
	for _, w := range strings.Fields(out) {
		switch w {
		case "disable", "enable":
			mode = w
			continue
		}
		n, err := strconv.ParseUint(w, 10, 8)
		if err != nil || n > 31 || mode == "" {
			return 0, fmt.Errorf("ipfw: cannot parse set show output %q", out)
		}
		if mode == "disable" {
			disabled |= 1 << n
		}
	}
	return disabled, nil
}

// SetPlan is what to do with the sets at Open.
type SetPlan struct {
	Free  int     // a set to use, -1 if none is free
	Stale []uint8 // sets holding only rules of dead processes: delete them
	// StaleRules are, in sets that also hold another program's rule or a
	// live handle's, the numbers whose every rule in the set is a dead
	// process's: delete them ("ipfw set S delete N").
	StaleRules []SetNumber
}

// SetNumber is the rules of one number in one set.
type SetNumber struct {
	Set    uint8
	Number uint32
}

// PlanSets picks a free set in [first, MaxSet] and finds stale ones. A set
// is free when it holds no rules and is enabled; it is stale when it holds
// only our rules and none of them is a live handle's (alive, given one of
// them, judges by its tag's PID and Start, its set and its port: a live
// process of that PID that started at another time is another process).
// A set that also holds a rule that is not ours, or a live handle's, is
// never deleted, but our dead processes' rules in it are, by number, when
// no other rule of the set has their number (ipfw deletes by set and
// number only): they would otherwise stay, diverting to a port no socket
// has, after the process that could not delete them (a Close that ipfw
// failed) has exited. Rules of a number shared with another program's stay.
func PlanSets(rules []Listed, disabled uint32, first uint8, alive func(r Listed) bool) SetPlan {
	var used, foreign, live uint32
	dead := make(map[SetNumber]bool) // whether every rule of that set and number is a dead process's
	for _, r := range rules {
		used |= 1 << r.Set
		isDead := false
		switch {
		case !r.Owned:
			foreign |= 1 << r.Set
		case alive(r):
			live |= 1 << r.Set
		default:
			isDead = true
		}
		k := SetNumber{r.Set, r.Number}
		if d, seen := dead[k]; seen {
			isDead = isDead && d
		}
		dead[k] = isDead
	}
	plan := SetPlan{Free: -1}
	for s := first; s <= MaxSet; s++ {
		bit := uint32(1) << s
		switch {
		case used&bit == 0:
			if plan.Free < 0 && disabled&bit == 0 {
				plan.Free = int(s)
			}
		case foreign&bit == 0 && live&bit == 0:
			plan.Stale = append(plan.Stale, s)
		}
	}
	for _, r := range rules {
		k := SetNumber{r.Set, r.Number}
		bit := uint32(1) << r.Set
		if r.Set >= first && r.Set <= MaxSet && (foreign|live)&bit != 0 && dead[k] {
			plan.StaleRules = append(plan.StaleRules, k)
			delete(dead, k) // once
		}
	}
	if plan.Free < 0 {
		for _, s := range plan.Stale {
			if disabled&(1<<s) == 0 {
				plan.Free = int(s) // usable once its stale rules are gone
				break
			}
		}
	}
	return plan
}
