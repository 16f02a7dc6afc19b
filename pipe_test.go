package divert_test

import (
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/netdivert/divert"
)

// udp4 builds an IPv4 UDP packet with valid checksums.
func udp4(t testing.TB, dport uint16, payload string) []byte {
	pkt := []byte{
		0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
		0x30, 0x39, byte(dport >> 8), byte(dport), 0, 0, 0, 0,
	}
	pkt = append(pkt, payload...)
	pkt[2], pkt[3] = byte(len(pkt)>>8), byte(len(pkt))
	pkt[24], pkt[25] = byte((len(pkt)-20)>>8), byte(len(pkt)-20)
	if err := divert.CalcChecksums(pkt, nil, 0); err != nil {
		t.Fatal(err)
	}
	return pkt
}

func TestPipeFilterAndReinject(t *testing.T) {
	h, p, err := divert.NewPipe("udp.DstPort == 53", divert.LayerNetwork, 0)
	require.NoError(t, err)
	defer h.Close()

	taken, err := p.Deliver(udp4(t, 80, "web"), divert.Address{Outbound: true})
	require.NoError(t, err)
	require.False(t, taken)
	got, _, ok := p.Next(time.Second)
	require.True(t, ok)
	require.Equal(t, udp4(t, 80, "web"), got, "non-matching packet continues unchanged")

	taken, err = p.Deliver(udp4(t, 53, "dns"), divert.Address{Outbound: true, IfIdx: 7})
	require.NoError(t, err)
	require.True(t, taken)
	_, _, ok = p.Next(20 * time.Millisecond)
	require.False(t, ok, "a taken packet is off the path")

	buf := make([]byte, divert.MTUMax)
	var a divert.Address
	n, err := h.Recv(buf, &a)
	require.NoError(t, err)
	require.Equal(t, udp4(t, 53, "dns"), buf[:n])
	require.True(t, a.Outbound)
	require.EqualValues(t, 7, a.IfIdx)

	copy(buf[28:], "DNS")
	require.NoError(t, divert.CalcChecksums(buf[:n], &a, 0))
	_, err = h.Send(buf[:n], &a)
	require.NoError(t, err)
	got, ga, ok := p.Next(time.Second)
	require.True(t, ok)
	require.Equal(t, udp4(t, 53, "DNS"), got, "the changed packet is reinjected")
	require.True(t, ga.UDPChecksum)

	st := p.Stats()
	require.Equal(t, divert.PipeStats{Delivered: 2, Passed: 1, Queued: 1, Sent: 1}, st)
}

// TestPipeAddressAfterVerdict: as on Linux, Send and Drop clear the
// Address they were given, so sending it again injects a new packet and
// dropping it again does nothing; a copy taken before still names the
// packet, which is gone. A sniffed copy holds nothing: sending it injects.
func TestPipeAddressAfterVerdict(t *testing.T) {
	h, p, err := divert.NewPipe("udp", divert.LayerNetwork, 0)
	require.NoError(t, err)
	defer h.Close()
	buf := make([]byte, 100)
	var a divert.Address
	for range 2 {
		_, err = p.Deliver(udp4(t, 1, "x"), divert.Address{})
		require.NoError(t, err)
	}

	n, err := h.Recv(buf, &a)
	require.NoError(t, err)
	before := a
	_, err = h.Send(buf[:n], &a)
	require.NoError(t, err)
	_, err = h.Send(buf[:n], &a)
	require.NoError(t, err, "the second Send of the same Address injects")
	_, err = h.Send(buf[:n], &before)
	require.ErrorIs(t, err, divert.ErrNotQueued, "a copy taken before the Send names a packet already sent")
	require.ErrorIs(t, h.Drop(&before), divert.ErrNotQueued)
	for range 2 {
		_, _, ok := p.Next(time.Second)
		require.True(t, ok)
	}

	n, err = h.Recv(buf, &a)
	require.NoError(t, err)
	require.NoError(t, h.Drop(&a))
	require.NoError(t, h.Drop(&a), "a second Drop drops nothing")
	_, err = h.Send(buf[:n], &a)
	require.NoError(t, err, "Send after Drop injects")
	_, _, ok := p.Next(time.Second)
	require.True(t, ok)

	st, err := h.Stats()
	require.NoError(t, err)
	require.EqualValues(t, 2, st.Received)
	require.EqualValues(t, 3, st.Sent)
	require.EqualValues(t, 2, st.Injected)
	require.EqualValues(t, 1, st.Dropped)

	hs, ps, err := divert.NewPipe("udp", divert.LayerNetwork, divert.FlagSniff)
	require.NoError(t, err)
	defer hs.Close()
	_, err = ps.Deliver(udp4(t, 1, "x"), divert.Address{})
	require.NoError(t, err)
	_, _, ok = ps.Next(time.Second) // the original
	require.True(t, ok)
	n, err = hs.Recv(buf, &a)
	require.NoError(t, err)
	require.True(t, a.Sniffed)
	_, err = hs.Send(buf[:n], &a)
	require.NoError(t, err, "a sniffed copy is sent as a new packet")
	_, _, ok = ps.Next(time.Second)
	require.True(t, ok)
	st, err = hs.Stats()
	require.NoError(t, err)
	require.EqualValues(t, 1, st.Injected)
	require.EqualValues(t, 1, st.Sent)
}

