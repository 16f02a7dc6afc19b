package divert

import (
	"encoding/binary"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/mdlayher/netlink"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/internal/netnstest"
	"github.com/netdivert/divert/internal/nftrules"
)

// ctWire is m as the kernel queues it: the netlink header (nlmsg_len the
// whole message), then the data.
func ctWire(m netlink.Message) []byte {
	b := make([]byte, 16+len(m.Data))
	binary.NativeEndian.PutUint32(b[0:], uint32(len(b)))
	binary.NativeEndian.PutUint16(b[4:], uint16(m.Header.Type))
	binary.NativeEndian.PutUint16(b[6:], uint16(m.Header.Flags))
	copy(b[16:], m.Data)
	return b
}

var ctFilterVM = sync.OnceValues(func() (*bpf.VM, error) {
	prog, err := ctFilter(hostLE())
	if err != nil {
		return nil, err
	}
	return bpf.NewVM(prog)
})

// ctFilterDrops runs the event socket's filter on the datagram b, as the
// kernel would (x/net/bpf's VM: an out-of-bounds load returns 0, a drop,
// as in the kernel).
func ctFilterDrops(t testing.TB, b []byte) bool {
	t.Helper()
	vm, err := ctFilterVM()
	if err != nil {
		t.Fatal(err)
	}
	n, err := vm.Run(b)
	if err != nil {
		t.Fatal(err)
	}
	return n == 0
}

// attr is a netlink attribute in host order, padded.
func attr(typ uint16, payload ...byte) []byte {
	b := make([]byte, (4+len(payload)+3)&^3)
	binary.NativeEndian.PutUint16(b, uint16(4+len(payload)))
	binary.NativeEndian.PutUint16(b[2:], typ)
	copy(b[4:], payload)
	return b
}

func labelsAttr(typ uint16, bits byte) []byte {
	l := make([]byte, 16)
	l[nftrules.LabelByte] = bits
	return attr(typ, l...)
}

