package divert

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/internal/netnstest"
	"github.com/netdivert/divert/internal/nfq"
	"github.com/netdivert/divert/internal/packet"
	"github.com/netdivert/divert/internal/reassembly"
)

// The verdict of a datagram reassembled in user space goes through its
// fragments, held in the queue (see frag_linux.go): these tests check what
// that gives, the kernel's own handling of the fragments.

// nftIn runs nft with argv in ns, failing t on error, and returns its
// output.
func nftIn(t *testing.T, ns *netnstest.NS, argv ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := ns.Run(ctx, append([]string{"nft"}, argv...)...)
	if err != nil {
		t.Fatalf("nft %v: %v: %s", argv, err, out)
	}
	return string(out)
}

// nftTable adds table inet name to ns with one base chain c of spec (e.g.
// "type filter hook forward priority 0 ;") holding rules, and deletes it
// when the test ends.
func nftTable(t *testing.T, ns *netnstest.NS, name, spec string, rules ...string) {
	t.Helper()
	nftIn(t, ns, "add", "table", "inet", name)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if out, err := ns.Run(ctx, "nft", "delete", "table", "inet", name); err != nil {
			t.Errorf("delete table %s: %v: %s", name, err, out)
		}
	})
	nftIn(t, ns, "add", "chain", "inet", name, "c", "{ "+spec+" }")
	for _, r := range rules {
		nftIn(t, ns, append([]string{"add", "rule", "inet", name, "c"}, strings.Fields(r)...)...)
	}
}

// nftCounter returns the packets counted by the rule of table inet name,
// chain c, whose text contains match.
func nftCounter(t *testing.T, ns *netnstest.NS, name, match string) int {
	t.Helper()
	out := nftIn(t, ns, "list", "chain", "inet", name, "c")
	re := regexp.MustCompile(`counter packets (\d+)`)
	for _, line := range strings.Split(out, "\n") {
		if !strings.Contains(line, match) {
			continue
		}
		if m := re.FindStringSubmatch(line); m != nil {
			n, _ := strconv.Atoi(m[1])
			return n
		}
	}
	t.Fatalf("no counter rule with %q in:\n%s", match, out)
	return 0
}

// TestFragHeldForwardFirewall: a fragmented datagram a FlagReassemble
// forward handle sends back unchanged is judged by the router's forward
// rules, as without the handle: a forward drop rule for its destination
// stops it (the handle's verdict accepts its fragments, which go on to the
// forward hook), with and without conntrack.
func TestFragHeldForwardFirewall(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "dhf", 1500)
	for i, c := range fragCases() {
		t.Run(caseName(c.v6, c.ct), func(t *testing.T) {
			if c.ct {
				withConntrack(t, r.Router())
			}
			dstA, fam := r.Right.B.V4, "ip"
			if c.v6 {
				dstA, fam = r.Right.B.V6, "ip6"
			}
			dst := netip.AddrPortFrom(dstA, 7130)
			sink, err := r.RightHost().ListenUDP(dst.String())
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()
			h := openIn(t, r.Router(), "udp.DstPort == 7130", LayerNetworkForward, 0, FlagReassemble)
			p := startFragPump(t, h, nil)
			name := fmt.Sprintf("fwdrop%d", i)
			nftTable(t, r.Router(), name, "type filter hook forward priority 0 ;",
				fam+" daddr "+dstA.String()+" counter drop")
			if err := r.LeftHost().SendUDP(dst, fragPayload("fw"), 1, 0); err != nil {
				t.Fatal(err)
			}
			late, err := netnstest.RecvUDP(sink, 1, 700*time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			got, errs := p.stop()
			if len(got) != 1 || len(errs) != 1 || errs[0] != nil {
				t.Fatalf("handle saw %d datagrams (Send: %v), want 1 sent back", len(got), errs)
			}
			if len(late) != 0 {
				t.Errorf("the datagram passed the router's forward drop rule")
			}
			if n := nftCounter(t, r.Router(), name, "drop"); n == 0 {
				t.Errorf("the forward drop rule counted nothing")
			}
		})
	}
}

