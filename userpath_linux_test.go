//go:build linux

package divert

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/internal/nfq"
)

// kernelPair is a Handle whose queue socket is one end of a socketpair; the
// test plays the kernel on the other end: it writes the packet messages
// NFQUEUE would send and reads the verdicts. No privileges, no network: the
// syscalls are cheap and the same for every build, so what changes between
// two builds is the user-space path.
type kernelPair struct {
	h    *Handle
	peer int
	msgs [][]byte // one packet message per batch slot, ids patched per batch
	hdrs []unix.Mmsghdr
	iovs []unix.Iovec
	next uint32 // id of the next packet
	vbuf []byte
}

const kernelPairQueue = 7

// newKernelPair opens a kernelPair that sends batches of up to k copies of
// pkt, as queued at the input hook of interface 2.
func newKernelPair(tb testing.TB, k int, pkt []byte) *kernelPair {
	tb.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		tb.Fatal(err)
	}
	c, err := nfq.Wrap(fds[0], nfq.Config{Queue: kernelPairQueue})
	if err != nil {
		unix.Close(fds[1])
		tb.Fatal(err)
	}
	cfg := &openConfig{layer: LayerNetwork, port: kernelPairQueue,
		params: [3]uint64{QueueLengthDefault, QueueTimeDefault, QueueSizeDefault}}
	b := newLinuxBackend(cfg)
	b.attach(c)
	kp := &kernelPair{
		h:    &Handle{b: b, layer: cfg.layer, params: cfg.params},
		peer: fds[1],
		msgs: make([][]byte, k),
		hdrs: make([]unix.Mmsghdr, k),
		iovs: make([]unix.Iovec, k),
		next: 1,
		vbuf: make([]byte, 64<<10),
	}
	tb.Cleanup(func() {
		kp.h.Close()
		unix.Close(kp.peer)
	})
	for i := range kp.msgs {
		p := nfq.Packet{HwProto: 0x0800, Hook: nfq.HookInput, Family: unix.AF_INET,
			Queue: kernelPairQueue, InDev: 2, SkbInfo: nfq.SkbCsumNotReady, Payload: pkt}
		kp.msgs[i] = nfq.AppendPacket(nil, &p)
		kp.iovs[i].Base = &kp.msgs[i][0]
		kp.iovs[i].SetLen(len(kp.msgs[i]))
		kp.hdrs[i].Hdr.Iov = &kp.iovs[i]
		kp.hdrs[i].Hdr.SetIovlen(1)
	}
	return kp
}

// packetIDOffset is where the packet id sits in a packet message: after
// the nlmsghdr, the nfgenmsg and the PACKET_HDR attribute's header.
const packetIDOffset = 16 + 4 + 4

// queue writes n packet messages, with the next n ids, in one sendmmsg.
func (kp *kernelPair) queue(tb testing.TB, n int) {
	for i := range n {
		binary.BigEndian.PutUint32(kp.msgs[i][packetIDOffset:], kp.next)
		kp.next++
	}
	sent, _, e := unix.RawSyscall6(unix.SYS_SENDMMSG, uintptr(kp.peer),
		uintptr(unsafe.Pointer(&kp.hdrs[0])), uintptr(n), 0, 0, 0)
	if e != 0 || int(sent) != n {
		tb.Fatalf("sendmmsg: %d of %d: %v", sent, n, e)
	}
}

// verdicts reads what the handle sent since the last call (one datagram
// per sendmsg) and returns the messages, without waiting.
func (kp *kernelPair) verdicts(tb testing.TB) [][]byte {
	var out [][]byte
	for {
		n, ok := kp.recv()
		if !ok {
			return out
		}
		out = append(out, append([]byte(nil), kp.vbuf[:n]...))
	}
}

// drain reads and drops what the handle sent, without waiting, and returns
// how many datagrams that was.
func (kp *kernelPair) drain() int {
	n := 0
	for {
		if _, ok := kp.recv(); !ok {
			return n
		}
		n++
	}
}

// recv reads one datagram the handle sent into vbuf, without waiting (and
// without the Sockaddr that unix.Recvfrom allocates).
func (kp *kernelPair) recv() (int, bool) {
	n, _, e := unix.RawSyscall6(unix.SYS_RECVFROM, uintptr(kp.peer),
		uintptr(unsafe.Pointer(&kp.vbuf[0])), uintptr(len(kp.vbuf)), unix.MSG_DONTWAIT, 0, 0)
	return int(n), e == 0
}

