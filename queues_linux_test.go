package divert

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/netdivert/divert/internal/netnstest"
)

// openQueuesIn opens n handles inside ns and closes them when the test
// ends.
func openQueuesIn(t testing.TB, ns *netnstest.NS, filt string, layer Layer, flags Flag, n int) []*Handle {
	t.Helper()
	var hs []*Handle
	if err := ns.Do(func() (err error) { hs, err = OpenQueues(filt, layer, 0, flags, n); return err }); err != nil {
		t.Fatalf("OpenQueues(%q, %v, %#x, %d): %v", filt, layer, uint64(flags), n, err)
	}
	t.Cleanup(func() {
		for _, h := range hs {
			h.Close()
		}
	})
	return hs
}

// extraAddrs adds k more addresses of the link's subnets to e (hosts
// 10..10+k-1) and returns them, IPv4 or IPv6.
func extraAddrs(t testing.TB, e *netnstest.End, k int, v6 bool) []netip.Addr {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var out []netip.Addr
	for i := range k {
		var a netip.Addr
		var argv []string
		if v6 {
			b := e.V6.As16()
			b[15] = byte(10 + i)
			a = netip.AddrFrom16(b)
			argv = []string{"ip", "-6", "addr", "add", a.String() + "/64", "dev", e.If, "nodad"}
		} else {
			b := e.V4.As4()
			b[3] = byte(10 + i)
			a = netip.AddrFrom4(b)
			argv = []string{"ip", "addr", "add", a.String() + "/24", "dev", e.If}
		}
		if _, err := e.NS.Run(ctx, argv...); err != nil {
			t.Fatal(err)
		}
		out = append(out, a)
	}
	return out
}

// flowSender sends tagged UDP datagrams to dst from fixed source
// addresses and ports inside ns.
type flowSender struct {
	conns []*net.UDPConn
	srcs  []netip.AddrPort
	dst   netip.AddrPort
}

func newFlowSender(t testing.TB, ns *netnstest.NS, srcAddrs []netip.Addr, ports []uint16, dst netip.AddrPort) *flowSender {
	t.Helper()
	fs := &flowSender{dst: dst}
	for _, a := range srcAddrs {
		for _, p := range ports {
			src := netip.AddrPortFrom(a, p)
			c, err := ns.ListenUDP(src.String())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			fs.conns = append(fs.conns, c)
			fs.srcs = append(fs.srcs, src)
		}
	}
	return fs
}

// send sends count datagrams of size bytes (at least the tag's length) on
// every flow, tagged "r<round> f<flow> s<seq>", and returns the tags.
func (fs *flowSender) send(t testing.TB, round, count, size int) []string {
	t.Helper()
	if count*len(fs.conns) > 10000 {
		t.Fatalf("%d datagrams: too many", count*len(fs.conns))
	}
	var tags []string
	buf := make([]byte, size)
	for s := range count {
		for f, c := range fs.conns {
			tag := fmt.Sprintf("r%d f%d s%d;", round, f, s)
			n := copy(buf, tag)
			for i := n; i < size; i++ {
				buf[i] = byte(i)
			}
			c.SetWriteDeadline(time.Now().Add(time.Second))
			if _, err := c.WriteToUDPAddrPort(buf[:max(n, size)], fs.dst); err != nil {
				t.Fatalf("send %s from %s: %v", tag, fs.srcs[f], err)
			}
			tags = append(tags, tag)
		}
		time.Sleep(time.Millisecond) // stay below the socket buffers
	}
	return tags
}

// udpTag returns the tag at the start of a UDP packet's payload, or "".
func udpTag(pkt []byte) string {
	p, err := ParsePacket(pkt)
	if err != nil || p.UDP == nil {
		return ""
	}
	tag, _, ok := bytes.Cut(p.Payload, []byte(";"))
	if !ok {
		return ""
	}
	return string(tag) + ";"
}

// flowOf returns "f<flow>" of a tag.
func flowOf(tag string) string {
	f := strings.Fields(tag)
	if len(f) < 2 {
		return ""
	}
	return f[1]
}

// tagsOf returns the tags of payloads, counted.
func tagsOf(payloads [][]byte) map[string]int {
	m := make(map[string]int)
	for _, p := range payloads {
		tag, _, _ := bytes.Cut(p, []byte(";"))
		m[string(tag)+";"]++
	}
	return m
}