// TestFragHeldForwardSmallerMTU: a forwarded datagram sent back unchanged
// whose route's MTU is smaller than its fragments is the kernel's to
// refuse: an IPv4 one with DF, or an IPv6 one, makes the router answer the
// sender ICMP fragmentation needed (Packet Too Big) with the route's MTU,
// and nothing reaches the host behind it; Send succeeds (the fragments
// were handed back).
func TestFragHeldForwardSmallerMTU(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "dhm", 1500)
	ipIn(t, r.Router(), "link", "set", r.Right.A.If, "mtu", "1280")
	for _, v6 := range []bool{false, true} {
		t.Run(caseName(v6, false), func(t *testing.T) {
			srcA, dstA := r.Left.A.V4, r.Right.B.V4
			icmpFilt := "inbound and icmp.Type == 3 and icmp.Code == 4"
			if v6 {
				srcA, dstA = r.Left.A.V6, r.Right.B.V6
				icmpFilt = "inbound and icmpv6.Type == 2"
			}
			dst := netip.AddrPortFrom(dstA, 7131)
			sink, err := r.RightHost().ListenUDP(dst.String())
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()
			icmp := openIn(t, r.LeftHost(), icmpFilt, LayerNetwork, 0, FlagSniff)
			ip := startFragPump(t, icmp, nil)
			h := openIn(t, r.Router(), "udp.DstPort == 7131", LayerNetworkForward, 0, FlagReassemble)
			p := startFragPump(t, h, nil)
			d := udpPacket(t, netip.AddrPortFrom(srcA, 5031), dst, fragPayload("mtu"))
			var id uint32 = 0x31313131
			if !v6 {
				binary.BigEndian.PutUint16(d[4:], 0x3131)
				id = 0
			}
			frags, err := reassembly.Fragment(nil, nil, d, 1500, id)
			if err != nil {
				t.Fatal(err)
			}
			ls := openIn(t, r.LeftHost(), "false", LayerNetwork, 0, FlagSendOnly)
			for _, f := range frags {
				if !v6 {
					f[6] |= 0x40 // DF
					CalcChecksums(f, nil, 0)
				}
				if _, err := ls.Send(f, &Address{Outbound: true, IPv6: v6, IPChecksum: true, UDPChecksum: true}); err != nil {
					t.Fatal(err)
				}
			}
			late, err := netnstest.RecvUDP(sink, 1, 700*time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			got, errs := p.stop()
			icmps, _ := ip.stop()
			if len(got) != 1 || len(errs) != 1 || errs[0] != nil {
				t.Fatalf("handle saw %d datagrams (Send: %v), want 1 sent back", len(got), errs)
			}
			if len(late) != 0 {
				t.Errorf("the datagram reached the host behind the smaller MTU")
			}
			if len(icmps) == 0 {
				t.Fatalf("the sender got no ICMP fragmentation needed / Packet Too Big")
			}
			for _, s := range icmps {
				pk, err := ParsePacket(s.pkt)
				if err != nil || len(pk.ICMP) < 8 && len(pk.ICMPv6) < 8 {
					t.Fatalf("ICMP %x: %v", s.pkt, err)
				}
				var mtu uint32
				if v6 {
					mtu = binary.BigEndian.Uint32(pk.ICMPv6[4:8])
				} else {
					mtu = uint32(binary.BigEndian.Uint16(pk.ICMP[6:8]))
				}
				if mtu != 1280 {
					t.Errorf("ICMP names MTU %d, want 1280", mtu)
				}
			}
		})
	}
}

