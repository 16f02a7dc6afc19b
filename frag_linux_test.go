package divert

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/netdivert/divert/filter"
	"github.com/netdivert/divert/internal/netnstest"
	"github.com/netdivert/divert/internal/nfq"
	"github.com/netdivert/divert/internal/packet"
	"github.com/netdivert/divert/internal/reassembly"
)

const fragPayloadLen = 3000

// fragPayload is a recognisable payload of fragPayloadLen bytes starting
// with tag.
func fragPayload(tag string) []byte {
	b := make([]byte, fragPayloadLen)
	for i := range b {
		b[i] = byte('a' + i%23)
	}
	copy(b, tag)
	return b
}

// withConntrack turns conntrack (and so its defragmentation at -400) on in
// ns with a rule in a table of its own, removed when the test ends.
func withConntrack(t *testing.T, ns *netnstest.NS) {
	t.Helper()
	name := fmt.Sprintf("ct_%d", time.Now().UnixNano()%1e9)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, argv := range [][]string{
		{"nft", "add", "table", "inet", name},
		{"nft", "add", "chain", "inet", name, "c", "{ type filter hook prerouting priority 0 ; }"},
		{"nft", "add", "rule", "inet", name, "c", "ct", "state", "established", "accept"},
	} {
		if out, err := ns.Run(ctx, argv...); err != nil {
			t.Fatalf("%v: %v: %s", argv, err, out)
		}
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if out, err := ns.Run(ctx, "nft", "delete", "table", "inet", name); err != nil {
			t.Errorf("delete table %s: %v: %s", name, err, out)
		}
	})
}

// fragPump receives on h until it is closed; for each packet it records a
// copy, lets edit change it, and sends it back (recording Send's error).
type fragPump struct {
	mu   sync.Mutex
	got  []seen
	errs []error
	done chan struct{}
	h    *Handle
}

func startFragPump(t *testing.T, h *Handle, edit func([]byte, *Address) []byte) *fragPump {
	p := &fragPump{done: make(chan struct{}), h: h}
	go func() {
		defer close(p.done)
		buf := make([]byte, MTUMax)
		var a Address
		for {
			n, err := h.Recv(buf, &a)
			if err != nil {
				if !errors.Is(err, net.ErrClosed) && !errors.Is(err, ErrShutdown) {
					t.Errorf("Recv: %v", err)
				}
				return
			}
			p.mu.Lock()
			p.got = append(p.got, seen{a, bytes.Clone(buf[:n])})
			p.mu.Unlock()
			out := buf[:n]
			if edit != nil {
				out = edit(out, &a)
			}
			_, err = h.Send(out, &a)
			p.mu.Lock()
			p.errs = append(p.errs, err)
			p.mu.Unlock()
		}
	}()
	return p
}

func (p *fragPump) stop() ([]seen, []error) {
	p.h.Close()
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.got, p.errs
}

// udpData returns the UDP payload of a whole (unfragmented) IP packet.
func udpData(t *testing.T, pkt []byte) []byte {
	t.Helper()
	p, err := ParsePacket(pkt)
	if err != nil {
		t.Fatalf("parse %d-byte packet: %v", len(pkt), err)
	}
	if p.UDP == nil {
		t.Fatalf("%d-byte packet is not a whole UDP datagram", len(pkt))
	}
	return p.Payload
}

// changeTag rewrites a payload starting with "chg" to "CHG" and fixes the
// checksums; other packets stay as they are.
func changeTag(t *testing.T) func([]byte, *Address) []byte {
	return func(b []byte, a *Address) []byte {
		p, err := ParsePacket(b)
		if err != nil || p.UDP == nil {
			return b
		}
		if bytes.HasPrefix(p.Payload, []byte("chg")) {
			copy(p.Payload, "CHG")
			if err := CalcChecksums(b, a, 0); err != nil {
				t.Errorf("CalcChecksums: %v", err)
			}
		}
		return b
	}
}

// isFragment reports whether pkt is an IPv4 or IPv6 fragment.
func isFragment(pkt []byte) bool {
	_, ok := parseFragKey(pkt)
	return ok
}

func fragCases() []struct{ v6, ct bool } {
	return []struct{ v6, ct bool }{{false, false}, {true, false}, {false, true}, {true, true}}
}

func caseName(v6, ct bool) string {
	s := "ipv4"
	if v6 {
		s = "ipv6"
	}
	if ct {
		s += "/conntrack"
	}
	return s
}