// tablesIn lists the nft tables of ns.
func tablesIn(t testing.TB, ns *netnstest.NS) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := ns.Run(ctx, "nft", "list", "tables")
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}

// checkSpread checks that every datagram seen was seen exactly once across
// the handles, every one of tags among them, every flow on one handle only
// and every handle got some; it returns flow -> handle.
func checkSpread(t *testing.T, tags []string, seenBy [][]seen) map[string]int {
	t.Helper()
	count := make(map[string]int)
	owner := make(map[string]int)
	per := make([]int, len(seenBy))
	for i, got := range seenBy {
		for _, s := range got {
			tag := udpTag(s.pkt)
			if tag == "" {
				t.Fatalf("handle %d saw a packet without a tag: %x", i, s.pkt)
			}
			count[tag]++
			per[i]++
			f := flowOf(tag)
			if o, ok := owner[f]; ok && o != i {
				t.Fatalf("flow %s seen on handles %d and %d", f, o, i)
			}
			owner[f] = i
		}
	}
	for tag, n := range count {
		if n != 1 {
			t.Fatalf("%q seen %d times across the handles", tag, n)
		}
	}
	for _, tag := range tags {
		if count[tag] != 1 {
			t.Fatalf("%q seen %d times across the handles", tag, count[tag])
		}
	}
	t.Logf("packets per handle: %v", per)
	for i, n := range per {
		if n == 0 {
			t.Fatalf("handle %d got no traffic (per handle: %v)", i, per)
		}
	}
	return owner
}

func TestQueuesSpreadFlows(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "qsp", 0)
	for _, v6 := range []bool{false, true} {
		t.Run(fmt.Sprintf("ipv6=%v", v6), func(t *testing.T) {
			dstAddr := l.B.V4
			if v6 {
				dstAddr = l.B.V6
			}
			dst := netip.AddrPortFrom(dstAddr, 7000)
			sink, err := l.B.NS.ListenUDP(dst.String())
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()
			// The kernel's flow hash covers addresses only: 16 source
			// addresses (two ports each) leave both queues empty with
			// odds 2^-15.
			fs := newFlowSender(t, l.A.NS, extraAddrs(t, &l.A, 16, v6), []uint16{5001, 5002}, dst)
			hs := openQueuesIn(t, l.B.NS, "inbound and udp.DstPort == 7000", LayerNetwork, 0, 2)
			if hs[0].b.(*linuxBackend).queue+1 != hs[1].b.(*linuxBackend).queue {
				t.Fatalf("queues %d, %d: not consecutive", hs[0].b.(*linuxBackend).queue, hs[1].b.(*linuxBackend).queue)
			}
			stops := []func() []seen{pump(t, hs[0], true, nil), pump(t, hs[1], true, nil)}
			// Read while sending: 320 datagrams overflow the sink's buffer.
			const flows, count = 32, 10
			recvd := make(chan [][]byte, 1)
			go func() {
				got, err := netnstest.RecvUDP(sink, flows*count, 5*time.Second)
				if err != nil {
					t.Error(err)
				}
				recvd <- got
			}()
			tags := fs.send(t, 1, count, 64)
			got := <-recvd
			seenBy := [][]seen{stops[0](), stops[1]()}
			owner := checkSpread(t, tags, seenBy)
			delivered := tagsOf(got)
			for _, tag := range tags {
				if delivered[tag] != 1 {
					t.Fatalf("%q delivered %d times", tag, delivered[tag])
				}
			}
			// Both ports of one address pair hash alike (no ports in the
			// kernel's hash): logged, as it is the kernel's business.
			same := 0
			for f := 0; f < len(fs.srcs); f += 2 {
				if owner[fmt.Sprintf("f%d", f)] == owner[fmt.Sprintf("f%d", f+1)] {
					same++
				}
			}
			t.Logf("%d of %d address pairs kept both ports on one handle", same, len(fs.srcs)/2)
			if tb := tablesIn(t, l.B.NS); tb != "" {
				t.Fatalf("tables after closing both handles: %q", tb)
			}
			if lines := queueLines(t, l.B.NS); len(lines) != 0 {
				t.Fatalf("queues left after Close: %v", lines)
			}
		})
	}
}

