package divert

import (
	"encoding/binary"
	"errors"
	"os"
	"slices"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/internal/nfq"
	"github.com/netdivert/divert/internal/nftrules"
)

// kernelModel plays nfnetlink_queue for a backend whose Conn is fake (no
// privileges, no sockets of the kernel's): packets are queued by id and
// wait in the socket for the receive side; each verdict the backend sends
// takes its packets off the queue, and one that finds none is refused
// (ENOENT), as the kernel answers: an ACCEPT or DROP of an id no longer
// queued, a batch with no queued id up to its own.
type kernelModel struct {
	queued   []uint32     // ids waiting for a verdict, in order
	socket   []nfq.Packet // packets not read yet
	verdicts map[uint32]int
	drops    map[uint32]bool // ids whose verdict was DROP
	refused  int             // refusals Stats.RefusedVerdicts would count
	quiet    int             // refusals of batches sent quiet (nfq.QuietSeq)
}

// queue has the kernel queue packet id, with payload.
func (k *kernelModel) queue(id uint32, payload []byte) {
	k.queued = append(k.queued, id)
	k.socket = append(k.socket, nfq.Packet{ID: id, Queue: 1, Hook: nfq.HookInput, InDev: 2, Payload: payload})
}

func (k *kernelModel) read(hdrs []unix.Mmsghdr, slots [][]byte, block bool) (int, syscall.Errno) {
	n := 0
	for n < len(hdrs) && len(k.socket) > 0 {
		m := nfq.AppendPacket(slots[n][:0], &k.socket[0])
		hdrs[n].Len, hdrs[n].Hdr.Flags = uint32(len(m)), 0
		k.socket = k.socket[1:]
		n++
	}
	if n == 0 {
		return 0, unix.EAGAIN
	}
	return n, 0
}

func (k *kernelModel) send(b []byte) syscall.Errno {
	for len(b) >= 32 {
		n := int(binary.NativeEndian.Uint32(b[0:4]))
		typ := binary.NativeEndian.Uint16(b[4:6]) & 0xff
		seq := binary.NativeEndian.Uint32(b[8:12])
		id := binary.BigEndian.Uint32(b[28:32])
		took := 0
		switch typ {
		case 1: // NFQNL_MSG_VERDICT
			if i := slices.Index(k.queued, id); i >= 0 {
				k.queued = slices.Delete(k.queued, i, i+1)
				k.verdicts[id]++
				k.drops[id] = binary.BigEndian.Uint32(b[24:28]) == uint32(nfq.Drop)
				took++
			}
		case 3: // NFQNL_MSG_VERDICT_BATCH: every queued id up to id
			k.queued = slices.DeleteFunc(k.queued, func(q uint32) bool {
				if int32(q-id) > 0 {
					return false
				}
				k.verdicts[q]++
				k.drops[q] = binary.BigEndian.Uint32(b[24:28]) == uint32(nfq.Drop)
				took++
				return true
			})
		default:
			took = 1 // config messages: not verdicts
		}
		if took == 0 {
			if seq == nfq.QuietSeq {
				k.quiet++
			} else {
				k.refused++
			}
		}
		b = b[(n+3)&^3:]
	}
	return 0
}