// WinDivert's way to answer a packet (its netfilter sample's TCP reset and
// ICMP error): a copy of the received Address with Outbound reversed sends
// the answer the other way as a new packet, and the received packet stays
// held for its own Address.
func TestPipeAnswerWithReversedAddress(t *testing.T) {
	for _, out := range []bool{false, true} {
		h, p, err := divert.NewPipe("udp", divert.LayerNetwork, 0)
		require.NoError(t, err)
		_, err = p.Deliver(udp4(t, 53, "query"), divert.Address{Outbound: out, IfIdx: 3})
		require.NoError(t, err)
		buf := make([]byte, 100)
		var recvAddr divert.Address
		n, err := h.Recv(buf, &recvAddr)
		require.NoError(t, err)

		answer := udp4(t, 12345, "answer")
		sendAddr := recvAddr
		sendAddr.Outbound = !recvAddr.Outbound
		_, err = h.Send(answer, &sendAddr)
		require.NoError(t, err)
		got, a, ok := p.Next(time.Second)
		require.True(t, ok)
		require.Equal(t, answer, got)
		require.Equal(t, !out, a.Outbound, "the answer goes the other way")

		_, err = h.Send(buf[:n], &recvAddr)
		require.NoError(t, err, "the received packet is still held after the answer")
		got, a, ok = p.Next(time.Second)
		require.True(t, ok)
		require.Equal(t, udp4(t, 53, "query"), got)
		require.Equal(t, out, a.Outbound)

		st, err := h.Stats()
		require.NoError(t, err)
		require.EqualValues(t, 2, st.Sent)
		require.EqualValues(t, 1, st.Injected, "the answer is a new packet")
		h.Close()
	}
}

// The batch loop of ExampleHandle_RecvBatch passes a packet larger than a
// typical MTU on every OS: with a Pipe, as on Windows and FreeBSD, a packet
// cut to a short buffer could not be sent back.
func TestPipeExampleRelay(t *testing.T) {
	h, p, err := divert.NewPipe("udp", divert.LayerNetwork, 0)
	require.NoError(t, err)
	defer h.Close()
	pkts := [][]byte{udp4(t, 53, "small"), udp4(t, 53, strings.Repeat("x", 9000)), udp4(t, 53, "after")}
	for _, pkt := range pkts {
		taken, err := p.Deliver(pkt, divert.Address{})
		require.NoError(t, err)
		require.True(t, taken)
	}
	require.NoError(t, h.Shutdown(divert.ShutdownRecv))
	require.NoError(t, relay(h), "the loop ends without error once drained")
	for _, want := range pkts {
		got, _, ok := p.Next(time.Second)
		require.True(t, ok)
		require.Equal(t, want, got)
	}
}

// After ShutdownRecv what the filter matches goes on its way, unseen, as
// WinDivert's driver lets it (also for a FlagDrop handle).
func TestPipeShutdownPasses(t *testing.T) {
	for _, fl := range []divert.Flag{0, divert.FlagDrop} {
		h, p, err := divert.NewPipe("udp", divert.LayerNetwork, fl)
		require.NoError(t, err)
		require.NoError(t, h.Shutdown(divert.ShutdownRecv))
		taken, err := p.Deliver(udp4(t, 53, "late"), divert.Address{})
		require.NoError(t, err)
		require.False(t, taken)
		got, _, ok := p.Next(time.Second)
		require.True(t, ok)
		require.Equal(t, udp4(t, 53, "late"), got)
		h.Close()
	}
}