// TestFragHeldInboundIif: an IPv6 datagram reassembled in user space at
// LayerNetwork inbound and sent back unchanged reaches the input rules as
// its fragments did, from the link they came in on (not from lo), and
// arrives intact. (A rule after the handle's counts the fragments, IPv6
// packets whose next header is Fragment, from the sender on the veth.)
func TestFragHeldInboundIif(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dhi", 1500)
	dst := netip.AddrPortFrom(l.B.V6, 7132)
	sink, err := l.B.NS.ListenUDP(dst.String())
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	h := openIn(t, l.B.NS, "inbound and udp.DstPort == 7132", LayerNetwork, 0, 0)
	p := startFragPump(t, h, nil)
	// After the handle's chain (priority 0).
	nftTable(t, l.B.NS, "iifcount", "type filter hook input priority 100 ;",
		"iifname "+l.B.If+" ip6 saddr "+l.A.V6.String()+" ip6 nexthdr 44 counter",
		"iifname lo ip6 saddr "+l.A.V6.String()+" counter")
	if err := l.A.NS.SendUDP(dst, fragPayload("iif"), 1, 0); err != nil {
		t.Fatal(err)
	}
	recvd, err := netnstest.RecvUDP(sink, 1, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	got, errs := p.stop()
	if len(got) != 1 || len(errs) != 1 || errs[0] != nil {
		t.Fatalf("handle saw %d datagrams (Send: %v), want 1 sent back", len(got), errs)
	}
	if len(recvd) != 1 || !bytes.Equal(recvd[0], fragPayload("iif")) {
		t.Fatalf("sink got %d datagrams, want the one intact", len(recvd))
	}
	if n := nftCounter(t, l.B.NS, "iifcount", "iifname \""+l.B.If+"\""); n < 2 {
		t.Errorf("the input rule for %s counted %d packets, want the datagram's fragments (2 or more)", l.B.If, n)
	}
	if n := nftCounter(t, l.B.NS, "iifcount", "iifname \"lo\""); n != 0 {
		t.Errorf("the input rule for lo counted %d packets, want 0", n)
	}
}

// TestFragHeldForwardVerdicts: the verdicts a FlagReassemble forward
// handle gives a datagram through its held fragments. Changed, it arrives
// changed, byte for byte, its fragments leaving the router with the TTL
// (hop limit) the program handed back (the kernel decrements them once
// more: the handle adds one back); Drop drops every fragment; a datagram
// whose fragments expired (ParamQueueTime) is no longer queued, for Send
// and Drop; Close accepts the fragments of a datagram still held.
func TestFragHeldForwardVerdicts(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "dhv", 1500)
	for _, c := range fragCases() {
		t.Run(caseName(c.v6, c.ct), func(t *testing.T) {
			if c.ct {
				withConntrack(t, r.Router())
			}
			srcA, dstA := r.Left.A.V4, r.Right.B.V4
			ttlOff, wireFilt := 8, "inbound && ip.SrcAddr == "
			if c.v6 {
				srcA, dstA = r.Left.A.V6, r.Right.B.V6
				ttlOff, wireFilt = 7, "inbound && ipv6.SrcAddr == "
			}
			dst := netip.AddrPortFrom(dstA, 7133)
			sink, err := r.RightHost().ListenUDP(dst.String())
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()
			wire := openIn(t, r.RightHost(), wireFilt+srcA.String(), LayerNetwork, 0, FlagFragments)
			wp := startFragPump(t, wire, nil)
			h := openIn(t, r.Router(), "udp.DstPort == 7133", LayerNetworkForward, 0, FlagReassemble)
			buf := make([]byte, MTUMax)
			var a Address
			recv := func(tag string) []byte {
				t.Helper()
				if err := r.LeftHost().SendUDP(dst, fragPayload(tag), 1, 0); err != nil {
					t.Fatal(err)
				}
				h.SetReadDeadline(time.Now().Add(3 * time.Second))
				n, err := h.Recv(buf, &a)
				if err != nil {
					t.Fatalf("%s: Recv: %v", tag, err)
				}
				if !bytes.Contains(buf[:n], []byte(tag)) {
					t.Fatalf("%s: handle got another %d-byte packet", tag, n)
				}
				return buf[:n]
			}
			arrives := func(want []byte) {
				t.Helper()
				got, err := netnstest.RecvUDP(sink, 1, 3*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				if len(got) != 1 || !bytes.Equal(got[0], want) {
					t.Fatalf("sink got %d datagrams, want the %q one byte for byte", len(got), want[:3])
				}
			}

			// Changed: the payload, then the TTL.
			d := recv("chg")
			copy(udpData(t, d), "CHG")
			CalcChecksums(d, &a, 0)
			if _, err := h.Send(d, &a); err != nil {
				t.Fatalf("Send changed: %v", err)
			}
			want := fragPayload("chg")
			copy(want, "CHG")
			arrives(want)
			d = recv("t40")
			d[ttlOff] = 40
			CalcChecksums(d, &a, 0)
			if _, err := h.Send(d, &a); err != nil {
				t.Fatalf("Send with TTL 40: %v", err)
			}
			arrives(fragPayload("t40"))

			// Dropped.
			recv("drp")
			if err := h.Drop(&a); err != nil {
				t.Fatalf("Drop: %v", err)
			}

			// Expired.
			if err := h.SetParam(ParamQueueTime, QueueTimeMin); err != nil {
				t.Fatal(err)
			}
			st0, _ := h.Stats()
			d = recv("exp")
			exp := a
			for i := 0; ; i++ {
				st, _ := h.Stats()
				if st.Expired >= st0.Expired+1 { // a datagram counts once
					break
				}
				if i == 100 {
					t.Fatalf("the datagram's fragments did not expire: %+v", st)
				}
				time.Sleep(50 * time.Millisecond)
			}
			if _, err := h.Send(d, &a); !errors.Is(err, ErrNotQueued) {
				t.Errorf("Send of an expired datagram: %v, want ErrNotQueued", err)
			}
			if err := h.Drop(&exp); !errors.Is(err, ErrNotQueued) {
				t.Errorf("Drop of an expired datagram: %v, want ErrNotQueued", err)
			}

			// Held at Close: accepted.
			if err := h.SetParam(ParamQueueTime, QueueTimeMax); err != nil {
				t.Fatal(err)
			}
			recv("cls")
			if err := h.Close(); err != nil {
				t.Fatal(err)
			}
			arrives(fragPayload("cls"))
			late, err := netnstest.RecvUDP(sink, 1, 500*time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			if len(late) != 0 {
				t.Errorf("a dropped or expired datagram arrived: %.3q", late[0])
			}

			onWire, _ := wp.stop()
			ttls := map[string]int{"CHG": -1, "t40": -1}
			for _, s := range onWire {
				for tag := range ttls {
					if isFragment(s.pkt) && bytes.Contains(s.pkt, []byte(tag)) {
						ttls[tag] = int(s.pkt[ttlOff])
					}
				}
			}
			if ttls["CHG"] != 63 || ttls["t40"] != 40 {
				t.Errorf("first fragments behind the router with TTL %d and %d, want 63 (the sender's 64, decremented once) and 40 (the program's)", ttls["CHG"], ttls["t40"])
			}
		})
	}
}

// heldTestBackend is a LayerNetworkForward backend without a queue whose
// reassembly takes fragV4 fragments, and deliver hands it the two
// fragments of datagram ipID as queue ids id and id+1.
func heldTestBackend() *linuxBackend {
	b := newLinuxBackend(&openConfig{layer: LayerNetworkForward})
	b.frag = &fragState{reasm: reassembly.New(reassembly.Config{Timeout: time.Minute}), pending: map[fragKey]*pendingDgram{}}
	return b
}

func deliverV4(t testing.TB, b *linuxBackend, buf []byte, a *Address, id uint32, ipID uint16) int {
	t.Helper()
	return deliverFrags(t, b, buf, a, id, v4Frags(ipID))
}

// v4Frags returns the two fragments of datagram ipID.
func v4Frags(ipID uint16) [][]byte {
	fs := [][]byte{fragV4(0, 16, true), fragV4(16, 8, false)}
	for _, f := range fs {
		binary.BigEndian.PutUint16(f[4:6], ipID)
		f[10], f[11] = 0, 0
		binary.BigEndian.PutUint16(f[10:12], ^packet.Checksum(f[:20], 0))
	}
	return fs
}

// deliverFrags hands b frags, queue ids from id on; the last completes
// the datagram.
func deliverFrags(t testing.TB, b *linuxBackend, buf []byte, a *Address, id uint32, frags [][]byte) int {
	t.Helper()
	now := time.Now().UnixNano()
	var n int
	for i, f := range frags {
		var delivered bool
		var err error
		n, _, delivered, err = b.reassemble(&nfq.Packet{ID: id + uint32(i), Hook: nfq.HookPrerouting, Payload: f}, buf, a, now)
		if err != nil || delivered != (i == len(frags)-1) {
			t.Fatalf("fragment %d: delivered %v, %v", i, delivered, err)
		}
	}
	return n
}

// TestFragHeldPartlyExpired: a datagram one of whose held fragments the
// reaper dropped (ParamQueueTime) is no longer queued: Send fails as for
// an expired packet and drops the fragments left, once; the slot is free
// and a second Send fails the same way without another verdict.
func TestFragHeldPartlyExpired(t *testing.T) {
	b := heldTestBackend()
	buf := make([]byte, MTUMax)
	var a Address
	n := deliverV4(t, b, buf, &a, 1, 0x4242)
	if b.track.Len() != 2 || len(b.vbuf) != 0 || len(b.acc) != 0 {
		t.Fatalf("delivered: %d held, verdicts %x %v; want both fragments held", b.track.Len(), b.vbuf, b.acc)
	}
	b.track.PopOldest() // the reaper's DROP of id 1
	a2 := a
	if _, err := b.sendDgram(buf[:n], &a, true); !errors.Is(err, ErrNotQueued) {
		t.Fatalf("Send: %v, want ErrNotQueued", err)
	}
	if want := nfq.AppendVerdict(nil, b.queue, 2, nfq.Drop, nil); !bytes.Equal(b.vbuf, want) || len(b.acc) != 0 || b.track.Len() != 0 {
		t.Fatalf("verdicts %x %v, %d held; want one DROP of id 2, nothing held", b.vbuf, b.acc, b.track.Len())
	}
	b.vbuf = b.vbuf[:0]
	if _, err := b.sendDgram(buf[:n], &a2, true); !errors.Is(err, ErrNotQueued) || len(b.vbuf) != 0 {
		t.Fatalf("second Send: %v, verdicts %x; want ErrNotQueued, none", err, b.vbuf)
	}
	if len(b.frag.free) != 1 || len(b.frag.spare) != 1 {
		t.Fatalf("%d free slots, %d spare records; want 1 and 1", len(b.frag.free), len(b.frag.spare))
	}
}

// TestFragHeldNoAlloc: once its slot and record exist, holding a
// delivered datagram's fragments and sending it back unchanged allocates
// nothing; each fragment gets exactly one verdict, an ACCEPT that sets the
// handle's mark (LayerNetworkForward).
func TestFragHeldNoAlloc(t *testing.T) {
	b := heldTestBackend()
	buf := make([]byte, MTUMax)
	var a Address
	id := uint32(1)
	frags := v4Frags(1) // the same datagram again and again
	var want []byte
	round := func() {
		n := deliverFrags(t, b, buf, &a, id, frags)
		if _, err := b.sendDgram(buf[:n], &a, true); err != nil {
			t.Fatal(err)
		}
		want = nfq.AppendVerdictMark(want[:0], b.queue, id, nfq.Accept, b.ownMark, nil)
		want = nfq.AppendVerdictMark(want, b.queue, id+1, nfq.Accept, b.ownMark, nil)
		if !bytes.Equal(b.vbuf, want) || len(b.acc) != 0 || b.track.Len() != 0 {
			t.Fatalf("verdicts %x %v, %d held; want two marked ACCEPTs %x", b.vbuf, b.acc, b.track.Len(), want)
		}
		b.vbuf = b.vbuf[:0]
		id += 2
	}
	round()
	if allocs := testing.AllocsPerRun(100, round); allocs != 0 {
		t.Errorf("%v allocations a datagram, want 0", allocs)
	}
	if fs := b.frag; len(fs.held) != 1 || len(fs.free) != 1 || len(fs.spare) != 1 || len(fs.pending) != 0 {
		t.Errorf("%d slots (%d free), %d spare records, %d pending; want the one slot and record reused", len(fs.held), len(fs.free), len(fs.spare), len(fs.pending))
	}
}

// TestFragHeldSendBatch: SendBatch gives reassembled datagrams their
// verdicts through their fragments too, changed or not, with a whole
// packet between them: all arrive, the changed one changed.
func TestFragHeldSendBatch(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "dhb", 1500)
	dst := netip.AddrPortFrom(r.Right.B.V4, 7134)
	sink, err := r.RightHost().ListenUDP(dst.String())
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	h := openIn(t, r.Router(), "udp.DstPort == 7134", LayerNetworkForward, 0, FlagReassemble)
	ms := make([]Message, 3)
	for i, tag := range []string{"chg", "small", "keep"} {
		payload := fragPayload(tag)
		if tag == "small" {
			payload = []byte(tag)
		}
		if err := r.LeftHost().SendUDP(dst, payload, 1, 0); err != nil {
			t.Fatal(err)
		}
		ms[i].Buf = make([]byte, MTUMax)
		h.SetReadDeadline(time.Now().Add(3 * time.Second))
		n, err := h.Recv(ms[i].Buf, &ms[i].Addr)
		if err != nil {
			t.Fatalf("Recv %s: %v", tag, err)
		}
		ms[i].N = n
	}
	d := ms[0].Buf[:ms[0].N]
	copy(udpData(t, d), "CHG")
	CalcChecksums(d, &ms[0].Addr, 0)
	if n, err := h.SendBatch(ms); n != 3 || err != nil {
		t.Fatalf("SendBatch: %d, %v", n, err)
	}
	got, err := netnstest.RecvUDP(sink, 3, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{"CHG": false, "small": false, "keep": false}
	for _, g := range got {
		for tag := range want {
			if bytes.HasPrefix(g, []byte(tag)) {
				w := fragPayload(tag)
				if tag == "CHG" {
					w = fragPayload("chg")
					copy(w, "CHG")
				} else if tag == "small" {
					w = []byte(tag)
				}
				want[tag] = bytes.Equal(g, w)
			}
		}
	}
	if !want["CHG"] || !want["small"] || !want["keep"] || len(got) != 3 {
		t.Errorf("sink got %d datagrams, intact: %v", len(got), want)
	}
}

// TestFragHeldBatchFlushes: verdicts SendBatch holds back for reassembled
// datagrams are sent once they reach half of what one sendmsg should carry
// (nfq.SendLimit), as for whole packets: six changed 60000-byte datagrams
// (about 61 KB of pieces each) never make one Send larger than that. The
// queue socket is a socketpair whose Sends a fake records.
func TestFragHeldBatchFlushes(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[1])
	c, err := nfq.Wrap(fds[0], nfq.Config{})
	if err != nil {
		unix.Close(fds[0])
		t.Fatal(err)
	}
	defer c.Close()
	var sizes []int
	c.SetFake(&nfq.Fake{Send: func(p []byte) syscall.Errno {
		sizes = append(sizes, len(p))
		return 0
	}})
	b := heldTestBackend()
	b.attach(c)
	buf := make([]byte, MTUMax)
	var a Address
	id := uint32(1)
	src := netip.MustParseAddrPort("10.0.0.1:5000")
	dst := netip.MustParseAddrPort("10.0.0.2:7000")
	for i := range 6 {
		d := udpPacket(t, src, dst, bytes.Repeat([]byte{'a'}, 60000))
		binary.BigEndian.PutUint16(d[4:], uint16(0x600+i))
		CalcChecksums(d, nil, 0)
		frags, err := reassembly.Fragment(nil, nil, d, 1500, 0)
		if err != nil {
			t.Fatal(err)
		}
		n := deliverFrags(t, b, buf, &a, id, frags)
		id += uint32(len(frags))
		copy(udpData(t, buf[:n]), "CHG")
		CalcChecksums(buf[:n], &a, 0)
		if _, err := b.sendDgram(buf[:n], &a, true); err != nil {
			t.Fatalf("datagram %d: %v", i, err)
		}
	}
	b.flush()
	total := 0
	for _, n := range sizes {
		total += n
		if n > nfq.SendLimit {
			t.Errorf("a Send of %d bytes, more than nfq.SendLimit (%d)", n, nfq.SendLimit)
		}
	}
	if len(sizes) < 2 || total < 6*60000 {
		t.Errorf("%d Sends of %d bytes in all, want the six datagrams' pieces in two or more", len(sizes), total)
	}
}

// TestFragHeldShortenedQueueTime: ParamQueueTime lowered while a datagram
// is being reassembled drops its first fragments from the queue (they
// waited the new time), but the reassembler keeps the timeout the
// datagram began with. The fragment that then completes it must not hand
// over a datagram only it still carries: Send of it would ACCEPT that one
// fragment and report success while the datagram can never arrive. It is
// dropped, and nothing is delivered or held.
func TestFragHeldShortenedQueueTime(t *testing.T) {
	b := heldTestBackend() // the reassembler's timeout: a minute
	buf := make([]byte, MTUMax)
	var a Address
	frags := [][]byte{fragV4(0, 16, true), fragV4(16, 8, true), fragV4(24, 8, false)}
	now := time.Now().UnixNano()
	for i, f := range frags[:2] {
		if _, handled, delivered, err := b.reassemble(&nfq.Packet{ID: uint32(i + 1), Hook: nfq.HookPrerouting, Payload: f}, buf, &a, now); !handled || delivered || err != nil {
			t.Fatalf("fragment %d: handled %v, delivered %v, %v", i+1, handled, delivered, err)
		}
	}
	// ParamQueueTime now 1 s (setParam also lowers the reassembler's
	// timeout, for datagrams begun from then on): the reaper's tick 2 s
	// later drops ids 1 and 2.
	qt := int64(time.Second)
	b.queueTime.Store(qt)
	b.frag.reasm.SetTimeout(time.Second)
	later := now + 2*qt
	b.vmu.Lock()
	b.expireLocked(later, qt)
	b.vmu.Unlock()
	want := nfq.AppendVerdict(nil, b.queue, 1, nfq.Drop, nil)
	want = nfq.AppendVerdict(want, b.queue, 2, nfq.Drop, nil)
	if !bytes.Equal(b.vbuf, want) || b.track.Len() != 0 {
		t.Fatalf("expired: verdicts %x, %d held; want DROPs of ids 1 and 2", b.vbuf, b.track.Len())
	}
	b.vbuf = b.vbuf[:0]
	_, handled, delivered, err := b.reassemble(&nfq.Packet{ID: 3, Hook: nfq.HookPrerouting, Payload: frags[2]}, buf, &a, later)
	if !handled || delivered || err != nil {
		t.Fatalf("last fragment: handled %v, delivered %v, %v; want it handled and nothing delivered", handled, delivered, err)
	}
	want = nfq.AppendVerdict(nil, b.queue, 3, nfq.Drop, nil)
	if !bytes.Equal(b.vbuf, want) || len(b.acc) != 0 || b.track.Len() != 0 {
		t.Fatalf("verdicts %x %v, %d held; want one DROP of id 3, nothing held", b.vbuf, b.acc, b.track.Len())
	}
	if fs := b.frag; len(fs.pending) != 0 || len(fs.held)-len(fs.free) != 0 {
		t.Fatalf("%d pending, %d slots in use; want none", len(fs.pending), len(fs.held)-len(fs.free))
	}
}

// TestFragHeldLengthenedQueueTime: ParamQueueTime raised while a datagram
// is being reassembled keeps its first fragments held after the
// reassembler gave it up (the timeout it began with); a new datagram under
// the same key then completes. Its fragments carry it: the ones left over
// from the first are dropped, not accepted with it, and Send accepts only
// its own.
func TestFragHeldLengthenedQueueTime(t *testing.T) {
	b := heldTestBackend()
	b.frag.reasm = reassembly.New(reassembly.Config{Timeout: time.Second})
	b.queueTime.Store(int64(time.Minute))
	buf := make([]byte, MTUMax)
	var a Address
	frags := v4Frags(0x1234)
	now := time.Now().UnixNano()
	if _, _, delivered, err := b.reassemble(&nfq.Packet{ID: 1, Hook: nfq.HookPrerouting, Payload: frags[0]}, buf, &a, now); delivered || err != nil {
		t.Fatalf("first fragment: delivered %v, %v", delivered, err)
	}
	later := now + int64(2*time.Second) // the reassembler's timeout passed, not the queue's
	var n int
	for i, f := range frags {
		var delivered bool
		var err error
		n, _, delivered, err = b.reassemble(&nfq.Packet{ID: uint32(i + 2), Hook: nfq.HookPrerouting, Payload: f}, buf, &a, later)
		if err != nil || delivered != (i == 1) {
			t.Fatalf("fragment %d again: delivered %v, %v", i, delivered, err)
		}
	}
	want := nfq.AppendVerdict(nil, b.queue, 1, nfq.Drop, nil)
	if !bytes.Equal(b.vbuf, want) || b.track.Len() != 2 {
		t.Fatalf("delivered: verdicts %x, %d held; want a DROP of id 1, ids 2 and 3 held", b.vbuf, b.track.Len())
	}
	b.vbuf = b.vbuf[:0]
	if _, err := b.sendDgram(buf[:n], &a, true); err != nil {
		t.Fatal(err)
	}
	want = nfq.AppendVerdictMark(nil, b.queue, 2, nfq.Accept, b.ownMark, nil)
	want = nfq.AppendVerdictMark(want, b.queue, 3, nfq.Accept, b.ownMark, nil)
	if !bytes.Equal(b.vbuf, want) || len(b.acc) != 0 || b.track.Len() != 0 {
		t.Fatalf("Send: verdicts %x %v, %d held; want marked ACCEPTs of ids 2 and 3 only", b.vbuf, b.acc, b.track.Len())
	}
}

// TestFragSniffForwardOnce: a FlagSniff FlagReassemble handle at
// LayerNetworkForward hands the program one copy of a forwarded
// fragmented datagram, also when conntrack defragments it in the router
// before the forward hook, where the handle's rules would queue the whole
// datagram again unless its fragments carry the handle's mark.
func TestFragSniffForwardOnce(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "dsf", 1500)
	for _, c := range fragCases() {
		t.Run(caseName(c.v6, c.ct), func(t *testing.T) {
			if c.ct {
				withConntrack(t, r.Router())
			}
			dstAddr := r.Right.B.V4
			if c.v6 {
				dstAddr = r.Right.B.V6
			}
			dst := netip.AddrPortFrom(dstAddr, 7109)
			sink, err := r.RightHost().ListenUDP(dst.String())
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()
			h := openIn(t, r.Router(), "udp.DstPort == 7109", LayerNetworkForward, 0, FlagReassemble|FlagSniff)
			copies := make(chan int, 1)
			go func() {
				buf := make([]byte, MTUMax)
				var a Address
				n := 0
				for range 100 { // bounded: one datagram is sent
					if _, err := h.Recv(buf, &a); err != nil {
						break
					}
					n++
				}
				copies <- n
			}()
			if err := r.LeftHost().SendUDP(dst, fragPayload("snf"), 1, 0); err != nil {
				t.Fatal(err)
			}
			recvd, err := netnstest.RecvUDP(sink, 1, 3*time.Second)
			if err != nil || len(recvd) != 1 {
				t.Fatalf("sink: %d datagrams, %v; want 1", len(recvd), err)
			}
			// The datagram went through the forward hook: a second copy
			// queued there is in the socket now; Shutdown lets Recv drain
			// it, then end.
			if err := h.Shutdown(ShutdownRecv); err != nil {
				t.Fatal(err)
			}
			if n := <-copies; n != 1 {
				t.Errorf("the program got %d copies of the datagram, want 1", n)
			}
		})
	}
}