// TestQueuesCloseOne closes one of two handles while the other runs:
// Close gives each packet the closed handle holds one ACCEPT, the rules
// stay, packets that hash to the closed queue are dropped (accepted
// unseen with FlagPassThrough), and the last Close removes the table.
func TestQueuesCloseOne(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "qcl", 0)
	srcs := extraAddrs(t, &l.A, 16, false)
	for _, pass := range []bool{false, true} {
		t.Run(fmt.Sprintf("passthrough=%v", pass), func(t *testing.T) {
			dst := netip.AddrPortFrom(l.B.V4, 7100)
			if pass {
				dst = netip.AddrPortFrom(l.B.V4, 7101)
			}
			sink, err := l.B.NS.ListenUDP(dst.String())
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()
			fs := newFlowSender(t, l.A.NS, srcs, []uint16{uint16(dst.Port() - 2000)}, dst)
			var flags Flag
			if pass {
				flags = FlagPassThrough
			}
			hs := openQueuesIn(t, l.B.NS, fmt.Sprintf("inbound and udp.DstPort == %d", dst.Port()), LayerNetwork, flags, 2)
			for _, h := range hs {
				if err := h.SetParam(ParamQueueTime, 10000); err != nil {
					t.Fatal(err)
				}
			}
			// Handle 0 holds what it receives; handle 1 reinjects.
			stop0 := pump(t, hs[0], false, nil)
			stop1 := pump(t, hs[1], true, nil)
			tags1 := fs.send(t, 1, 5, 32)
			got, err := netnstest.RecvUDP(sink, len(tags1), 3*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			// Wait for handle 0 to have read its share (everything
			// not delivered is held there).
			want0 := len(tags1) - len(got)
			deadline := time.Now().Add(3 * time.Second)
			for hs[0].b.(*linuxBackend).heldCount() < want0 && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			if n := hs[0].b.(*linuxBackend).heldCount(); n != want0 || want0 == 0 || len(got) == 0 {
				t.Fatalf("handle 0 holds %d, %d delivered of %d; want both shares non-empty", n, len(got), len(tags1))
			}
			held := stop0() // Close: every held packet gets one ACCEPT
			late, err := netnstest.RecvUDP(sink, want0+1, time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if len(late) != want0 {
				t.Fatalf("%d packets delivered after handle 0 closed, it held %d", len(late), want0)
			}
			delivered := tagsOf(append(got, late...))
			for _, tag := range tags1 {
				if delivered[tag] != 1 {
					t.Fatalf("%q delivered %d times", tag, delivered[tag])
				}
			}
			if tb := tablesIn(t, l.B.NS); tb == "" {
				t.Fatal("the rules went with the first Close")
			}

			// Round 2, with handle 0 closed.
			tags2 := fs.send(t, 2, 5, 32)
			got2, err := netnstest.RecvUDP(sink, len(tags2), 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			seen1 := stop1()
			owner := checkSpread(t, tags1, [][]seen{held, seen1})
			d2 := tagsOf(got2)
			for _, tag := range tags2 {
				o, ok := owner[flowOf(tag)]
				if !ok {
					t.Fatalf("flow of %q not seen in round 1", tag)
				}
				want := 1
				if o == 0 && !pass {
					want = 0 // its queue has no listener: dropped
				}
				if d2[tag] != want {
					t.Fatalf("%q (flow on handle %d) delivered %d times, want %d", tag, o, d2[tag], want)
				}
			}
			c1 := 0
			for _, s := range seen1 {
				if strings.HasPrefix(udpTag(s.pkt), "r2 ") {
					c1++
					if owner[flowOf(udpTag(s.pkt))] != 1 {
						t.Fatalf("handle 1 saw %q of a flow of handle 0", udpTag(s.pkt))
					}
				}
			}
			if c1 == 0 {
				t.Fatal("handle 1 saw nothing of round 2")
			}

			// Both closed: no table, no queue, everything passes.
			if tb := tablesIn(t, l.B.NS); tb != "" {
				t.Fatalf("tables after the last Close: %q", tb)
			}
			if lines := queueLines(t, l.B.NS); len(lines) != 0 {
				t.Fatalf("queues left after Close: %v", lines)
			}
			tags3 := fs.send(t, 3, 2, 32)
			got3, err := netnstest.RecvUDP(sink, len(tags3), 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if len(got3) != len(tags3) {
				t.Fatalf("%d of %d delivered with no handle", len(got3), len(tags3))
			}
		})
	}
}

// heldCount is how many packets the program holds on b.
func (b *linuxBackend) heldCount() int {
	b.vmu.Lock()
	defer b.vmu.Unlock()
	return b.track.Len()
}

// TestQueuesFragments: LayerNetwork reassembles IPv6 fragments in user
// space by default; with two queues every datagram still reaches one
// handle whole, exactly once, and is delivered after Send.
func TestQueuesFragments(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "qfr", 0)
	dst := netip.AddrPortFrom(l.B.V6, 7200)
	sink, err := l.B.NS.ListenUDP(dst.String())
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	fs := newFlowSender(t, l.A.NS, extraAddrs(t, &l.A, 16, true), []uint16{5200}, dst)
	hs := openQueuesIn(t, l.B.NS, "inbound and udp.DstPort == 7200", LayerNetwork, 0, 2)
	// The group's one table queues the fragments too (QueueFragments).
	if g := hs[0].b.(*linuxBackend).group; g == nil || g.rules == nil || g.frag != nil ||
		hs[0].b.(*linuxBackend).frag == nil || hs[1].b.(*linuxBackend).frag == nil {
		t.Fatal("no shared rules, a fragments' table besides them, or no reassembler per handle")
	}
	stops := []func() []seen{pump(t, hs[0], true, nil), pump(t, hs[1], true, nil)}
	const size, count = 3000, 4 // three fragments each at MTU 1500
	recvd := make(chan [][]byte, 1)
	go func() {
		got, err := netnstest.RecvUDP(sink, 16*count, 5*time.Second)
		if err != nil {
			t.Error(err)
		}
		recvd <- got
	}()
	tags := fs.send(t, 1, count, size)
	got := <-recvd
	seenBy := [][]seen{stops[0](), stops[1]()}
	checkSpread(t, tags, seenBy)
	for i, ss := range seenBy {
		for _, s := range ss {
			if len(s.pkt) != 40+8+size {
				t.Fatalf("handle %d got %d bytes, want the whole %d-byte datagram", i, len(s.pkt), 40+8+size)
			}
		}
	}
	delivered := tagsOf(got)
	for _, tag := range tags {
		if delivered[tag] != 1 {
			t.Fatalf("%q delivered %d times", tag, delivered[tag])
		}
	}
	for _, p := range got {
		if len(p) != size {
			t.Fatalf("sink got %d bytes, want %d", len(p), size)
		}
	}
}

// BenchmarkQueues measures how many packets n handles (one goroutine each,
// RecvBatch then SendBatch of up to 32) pass per second while generator
// goroutines in the other namespace send small UDP datagrams from 16
// source addresses as fast as they can. One op is one packet reinjected.
// Generator and consumers share the machine's cores. Run with a count, e.g.
// -benchtime=300000x.
//
// In the work=10us cases each consumer also spends 10 µs of CPU per packet,
// as a program that inspects or rewrites packets does: the consumers are
// then the bottleneck, and n handles can use n cores. Without that work,
// on a 2-core machine the generator and the kernel's path take as much CPU
// as the consumer, so a second queue has no idle core to use.
func BenchmarkQueues(b *testing.B) {
	for _, work := range []time.Duration{0, 10 * time.Microsecond} {
		for _, n := range []int{1, 2} {
			name := fmt.Sprintf("n=%d", n)
			if work > 0 {
				name = fmt.Sprintf("work=%dus/n=%d", work.Microseconds(), n)
			}
			b.Run(name, func(b *testing.B) { benchQueues(b, n, work) })
		}
	}
}

// spin keeps the CPU busy for d.
func spin(d time.Duration) {
	for t0 := time.Now(); time.Since(t0) < d; {
	}
}

func benchQueues(b *testing.B, n int, work time.Duration) {
	netnstest.RequireRoot(b)
	l := netnstest.Pair(b, "qbn", 0)
	dst := netip.AddrPortFrom(l.B.V4, 7300)
	sink, err := l.B.NS.ListenUDP(dst.String()) // never read: full, it drops cheaply
	if err != nil {
		b.Fatal(err)
	}
	defer sink.Close()
	fs := newFlowSender(b, l.A.NS, extraAddrs(b, &l.A, 16, false), []uint16{5300}, dst)
	var hs []*Handle
	if err := l.B.NS.Do(func() (err error) {
		hs, err = OpenQueues("inbound and udp.DstPort == 7300", LayerNetwork, 0, 0, n)
		return err
	}); err != nil {
		b.Fatal(err)
	}
	var done atomic.Int64
	target := int64(b.N)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	per := make([]int64, n)
	for i, h := range hs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ms := make([]Message, 32)
			for j := range ms {
				ms[j].Buf = make([]byte, 2048)
			}
			for {
				k, err := h.RecvBatch(ms)
				if err != nil {
					return // closed
				}
				if work > 0 {
					spin(time.Duration(k) * work)
				}
				if _, err := h.SendBatch(ms[:k]); err != nil {
					if errors.Is(err, net.ErrClosed) {
						return
					}
					b.Errorf("SendBatch: %v", err)
					return
				}
				per[i] += int64(k)
				if done.Add(int64(k)) >= target {
					select {
					case <-stop:
					default:
						close(stop)
					}
				}
			}
		}()
	}
	// Generators: two goroutines, eight flows each; bounded by the stop
	// signal and by 60 s.
	limit := time.Now().Add(60 * time.Second)
	var gwg sync.WaitGroup
	payload := make([]byte, 64)
	b.ResetTimer()
	start := time.Now()
	for g := range 2 {
		gwg.Add(1)
		go func() {
			defer gwg.Done()
			conns := fs.conns[g*8 : g*8+8]
			for i := 0; ; i++ {
				if i%64 == 0 {
					select {
					case <-stop:
						return
					default:
					}
					if time.Now().After(limit) {
						return
					}
				}
				conns[i%8].WriteToUDPAddrPort(payload, dst)
			}
		}()
	}
	select {
	case <-stop:
	case <-time.After(time.Until(limit)):
		b.Errorf("only %d of %d packets in 60 s", done.Load(), target)
	}
	el := time.Since(start)
	b.StopTimer()
	gwg.Wait()
	for _, h := range hs {
		h.Close()
	}
	wg.Wait()
	b.ReportMetric(float64(done.Load())/el.Seconds(), "pkts/s")
	b.Logf("n=%d: %d packets in %v; per handle %v", n, done.Load(), el, per)
}