func TestPipeSniffAndDrop(t *testing.T) {
	h, p, err := divert.NewPipe("udp", divert.LayerNetwork, divert.FlagSniff|divert.FlagRecvOnly)
	require.NoError(t, err)
	taken, err := p.Deliver(udp4(t, 1, "x"), divert.Address{})
	require.NoError(t, err)
	require.False(t, taken)
	_, _, ok := p.Next(time.Second)
	require.True(t, ok, "the original goes on")
	var a divert.Address
	buf := make([]byte, 100)
	_, err = h.Recv(buf, &a)
	require.NoError(t, err)
	require.True(t, a.Sniffed)
	require.NoError(t, h.Close())

	h, p, err = divert.NewPipe("udp", divert.LayerNetwork, divert.FlagDrop)
	require.NoError(t, err)
	defer h.Close()
	taken, err = p.Deliver(udp4(t, 1, "x"), divert.Address{})
	require.NoError(t, err)
	require.True(t, taken)
	_, _, ok = p.Next(20 * time.Millisecond)
	require.False(t, ok)
	require.EqualValues(t, 1, p.Stats().Dropped)
	_, err = h.Recv(buf, &a)
	require.Error(t, err, "a FlagDrop handle does not receive")
}

func TestPipeQueueLimits(t *testing.T) {
	h, p, err := divert.NewPipe("true", divert.LayerNetwork, 0)
	require.NoError(t, err)
	defer h.Close()
	require.NoError(t, h.SetParam(divert.ParamQueueLength, 32))
	for i := 0; i < 40; i++ {
		_, err := p.Deliver(udp4(t, uint16(i), ""), divert.Address{})
		require.NoError(t, err)
	}
	require.EqualValues(t, 8, p.Stats().Dropped, "overflow drops the oldest")
	buf := make([]byte, 100)
	var a divert.Address
	n, err := h.Recv(buf, &a)
	require.NoError(t, err)
	require.EqualValues(t, 8, buf[n-8+3], "the oldest 8 (ports 0..7) are gone")

	require.NoError(t, h.SetParam(divert.ParamQueueTime, 100))
	time.Sleep(150 * time.Millisecond)
	_, err = p.Deliver(udp4(t, 99, ""), divert.Address{}) // services the queue
	require.NoError(t, err)
	_, err = h.Send(buf[:n], &a)
	require.ErrorIs(t, err, divert.ErrNotQueued, "expired after QueueTime")
}

func TestPipeLifecycle(t *testing.T) {
	h, p, err := divert.NewPipe("true", divert.LayerNetwork, 0)
	require.NoError(t, err)
	buf := make([]byte, 100)
	var a divert.Address

	require.NoError(t, h.SetReadDeadline(time.Now().Add(30*time.Millisecond)))
	_, err = h.Recv(buf, &a)
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	require.NoError(t, h.SetReadDeadline(time.Time{}))

	_, err = p.Deliver(udp4(t, 1, "a"), divert.Address{})
	require.NoError(t, err)
	require.NoError(t, h.Shutdown(divert.ShutdownRecv))
	_, err = h.Recv(buf, &a)
	require.NoError(t, err, "queued packets drain after Shutdown")
	_, err = h.Recv(buf, &a)
	require.ErrorIs(t, err, divert.ErrShutdown)

	var wg sync.WaitGroup
	h2, p2, err := divert.NewPipe("true", divert.LayerNetwork, 0)
	require.NoError(t, err)
	wg.Add(1)
	var rerr error
	go func() {
		defer wg.Done()
		var a divert.Address
		_, rerr = h2.Recv(make([]byte, 100), &a)
	}()
	time.Sleep(20 * time.Millisecond)
	require.NoError(t, h2.Close())
	wg.Wait()
	require.ErrorIs(t, rerr, net.ErrClosed, "Close unblocks a blocked Recv")
	_, err = p2.Deliver(udp4(t, 2, "b"), divert.Address{})
	require.ErrorIs(t, err, net.ErrClosed)

	h3, p3, err := divert.NewPipe("true", divert.LayerNetwork, 0)
	require.NoError(t, err)
	_, err = p3.Deliver(udp4(t, 3, "c"), divert.Address{})
	require.NoError(t, err)
	require.NoError(t, h3.Close())
	got, _, ok := p3.Next(time.Second)
	require.True(t, ok, "Close reinjects what is still queued")
	require.Equal(t, udp4(t, 3, "c"), got)

	_, _, err = divert.NewPipe("tcp.DstPort = ", divert.LayerNetwork, 0)
	require.Error(t, err)
}