// TestFragPassedForwardOnce: a forwarded fragmented datagram the
// user-space filter rejects (the kernel rules cannot express its
// timestamp condition, so they queue more) passes unseen, each of its
// three fragments counted once in Stats.Passed, also when conntrack
// defragments it in the router before the forward hook, where the
// handle's rules would queue the whole datagram again unless its fragments
// carry the handle's mark.
func TestFragPassedForwardOnce(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "dpf", 1500)
	for _, c := range fragCases() {
		t.Run(caseName(c.v6, c.ct), func(t *testing.T) {
			if c.ct {
				withConntrack(t, r.Router())
			}
			dstAddr := r.Right.B.V4
			if c.v6 {
				dstAddr = r.Right.B.V6
			}
			dst := netip.AddrPortFrom(dstAddr, 7111)
			sink, err := r.RightHost().ListenUDP(dst.String())
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()
			h := openIn(t, r.Router(), "udp.DstPort == 7111 and timestamp < 0", LayerNetworkForward, 0, FlagReassemble)
			done := make(chan error, 1)
			go func() {
				buf := make([]byte, MTUMax)
				var a Address
				_, err := h.Recv(buf, &a) // nothing to see: ends with Shutdown
				done <- err
			}()
			if err := r.LeftHost().SendUDP(dst, fragPayload("pas"), 1, 0); err != nil {
				t.Fatal(err)
			}
			recvd, err := netnstest.RecvUDP(sink, 1, 3*time.Second)
			if err != nil || len(recvd) != 1 {
				t.Fatalf("sink: %d datagrams, %v; want 1", len(recvd), err)
			}
			if err := h.Shutdown(ShutdownRecv); err != nil {
				t.Fatal(err)
			}
			if err := <-done; !errors.Is(err, ErrShutdown) {
				t.Fatalf("Recv: %v, want ErrShutdown (nothing seen)", err)
			}
			if s := statsOf(t, h); s.Passed != 3 || s.Received != 0 {
				t.Errorf("Stats %+v, want Passed 3 (the fragments, once each), Received 0", s)
			}
		})
	}
}