// udp64 is an IPv4 UDP datagram with 64 bytes of payload, as the bench's
// generator sends.
func udp64(tb testing.TB) []byte {
	return udpPacket(tb, netip.MustParseAddrPort("10.200.1.1:40000"),
		netip.MustParseAddrPort("10.200.1.2:9000"), make([]byte, 64))
}

// TestKernelPair checks the harness of BenchmarkLinuxUserPath: a batch
// written to the socketpair comes out of RecvBatch whole, and SendBatch of
// it answers with one batch verdict (ACCEPT up to the batch's last id).
func TestKernelPair(t *testing.T) {
	pkt := udp64(t)
	kp := newKernelPair(t, 3, pkt)
	ms := make([]Message, 8)
	for i := range ms {
		ms[i].Buf = make([]byte, MTUMax)
	}
	for round := range 3 {
		kp.queue(t, 3)
		n, err := kp.h.RecvBatch(ms)
		if err != nil || n != 3 {
			t.Fatalf("round %d: RecvBatch: %d, %v; want 3", round, n, err)
		}
		for i := range n {
			if string(ms[i].Buf[:ms[i].N]) != string(pkt) || ms[i].Addr.Outbound || ms[i].Addr.IfIdx != 2 {
				t.Fatalf("round %d, message %d: %x %+v", round, i, ms[i].Buf[:ms[i].N], ms[i].Addr)
			}
		}
		if sent, err := kp.h.SendBatch(ms[:n]); sent != n || err != nil {
			t.Fatalf("round %d: SendBatch: %d, %v", round, sent, err)
		}
		want := nfq.AppendVerdictBatch(nil, kernelPairQueue, kp.next-1, nfq.Accept)
		if v := kp.verdicts(t); len(v) != 1 || string(v[0]) != string(want) {
			t.Fatalf("round %d: verdicts %x, want one: %x", round, v, want)
		}
	}
	if s, err := kp.h.Stats(); err != nil || s.Received != 9 || s.Sent != 9 || s.Injected != 0 {
		t.Fatalf("Stats %+v, %v", s, err)
	}
}

// TestSendChangedTooBig sends back, changed, a packet longer than a
// verdict can carry (NFQUEUE's payload attribute has a 16-bit length):
// Send must fail and keep the packet queued, so that it can still be sent
// as it came.
func TestSendChangedTooBig(t *testing.T) {
	pkt := udp64(t)
	kp := newKernelPair(t, 1, pkt)
	kp.queue(t, 1)
	buf := make([]byte, MTUMax)
	var a Address
	n, err := kp.h.Recv(buf, &a)
	if err != nil {
		t.Fatal(err)
	}
	big := udpPacket(t, netip.MustParseAddrPort("10.200.1.1:40000"),
		netip.MustParseAddrPort("10.200.1.2:9000"), make([]byte, 0xFFFF-28))
	if _, err := kp.h.Send(big, &a); err == nil {
		t.Fatalf("Send of a changed %d-byte packet: no error", len(big))
	}
	if v := kp.verdicts(t); len(v) != 0 {
		t.Fatalf("the failed Send wrote %d verdict messages", len(v))
	}
	if _, err := kp.h.Send(buf[:n], &a); err != nil {
		t.Fatalf("Send of the packet as it came, after the failed one: %v", err)
	}
	want := nfq.AppendVerdictBatch(nil, kernelPairQueue, kp.next-1, nfq.Accept)
	if v := kp.verdicts(t); len(v) != 1 || string(v[0]) != string(want) {
		t.Fatalf("verdicts %x, want one: %x", v, want)
	}
}

// BenchmarkLinuxUserPath measures the batch loop of the package
// documentation (RecvBatch, then SendBatch of the same messages) with
// the kernel's queue replaced by a socketpair (see kernelPair): each op
// writes a batch of k packet messages, receives and reinjects them; the
// verdicts are read every 32 ops. The syscalls and the socketpair's kernel work stay
// the same from build to build, so a change in ns/pkt is a change in the
// user-space path. Batches of 1 are the idle case, of 3 about what the
// bench's flood gives.
func BenchmarkLinuxUserPath(b *testing.B) { benchKernelPair(b, userPathBatch) }