// TestFragReassembleInbound: at LayerNetwork inbound, a 3000-byte UDP
// datagram that crossed a 1500-MTU link as fragments is seen as one
// packet (the input hook reassembles), with and without FlagReassemble,
// and reinjected unchanged or changed it reaches the socket intact.
func TestFragReassembleInbound(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dfi", 1500)
	for _, c := range fragCases() {
		for _, flags := range []Flag{FlagReassemble, 0} {
			t.Run(fmt.Sprintf("%s/flags=%#x", caseName(c.v6, c.ct), uint64(flags)), func(t *testing.T) {
				if c.ct {
					withConntrack(t, l.B.NS)
				}
				dst := netip.AddrPortFrom(l.B.V4, 7101)
				if c.v6 {
					dst = netip.AddrPortFrom(l.B.V6, 7101)
				}
				sink, err := l.B.NS.ListenUDP(dst.String())
				if err != nil {
					t.Fatal(err)
				}
				defer sink.Close()
				h := openIn(t, l.B.NS, "inbound && udp.DstPort == 7101", LayerNetwork, 0, flags)
				p := startFragPump(t, h, changeTag(t))
				for _, tag := range []string{"chg", "keep"} {
					if err := l.A.NS.SendUDP(dst, fragPayload(tag), 1, 0); err != nil {
						t.Fatal(err)
					}
				}
				recvd, err := netnstest.RecvUDP(sink, 2, 3*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				got, errs := p.stop()
				checkWhole(t, got, errs, recvd, c.v6)
			})
		}
	}
}

// TestFragInboundLargerThanLo: an IPv6 datagram reassembled in user space
// inbound whose length exceeds lo's MTU (65,575 bytes, the largest, against
// lo's default 65,536; 3,048 bytes against an MTU of 1,280 set on lo) is
// delivered through lo as fragments of lo's MTU, which the kernel
// reassembles: the socket gets it whole. So is one to a link-local
// address of the host, whose route (lo's MTU) is asked with its zone.
func TestFragInboundLargerThanLo(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dfo", 1500)
	// B's link-local address: the route of a datagram to it, whose
	// fragments' size is lo's MTU, is looked up with its zone.
	ipIn(t, l.B.NS, "addr", "add", "fe80::99/64", "dev", l.B.If, "nodad")
	largest := bytes.Repeat([]byte("big!"), (65535-8)/4+1)[:65535-8]
	for _, c := range []struct {
		name      string
		loMTU     int // 0: lo's default
		data      []byte
		linkLocal bool
	}{
		{"max", 0, largest, false},
		{"lo1280", 1280, fragPayload("lo1280"), false},
		{"max/link-local", 0, largest, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			if c.loMTU != 0 {
				ipIn(t, l.B.NS, "link", "set", "lo", "mtu", fmt.Sprint(c.loMTU))
				defer ipIn(t, l.B.NS, "link", "set", "lo", "mtu", "65536")
			}
			dst, listen := netip.AddrPortFrom(l.B.V6, 7151), netip.AddrPortFrom(l.B.V6, 7151).String()
			if c.linkLocal {
				dst = netip.AddrPortFrom(netip.MustParseAddr("fe80::99").WithZone(l.A.If), 7151)
				listen = "[::]:7151"
			}
			sink, err := l.B.NS.ListenUDP(listen)
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()
			h := openIn(t, l.B.NS, "inbound && udp.DstPort == 7151", LayerNetwork, 0, 0)
			p := startFragPump(t, h, nil)
			if err := l.A.NS.SendUDP(dst, c.data, 1, 0); err != nil {
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
			if want := 40 + 8 + len(c.data); len(got[0].pkt) != want {
				t.Errorf("handle got %d bytes, want the %d-byte datagram", len(got[0].pkt), want)
			}
			if len(recvd) != 1 || !bytes.Equal(recvd[0], c.data) {
				t.Fatalf("the socket got %d datagrams, want the %d-byte one sent back", len(recvd), len(c.data))
			}
		})
	}
}

// TestFragMalformedDgramSend: a datagram reassembled in user space and
// changed into something that is not one whole IP packet is refused, and
// can still be sent as received.
func TestFragMalformedDgramSend(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dfm", 1500)
	dst := netip.AddrPortFrom(l.B.V6, 7102) // IPv4 reaches input reassembled by the kernel
	sink, err := l.B.NS.ListenUDP(dst.String())
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	h := openIn(t, l.B.NS, "inbound && udp.DstPort == 7102", LayerNetwork, 0, FlagReassemble)
	if err := l.A.NS.SendUDP(dst, fragPayload("bad"), 1, 0); err != nil {
		t.Fatal(err)
	}
	h.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, MTUMax)
	var a Address
	n, err := h.Recv(buf, &a)
	if err != nil {
		t.Fatal(err)
	}
	if !a.sys.dgram || n <= 1500 {
		t.Fatalf("received %d bytes (datagram %v): want a datagram reassembled in user space", n, a.sys.dgram)
	}
	bad := bytes.Clone(buf[:n])
	binary.BigEndian.PutUint16(bad[4:], binary.BigEndian.Uint16(bad[4:])+1) // payload length one past the end
	if _, err := h.Send(bad, &a); err == nil || !strings.Contains(err.Error(), "malformed packet: IPv6 payload length") {
		t.Fatalf("Send of the datagram with a wrong payload length: %v", err)
	}
	// With two bytes past its length, which are left out and not counted.
	if sent, err := h.Send(append(buf[:n:n], 0xAA, 0xBB), &a); err != nil || sent != n {
		t.Fatalf("Send of the datagram as received, 2 bytes past its length: %d, %v; want %d sent", sent, err, n)
	}
	if _, err := netnstest.RecvUDP(sink, 1, 3*time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestFragTruncatedKeepsToLen receives a datagram reassembled in user
// space into a buffer shorter than it, cut from a bigger array: Recv must
// report the cut and write nothing past len(buf), where the array's next
// slot (another worker's buffer, say) begins.
func TestFragTruncatedKeepsToLen(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dft", 1500)
	dst := netip.AddrPortFrom(l.B.V6, 7107) // the IPv6 input hook sees the fragments
	sink, err := l.B.NS.ListenUDP(dst.String())
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	h := openIn(t, l.B.NS, "inbound && udp.DstPort == 7107", LayerNetwork, 0, 0)
	if err := l.A.NS.SendUDP(dst, fragPayload("trnc"), 1, 0); err != nil {
		t.Fatal(err)
	}
	arena := bytes.Repeat([]byte{0xAA}, 8192)
	buf := arena[:1000]
	var a Address
	h.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, err := h.Recv(buf, &a)
	if !errors.Is(err, ErrTruncated) || n != len(buf) {
		t.Fatalf("Recv of a %d-byte datagram into %d bytes: %d, %v", 48+fragPayloadLen, len(buf), n, err)
	}
	for i := len(buf); i < len(arena); i++ {
		if arena[i] != 0xAA {
			t.Fatalf("Recv wrote past len(buf): arena[%d] changed", i)
		}
	}
}

// checkWhole checks that the handle saw the two datagrams whole and the
// sink got "CHG..." and "keep..." intact.
func checkWhole(t *testing.T, got []seen, errs []error, recvd [][]byte, v6 bool) {
	t.Helper()
	for _, err := range errs {
		if err != nil {
			t.Errorf("Send: %v", err)
		}
	}
	hdr := 20
	if v6 {
		hdr = 40
	}
	if len(got) != 2 {
		t.Fatalf("handle saw %d packets, want the 2 datagrams whole", len(got))
	}
	for _, s := range got {
		if len(s.pkt) != hdr+8+fragPayloadLen || isFragment(s.pkt) {
			t.Fatalf("handle saw a %d-byte packet (fragment %v), want %d bytes whole", len(s.pkt), isFragment(s.pkt), hdr+8+fragPayloadLen)
		}
		if s.addr.IPv6 != v6 {
			t.Fatalf("Address.IPv6 = %v", s.addr.IPv6)
		}
		if d := udpData(t, s.pkt); !bytes.Equal(d[4:], fragPayload("chg")[4:]) {
			t.Fatalf("handle saw a corrupt payload")
		}
	}
	if len(recvd) != 2 {
		t.Fatalf("sink got %d of 2 datagrams", len(recvd))
	}
	want := map[string]bool{string(fragPayload("CHG")): true, string(fragPayload("keep")): true}
	for _, r := range recvd {
		if !want[string(r)] {
			t.Fatalf("sink got a %d-byte datagram starting %q, not the expected one", len(r), r[:min(8, len(r))])
		}
		delete(want, string(r))
	}
}

// TestFragFragmentsInbound: with FlagFragments the handle sees the
// fragments as on the wire (before conntrack's defragmentation too), and
// reinjecting each lets the datagram reach the socket intact.
func TestFragFragmentsInbound(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dff", 1500)
	for _, c := range fragCases() {
		t.Run(caseName(c.v6, c.ct), func(t *testing.T) {
			if c.ct {
				withConntrack(t, l.B.NS)
			}
			filt := "inbound && ip.SrcAddr == " + l.A.V4.String()
			dst := netip.AddrPortFrom(l.B.V4, 7102)
			hdr := 20
			if c.v6 {
				filt = "inbound && ipv6.SrcAddr == " + l.A.V6.String()
				dst = netip.AddrPortFrom(l.B.V6, 7102)
				hdr = 40
			}
			sink, err := l.B.NS.ListenUDP(dst.String())
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()
			h := openIn(t, l.B.NS, filt, LayerNetwork, 0, FlagFragments)
			p := startFragPump(t, h, nil)
			payload := fragPayload("frag")
			if err := l.A.NS.SendUDP(dst, payload, 1, 0); err != nil {
				t.Fatal(err)
			}
			recvd, err := netnstest.RecvUDP(sink, 1, 3*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			got, errs := p.stop()
			for _, err := range errs {
				if err != nil {
					t.Errorf("Send: %v", err)
				}
			}
			var frags, data int
			for _, s := range got {
				if !isFragment(s.pkt) {
					continue // e.g. neighbour discovery
				}
				if s.addr.Outbound || s.addr.IPv6 != c.v6 || s.addr.IfIdx != uint32(l.B.IfIdx) {
					t.Errorf("fragment address %+v", s.addr)
				}
				if len(s.pkt) > 1500 {
					t.Errorf("%d-byte fragment exceeds the MTU", len(s.pkt))
				}
				frags++
				data += len(s.pkt) - hdr
				if c.v6 {
					data -= 8 // Fragment header
				}
			}
			if frags < 2 || frags > 3 {
				t.Fatalf("handle saw %d fragments (of %d packets), want 2 or 3", frags, len(got))
			}
			if data != 8+fragPayloadLen {
				t.Fatalf("fragments carry %d bytes, want %d", data, 8+fragPayloadLen)
			}
			if len(recvd) != 1 || !bytes.Equal(recvd[0], payload) {
				t.Fatalf("sink got %d datagrams, want the one intact", len(recvd))
			}
		})
	}
}

// TestFragReassembleForward: at LayerNetworkForward with FlagReassemble a
// router sees a forwarded 3000-byte datagram as one packet, whether or not
// conntrack defragments in the router; sent back, changed or not, it
// reaches the host behind the router intact. A datagram the filter does
// not match passes unseen; one the program marks DF cannot be
// refragmented and Send says so.
func TestFragReassembleForward(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "dfw", 1500)
	for _, c := range fragCases() {
		t.Run(caseName(c.v6, c.ct), func(t *testing.T) {
			if c.ct {
				withConntrack(t, r.Router())
			}
			dstAddr := r.Right.B.V4
			if c.v6 {
				dstAddr = r.Right.B.V6
			}
			dst := netip.AddrPortFrom(dstAddr, 7103)
			other := netip.AddrPortFrom(dstAddr, 7104)
			sink, err := r.RightHost().ListenUDP(dst.String())
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()
			sink2, err := r.RightHost().ListenUDP(other.String())
			if err != nil {
				t.Fatal(err)
			}
			defer sink2.Close()
			// At the forward layer IfIdx is the outgoing interface, for a
			// datagram reassembled from fragments taken before routing too.
			out := uint32(r.Right.A.IfIdx)
			h := openIn(t, r.Router(), fmt.Sprintf("udp.DstPort == 7103 and ifIdx == %d", out), LayerNetworkForward, 0, FlagReassemble)
			edit := changeTag(t)
			p := startFragPump(t, h, func(b []byte, a *Address) []byte {
				if !c.v6 && bytes.Contains(b, []byte("dfdf")) {
					b[6] |= 0x40 // set DF: cannot be refragmented
					CalcChecksums(b, a, 0)
				}
				return edit(b, a)
			})
			for _, tag := range []string{"chg", "keep"} {
				if err := r.LeftHost().SendUDP(dst, fragPayload(tag), 1, 0); err != nil {
					t.Fatal(err)
				}
			}
			if err := r.LeftHost().SendUDP(other, fragPayload("other"), 1, 0); err != nil {
				t.Fatal(err)
			}
			recvd, err := netnstest.RecvUDP(sink, 2, 3*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			recvd2, err := netnstest.RecvUDP(sink2, 1, 3*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if len(recvd2) != 1 || !bytes.Equal(recvd2[0], fragPayload("other")) {
				t.Errorf("a datagram the filter does not match: sink got %d", len(recvd2))
			}
			checkAddrs := func(got []seen) {
				t.Helper()
				for _, s := range got {
					if s.addr.Layer != LayerNetworkForward || !s.addr.Outbound || s.addr.IfIdx != out {
						t.Errorf("address %+v, want IfIdx %d (outgoing)", s.addr, out)
					}
				}
			}
			if c.v6 {
				got, errs := p.stop()
				checkWhole(t, got, errs, recvd, c.v6)
				checkAddrs(got)
				return
			}
			// IPv4: a DF datagram larger than the MTU.
			if err := r.LeftHost().SendUDP(dst, fragPayload("dfdf"), 1, 0); err != nil {
				t.Fatal(err)
			}
			late, err := netnstest.RecvUDP(sink, 1, 500*time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			got, errs := p.stop()
			if len(late) != 0 {
				t.Errorf("the DF datagram arrived")
			}
			if len(got) != 3 || len(errs) != 3 {
				t.Fatalf("handle saw %d datagrams, want 3", len(got))
			}
			if !errors.Is(errs[2], reassembly.ErrDontFragment) || !strings.Contains(errs[2].Error(), "DF") {
				t.Errorf("Send of a DF datagram larger than the MTU: %v, want ErrDontFragment", errs[2])
			}
			checkWhole(t, got[:2], errs[:2], recvd, c.v6)
			checkAddrs(got)
		})
	}
}

// TestFragForwardExpiry: fragments of a datagram that never completes are
// held for ParamQueueTime, then dropped, and the handle never sees them.
func TestFragForwardExpiry(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "dfx", 1500)
	h := openIn(t, r.Router(), "udp", LayerNetworkForward, 0, FlagReassemble)
	if err := h.SetParam(ParamQueueTime, 200); err != nil {
		t.Fatal(err)
	}
	p := startFragPump(t, h, nil)
	// One first fragment, sent raw from the left host: MF set, offset 0.
	src, dst := netip.AddrPortFrom(r.Left.A.V4, 5000), netip.AddrPortFrom(r.Right.B.V4, 7105)
	sink, err := r.RightHost().ListenUDP(dst.String())
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	pkt := udpPacket(t, src, dst, make([]byte, 1000))
	pkt[6] |= 0x20 // MF
	binary.BigEndian.PutUint16(pkt[4:], 0x4242)
	CalcChecksums(pkt, nil, NoUDPChecksum)
	ls := openIn(t, r.LeftHost(), "false", LayerNetwork, 0, FlagSendOnly)
	if _, err := ls.Send(pkt, &Address{Outbound: true, IPChecksum: true, UDPChecksum: true}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(600 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := r.Router().Run(ctx, "cat", "/proc/net/netfilter/nfnetlink_queue")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[2] != "0" {
			t.Errorf("queue still holds packets after ParamQueueTime: %s", line)
		}
	}
	if got, _ := p.stop(); len(got) != 0 {
		t.Errorf("handle saw %d packets of an incomplete datagram", len(got))
	}
	if s := h.b.(*linuxBackend); s.frag != nil && len(s.frag.pending) != 0 {
		t.Errorf("%d datagrams still pending", len(s.frag.pending))
	}
}

// TestLinuxNewPacketChecksums: a new packet whose Address checksum bits
// are clear gets its checksums computed (a packet with a bad UDP checksum
// arrives); with the bits set it is sent as given (and the receiver drops
// it), proving the receiver checks.
func TestLinuxNewPacketChecksums(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dnc", 0)
	h := openIn(t, l.A.NS, "false", LayerNetwork, 0, FlagSendOnly)
	for _, v6 := range []bool{false, true} {
		t.Run(fmt.Sprint(v6), func(t *testing.T) {
			src, dst := netip.AddrPortFrom(l.A.V4, 1234), netip.AddrPortFrom(l.B.V4, 7106)
			if v6 {
				src, dst = netip.AddrPortFrom(l.A.V6, 1234), netip.AddrPortFrom(l.B.V6, 7106)
			}
			sink, err := l.B.NS.ListenUDP(dst.String())
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()
			bad := udpPacket(t, src, dst, []byte("offloaded"))
			ck := len(bad) - len("offloaded") - 2
			bad[ck] ^= 0x5a // a wrong (non-zero) UDP checksum
			orig := bytes.Clone(bad)
			// Bits set: sent as given, dropped by the receiver.
			if _, err := h.Send(bad, &Address{Outbound: true, IPChecksum: true, TCPChecksum: true, UDPChecksum: true}); err != nil {
				t.Fatal(err)
			}
			got, err := netnstest.RecvUDP(sink, 1, 500*time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 0 {
				t.Fatalf("a packet with a bad UDP checksum was delivered; the test cannot tell")
			}
			// Bits clear: computed.
			if _, err := h.Send(bad, &Address{Outbound: true}); err != nil {
				t.Fatal(err)
			}
			got, err = netnstest.RecvUDP(sink, 1, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 1 || string(got[0]) != "offloaded" {
				t.Fatalf("sink got %q, want the packet with its checksum computed", got)
			}
			if !bytes.Equal(bad, orig) {
				t.Errorf("Send changed the caller's buffer")
			}
		})
	}
}

func TestFragParseKey(t *testing.T) {
	src, dst := netip.MustParseAddrPort("10.1.2.3:1"), netip.MustParseAddrPort("10.4.5.6:2")
	pkt := udpPacket(t, src, dst, make([]byte, 3000))
	frags, err := reassembly.Fragment(nil, nil, pkt, 1500, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := parseFragKey(pkt); ok {
		t.Fatal("a whole datagram parsed as a fragment")
	}
	var k0 fragKey
	for i, f := range frags {
		k, ok := parseFragKey(f)
		if !ok || k.v6 || k.proto != 17 || netip.AddrFrom4([4]byte(k.dst[:4])) != dst.Addr() {
			t.Fatalf("fragment %d: %+v %v", i, k, ok)
		}
		if i > 0 && k != k0 {
			t.Fatalf("fragment %d key %+v differs from %+v", i, k, k0)
		}
		k0 = k
	}
	src6, dst6 := netip.MustParseAddrPort("[fd00::1]:1"), netip.MustParseAddrPort("[fd00::2]:2")
	pkt6 := udpPacket(t, src6, dst6, make([]byte, 3000))
	frags, err = reassembly.Fragment(nil, nil, pkt6, 1500, 0xabcdef01)
	if err != nil {
		t.Fatal(err)
	}
	for i, f := range frags {
		k, ok := parseFragKey(f)
		if !ok || !k.v6 || k.id != 0xabcdef01 || netip.AddrFrom16(k.src) != src6.Addr() {
			t.Fatalf("IPv6 fragment %d: %+v %v", i, k, ok)
		}
	}
	if _, ok := parseFragKey(pkt6); ok {
		t.Fatal("a whole IPv6 datagram parsed as a fragment")
	}
}

func FuzzFragParseKey(f *testing.F) {
	f.Add([]byte{0x45, 0, 0, 20, 0, 1, 0x20, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2})
	f.Add(append([]byte{0x60, 0, 0, 0, 0, 16, 0, 64}, make([]byte, 32+8+8)...))
	f.Add(append([]byte{0x60, 0, 0, 0, 0, 16, 44, 64}, make([]byte, 32+8+8)...))
	f.Add([]byte{0x60})
	f.Fuzz(func(t *testing.T, b []byte) {
		k, ok := parseFragKey(b)
		if !ok {
			return
		}
		if (b[0]>>4 == 6) != k.v6 {
			t.Fatalf("version %d, key v6 %v", b[0]>>4, k.v6)
		}
		if b[0]>>4 == 4 && binary.BigEndian.Uint16(b[6:])&0x3fff == 0 {
			t.Fatal("IPv4 non-fragment parsed as a fragment")
		}
	})
}

// fragV4 is an IPv4 UDP fragment 10.0.0.1 -> 10.0.0.2, id 0x1234, of n
// data bytes at off, with a valid header checksum.
func fragV4(off, n int, more bool) []byte {
	p := make([]byte, 20+n)
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:4], uint16(len(p)))
	binary.BigEndian.PutUint16(p[4:6], 0x1234)
	fo := uint16(off / 8)
	if more {
		fo |= 0x2000
	}
	binary.BigEndian.PutUint16(p[6:8], fo)
	p[8], p[9] = 64, 17
	copy(p[12:16], []byte{10, 0, 0, 1})
	copy(p[16:20], []byte{10, 0, 0, 2})
	binary.BigEndian.PutUint16(p[10:12], ^packet.Checksum(p[:20], 0))
	for i := 20; i < len(p); i++ {
		p[i] = byte(i)
	}
	return p
}

// TestFragMalformedKeepsHeld: a packet with a bad header checksum, keyed
// like a held datagram's fragments, is dropped alone (as the kernel drops
// it before its fragment queue): the datagram still completes, and its
// fragments get their verdicts (here ACCEPT: the filter does not match).
func TestFragMalformedKeepsHeld(t *testing.T) {
	f, err := filter.Compile("tcp", filter.LayerNetworkForward)
	if err != nil {
		t.Fatal(err)
	}
	b := newLinuxBackend(&openConfig{layer: LayerNetworkForward, filter: f})
	b.userSide = true
	b.frag = &fragState{reasm: reassembly.New(reassembly.Config{Timeout: time.Second}), pending: map[fragKey]*pendingDgram{}}
	now := time.Now().UnixNano()
	buf := make([]byte, MTUMax)
	var a Address
	bad := fragV4(8, 8, true)
	bad[11] ^= 0xFF // bad header checksum
	for i, pk := range [][]byte{fragV4(0, 16, true), bad, fragV4(16, 8, false)} {
		b.reassemble(&nfq.Packet{ID: uint32(i + 1), Hook: nfq.HookPrerouting, Payload: pk}, buf, &a, now)
	}
	// At LayerNetworkForward the ACCEPTs set the handle's mark (see
	// passDgram): the last fragment's first, then those held.
	want := nfq.AppendVerdict(nil, b.queue, 2, nfq.Drop, nil)
	want = nfq.AppendVerdictMark(want, b.queue, 3, nfq.Accept, b.ownMark, nil)
	want = nfq.AppendVerdictMark(want, b.queue, 1, nfq.Accept, b.ownMark, nil)
	if !bytes.Equal(b.vbuf, want) || len(b.acc) != 0 {
		t.Fatalf("verdicts %x %v, want ids 1 and 3 accepted (marked), 2 dropped alone: %x", b.vbuf, b.acc, want)
	}
}

// TestFragPassedCounted: a datagram reassembled in user space that the
// filter does not match goes on unseen, every fragment of it: each counts
// in Stats.Passed, as a whole packet the filter rejects does.
func TestFragPassedCounted(t *testing.T) {
	f, err := filter.Compile("tcp", filter.LayerNetworkForward)
	if err != nil {
		t.Fatal(err)
	}
	b := newLinuxBackend(&openConfig{layer: LayerNetworkForward, filter: f})
	b.userSide = true
	b.frag = &fragState{reasm: reassembly.New(reassembly.Config{Timeout: time.Second}), pending: map[fragKey]*pendingDgram{}}
	now := time.Now().UnixNano()
	buf := make([]byte, MTUMax)
	var a Address
	for i, pk := range [][]byte{fragV4(0, 16, true), fragV4(16, 8, true), fragV4(24, 8, false)} {
		b.reassemble(&nfq.Packet{ID: uint32(i + 1), Hook: nfq.HookPrerouting, Payload: pk}, buf, &a, now)
	}
	// At LayerNetworkForward the ACCEPTs set the handle's mark (see
	// passDgram): the last fragment's first, then those held.
	var want []byte
	for _, id := range []uint32{3, 1, 2} {
		want = nfq.AppendVerdictMark(want, b.queue, id, nfq.Accept, b.ownMark, nil)
	}
	if s, err := b.stats(); err != nil || s.Passed != 3 || s.Received != 0 || !bytes.Equal(b.vbuf, want) || len(b.acc) != 0 {
		t.Fatalf("Stats %+v (%v), verdicts %x %v: want the 3 fragments passed, accepted marked", s, err, b.vbuf, b.acc)
	}
}

// TestFragEvictedDropsHeld: a datagram the reassembler drops to stay
// within its bounds cannot complete, so its fragments held in the queue
// are dropped at once, not when ParamQueueTime runs out; the others stay
// held and complete.
func TestFragEvictedDropsHeld(t *testing.T) {
	b := newLinuxBackend(&openConfig{layer: LayerNetworkForward})
	fs := &fragState{pending: map[fragKey]*pendingDgram{}}
	fs.reasm = reassembly.New(reassembly.Config{Timeout: time.Minute, MaxDatagrams: 2, OnEvict: fs.evict})
	b.frag = fs
	now := time.Now().UnixNano()
	buf := make([]byte, MTUMax)
	var a Address
	first := func(ipID uint16) []byte {
		p := fragV4(0, 16, true)
		binary.BigEndian.PutUint16(p[4:6], ipID)
		p[10], p[11] = 0, 0
		binary.BigEndian.PutUint16(p[10:12], ^packet.Checksum(p[:20], 0))
		return p
	}
	// Queue ids 1, 2, 3: first fragments of three datagrams; the third
	// evicts the first.
	for i := range 3 {
		if _, handled, delivered, err := b.reassemble(&nfq.Packet{ID: uint32(i + 1), Hook: nfq.HookPrerouting, Payload: first(uint16(100 + i))}, buf, &a, now); !handled || delivered || err != nil {
			t.Fatalf("fragment %d: handled %v, delivered %v, %v", i+1, handled, delivered, err)
		}
	}
	if want := nfq.AppendVerdict(nil, b.queue, 1, nfq.Drop, nil); !bytes.Equal(b.vbuf, want) {
		t.Fatalf("verdicts %x, want one DROP of id 1: %x", b.vbuf, want)
	}
	if n := b.track.Len(); n != 2 || len(fs.pending) != 2 {
		t.Fatalf("%d held, %d datagrams pending; want 2 and 2", n, len(fs.pending))
	}
	// Datagram 101 completes: handed over, its fragments (ids 2 and 4)
	// stay held for its verdict; Drop drops them both.
	b.vbuf = b.vbuf[:0]
	last := fragV4(16, 8, false)
	binary.BigEndian.PutUint16(last[4:6], 101)
	last[10], last[11] = 0, 0
	binary.BigEndian.PutUint16(last[10:12], ^packet.Checksum(last[:20], 0))
	if _, _, delivered, err := b.reassemble(&nfq.Packet{ID: 4, Hook: nfq.HookPrerouting, Payload: last}, buf, &a, now); !delivered || err != nil {
		t.Fatalf("datagram 101: delivered %v, %v", delivered, err)
	}
	if n := b.track.Len(); n != 3 || len(b.vbuf) != 0 {
		t.Fatalf("%d held after completion, verdicts %x; want 3 (datagram 102's, 101's two) and none", n, b.vbuf)
	}
	b.vmu.Lock()
	b.releaseDgram(a.sys.dslot, nfq.Drop)
	b.vmu.Unlock()
	want := nfq.AppendVerdict(nfq.AppendVerdict(nil, b.queue, 2, nfq.Drop, nil), b.queue, 4, nfq.Drop, nil)
	if n := b.track.Len(); n != 1 || !bytes.Equal(b.vbuf, want) {
		t.Fatalf("dropped: %d held, verdicts %x; want 1 (datagram 102) and DROPs of 2 and 4 %x", n, b.vbuf, want)
	}
}

// ipIn runs ip(8) with argv in ns, failing t on error.
func ipIn(t *testing.T, ns *netnstest.NS, argv ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if out, err := ns.Run(ctx, append([]string{"ip"}, argv...)...); err != nil {
		t.Fatalf("ip %v: %v: %s", argv, err, out)
	}
}

// TestFragLinkLocalRouteMTU: a datagram reassembled in user space, to a
// link-local destination, that the program grew past what its fragments
// can carry goes out as new fragments (sendDgramRaw); its link's MTU
// shrank below the size its fragments came in, so it is refragmented to
// that link's MTU: the route MTU is asked with the datagram's zone
// (without it the kernel cannot route a link-local address and the lookup
// fails). The router has links of MTU 1500 on both sides and the address
// fe80::99 behind each, so only the zone says which link's MTU applies.
func TestFragLinkLocalRouteMTU(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "dlz", 0)
	ll := netip.MustParseAddr("fe80::99")
	ipIn(t, r.RightHost(), "addr", "add", "fe80::99/64", "dev", r.Right.B.If, "nodad")
	ipIn(t, r.LeftHost(), "addr", "add", "fe80::99/64", "dev", r.Left.A.If, "nodad")
	sink, err := r.RightHost().ListenUDP("[::]:7121")
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	// h takes the router's outbound fragments (from the raw sends of s,
	// whose higher priority lets h see them) and reassembles them.
	h := openIn(t, r.Router(), "outbound and udp.DstPort == 7121", LayerNetwork, 0, 0)
	s := openIn(t, r.Router(), "false", LayerNetwork, 10, FlagSendOnly)
	right := uint32(r.Right.A.IfIdx)
	src := netip.AddrPortFrom(netip.MustParseAddr("fe80::1"), 5000)
	dgram := udpPacket(t, src, netip.AddrPortFrom(ll, 7121), fragPayload("zone"))
	frags, err := reassembly.Fragment(nil, nil, dgram, 1500, 0x7121)
	if err != nil || len(frags) != 3 {
		t.Fatalf("fragment: %d fragments, %v", len(frags), err)
	}
	for _, f := range frags {
		if _, err := s.Send(f, &Address{Outbound: true, IPv6: true, IfIdx: right, IPChecksum: true, TCPChecksum: true, UDPChecksum: true}); err != nil {
			t.Fatal(err)
		}
	}
	h.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, MTUMax)
	var a Address
	n, err := h.Recv(buf, &a)
	if err != nil {
		t.Fatal(err)
	}
	if n != len(dgram) || a.IfIdx != right || !a.Outbound {
		t.Fatalf("handle got %d bytes, %+v; want the %d-byte datagram outbound on %d", n, a, len(dgram), right)
	}
	// The right link shrinks: the 1500-byte fragments no longer fit. The
	// program grows the datagram by 1500 bytes: four fragments of the
	// size it came in, one more than it has held.
	ipIn(t, r.Router(), "link", "set", r.Right.A.If, "mtu", "1280")
	ipIn(t, r.RightHost(), "link", "set", r.Right.B.If, "mtu", "1280")
	grown := append(fragPayload("zone"), bytes.Repeat([]byte("G"), 1500)...)
	if _, err := h.Send(udpPacket(t, src, netip.AddrPortFrom(ll, 7121), grown), &a); err != nil {
		t.Fatalf("Send: %v", err)
	}
	got, err := netnstest.RecvUDP(sink, 1, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || !bytes.Equal(got[0], grown) {
		t.Fatalf("the right host got %d datagrams, want the one refragmented to 1280", len(got))
	}
}

// TestFragForwardLinkLocalV4: a router forwards a fragmented datagram to
// 169.254.2.2 (IPv4 link-local, which Linux routes like any address) onto
// its right link; a LayerNetworkForward FlagReassemble handle takes it and
// sends it back. Its Address's IfIdx is the route's interface; the handle
// then points IfIdx at the link the fragments came in on, and the
// refragmented datagram must still leave by its route, not through that
// interface as the zone of a link-scoped destination: the host behind the
// right link gets it.
func TestFragForwardLinkLocalV4(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "dfl", 1500)
	ipIn(t, r.RightHost(), "addr", "add", "169.254.2.2/24", "dev", r.Right.B.If)
	ipIn(t, r.Router(), "route", "add", "169.254.2.0/24", "dev", r.Right.A.If)
	dst := netip.AddrPortFrom(netip.MustParseAddr("169.254.2.2"), 7131)
	sink, err := r.RightHost().ListenUDP(dst.String())
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	h := openIn(t, r.Router(), "udp.DstPort == 7131", LayerNetworkForward, 0, FlagReassemble)
	p := startFragPump(t, h, func(b []byte, a *Address) []byte {
		a.IfIdx = uint32(r.Left.B.IfIdx)
		return b
	})
	if err := r.LeftHost().SendUDP(dst, fragPayload("ll4"), 1, 0); err != nil {
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
	if got[0].addr.IfIdx != uint32(r.Right.A.IfIdx) {
		t.Errorf("IfIdx %d, want %d (the route's interface)", got[0].addr.IfIdx, r.Right.A.IfIdx)
	}
	if len(recvd) != 1 || !bytes.Equal(recvd[0], fragPayload("ll4")) {
		t.Fatalf("the host behind the router got %d datagrams, want the one sent back", len(recvd))
	}
}

// TestFragForwardLinkLocalV6: fragments of a datagram to fe80::99 reach a
// router on one of its links (sent to the router's MAC address: a
// neighbour that routes it); Linux routes an IPv6 link-local destination
// only back onto the link it came in on, so a LayerNetworkForward
// FlagReassemble handle gets the datagram with that link as IfIdx, and
// sent back it must leave through it, the zone of its link-local
// destination. Both hosts have fe80::99; the fragments come in on the link
// that a raw send without a zone would not take (the router's first
// fe80::/64 route's), so only the zone brings the datagram back to the
// host that sent it, and nothing for fe80::99 leaves through the other
// link.
func TestFragForwardLinkLocalV6(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "dfl6", 1500)
	ipIn(t, r.LeftHost(), "addr", "add", "fe80::99/64", "dev", r.Left.A.If, "nodad")
	ipIn(t, r.RightHost(), "addr", "add", "fe80::99/64", "dev", r.Right.B.If, "nodad")
	// The link a zoneless send to fe80::99 takes.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := r.Router().Run(ctx, "ip", "-6", "-o", "route", "get", "fe80::99")
	if err != nil {
		t.Fatalf("ip route get: %v: %s", err, out)
	}
	// host sends to routerEnd; nothing must leave through otherEnd.
	host, routerEnd, otherEnd := r.Right.B, r.Right.A, r.Left.B
	switch f := strings.Fields(string(out)); {
	case slices.Contains(f, r.Right.A.If):
		host, routerEnd, otherEnd = r.Left.A, r.Left.B, r.Right.A
	case !slices.Contains(f, r.Left.B.If):
		t.Fatalf("a zoneless fe80::99 takes neither of the router's links: %s", out)
	}
	// Whatever the router sends to fe80::99 through the other link passes
	// its postrouting hook within the send (a raw send, as Send's; the
	// neighbour lookup, which could hold it, comes after): a counter there
	// has counted it by the time Send returns, with no wait for a packet
	// that must not come.
	for _, argv := range [][]string{
		{"nft", "add", "table", "ip6", "dflcount"},
		{"nft", "add", "chain", "ip6", "dflcount", "post", "{ type filter hook postrouting priority 0 ; }"},
		{"nft", "add", "rule", "ip6", "dflcount", "post", "oifname", otherEnd.If, "ip6", "daddr", "fe80::99", "counter"},
	} {
		if out, err := r.Router().Run(ctx, argv...); err != nil {
			t.Fatalf("%v: %v: %s", argv, err, out)
		}
	}
	sink, err := host.NS.ListenUDP("[::]:7132")
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	var routerMAC net.HardwareAddr
	if err := r.Router().Do(func() error {
		ifc, err := net.InterfaceByName(routerEnd.If)
		if err == nil {
			routerMAC = ifc.HardwareAddr
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	h := openIn(t, r.Router(), "udp.DstPort == 7132", LayerNetworkForward, 0, FlagReassemble)
	p := startFragPump(t, h, nil)
	dst := netip.AddrPortFrom(netip.MustParseAddr("fe80::99"), 7132)
	d := udpPacket(t, netip.AddrPortFrom(host.V6, 5000), dst, fragPayload("ll6"))
	frags, err := reassembly.Fragment(nil, nil, d, 1500, 0x7132)
	if err != nil || len(frags) != 3 {
		t.Fatalf("fragment: %d fragments, %v", len(frags), err)
	}
	// The host's own sends to fe80::99 stay in it (a local address): the
	// fragments go out as frames to the router.
	if err := host.NS.Do(func() error {
		fd, err := syscall.Socket(syscall.AF_PACKET, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer syscall.Close(fd)
		sa := &syscall.SockaddrLinklayer{Protocol: 0xdd86, Ifindex: host.IfIdx, Halen: 6} // ETH_P_IPV6, network order
		copy(sa.Addr[:], routerMAC)
		for _, f := range frags {
			if err := syscall.Sendto(fd, f, 0, sa); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("send the fragments to the router: %v", err)
	}
	recvd, err := netnstest.RecvUDP(sink, 1, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	got, errs := p.stop()
	if len(got) != 1 || len(errs) != 1 || errs[0] != nil {
		t.Fatalf("handle saw %d datagrams (Send: %v), want 1 sent back", len(got), errs)
	}
	if got[0].addr.IfIdx != uint32(routerEnd.IfIdx) || !got[0].addr.IPv6 {
		t.Errorf("IfIdx %d, want %d (the link it came in on)", got[0].addr.IfIdx, routerEnd.IfIdx)
	}
	if len(recvd) != 1 || !bytes.Equal(recvd[0], fragPayload("ll6")) {
		t.Fatalf("the host on the link it came in on got %d datagrams, want the one sent back", len(recvd))
	}
	lctx, lcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer lcancel()
	out, err = r.Router().Run(lctx, "nft", "list", "chain", "ip6", "dflcount", "post")
	if err != nil {
		t.Fatalf("nft list chain: %v: %s", err, out)
	}
	if !strings.Contains(string(out), "counter packets 0 bytes 0") {
		t.Errorf("the router sent to fe80::99 through the other link, %s:\n%s", otherEnd.If, out)
	}
}

// TestFragChangedChecksumsComputed: a datagram reassembled in user space
// that the program changes and sends back with its UDPChecksum bit clear
// gets its UDP checksum computed, refragmented (forward) or whole
// (inbound), and the receiver's socket takes it (Linux drops UDP with a bad
// checksum); as for a whole packet, one sent back unchanged goes as it
// came, so a datagram whose sender got the checksum wrong stays dropped.
func TestFragChangedChecksumsComputed(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "dcf", 1500)
	for _, c := range []struct {
		name    string
		v6      bool
		forward bool
	}{{"forward/ipv4", false, true}, {"forward/ipv6", true, true}, {"inbound/ipv6", true, false}} {
		t.Run(c.name, func(t *testing.T) {
			srcAddr, dstAddr := r.Left.A.V4, r.Right.B.V4
			if c.v6 {
				srcAddr, dstAddr = r.Left.A.V6, r.Right.B.V6
			}
			dst := netip.AddrPortFrom(dstAddr, 7122)
			sink, err := r.RightHost().ListenUDP(dst.String())
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()
			var h *Handle
			if c.forward {
				h = openIn(t, r.Router(), "udp.DstPort == 7122", LayerNetworkForward, 0, FlagReassemble)
			} else {
				// IPv6 fragments reach the input hook as they are: user
				// space reassembles them.
				h = openIn(t, r.RightHost(), "inbound and udp.DstPort == 7122", LayerNetwork, 0, 0)
			}
			// The left host sends the datagrams as fragments of its own
			// making, so that one can carry a wrong checksum.
			ls := openIn(t, r.LeftHost(), "false", LayerNetwork, 0, FlagSendOnly)
			send := func(tag string, badSum bool, id uint32) {
				t.Helper()
				d := udpPacket(t, netip.AddrPortFrom(srcAddr, 5000), dst, fragPayload(tag))
				if !c.v6 {
					binary.BigEndian.PutUint16(d[4:], uint16(id))
				}
				if badSum {
					d[len(d)-fragPayloadLen-2] ^= 0x5a
				}
				sendFrags(t, ls, d, id, Address{Outbound: true, IPv6: c.v6, IPChecksum: true, TCPChecksum: true, UDPChecksum: true})
			}
			recvBack := func(change bool) {
				t.Helper()
				h.SetReadDeadline(time.Now().Add(3 * time.Second))
				buf := make([]byte, MTUMax)
				var a Address
				n, err := h.Recv(buf, &a)
				if err != nil {
					t.Fatal(err)
				}
				if !a.UDPChecksum {
					t.Fatalf("a reassembled datagram's UDPChecksum bit is clear")
				}
				if change {
					p, err := ParsePacket(buf[:n])
					if err != nil || p.UDP == nil {
						t.Fatalf("parse: %v", err)
					}
					copy(p.Payload, "CHG") // the UDP checksum no longer matches
				}
				a.UDPChecksum = false // unfinished: Send computes it if the datagram changed
				if _, err := h.Send(buf[:n], &a); err != nil {
					t.Fatal(err)
				}
			}
			// Unchanged with a wrong checksum: sent as it came, dropped.
			send("bad", true, 0x7001)
			recvBack(false)
			got, err := netnstest.RecvUDP(sink, 1, 500*time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 0 {
				t.Fatalf("an unchanged datagram with a wrong checksum arrived: its checksum was computed, or the receiver does not check")
			}
			// Changed: computed, delivered.
			send("chg", false, 0x7002)
			recvBack(true)
			got, err = netnstest.RecvUDP(sink, 1, 3*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 1 || !bytes.Equal(got[0], fragPayload("CHG")) {
				t.Fatalf("the changed datagram: the sink got %d datagrams (its checksum was not computed?)", len(got))
			}
		})
	}
}

// TestLinuxNewPacketLargerThanMTU: a new outbound packet larger than its
// route's MTU is fragmented as the host fragments its own datagrams (the
// kernel's header-included raw send alone refuses it, EMSGSIZE): IPv4
// without DF (with the sender's identification, or one chosen when it is 0,
// as the kernel chooses one), IPv6, a link-local destination on the link
// Address.IfIdx names, and a packet whose checksums Send computes first.
// An IPv4 packet with DF set is refused with an error that says so.
func TestLinuxNewPacketLargerThanMTU(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dbg", 1500)
	ipIn(t, l.B.NS, "addr", "add", "fe80::99/64", "dev", l.B.If, "nodad")
	h := openIn(t, l.A.NS, "false", LayerNetwork, 0, FlagSendOnly)
	sink, err := l.B.NS.ListenUDP("[::]:7123") // both families
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	all := Address{Outbound: true, IPChecksum: true, TCPChecksum: true, UDPChecksum: true}
	for _, c := range []struct {
		name   string
		src    netip.Addr
		dst    netip.Addr
		id     uint16 // IPv4
		clear  bool   // checksum bits clear, the UDP checksum wrong
		ifIdx  bool
		fe80v6 bool
	}{
		{name: "ipv4", src: l.A.V4, dst: l.B.V4, id: 0x4242},
		{name: "ipv4/id0", src: l.A.V4, dst: l.B.V4},
		{name: "ipv4/checksums", src: l.A.V4, dst: l.B.V4, id: 0x4343, clear: true},
		{name: "ipv6", src: l.A.V6, dst: l.B.V6},
		{name: "ipv6/checksums", src: l.A.V6, dst: l.B.V6, clear: true},
		{name: "ipv6/link-local", src: netip.MustParseAddr("fe80::1"), dst: netip.MustParseAddr("fe80::99"), ifIdx: true},
	} {
		t.Run(c.name, func(t *testing.T) {
			pkt := udpPacket(t, netip.AddrPortFrom(c.src, 5000), netip.AddrPortFrom(c.dst, 7123), fragPayload(c.name))
			a := all
			a.IPv6 = c.dst.Is6()
			if !a.IPv6 {
				binary.BigEndian.PutUint16(pkt[4:], c.id)
				CalcChecksums(pkt, nil, NoUDPChecksum)
			}
			if c.clear {
				pkt[len(pkt)-fragPayloadLen-2] ^= 0x5a
				a.IPChecksum, a.TCPChecksum, a.UDPChecksum = false, false, false
			}
			if c.ifIdx {
				a.IfIdx = uint32(l.A.IfIdx)
			}
			orig := bytes.Clone(pkt)
			n, err := h.Send(pkt, &a)
			if err != nil || n != len(pkt) {
				t.Fatalf("Send of %d bytes: %d, %v", len(pkt), n, err)
			}
			if !bytes.Equal(pkt, orig) {
				t.Errorf("Send changed the caller's buffer")
			}
			got, err := netnstest.RecvUDP(sink, 1, 3*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 1 || !bytes.Equal(got[0], fragPayload(c.name)) {
				t.Fatalf("the sink got %d datagrams, want the %d-byte one", len(got), len(pkt))
			}
		})
	}
	t.Run("ipv4/DF", func(t *testing.T) {
		pkt := udpPacket(t, netip.AddrPortFrom(l.A.V4, 5000), netip.AddrPortFrom(l.B.V4, 7123), fragPayload("df"))
		pkt[6] |= 0x40
		CalcChecksums(pkt, nil, NoUDPChecksum)
		a := all
		_, err := h.Send(pkt, &a)
		if !errors.Is(err, reassembly.ErrDontFragment) || !errors.Is(err, syscall.EMSGSIZE) || !strings.Contains(err.Error(), "1500") {
			t.Fatalf("Send of a DF packet larger than the MTU: %v, want ErrDontFragment and EMSGSIZE, naming the MTU", err)
		}
		got, err := netnstest.RecvUDP(sink, 1, 500*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 0 {
			t.Fatalf("the DF packet arrived")
		}
	})
	// An IPv6 packet that is a fragment already (an atomic fragment: a
	// Fragment header, offset 0, no more fragments) cannot be fragmented
	// again: refused as the README says, wrapping EMSGSIZE and naming the
	// MTU, as the IPv4 DF case is.
	t.Run("ipv6/fragment", func(t *testing.T) {
		whole := udpPacket(t, netip.AddrPortFrom(l.A.V6, 5000), netip.AddrPortFrom(l.B.V6, 7123), fragPayload("v6frag"))
		pkt := make([]byte, 0, len(whole)+8)
		pkt = append(pkt, whole[:40]...)
		pkt = append(pkt, 17, 0, 0, 0, 0x12, 0x34, 0x56, 0x78) // UDP next, offset 0, M clear
		pkt = append(pkt, whole[40:]...)
		pkt[6] = 44
		binary.BigEndian.PutUint16(pkt[4:], uint16(len(pkt)-40))
		a := all
		a.IPv6 = true
		_, err := h.Send(pkt, &a)
		if !errors.Is(err, reassembly.ErrFragmented) || !errors.Is(err, syscall.EMSGSIZE) || !strings.Contains(err.Error(), "1500") {
			t.Fatalf("Send of an IPv6 fragment larger than the MTU: %v, want ErrFragmented and EMSGSIZE, naming the MTU", err)
		}
		got, err := netnstest.RecvUDP(sink, 1, 500*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 0 {
			t.Fatalf("the fragment arrived")
		}
	})
}

// TestFragForwardPolicyRoute: the outgoing interface of a datagram
// reassembled at LayerNetworkForward follows the router's policy rules
// on the datagram's TOS and on its mark, as the kernel's forwarding does:
// rules send TOS 0x10 and mark 7 to a third interface (a veth going
// nowhere). Sent back, the datagrams go that way too (their fragments'
// verdicts keep the mark they came with): neither reaches the right host,
// where the main table's routes would take them.
func TestFragForwardPolicyRoute(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "dpr", 1500)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dstT := r.Right.B.V4
	dstM := netip.MustParseAddr("192.0.2.77")
	ipIn(t, r.RightHost(), "addr", "add", dstM.String()+"/32", "dev", r.Right.B.If)
	ipIn(t, r.Router(), "route", "add", dstM.String()+"/32", "dev", r.Right.A.If)
	ipIn(t, r.Router(), "link", "add", "dpol", "type", "veth", "peer", "name", "dpolp")
	ipIn(t, r.Router(), "link", "set", "dpol", "up")
	ipIn(t, r.Router(), "link", "set", "dpolp", "up")
	ipIn(t, r.Router(), "route", "add", dstT.String()+"/32", "dev", "dpol", "table", "100")
	ipIn(t, r.Router(), "route", "add", dstM.String()+"/32", "dev", "dpol", "table", "101")
	ipIn(t, r.Router(), "rule", "add", "tos", "0x10", "lookup", "100")
	ipIn(t, r.Router(), "rule", "add", "fwmark", "7", "lookup", "101")
	for _, argv := range [][]string{
		{"nft", "add", "table", "ip", "dprmark"},
		// Before the handle's fragments chain (prerouting, about -30401).
		{"nft", "add", "chain", "ip", "dprmark", "c", "{ type filter hook prerouting priority -40000 ; }"},
		{"nft", "add", "rule", "ip", "dprmark", "c", "ip", "daddr", dstM.String(), "meta", "mark", "set", "7"},
	} {
		if out, err := r.Router().Run(ctx, argv...); err != nil {
			t.Fatalf("%v: %v: %s", argv, err, out)
		}
	}
	var dpol uint32
	if err := r.Router().Do(func() error {
		ifc, err := net.InterfaceByName("dpol")
		if err == nil {
			dpol = uint32(ifc.Index)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	sink, err := r.RightHost().ListenUDP("0.0.0.0:7140")
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	h := openIn(t, r.Router(), "udp.DstPort == 7140", LayerNetworkForward, 0, FlagReassemble)
	p := startFragPump(t, h, nil)
	ls := openIn(t, r.LeftHost(), "false", LayerNetwork, 0, FlagSendOnly)
	// TOS 0x10, crafted: the left host's own sends carry TOS 0.
	d := udpPacket(t, netip.AddrPortFrom(r.Left.A.V4, 5000), netip.AddrPortFrom(dstT, 7140), fragPayload("tos"))
	d[1] = 0x10
	binary.BigEndian.PutUint16(d[4:], 0x7140) // an ID 0 would get one per fragment from the kernel
	if err := CalcChecksums(d, nil, 0); err != nil {
		t.Fatal(err)
	}
	sendFrags(t, ls, d, 0, Address{Outbound: true, IPChecksum: true, TCPChecksum: true, UDPChecksum: true})
	// Marked by the router's prerouting rule.
	if err := r.LeftHost().SendUDP(netip.AddrPortFrom(dstM, 7140), fragPayload("mark"), 1, 0); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		p.mu.Lock()
		n := len(p.got)
		p.mu.Unlock()
		if n >= 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	late, err := netnstest.RecvUDP(sink, 1, 700*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	got, errs := p.stop()
	if len(late) != 0 {
		t.Errorf("the right host got the %.4q datagram: its policy route was not followed", late[0])
	}
	for _, err := range errs {
		if err != nil {
			t.Errorf("Send: %v", err)
		}
	}
	if len(got) != 2 {
		for _, s := range got {
			t.Logf("seen: to %v, IfIdx %d", netip.AddrFrom4([4]byte(s.pkt[16:20])), s.addr.IfIdx)
		}
		t.Fatalf("handle saw %d datagrams, want 2", len(got))
	}
	for _, s := range got {
		if s.addr.IfIdx != dpol {
			t.Errorf("datagram to %v: IfIdx %d, want %d (the interface the policy rules pick)", netip.AddrFrom4([4]byte(s.pkt[16:20])), s.addr.IfIdx, dpol)
		}
	}
}

// sendFrags cuts the datagram d into fragments of at most 1500 bytes
// (identification id for IPv6) and sends each through h with a copy of a.
func sendFrags(t *testing.T, h *Handle, d []byte, id uint32, a Address) {
	t.Helper()
	frags, err := reassembly.Fragment(nil, nil, d, 1500, id)
	if err != nil || len(frags) < 2 {
		t.Fatalf("fragment: %d fragments, %v", len(frags), err)
	}
	for _, f := range frags {
		fa := a
		if _, err := h.Send(f, &fa); err != nil {
			t.Fatal(err)
		}
	}
}

// TestFragForwardDFFragments: a forwarded IPv4 datagram that comes as
// fragments with DF set (legal, and what Linux itself forwards when it
// reassembled such fragments) passes a FlagReassemble forward handle that
// sends it back unchanged, as Linux forwards it: refragmented to the size it
// came in, DF on every fragment. The fragments reaching the host behind the
// router are those the sender sent, byte for byte but for the TTL, one
// less, and the header checksum (and DF with conntrack in the router, whose own
// refragmenting drops it, with or without the handle); the handle saw one
// datagram with DF set.
func TestFragForwardDFFragments(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "ddf", 1500)
	for _, ct := range []bool{false, true} {
		t.Run(caseName(false, ct), func(t *testing.T) {
			if ct {
				withConntrack(t, r.Router())
			}
			dst := netip.AddrPortFrom(r.Right.B.V4, 7107)
			src := netip.AddrPortFrom(r.Left.A.V4, 5007)
			sink, err := r.RightHost().ListenUDP(dst.String())
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()
			wire := openIn(t, r.RightHost(), "inbound && ip.SrcAddr == "+src.Addr().String(), LayerNetwork, 0, FlagFragments)
			wp := startFragPump(t, wire, nil)
			h := openIn(t, r.Router(), "udp.DstPort == 7107", LayerNetworkForward, 0, FlagReassemble)
			p := startFragPump(t, h, nil)

			payload := fragPayload("df")
			d := udpPacket(t, src, dst, payload)
			binary.BigEndian.PutUint16(d[4:], 0x5151)
			frags, err := reassembly.Fragment(nil, nil, d, 1500, 0)
			if err != nil || len(frags) != 3 {
				t.Fatalf("fragment: %d fragments, %v", len(frags), err)
			}
			ls := openIn(t, r.LeftHost(), "false", LayerNetwork, 0, FlagSendOnly)
			var sent [][]byte
			for _, f := range frags {
				f = bytes.Clone(f)
				f[6] |= 0x40 // DF
				CalcChecksums(f, nil, 0)
				sent = append(sent, f)
				if _, err := ls.Send(f, &Address{Outbound: true, IPChecksum: true, UDPChecksum: true}); err != nil {
					t.Fatal(err)
				}
			}
			recvd, err := netnstest.RecvUDP(sink, 1, 3*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			got, errs := p.stop()
			onWire, _ := wp.stop()
			for _, err := range errs {
				if err != nil {
					t.Errorf("Send: %v", err)
				}
			}
			if len(got) != 1 || len(got[0].pkt) != len(d) || got[0].pkt[6]&0x40 == 0 {
				t.Fatalf("handle saw %d datagrams, want one of %d bytes with DF set", len(got), len(d))
			}
			if len(recvd) != 1 || !bytes.Equal(recvd[0], payload) {
				t.Fatalf("sink got %d datagrams, want the one intact", len(recvd))
			}
			var wf [][]byte
			for _, s := range onWire {
				if isFragment(s.pkt) {
					wf = append(wf, s.pkt)
				}
			}
			if len(wf) != len(sent) {
				t.Fatalf("%d fragments reached the host behind the router, want %d", len(wf), len(sent))
			}
			for i, f := range wf {
				if netnstest.Checksum(f[:20]) != 0 {
					t.Errorf("fragment %d on the wire: bad header checksum", i)
				}
				a, b := bytes.Clone(f), bytes.Clone(sent[i])
				b[8]-- // the router's hop
				for _, x := range [][]byte{a, b} {
					x[10], x[11] = 0, 0 // header checksum
					if ct {
						// Conntrack in the router defragments the raw
						// sends at output and the kernel refragments them
						// through its fast path, which drops DF: what it
						// does to these fragments without the handle too.
						x[6] &^= 0x40
					}
				}
				if !bytes.Equal(a, b) {
					t.Errorf("fragment %d on the wire: header %x, sent %x", i, f[:20], sent[i][:20])
				}
			}
		})
	}
}

// TestFragForwardTTL: a datagram a FlagReassemble forward handle
// reassembled is handed over with its TTL (hop limit) decremented, as the
// forward hook shows a whole packet, and leaves the router so, as the
// kernel forwards it; one that arrives with TTL 1 is not handed over and
// the kernel answers ICMP time exceeded, as for a whole packet.
func TestFragForwardTTL(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "dtl", 1500)
	for _, c := range fragCases() {
		t.Run(caseName(c.v6, c.ct), func(t *testing.T) {
			if c.ct {
				withConntrack(t, r.Router())
			}
			srcA, dstA := r.Left.A.V4, r.Right.B.V4
			ttlOff, wireFilt, icmpFilt := 8, "inbound && ip.SrcAddr == ", "inbound && icmp.Type == 11"
			if c.v6 {
				srcA, dstA = r.Left.A.V6, r.Right.B.V6
				ttlOff, wireFilt, icmpFilt = 7, "inbound && ipv6.SrcAddr == ", "inbound && icmpv6.Type == 3"
			}
			dst := netip.AddrPortFrom(dstA, 7108)
			sink, err := r.RightHost().ListenUDP(dst.String())
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()
			wire := openIn(t, r.RightHost(), wireFilt+srcA.String(), LayerNetwork, 0, FlagFragments)
			wp := startFragPump(t, wire, nil)
			icmp := openIn(t, r.LeftHost(), icmpFilt, LayerNetwork, 0, FlagSniff)
			ip := startFragPump(t, icmp, nil)
			h := openIn(t, r.Router(), "udp.DstPort == 7108", LayerNetworkForward, 0, FlagReassemble)
			p := startFragPump(t, h, nil)

			if err := r.LeftHost().SendUDP(dst, []byte("whole"), 1, 0); err != nil {
				t.Fatal(err)
			}
			if err := r.LeftHost().SendUDP(dst, fragPayload("ttl"), 1, 0); err != nil {
				t.Fatal(err)
			}
			recvd, err := netnstest.RecvUDP(sink, 2, 3*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			// A datagram with TTL 1, as raw fragments from the left host.
			d := udpPacket(t, netip.AddrPortFrom(srcA, 5008), dst, fragPayload("one"))
			d[ttlOff] = 1
			if !c.v6 {
				binary.BigEndian.PutUint16(d[4:], 0x5252)
				CalcChecksums(d, nil, 0)
			}
			ls := openIn(t, r.LeftHost(), "false", LayerNetwork, 0, FlagSendOnly)
			sendFrags(t, ls, d, 0x52525252, Address{Outbound: true, IPChecksum: true, UDPChecksum: true})
			late, err := netnstest.RecvUDP(sink, 1, 500*time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			got, errs := p.stop()
			onWire, _ := wp.stop()
			icmps, _ := ip.stop()
			for _, err := range errs {
				if err != nil {
					t.Errorf("Send: %v", err)
				}
			}
			if len(recvd) != 2 || len(late) != 0 {
				t.Fatalf("sink got %d datagrams then %d, want 2 then none", len(recvd), len(late))
			}
			if len(got) != 2 {
				t.Fatalf("handle saw %d datagrams, want 2 (the TTL 1 one not)", len(got))
			}
			// The sender's TTL is the kernel's default, 64.
			for _, s := range got {
				if s.pkt[ttlOff] != 63 {
					t.Errorf("handle saw a %d-byte datagram with TTL %d, want 63 (decremented, as the forward hook shows it)", len(s.pkt), s.pkt[ttlOff])
				}
			}
			var frags int
			for _, s := range onWire {
				if !isFragment(s.pkt) {
					continue
				}
				frags++
				if s.pkt[ttlOff] != 63 {
					t.Errorf("fragment on the wire with TTL %d, want 63", s.pkt[ttlOff])
				}
			}
			if frags < 2 {
				t.Errorf("%d fragments reached the host behind the router", frags)
			}
			// One per fragment for IPv6 without conntrack: the kernel
			// answers each fragment it cannot forward.
			if len(icmps) == 0 {
				t.Errorf("the sender got no ICMP time exceeded")
			}
		})
	}
}

// TestFragDuplicateNotHeld: an exact duplicate of a held fragment is not
// held in the queue too (the kernel frees a duplicate at once): repeating a
// fragment cannot fill the queue. It is dropped at once; the datagram still
// completes. A sniffing handle holds no fragment: each, the duplicates
// too, goes on at once (at LayerNetworkForward with the handle's mark,
// see acceptSniffedFrag).
func TestFragDuplicateNotHeld(t *testing.T) {
	for _, sniff := range []bool{false, true} {
		var flags Flag
		if sniff {
			flags = FlagSniff
		}
		b := newLinuxBackend(&openConfig{layer: LayerNetworkForward, flags: flags})
		b.frag = &fragState{reasm: reassembly.New(reassembly.Config{Timeout: time.Minute}), pending: map[fragKey]*pendingDgram{}}
		now := time.Now().UnixNano()
		buf := make([]byte, MTUMax)
		var a Address
		for i := range 100 {
			if _, handled, delivered, err := b.reassemble(&nfq.Packet{ID: uint32(i + 1), Hook: nfq.HookPrerouting, Payload: fragV4(0, 16, true)}, buf, &a, now); !handled || delivered || err != nil {
				t.Fatalf("sniff %v, copy %d: handled %v, delivered %v, %v", sniff, i+1, handled, delivered, err)
			}
		}
		held, first := 1, uint32(2)
		if sniff {
			held, first = 0, 1
		}
		if n := b.track.Len(); n != held {
			t.Errorf("sniff %v: %d fragments held, want %d", sniff, n, held)
		}
		want := []byte(nil)
		for id := first; id <= 100; id++ {
			if sniff {
				want = nfq.AppendVerdictMark(want, b.queue, id, nfq.Accept, b.ownMark, nil)
			} else {
				want = nfq.AppendVerdict(want, b.queue, id, nfq.Drop, nil)
			}
		}
		if !bytes.Equal(b.vbuf, want) || len(b.acc) != 0 {
			t.Errorf("sniff %v: verdicts %d bytes, accepted %v; want the 99 copies dropped (accepted with the handle's mark with FlagSniff) at once", sniff, len(b.vbuf), b.acc)
		}
		b.vbuf, b.acc = b.vbuf[:0], b.acc[:0]
		if _, _, delivered, err := b.reassemble(&nfq.Packet{ID: 101, Hook: nfq.HookPrerouting, Payload: fragV4(16, 8, false)}, buf, &a, now); !delivered || err != nil {
			t.Fatalf("sniff %v: the last fragment: delivered %v, %v", sniff, delivered, err)
		}
		// The datagram's two fragments wait for its verdict; a sniffing
		// handle let them go.
		if n, want := b.track.Len(), 2; n != want && !sniff || sniff && n != 0 {
			t.Errorf("sniff %v: %d fragments held after completion", sniff, n)
		}
	}
}

// TestFragSendMatchesKernel: the fragments Send cuts for a new packet
// larger than the route's MTU are the kernel's own, byte for byte, for the
// same datagram: a UDP socket's 3028-byte datagram is captured as the
// kernel fragmented it (FlagFragments on the receiver), reassembled, sent
// again through Send (IPv4 with the same identification; IPv6 with its
// own random one, masked here) and captured again.
func TestFragSendMatchesKernel(t *testing.T) {
	netnstest.RequireRoot(t)
	l := netnstest.Pair(t, "dbk", 1500)
	for _, v6 := range []bool{false, true} {
		t.Run(caseName(v6, false), func(t *testing.T) {
			dst := netip.AddrPortFrom(l.B.V4, 7109)
			filt := "inbound && ip.SrcAddr == " + l.A.V4.String()
			if v6 {
				dst = netip.AddrPortFrom(l.B.V6, 7109)
				filt = "inbound && ipv6.SrcAddr == " + l.A.V6.String()
			}
			sink, err := l.B.NS.ListenUDP(dst.String())
			if err != nil {
				t.Fatal(err)
			}
			defer sink.Close()
			capture := func(send func()) [][]byte {
				t.Helper()
				h := openIn(t, l.B.NS, filt, LayerNetwork, 0, FlagFragments)
				p := startFragPump(t, h, nil)
				send()
				if got, err := netnstest.RecvUDP(sink, 1, 3*time.Second); err != nil || len(got) != 1 {
					t.Fatalf("sink got %d datagrams, %v", len(got), err)
				}
				got, _ := p.stop()
				var fs [][]byte
				for _, s := range got {
					if isFragment(s.pkt) {
						fs = append(fs, s.pkt)
					}
				}
				return fs
			}
			kernel := capture(func() {
				if err := l.A.NS.SendUDP(dst, fragPayload("kernel"), 1, 0); err != nil {
					t.Fatal(err)
				}
			})
			if len(kernel) != 3 {
				t.Fatalf("the kernel sent %d fragments, want 3", len(kernel))
			}
			r := reassembly.New(reassembly.Config{})
			var d []byte
			for _, f := range kernel {
				var err error
				if d, _, err = r.Add(nil, f, time.Now()); err != nil {
					t.Fatal(err)
				}
			}
			if d == nil {
				t.Fatal("the kernel's fragments do not reassemble")
			}
			h := openIn(t, l.A.NS, "false", LayerNetwork, 0, FlagSendOnly)
			ours := capture(func() {
				if _, err := h.Send(d, &Address{Outbound: true, IPv6: v6, IPChecksum: true, UDPChecksum: true}); err != nil {
					t.Fatal(err)
				}
			})
			if len(ours) != len(kernel) {
				t.Fatalf("Send cut %d fragments, the kernel %d", len(ours), len(kernel))
			}
			for i := range ours {
				a, b := bytes.Clone(ours[i]), bytes.Clone(kernel[i])
				if v6 {
					clear(a[44:48]) // the Fragment header's identification
					clear(b[44:48])
				}
				if !bytes.Equal(a, b) {
					n := min(len(a), len(b), 48)
					t.Errorf("fragment %d: %d bytes, header %x; the kernel's %d bytes, %x", i, len(a), a[:n], len(b), b[:n])
				}
			}
		})
	}
}