// TestFragExpiredCountsDatagrams: Stats.Expired counts a datagram
// reassembled in user space once, as Stats.Received does, when its
// fragments wait ParamQueueTime: one handed over and left without Send or
// Drop (two fragments, which go in two ticks of the reaper), and one still
// incomplete (two fragments of three, as WinDivert counts incomplete
// datagrams). A Send after the expiry fails and counts nothing more.
func TestFragExpiredCountsDatagrams(t *testing.T) {
	b := heldTestBackend()
	qt := int64(time.Second)
	b.queueTime.Store(qt)
	buf := make([]byte, MTUMax)
	var a, other Address
	now := time.Now().UnixNano()
	add := func(id uint32, f []byte, at int64, a *Address) (n int, delivered bool) {
		t.Helper()
		n, _, delivered, err := b.reassemble(&nfq.Packet{ID: id, Hook: nfq.HookPrerouting, Payload: f}, buf, a, at)
		if err != nil {
			t.Fatalf("fragment %d: %v", id, err)
		}
		return n, delivered
	}
	held := v4Frags(0x4242)
	add(1, held[0], now, &a)
	add(2, fragV4(0, 16, true), now, &other) // datagram 0x1234, incomplete
	add(3, fragV4(16, 8, true), now, &other)
	n, delivered := add(4, held[1], now+qt/2, &a)
	if !delivered {
		t.Fatal("datagram 0x4242 not delivered")
	}
	expired := func(tick int64, want uint64) {
		t.Helper()
		b.vmu.Lock()
		b.expireLocked(tick, qt)
		b.vmu.Unlock()
		if s, err := b.stats(); err != nil || s.Expired != want {
			t.Fatalf("tick at %v: Stats %+v (%v), want Expired %d", time.Duration(tick-now), s, err, want)
		}
	}
	expired(now+qt, 2)   // ids 1, 2, 3: both datagrams
	expired(now+2*qt, 2) // id 4: the held datagram's last fragment
	if b.track.Len() != 0 {
		t.Fatalf("%d held after the expiry, want none", b.track.Len())
	}
	if _, err := b.sendDgram(buf[:n], &a, true); err == nil {
		t.Fatal("Send of the expired datagram succeeded")
	}
	if s, _ := b.stats(); s.Expired != 2 {
		t.Fatalf("Stats %+v after Send, want Expired 2", s)
	}
}