// userPathBatch returns the op of the batch loop on h: RecvBatch of the k
// packets queued, SendBatch of them.
func userPathBatch(b *testing.B, h *Handle, k int) func() {
	ms := make([]Message, 64)
	for i := range ms {
		ms[i].Buf = make([]byte, MTUMax)
	}
	return func() {
		n, err := h.RecvBatch(ms)
		if err != nil || n != k {
			b.Fatalf("RecvBatch: %d, %v; want %d", n, err, k)
		}
		if sent, err := h.SendBatch(ms[:n]); sent != n || err != nil {
			b.Fatalf("SendBatch: %d, %v", sent, err)
		}
	}
}

// BenchmarkLinuxConnPath is BenchmarkLinuxUserPath's floor: the same
// socketpair and batches, read and answered by the queue socket layer
// (internal/nfq) alone, as the bench adapter's -loop conn does: packets
// decoded in place, one batch verdict, no Handle. The difference between
// the two is what the Handle adds per batch (the copies, the Addresses,
// the verdict tracking and the change detection).
func BenchmarkLinuxConnPath(b *testing.B) { benchKernelPair(b, connPathBatch) }

// connPathBatch returns the op of the queue socket layer's loop on h's
// Conn: the k packets queued decoded in place, one batch verdict.
func connPathBatch(b *testing.B, h *Handle, k int) func() {
	c := h.b.(*linuxBackend).conn
	var p nfq.Packet
	msg := make([]byte, 0, 64)
	return func() {
		got := 0
		for err := c.Next(&p, true); err == nil; err = c.Next(&p, false) {
			if got++; !c.Buffered() {
				break
			}
		}
		if got != k {
			b.Fatalf("read %d packets, want %d", got, k)
		}
		msg = nfq.AppendVerdictBatch(msg[:0], c.Queue(), p.ID, nfq.Accept)
		if err := c.Send(msg); err != nil {
			b.Fatal(err)
		}
	}
}

// benchKernelPair runs, for batches of 1, 3 and 8, the loop of the two
// benchmarks above: each op queues a batch of k packet messages on a
// kernelPair and calls the function newBatch made, which receives and
// answers them; the verdicts are read 32 ops at a time, well within the
// socket's buffer.
func benchKernelPair(b *testing.B, newBatch func(b *testing.B, h *Handle, k int) func()) {
	for _, k := range []int{1, 3, 8} {
		b.Run(fmt.Sprintf("batch=%d", k), func(b *testing.B) {
			kp := newKernelPair(b, k, udp64(b))
			batch := newBatch(b, kp.h, k)
			pending := 0
			b.ReportAllocs()
			for b.Loop() {
				kp.queue(b, k)
				batch()
				if pending++; pending == 32 {
					if got := kp.drain(); got != pending {
						b.Fatalf("%d verdict messages for %d batches", got, pending)
					}
					pending = 0
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*k), "ns/pkt")
		})
	}
}

// TestOverflowsFromIDGaps: the kernel numbers the packets it queues one by
// one, so ids missing between those read are packets it could not put in
// the receive buffer: Stats.Overflows counts them.
func TestOverflowsFromIDGaps(t *testing.T) {
	kp := newKernelPair(t, 1, udp64(t))
	buf := make([]byte, MTUMax)
	var a Address
	for _, skip := range []uint32{0, 3, 0, 2} {
		kp.next += skip
		kp.queue(t, 1)
		n, err := kp.h.Recv(buf, &a)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := kp.h.Send(buf[:n], &a); err != nil {
			t.Fatal(err)
		}
	}
	if s, err := kp.h.Stats(); err != nil || s.Overflows != 5 || s.Received != 4 {
		t.Fatalf("Stats %+v, %v: want 5 overflows (ids 2-4 and 7-8 missing), 4 received", s, err)
	}
}