// A unit test of a divert program without root: the Pipe plays the network.
func ExampleNewPipe() {
	h, p, err := divert.NewPipe("udp.DstPort == 53", divert.LayerNetwork, 0)
	if err != nil {
		panic(err)
	}
	defer h.Close()
	pkt := []byte{ // IPv4 UDP 10.0.0.1:12345 -> 10.0.0.2:53, "q"
		0x45, 0, 0, 29, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
		0x30, 0x39, 0, 53, 0, 9, 0, 0, 'q',
	}
	taken, _ := p.Deliver(pkt, divert.Address{Outbound: true})
	fmt.Println("taken:", taken)

	buf := make([]byte, divert.MTUMax)
	var addr divert.Address
	n, _ := h.Recv(buf, &addr) // the program under test would do this
	buf[n-1] = 'Q'
	divert.CalcChecksums(buf[:n], &addr, 0)
	h.Send(buf[:n], &addr)

	out, _, _ := p.Next(time.Second)
	fmt.Printf("on the path: %q\n", out[28:])
	// Output:
	// taken: true
	// on the path: "Q"
}

// TestPipeRecvBatchConcurrent: two readers call RecvBatch at once while
// packets arrive. A batch waits for its first packet only: every message
// it returns holds a packet, and the readers get each packet once.
func TestPipeRecvBatchConcurrent(t *testing.T) {
	h, p, err := divert.NewPipe("udp.DstPort == 53", divert.LayerNetwork, 0)
	require.NoError(t, err)
	defer h.Close()
	for round := range 250 {
		// No deadline while the packets are taken: a loaded machine (CI,
		// Wine) may start the readers late. The reader left without a
		// packet is woken once both came back.
		require.NoError(t, h.SetReadDeadline(time.Time{}))
		var wg sync.WaitGroup
		got := make(chan int, 2)
		for range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ms := make([]divert.Message, 4)
				for i := range ms {
					ms[i].Buf = make([]byte, 128)
				}
				n, err := h.RecvBatch(ms)
				if err != nil && n > 0 {
					t.Errorf("round %d: RecvBatch = %d with error %v", round, n, err)
				}
				for i := range n {
					if ms[i].N == 0 {
						t.Errorf("round %d: message %d of %d is empty", round, i, n)
					}
					if _, err := h.Send(ms[i].Buf[:ms[i].N], &ms[i].Addr); err != nil {
						t.Errorf("round %d: Send: %v", round, err)
					}
				}
				got <- n
			}()
		}
		for range 2 {
			_, err := p.Deliver(udp4(t, 53, "dns"), divert.Address{})
			require.NoError(t, err)
		}
		for range 2 {
			_, _, ok := p.Next(10 * time.Second)
			require.True(t, ok, "round %d: a packet was not sent back", round)
		}
		require.NoError(t, h.SetReadDeadline(time.Now()))
		wg.Wait()
		if n := <-got + <-got; n != 2 {
			t.Fatalf("round %d: the readers got %d packets, want 2", round, n)
		}
		if t.Failed() {
			return
		}
	}
}