// TestFragHeldGrownSendFails: Send of a datagram grown past what its held
// fragments can carry goes out raw; when that fails (here the handle
// cannot inject), Send fails and the fragments stay held, no verdict
// given, and the Address still names the datagram (for Drop or another
// Send).
func TestFragHeldGrownSendFails(t *testing.T) {
	b := heldTestBackend() // no injector
	buf := make([]byte, MTUMax)
	var a Address
	n := deliverV4(t, b, buf, &a, 1, 0x4242)
	grown := append(bytes.Clone(buf[:n]), make([]byte, 40)...) // 4 pieces of 16 bytes
	binary.BigEndian.PutUint16(grown[2:4], uint16(len(grown)))
	grown[10], grown[11] = 0, 0
	binary.BigEndian.PutUint16(grown[10:12], ^packet.Checksum(grown[:20], 0))
	if _, err := b.sendDgram(grown, &a, false); err == nil || !strings.Contains(err.Error(), "cannot inject") {
		t.Fatalf("Send grown: %v, want the raw send's error", err)
	}
	if b.track.Len() != 2 || len(b.vbuf) != 0 || len(b.acc) != 0 {
		t.Fatalf("after the failed Send: %d held, verdicts %x %v; want both fragments held, no verdict", b.track.Len(), b.vbuf, b.acc)
	}
	if pd := b.heldDgram(&a); pd == nil || !b.dgramQueued(pd) {
		t.Fatal("after the failed Send the Address no longer names the datagram")
	}
}
