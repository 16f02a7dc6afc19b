package filter

// Analysis is what a filter can possibly match, found statically in the
// way of WinDivertAnalyzeFilter ("can this filter accept when field X = v?").
// Every "possible" is an over-approximation: false means the filter
// certainly rejects every such packet or event.
type Analysis struct {
	None bool // the filter matches nothing
	All  bool // the filter matches every packet or event (proved, not guessed)

	Inbound  bool // it may match inbound packets/events
	Outbound bool // it may match outbound packets/events
	IPv4     bool // it may match IPv4
	IPv6     bool // it may match IPv6

	TCP    bool // it may match TCP
	UDP    bool // it may match UDP
	ICMP   bool // it may match ICMP (IPv4)
	ICMPv6 bool // it may match ICMPv6
	Other  bool // it may match packets of no transport protocol above

	// Events has bit e set when the filter may match event e (EventPacket,
	// EventEstablished, ...).
	Events uint16
}

type assume struct {
	field fid
	val   uint32
}

// condExec is WinDivertCondExecFilter generalized to several assumptions:
// false means the filter rejects every packet satisfying them. A test on a
// field whose protocol is assumed absent is decided false (rule 1).
func condExec(prog []insn, as []assume) bool {
	var res [maxTests]bool
	look := func(l uint16, ip int) bool {
		switch l {
		case resAccept:
			return true
		case resReject:
			return false
		}
		if int(l) > ip && int(l) < len(prog) {
			return res[l]
		}
		return true
	}
	for ip := len(prog) - 1; ip >= 0; ip-- {
		in := &prog[ip]
		s, f := look(in.succ, ip), look(in.fail, ip)
		if s == f {
			res[ip] = s
			continue
		}
		res[ip] = true
		for _, a := range as {
			if p := fields[in.field].proto; p != fTrue && p == a.field && a.val == 0 {
				res[ip] = f // header absent: the test is false
				break
			}
			if a.field != in.field {
				continue
			}
			if in.neg || in.val[1] != 0 || in.val[2] != 0 || in.val[3] != 0 {
				break
			}
			var c int
			switch {
			case a.val < in.val[0]:
				c = -1
			case a.val > in.val[0]:
				c = 1
			}
			if in.op.Holds(c) {
				res[ip] = s
			} else {
				res[ip] = f
			}
			break
		}
	}
	return res[0]
}

// Analyze returns what the filter can possibly match.
func (f *Filter) Analyze() Analysis {
	p := f.prog
	var a Analysis
	if !condExec(p, nil) {
		a.None = true
		return a
	}
	a.All = provedAll(p)
	net := f.layer <= LayerNetworkForward
	a.Inbound = condExec(p, []assume{{fInbound, 1}, {fOutbound, 0}})
	a.Outbound = condExec(p, []assume{{fOutbound, 1}, {fInbound, 0}})
	if f.layer != LayerReflect {
		a.IPv4 = condExec(p, []assume{{fIP, 1}, {fIPv6, 0}, {fICMPv6, 0}})
		a.IPv6 = condExec(p, []assume{{fIPv6, 1}, {fIP, 0}, {fICMP, 0}})
		a.TCP = condExec(p, []assume{{fTCP, 1}, {fUDP, 0}, {fICMP, 0}, {fICMPv6, 0}, {fProtocol, 6}})
		a.UDP = condExec(p, []assume{{fUDP, 1}, {fTCP, 0}, {fICMP, 0}, {fICMPv6, 0}, {fProtocol, 17}})
		a.ICMP = condExec(p, []assume{{fICMP, 1}, {fTCP, 0}, {fUDP, 0}, {fICMPv6, 0}, {fIP, 1}, {fIPv6, 0}})
		a.ICMPv6 = condExec(p, []assume{{fICMPv6, 1}, {fTCP, 0}, {fUDP, 0}, {fICMP, 0}, {fIPv6, 1}, {fIP, 0}})
		a.Other = condExec(p, []assume{{fTCP, 0}, {fUDP, 0}, {fICMP, 0}, {fICMPv6, 0}})
	}
	for e := uint32(0); e <= EventReflectClose; e++ {
		if net && e != EventPacket {
			continue
		}
		if condExec(p, []assume{{fEvent, e}}) {
			a.Events |= 1 << e
		}
	}
	return a
}

// provedAll reports whether every path of the program accepts.
func provedAll(prog []insn) bool {
	var res [maxTests]bool
	look := func(l uint16) bool {
		switch l {
		case resAccept:
			return true
		case resReject:
			return false
		}
		return res[l]
	}
	for ip := len(prog) - 1; ip >= 0; ip-- {
		res[ip] = look(prog[ip].succ) && look(prog[ip].fail)
	}
	return res[0]
}