// TestKernelPairEmptyBuf: on Linux too an empty receive buffer is refused
// and takes nothing, and an empty Buf ends a batch before it: the packets
// after it stay buffered for the next call, and all get their verdicts.
func TestKernelPairEmptyBuf(t *testing.T) {
	pkt := udp64(t)
	kp := newKernelPair(t, 3, pkt)
	kp.queue(t, 3)
	var a Address
	if n, err := kp.h.Recv(nil, &a); err == nil || n != 0 {
		t.Fatalf("Recv(nil) = %d, %v; want a refusal", n, err)
	}
	full := func() []byte { return make([]byte, MTUMax) }
	ms := []Message{{Buf: full()}, {}, {Buf: full()}}
	n, err := kp.h.RecvBatch(ms)
	if err != nil || n != 1 {
		t.Fatalf("RecvBatch with an empty second Buf = %d, %v; want 1", n, err)
	}
	rest := []Message{{Buf: full()}, {Buf: full()}, {Buf: full()}}
	m, err := kp.h.RecvBatch(rest)
	if err != nil || m != 2 {
		t.Fatalf("the next RecvBatch = %d, %v; want the 2 packets left", m, err)
	}
	if sent, err := kp.h.SendBatch(append(ms[:1], rest[:2]...)); err != nil || sent != 3 {
		t.Fatalf("SendBatch: %d, %v", sent, err)
	}
	want := nfq.AppendVerdictBatch(nil, kernelPairQueue, kp.next-1, nfq.Accept)
	if v := kp.verdicts(t); len(v) != 1 || string(v[0]) != string(want) {
		t.Fatalf("verdicts %x, want one: %x", v, want)
	}
	if s, err := kp.h.Stats(); err != nil || s.Received != 3 || s.Sent != 3 {
		t.Fatalf("Stats %+v, %v", s, err)
	}
}

// memPair is a kernelPair whose queue socket is never used: the Conn's
// reads and Sends call an in-memory fake (nfq.Fake) that hands out batches
// of k packet messages and counts the verdict messages. No syscall is made,
// so what a benchmark measures is the user-space path alone.
type memPair struct {
	*kernelPair
	k        int
	queued   int // packets still to hand out
	verdicts int
}

func newMemPair(tb testing.TB, k int, pkt []byte) *memPair {
	mp := &memPair{kernelPair: newKernelPair(tb, k, pkt), k: k}
	mp.h.b.(*linuxBackend).conn.SetFake(&nfq.Fake{
		Read: func(hdrs []unix.Mmsghdr, slots [][]byte, block bool) (int, syscall.Errno) {
			n := min(mp.queued, len(hdrs))
			if n == 0 {
				if block {
					tb.Fatal("blocking read with nothing queued")
				}
				return 0, unix.EAGAIN
			}
			for i := range n {
				m := mp.msgs[mp.k-mp.queued]
				binary.BigEndian.PutUint32(m[packetIDOffset:], mp.next)
				mp.next++
				hdrs[i].Len = uint32(copy(slots[i], m))
				hdrs[i].Hdr.Flags = 0
				mp.queued--
			}
			return n, 0
		},
		Send: func(b []byte) syscall.Errno {
			mp.verdicts++
			return 0
		},
	})
	return mp
}

// BenchmarkLinuxUserPathMem is BenchmarkLinuxUserPath without the
// socketpair: the queue socket is an in-memory fake (memPair), so the
// figure is the user-space path alone, per packet, without the syscalls.
func BenchmarkLinuxUserPathMem(b *testing.B) { benchMemPair(b, userPathBatch) }

// BenchmarkLinuxConnPathMem is BenchmarkLinuxConnPath on the in-memory
// fake: the queue socket layer's user-space path alone.
func BenchmarkLinuxConnPathMem(b *testing.B) { benchMemPair(b, connPathBatch) }

// benchMemPair is benchKernelPair on a memPair: each op hands the batch's
// k packets to the fake and runs the op newBatch made; every batch must
// draw one verdict message.
func benchMemPair(b *testing.B, newBatch func(b *testing.B, h *Handle, k int) func()) {
	for _, k := range []int{1, 3, 8} {
		b.Run(fmt.Sprintf("batch=%d", k), func(b *testing.B) {
			mp := newMemPair(b, k, udp64(b))
			batch := newBatch(b, mp.h, k)
			b.ReportAllocs()
			for b.Loop() {
				mp.queued = k
				batch()
			}
			if mp.verdicts != b.N {
				b.Fatalf("%d verdict messages for %d batches", mp.verdicts, b.N)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*k), "ns/pkt")
		})
	}
}