// TestCtFilter: the event socket's filter drops what ctSkip skips for its
// labels (a NEW event without LabelOut or LabelIn) and keeps everything
// else: labelled NEW events, UPDATE and DESTROY events, and whatever it
// cannot tell (as ctSkip leaves it to the decoder). It never drops a
// message ctSkip keeps. The kernel accepts it.
func TestCtFilter(t *testing.T) {
	src, dst := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	fwd := ctMessage(t, false, 8, src, dst, 1, 2, 0)
	withAttrs := func(m netlink.Message, extra ...[]byte) netlink.Message {
		m.Data = append([]byte(nil), m.Data...)
		for _, a := range extra {
			m.Data = append(m.Data, a...)
		}
		return m
	}
	upd := ctMessage(t, false, 7, src, dst, 1, 2, 0)
	upd.Header.Flags = 0
	short := withAttrs(fwd)
	short.Data = short.Data[:len(short.Data)-3]
	other := withAttrs(fwd)
	other.Header.Type = 0x101
	many := withAttrs(fwd)
	for range ctFilterAttrs {
		many.Data = append(many.Data, attr(8, 0, 0, 0, 0)...) // CTA_MARK
	}
	shortLabels := withAttrs(fwd, attr(22, make([]byte, 15)...))
	shortLabels.Data[len(shortLabels.Data)-1] = nftrules.LabelOut // in the padding, not the labels
	cases := []struct {
		name string
		m    netlink.Message
		drop bool
	}{
		{"new-out", ctMessage(t, false, 8, src, dst, 1, 2, nftrules.LabelOut), false},
		{"new-in", ctMessage(t, false, 8, src, dst, 1, 2, nftrules.LabelIn), false},
		{"new-out-excl-only", func() netlink.Message {
			m := ctMessage(t, false, 8, src, dst, 1, 2, 0)
			m.Header.Flags = netlink.Excl
			return m
		}(), true},
		{"new-loop-only", ctMessage(t, false, 8, src, dst, 1, 2, nftrules.LabelLoop), true},
		{"new-forwarded", fwd, true},
		{"update", upd, false},
		{"destroy", ctMessage(t, true, 7, src, dst, 1, 2, 0), false},
		{"malformed", short, false},
		{"not-an-event", other, false},
		{"labels-then-unlabelled", withAttrs(fwd, labelsAttr(22, nftrules.LabelOut), labelsAttr(22, 0)), true},
		{"unlabelled-then-labels", withAttrs(fwd, labelsAttr(22, 0), labelsAttr(22, nftrules.LabelIn)), false},
		{"labels-high-type-bits", withAttrs(fwd, labelsAttr(0x8016, nftrules.LabelOut)), false}, // NLA_F_NESTED: still CTA_LABELS to the decoder
		{"labels-other-high-bits", withAttrs(fwd, labelsAttr(0x0116, nftrules.LabelOut)), false},
		{"labels-too-short", shortLabels, true},
		{"id-wrong-size", withAttrs(fwd, attr(12, 0, 0, 0, 0, 0, 0)), false},
		{"more-attributes-than-walked", many, false},
		{"zero-length-attribute", withAttrs(fwd, []byte{0, 0, 0, 0}), false},
		{"header-only", netlink.Message{Header: netlink.Header{Type: 0x100, Flags: netlink.Create}}, false},
		{"no-attributes", netlink.Message{Header: netlink.Header{Type: 0x100, Flags: netlink.Create}, Data: []byte{2, 0, 0, 0}}, true},
		{"trailing-bytes", fwd, false}, // below: the datagram is longer than the message
	}
	for _, c := range cases {
		b := ctWire(c.m)
		if c.name == "trailing-bytes" {
			b = append(b, 0, 0, 0, 0)
		}
		drop := ctFilterDrops(t, b)
		if drop != c.drop {
			t.Errorf("%s: filter drops %v, want %v", c.name, drop, c.drop)
		}
		if drop && !ctSkip(c.m, func(uint32) bool { return true }) {
			t.Errorf("%s: the filter drops what ctSkip keeps", c.name)
		}
	}
	// The program for a big-endian host, on the same messages as a
	// big-endian kernel would lay them out (the header's and the
	// top-level attributes' integers swapped; the walk stops where it
	// would, at a malformed attribute).
	beProg, err := ctFilter(false)
	if err != nil {
		t.Fatal(err)
	}
	beVM, err := bpf.NewVM(beProg)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		b := ctWire(c.m)
		if c.name == "trailing-bytes" {
			b = append(b, 0, 0, 0, 0)
		}
		swap16 := func(o int) { b[o], b[o+1] = b[o+1], b[o] }
		b[0], b[1], b[2], b[3] = b[3], b[2], b[1], b[0]
		swap16(4)
		swap16(6)
		end := 16 + len(c.m.Data)
		for o := 20; o+4 <= end; {
			l := int(binary.LittleEndian.Uint16(b[o:]))
			swap16(o)
			swap16(o + 2)
			if l < 4 {
				break
			}
			o += (l + 3) &^ 3
		}
		n, err := beVM.Run(b)
		if err != nil {
			t.Fatal(err)
		}
		if drop := n == 0; drop != c.drop {
			t.Errorf("%s, big-endian: filter drops %v, want %v", c.name, drop, c.drop)
		}
	}
	// The kernel's checker accepts it.
	raw, err := ctFilterRaw()
	if err != nil {
		t.Fatal(err)
	}
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SetBPF(raw); err != nil {
		t.Fatalf("attach the filter (%d instructions): %v", len(raw), err)
	}
	t.Logf("%d instructions", len(raw))
}

// TestFlowFilterDropsForwarded: on a router, the NEW events of the
// connections it forwards are dropped in the kernel by the event socket's
// filter: the reader receives fewer messages than there were forwarded
// connections, and its own flow is still reported.
func TestFlowFilterDropsForwarded(t *testing.T) {
	netnstest.RequireRoot(t)
	r := netnstest.Route(t, "flbf", 0)
	var receives atomic.Int64
	flowRecvHook = func() { receives.Add(1) }
	t.Cleanup(func() { flowRecvHook = nil }) // also if the open fails
	h := openFlowIn(t, r.Router(), "true")
	flowRecvHook = nil
	const flows = 100
	var c *net.UDPConn
	if err := r.LeftHost().Do(func() (err error) {
		c, err = net.ListenUDP("udp4", nil)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range flows {
		if _, err := c.WriteToUDPAddrPort([]byte("f"), netip.AddrPortFrom(r.Right.B.V4, uint16(7300+i))); err != nil {
			t.Fatal(err)
		}
	}
	// The router's own flow, last: its events come after the forwarded ones'.
	routerPingOnly(t, r, h)
	read := receives.Load() - 1 // the receive under way
	t.Logf("%d messages read for %d forwarded connections and the router's ping", read, flows)
	if read >= flows {
		t.Fatalf("%d messages read: the forwarded connections' NEW events were not dropped in the kernel", read)
	}
}