// TestQueuesForwardReassembleIfIdx: OpenQueues' LayerNetworkForward
// FlagReassemble handles give a datagram reassembled from fragments (taken
// at prerouting, before routing) the outgoing interface as IfIdx, as an
// Open handle does (see frag_linux.go), and their filter's ifIdx sees it:
// a datagram of each IP version, sent back, reaches the host behind the
// router.
func TestQueuesForwardReassembleIfIdx(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "qfi", 1500)
	out := uint32(r.Right.A.IfIdx)
	hs := openQueuesIn(t, r.Router(), fmt.Sprintf("udp.DstPort == 7133 and ifIdx == %d", out), LayerNetworkForward, FlagReassemble, 2)
	stops := []func() []seen{pump(t, hs[0], true, nil), pump(t, hs[1], true, nil)}
	var sinks []*net.UDPConn
	for _, a := range []netip.Addr{r.Right.B.V4, r.Right.B.V6} {
		dst := netip.AddrPortFrom(a, 7133)
		sink, err := r.RightHost().ListenUDP(dst.String())
		if err != nil {
			t.Fatal(err)
		}
		defer sink.Close()
		sinks = append(sinks, sink)
		if err := r.LeftHost().SendUDP(dst, fragPayload("qif"), 1, 0); err != nil {
			t.Fatal(err)
		}
	}
	for i, sink := range sinks {
		recvd, err := netnstest.RecvUDP(sink, 1, 3*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if len(recvd) != 1 || !bytes.Equal(recvd[0], fragPayload("qif")) {
			t.Errorf("datagram %d: the host behind the router got %d datagrams, want it once", i, len(recvd))
		}
	}
	var got []seen
	for _, stop := range stops {
		got = append(got, stop()...)
	}
	if len(got) != 2 {
		t.Fatalf("the handles saw %d datagrams, want 2", len(got))
	}
	for _, s := range got {
		if len(s.pkt) < 20+8+fragPayloadLen || isFragment(s.pkt) || s.addr.IfIdx != out {
			t.Errorf("a %d-byte packet (fragment %v), IfIdx %d; want a whole datagram, IfIdx %d (outgoing)", len(s.pkt), isFragment(s.pkt), s.addr.IfIdx, out)
		}
	}
}