// TestPipeForeignAddress: an Address received from one Pipe is a new
// packet to another, as another handle's is on the OSes: the other Pipe
// injects it and keeps what it holds.
func TestPipeForeignAddress(t *testing.T) {
	hA, pA, err := divert.NewPipe("udp", divert.LayerNetwork, 0)
	require.NoError(t, err)
	defer hA.Close()
	hB, pB, err := divert.NewPipe("udp", divert.LayerNetwork, 0)
	require.NoError(t, err)
	defer hB.Close()
	_, err = pA.Deliver(udp4(t, 1, "a"), divert.Address{Outbound: true})
	require.NoError(t, err)
	_, err = pB.Deliver(udp4(t, 1, "b"), divert.Address{Outbound: true})
	require.NoError(t, err)
	bufA, bufB := make([]byte, 100), make([]byte, 100)
	var aA, aB divert.Address
	nA, err := hA.Recv(bufA, &aA)
	require.NoError(t, err)
	nB, err := hB.Recv(bufB, &aB)
	require.NoError(t, err)

	_, err = hB.Send(bufA[:nA], &aA)
	require.NoError(t, err, "A's Address is a new packet to B")
	_, err = hB.Send(bufB[:nB], &aB)
	require.NoError(t, err, "B still holds its own packet")
	_, err = hA.Send(bufA[:nA], &aA)
	require.NoError(t, err, "A's Address still names A's packet")
	st, err := hB.Stats()
	require.NoError(t, err)
	require.EqualValues(t, 2, st.Sent)
	require.EqualValues(t, 1, st.Injected)
	st, err = hA.Stats()
	require.NoError(t, err)
	require.EqualValues(t, 0, st.Injected)
}

// TestPipeDeadlineAndExpiry: a read deadline that has passed fails Recv even
// with packets queued (Go's deadlines), but not after Shutdown, which
// drains; packets left unread for ParamQueueTime are gone, and a held one
// cannot be sent after it, whether or not anything else used the pipe.
func TestPipeDeadlineAndExpiry(t *testing.T) {
	h, p, err := divert.NewPipe("udp", divert.LayerNetwork, 0)
	require.NoError(t, err)
	defer h.Close()
	buf := make([]byte, 100)
	var a divert.Address
	_, err = p.Deliver(udp4(t, 1, "x"), divert.Address{})
	require.NoError(t, err)
	require.NoError(t, h.SetReadDeadline(time.Now().Add(-time.Second)))
	_, err = h.Recv(buf, &a)
	require.ErrorIs(t, err, os.ErrDeadlineExceeded, "a passed deadline fails the read with a packet queued")
	ms := []divert.Message{{Buf: buf}}
	_, err = h.RecvBatch(ms)
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	require.NoError(t, h.SetReadDeadline(time.Time{}))
	n, err := h.Recv(buf, &a)
	require.NoError(t, err, "the packet was still queued")

	require.NoError(t, h.SetParam(divert.ParamQueueTime, divert.QueueTimeMin))
	_, err = p.Deliver(udp4(t, 2, "unread"), divert.Address{})
	require.NoError(t, err)
	time.Sleep(time.Duration(divert.QueueTimeMin)*time.Millisecond + 20*time.Millisecond)
	_, err = h.Send(buf[:n], &a)
	require.ErrorIs(t, err, divert.ErrNotQueued, "held past the queue time")
	_, err = p.Deliver(udp4(t, 3, "fresh"), divert.Address{})
	require.NoError(t, err)
	n, err = h.Recv(buf, &a)
	require.NoError(t, err)
	require.Equal(t, udp4(t, 3, "fresh"), buf[:n], "the packet left unread past the queue time is gone")
	st, err := h.Stats()
	require.NoError(t, err)
	require.EqualValues(t, 2, st.Expired)

	_, err = p.Deliver(udp4(t, 4, "y"), divert.Address{})
	require.NoError(t, err)
	require.NoError(t, h.SetReadDeadline(time.Now().Add(-time.Second)))
	require.NoError(t, h.Shutdown(divert.ShutdownRecv))
	_, err = h.Recv(buf, &a)
	require.NoError(t, err, "after Shutdown the queue drains whatever the deadline")
	_, err = h.Recv(buf, &a)
	require.ErrorIs(t, err, divert.ErrShutdown)
}