// modelBackend is a backend of flags whose queue is k, with no reaper
// running: the test runs the reaper's steps itself.
func modelBackend(t *testing.T, k *kernelModel, flags Flag) *linuxBackend {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fds[1]) })
	c, err := nfq.Wrap(fds[0], nfq.Config{Queue: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetFake(&nfq.Fake{Read: k.read, Send: k.send})
	b := newLinuxBackend(&openConfig{layer: LayerNetwork, flags: flags, params: [3]uint64{QueueLengthDefault, QueueTimeDefault, QueueSizeDefault}})
	b.attach(c)
	return b
}

// TestSniffOneVerdictEach: a sniffing handle accepts each original once,
// whichever of its two ways gets there first: the receive side's ACCEPT of
// a copy read, or the reaper's batch every tick of what was queued by the
// previous tick. The kernel refuses a second verdict (ENOENT), and
// Stats.RefusedVerdicts, which reports packets the kernel lost while the
// handle held them, would count it. The steps interleave as the reaper's
// ticks (flush, read the proc file's id sequence and queue total, batch)
// and the reader can: a copy read and accepted before the tick; read and
// handed to the verdict side between the tick's flush and its batch; read
// with its verdict decided while the batch goes out; a fragment whose
// datagram never completes (a sniffing handle holds nothing: the batch
// would take what the tracker drops at expiry); and ids the kernel gave
// packets it could not put in the socket (an overflow), whose batch finds
// nothing queued: that refusal, the only batch sent for nothing, is
// quiet. No original is dropped.
func TestSniffOneVerdictEach(t *testing.T) {
	k := &kernelModel{verdicts: map[uint32]int{}, drops: map[uint32]bool{}}
	b := modelBackend(t, k, FlagSniff|FlagRecvOnly)
	b.frag = newFragState(QueueTimeDefault * time.Millisecond)
	seq := uint32(0) // the kernel's last id
	batch := func() {
		t.Helper()
		b.acceptSniffed(kernelQueueStats{idSeq: seq, total: uint64(len(k.queued))})
	}
	tick := func() {
		t.Helper()
		b.flush()
		batch()
	}
	buf := make([]byte, MTUMax)
	var a Address
	recv := func() {
		t.Helper()
		if _, err := b.recv(buf, &a); err != nil || !a.Sniffed {
			t.Fatalf("recv: %v (Sniffed %v)", err, a.Sniffed)
		}
	}
	pkt := func() []byte { p := fragV4(0, 8, false); p[6], p[7] = 0, 0; return p } // whole, not a fragment
	arrive := func(p []byte) { seq++; k.queue(seq, p) }

	tick() // the first reading of the proc file
	// 1. Id 1 read and accepted by the reader (its ACCEPT goes out with the
	// tick's flush) while id 2 waits unread; then the tick's batch takes
	// id 2, and the reader reads it.
	arrive(pkt())
	tick()
	recv()
	arrive(pkt())
	tick()
	tick()
	recv()
	// 2. Id 3 read and handed to the verdict side between the tick's flush
	// and its batch, which is for id 4, unread.
	arrive(pkt())
	arrive(pkt())
	tick()
	b.flush()
	recv()
	batch()
	recv()
	// 3. Id 5 read, its verdict decided, and the batch goes out before the
	// receive call hands it to the verdict side.
	arrive(pkt())
	tick()
	arrive(pkt())
	b.rmu.Lock()
	if err := b.conn.Next(&b.pkt, true); err != nil { // queued: no wait
		t.Fatal(err)
	}
	b.pendAdd(b.pkt.ID, pendAccept, 0, nil) // what next decides for a copy
	tick()
	b.applyPending()
	b.rmu.Unlock()
	recv()
	// 4. Id 7, the first fragment of a datagram whose rest never comes:
	// the copy cannot complete, the original goes on; the queue time runs
	// out.
	arrive(fragV4(0, 16, true))
	b.rmu.Lock()
	if err := b.conn.Next(&b.pkt, true); err != nil {
		t.Fatal(err)
	}
	if _, handled, delivered, err := b.reassemble(&b.pkt, buf, &a, nfq.Mono()); !handled || delivered || err != nil {
		t.Fatalf("first fragment: handled %v, delivered %v, %v", handled, delivered, err)
	}
	b.rmu.Unlock()
	if n := b.track.Len(); n != 0 {
		t.Errorf("a sniffing handle holds %d packets", n)
	}
	tick()
	tick()
	b.vmu.Lock()
	b.expireLocked(nfq.Mono()+int64(time.Hour), int64(QueueTimeDefault*time.Millisecond))
	b.flushLocked()
	b.vmu.Unlock()
	// 5. Ids 8 to 10 lost to a full socket buffer (the kernel gave them
	// out, queued nothing); id 11 waits unread.
	seq += 3
	tick()
	arrive(pkt())
	tick()
	recv()
	b.flush()

	if len(k.queued) != 0 {
		t.Errorf("ids still queued, never verdicted: %v", k.queued)
	}
	if len(k.verdicts) != 8 {
		t.Errorf("verdicts for %d ids, want 8: %v", len(k.verdicts), k.verdicts)
	}
	for id, n := range k.verdicts {
		if n != 1 || k.drops[id] {
			t.Errorf("id %d: %d verdicts (dropped %v), want one ACCEPT", id, n, k.drops[id])
		}
	}
	if k.refused != 0 || k.quiet != 1 {
		t.Errorf("%d verdicts refused and %d quiet batches refused, want 0 and 1 (the overflow's): %v", k.refused, k.quiet, k.verdicts)
	}
}

// TestDrainUnreadLongQueueTime: a packet left unread is released once it
// has waited ParamQueueTime, also when that is longer than the reaper's
// samples of the id sequence would reach at one a tick (FlagSniff ticks
// every 10 ms; 256 samples reached 2.56 s back). Here 5 s: the sniffed
// packet is released (its original accepted, the copy counted expired)
// after 5 s, not before.
func TestDrainUnreadLongQueueTime(t *testing.T) {
	k := &kernelModel{verdicts: map[uint32]int{}, drops: map[uint32]bool{}}
	b := modelBackend(t, k, FlagSniff|FlagRecvOnly)
	qt := int64(5 * time.Second)
	pkt := fragV4(0, 8, false)
	pkt[6], pkt[7] = 0, 0
	k.queue(1, pkt)
	now0 := nfq.Mono()
	released := int64(-1)
	for i := range 800 { // 8 s of 10 ms ticks
		now := now0 + int64(i)*int64(10*time.Millisecond)
		b.drainUnread(now, qt, 1)
		if len(k.queued) == 0 {
			released = now - now0
			break
		}
	}
	if released < qt || released > qt+qt/50 {
		t.Fatalf("unread packet released after %v, want %v (to within 2%%; -1: never)", time.Duration(released), time.Duration(qt))
	}
	if s, _ := b.stats(); s.Expired != 1 || k.verdicts[1] != 1 || k.drops[1] || len(k.socket) != 0 {
		t.Fatalf("expired %d, verdicts %v (dropped %v), %d left in the socket; want the copy expired, its original accepted once", s.Expired, k.verdicts, k.drops[1], len(k.socket))
	}
}

// TestCloseVerdictsNotRefused: Close's batch ACCEPT, which finds nothing
// queued when the program sent everything back, and the verdicts a receive
// call still running collects while Close removes the rules (after that
// batch accepted its packets), are not packets lost: no refusal of them
// may reach Stats.RefusedVerdicts (a receive call racing Close can read
// the answers before the socket closes). Each packet gets one verdict.
func TestCloseVerdictsNotRefused(t *testing.T) {
	pkt := fragV4(0, 8, false)
	pkt[6], pkt[7] = 0, 0
	buf := make([]byte, MTUMax)
	var a Address

	// Everything sent back: Close's batch finds nothing.
	k := &kernelModel{verdicts: map[uint32]int{}, drops: map[uint32]bool{}}
	b := modelBackend(t, k, 0)
	k.queue(1, pkt)
	if _, err := b.recv(buf, &a); err != nil {
		t.Fatal(err)
	}
	if _, err := b.send(buf[:len(pkt)], &a); err != nil {
		t.Fatal(err)
	}
	b.flush()
	if err := b.close(); err != nil {
		t.Fatal(err)
	}
	if k.verdicts[1] != 1 || k.refused != 0 {
		t.Errorf("everything sent back, then Close: verdicts %v, %d refused; want one for id 1, none refused", k.verdicts, k.refused)
	}

	// A receive call has read packet 2 (one to pass, its verdict not yet
	// handed to the verdict side) when Close comes, and hands it over
	// while Close removes the rules, after Close's batch accepted it.
	k = &kernelModel{verdicts: map[uint32]int{}, drops: map[uint32]bool{}}
	b = modelBackend(t, k, 0)
	k.queue(1, pkt)
	k.queue(2, pkt)
	b.rmu.Lock()
	if err := b.conn.Next(&b.pkt, true); err != nil { // queued: no wait
		t.Fatal(err)
	}
	b.pendAdd(b.pkt.ID, pendPass, 0, nil)
	b.applyPending()
	b.flush() // id 1 accepted
	if err := b.conn.Next(&b.pkt, true); err != nil {
		t.Fatal(err)
	}
	b.pendAdd(b.pkt.ID, pendPass, 0, nil)
	leave := leaveNamespace
	t.Cleanup(func() { leaveNamespace = leave })
	leaveNamespace = func(*nftrules.Member) error {
		b.applyPending() // the receive call goes on meanwhile
		b.flush()
		return nil
	}
	b.member = new(nftrules.Member)
	if err := b.close(); err != nil {
		t.Fatal(err)
	}
	b.rmu.Unlock()
	if len(k.queued) != 0 || k.refused != 0 || k.verdicts[1] != 1 || k.verdicts[2] != 1 {
		t.Errorf("a receive call racing Close: queued %v, verdicts %v, %d refused; want one verdict each, none refused", k.queued, k.verdicts, k.refused)
	}
}

// TestDeadlinePassedWhileWaitingForLock: a receive call that waits for
// another one to finish (its lock) and gets it after the read deadline
// passed fails with os.ErrDeadlineExceeded, even with packets buffered, as
// Go's reads do: they check the deadline once they hold their lock.
func TestDeadlinePassedWhileWaitingForLock(t *testing.T) {
	k := &kernelModel{verdicts: map[uint32]int{}, drops: map[uint32]bool{}}
	b := modelBackend(t, k, 0)
	pkt := fragV4(0, 8, false)
	pkt[6], pkt[7] = 0, 0
	for id := range uint32(3) {
		k.queue(id+1, pkt)
	}
	buf := make([]byte, MTUMax)
	var a Address
	if _, err := b.recv(buf, &a); err != nil { // reads all three, returns 1
		t.Fatal(err)
	}
	for _, batch := range []bool{false, true} {
		if !b.conn.Buffered() {
			t.Fatal("no packet buffered")
		}
		b.rmu.Lock() // another receive call
		errc := make(chan error, 1)
		go func() {
			var err error
			if batch {
				ms := []Message{{Buf: make([]byte, MTUMax)}}
				_, err = b.recvBatch(ms)
			} else {
				var a2 Address
				_, err = b.recv(make([]byte, MTUMax), &a2)
			}
			errc <- err
		}()
		for uint32(b.recvCalls.Load()) == 0 { // past its first check, at the lock
			time.Sleep(time.Millisecond)
		}
		if err := b.setReadDeadline(time.Now().Add(-time.Second)); err != nil {
			t.Fatal(err)
		}
		b.rmu.Unlock()
		if err := <-errc; !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("batch %v: receive call that got its lock past the deadline: %v, want os.ErrDeadlineExceeded", batch, err)
		}
		if err := b.setReadDeadline(time.Time{}); err != nil {
			t.Fatal(err)
		}
	}
}