// TestPipeMalformedSend: Send refuses a packet that is not one whole IP
// packet, as the OSes do, and the received packet stays held.
func TestPipeMalformedSend(t *testing.T) {
	h, p, err := divert.NewPipe("udp", divert.LayerNetwork, 0)
	require.NoError(t, err)
	defer h.Close()
	_, err = p.Deliver(udp4(t, 1, "x"), divert.Address{})
	require.NoError(t, err)
	buf := make([]byte, 100)
	var a divert.Address
	n, err := h.Recv(buf, &a)
	require.NoError(t, err)
	_, err = h.Send([]byte{1, 2, 3}, &a)
	require.ErrorContains(t, err, "malformed packet")
	_, err = h.Send(buf[:n-1], &a)
	require.ErrorContains(t, err, "total length")
	_, _, ok := p.Next(20 * time.Millisecond)
	require.False(t, ok, "nothing was sent")
	_, err = h.Send(append(buf[:n:n], 1, 2), &a)
	require.NoError(t, err, "the packet is still held; bytes past its length are left out")
	got, _, ok := p.Next(time.Second)
	require.True(t, ok)
	require.Equal(t, buf[:n], got)
	_, err = h.Send([]byte{0x45}, &divert.Address{})
	require.ErrorContains(t, err, "malformed packet", "a new packet too")
}

// TestPipeDeliverWholePackets: Deliver takes only whole packets, as the
// stack meets them (a packet cut short, or with bytes past its IP length,
// is refused); a received packet changed into a malformed one is refused
// by Send and stays held, and sent back unchanged it goes on.
func TestPipeDeliverWholePackets(t *testing.T) {
	h, p, err := divert.NewPipe("true", divert.LayerNetwork, 0)
	require.NoError(t, err)
	defer h.Close()
	odd := udp4(t, 1, "x")
	odd[3]++ // a total length one past the end: cut short
	_, err = p.Deliver(odd, divert.Address{})
	require.ErrorContains(t, err, "not a whole packet", "cut short")
	_, err = p.Deliver(append(udp4(t, 1, "x"), 0), divert.Address{})
	require.ErrorContains(t, err, "past the IP length", "trailing bytes")
	require.Zero(t, p.Stats().Delivered, "refused packets are not delivered")
	pkt := udp4(t, 1, "x")
	taken, err := p.Deliver(pkt, divert.Address{})
	require.NoError(t, err)
	require.True(t, taken)
	buf := make([]byte, 100)
	var a divert.Address
	n, err := h.Recv(buf, &a)
	require.NoError(t, err)
	buf[3]++ // changed: cut short
	_, err = h.Send(buf[:n], &a)
	require.ErrorContains(t, err, "malformed packet", "changed")
	buf[3]--
	_, err = h.Send(buf[:n], &a)
	require.NoError(t, err, "unchanged, still held")
	got, _, ok := p.Next(time.Second)
	require.True(t, ok)
	require.Equal(t, pkt, got)
}

// TestPipeDeliverFreshAddress: Deliver does not carry over a reference or
// the Sniffed mark from the Address it is given (say, one a handle
// received), so the copy a handle receives names only its own packet.
func TestPipeDeliverFreshAddress(t *testing.T) {
	hA, pA, err := divert.NewPipe("udp", divert.LayerNetwork, 0)
	require.NoError(t, err)
	defer hA.Close()
	hB, pB, err := divert.NewPipe("udp", divert.LayerNetwork, divert.FlagSniff)
	require.NoError(t, err)
	defer hB.Close()
	hC, pC, err := divert.NewPipe("udp", divert.LayerNetwork, 0)
	require.NoError(t, err)
	defer hC.Close()
	_, err = pA.Deliver(udp4(t, 1, "x"), divert.Address{})
	require.NoError(t, err)
	buf := make([]byte, 100)
	var a, b, c divert.Address
	n, err := hA.Recv(buf, &a)
	require.NoError(t, err)

	_, err = pB.Deliver(buf[:n], a) // the Address A's handle received
	require.NoError(t, err)
	_, err = hB.Recv(make([]byte, 100), &b)
	require.NoError(t, err)
	require.True(t, b.Sniffed)
	_, err = hA.Send(buf[:n], &b)
	require.NoError(t, err, "B's copy is a new packet to A")
	_, err = hA.Send(buf[:n], &a)
	require.NoError(t, err, "A still holds its packet")
	st, err := hA.Stats()
	require.NoError(t, err)
	require.EqualValues(t, 1, st.Injected)

	sniffed := divert.Address{Sniffed: true}
	taken, err := pC.Deliver(udp4(t, 2, "y"), sniffed)
	require.NoError(t, err)
	require.True(t, taken, "a non-sniffing handle takes the packet whatever the Address said")
	n, err = hC.Recv(buf, &c)
	require.NoError(t, err)
	require.False(t, c.Sniffed)
	_, err = hC.Send(buf[:n], &c)
	require.NoError(t, err)
	st, err = hC.Stats()
	require.NoError(t, err)
	require.EqualValues(t, 0, st.Injected, "the packet was held: its Send is a reinjection")
}

// TestRecvEmptyBuffer: an empty receive buffer is refused before anything
// is received (nothing could be sent back from it, so the packet would be
// lost), and an empty Buf ends a batch before it.
func TestRecvEmptyBuffer(t *testing.T) {
	h, p, err := divert.NewPipe("udp", divert.LayerNetwork, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	for i := range 3 {
		if _, err := p.Deliver(udp4(t, uint16(1000+i), "x"), divert.Address{}); err != nil {
			t.Fatal(err)
		}
	}
	var a divert.Address
	if n, err := h.Recv(nil, &a); err == nil || n != 0 {
		t.Fatalf("Recv(nil) = %d, %v; want an error", n, err)
	}
	if n, err := h.RecvBatch([]divert.Message{{}}); err == nil || n != 0 {
		t.Fatalf("RecvBatch with an empty first Buf = %d, %v; want an error", n, err)
	}
	ms := []divert.Message{{Buf: make([]byte, 1500)}, {}, {Buf: make([]byte, 1500)}}
	n, err := h.RecvBatch(ms)
	if err != nil || n != 1 {
		t.Fatalf("RecvBatch with an empty second Buf = %d, %v; want 1", n, err)
	}
	if _, err := h.SendBatch(ms[:1]); err != nil {
		t.Fatal(err)
	}
	// Nothing was lost: the other two are still queued.
	for range 2 {
		buf := make([]byte, 1500)
		n, err := h.Recv(buf, &a)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := h.Send(buf[:n], &a); err != nil {
			t.Fatal(err)
		}
	}
	if st := p.Stats(); st.Dropped != 0 || st.Sent != 3 {
		t.Errorf("%+v: want none dropped, 3 sent", st)
	}
	if s, err := h.Stats(); err != nil || s.Received != 3 || s.Sent != 3 {
		t.Errorf("Stats %+v, %v: want 3 received and sent", s, err)
	}

	// A layer whose events carry no packet takes an empty buffer, as in
	// WinDivert.
	fh, fp, err := divert.NewPipe("true", divert.LayerFlow, divert.FlagSniff|divert.FlagRecvOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	for range 2 {
		if _, err := fp.Deliver(nil, divert.Address{Event: divert.EventFlowEstablished}); err != nil {
			t.Fatal(err)
		}
	}
	if n, err := fh.Recv(nil, &a); err != nil || n != 0 || a.Event != divert.EventFlowEstablished {
		t.Errorf("Recv(nil) at the flow layer = %d, %v, %v; want the event", n, err, a.Event)
	}
	if n, err := fh.RecvBatch([]divert.Message{{}}); err != nil || n != 1 {
		t.Errorf("RecvBatch of an empty Buf at the flow layer = %d, %v; want the event", n, err)
	}
}

// TestSendBatchTooLarge: more than BatchMax messages are refused before
// any is sent, rather than the first BatchMax sent with no error.
func TestSendBatchTooLarge(t *testing.T) {
	h, p, err := divert.NewPipe("false", divert.LayerNetwork, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	pkt := udp4(t, 9, "x")
	ms := make([]divert.Message, divert.BatchMax+1)
	for i := range ms {
		ms[i] = divert.Message{Buf: pkt, N: len(pkt), Addr: divert.Address{Outbound: true}}
	}
	if n, err := h.SendBatch(ms); err == nil || n != 0 {
		t.Fatalf("SendBatch of %d = %d, %v; want 0 and an error", len(ms), n, err)
	}
	if st := p.Stats(); st.Sent != 0 {
		t.Fatalf("%d sent by a refused batch", st.Sent)
	}
	if n, err := h.SendBatch(ms[:divert.BatchMax]); err != nil || n != divert.BatchMax {
		t.Fatalf("SendBatch of BatchMax = %d, %v", n, err)
	}
}
