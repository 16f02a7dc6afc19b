package divert

import (
	"encoding/binary"
	"net/netip"
	"sync/atomic"
	"testing"

	"github.com/mdlayher/netlink"
	"github.com/ti-mo/conntrack"
	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/internal/netnstest"
	"github.com/netdivert/divert/internal/nftrules"
)

// ctMessage builds a ctnetlink event message as the kernel sends it (the
// attributes a UDP connection's NEW or DESTROY carries): kind 0 NEW, 2
// DESTROY; labels is byte nftrules.LabelByte of CTA_LABELS (none when 0).
func ctMessage(b testing.TB, destroy bool, id uint32, src, dst netip.Addr, sport, dport uint16, labels byte) netlink.Message {
	b.Helper()
	tuple := func(ae *netlink.AttributeEncoder, s, d netip.Addr, sp, dp uint16) error {
		ae.Nested(1, func(ae *netlink.AttributeEncoder) error { // CTA_TUPLE_IP
			ae.Bytes(1, s.AsSlice()) // CTA_IP_V4_SRC
			ae.Bytes(2, d.AsSlice()) // CTA_IP_V4_DST
			return nil
		})
		ae.Nested(2, func(ae *netlink.AttributeEncoder) error { // CTA_TUPLE_PROTO
			ae.Uint8(1, unix.IPPROTO_UDP) // CTA_PROTO_NUM
			ae.Uint16(2, sp)              // CTA_PROTO_SRC_PORT
			ae.Uint16(3, dp)              // CTA_PROTO_DST_PORT
			return nil
		})
		return nil
	}
	ae := netlink.NewAttributeEncoder()
	ae.ByteOrder = binary.BigEndian
	ae.Nested(1, func(ae *netlink.AttributeEncoder) error { return tuple(ae, src, dst, sport, dport) }) // CTA_TUPLE_ORIG
	ae.Nested(2, func(ae *netlink.AttributeEncoder) error { return tuple(ae, dst, src, dport, sport) }) // CTA_TUPLE_REPLY
	ae.Uint32(3, 0x188)                                                                                 // CTA_STATUS: confirmed, src NAT done, dst NAT done
	if !destroy {
		ae.Uint32(7, 30) // CTA_TIMEOUT
	}
	ae.Uint32(8, 0)   // CTA_MARK
	ae.Uint32(12, id) // CTA_ID
	ae.Uint32(11, 1)  // CTA_USE
	if labels != 0 {
		var l [16]byte
		l[nftrules.LabelByte] = labels
		ae.Bytes(22, l[:]) // CTA_LABELS
	}
	data, err := ae.Encode()
	if err != nil {
		b.Fatal(err)
	}
	typ, flags := netlink.HeaderType(0x100), netlink.HeaderFlags(0x600) // IPCTNL_MSG_CT_NEW, NLM_F_CREATE|NLM_F_EXCL
	if destroy {
		typ, flags = 0x102, 0 // IPCTNL_MSG_CT_DELETE
	}
	return netlink.Message{
		Header: netlink.Header{Type: typ, Flags: flags},
		Data:   append([]byte{unix.AF_INET, 0, 0, 0}, data...), // nfgenmsg
	}
}

// BenchmarkFlowEvent is what a LayerFlow handle's reader spends on one
// conntrack event once read (the pre-check, ti-mo/conntrack's decoding,
// the mapping, the tracker; not the receive syscall nor the filter): a
// local UDP flow's NEW and DESTROY, each reported, and a forwarded
// connection's NEW, which carries none of the handle's labels and is
// skipped before decoding (ctSkip).
func BenchmarkFlowEvent(b *testing.B) {
	src, dst := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	var delivered int
	newTracker := func() *flowTracker {
		return newFlowTracker(flowTrackMax, func(*Address, *atomic.Bool) bool { delivered++; return true }, func(*Address) {})
	}
	handle := func(tr *flowTracker, m netlink.Message) {
		if ctSkip(m, tr.tracked) {
			return // as the reader does
		}
		var ev conntrack.Event
		if err := ev.Unmarshal(m); err != nil {
			b.Fatal(err)
		}
		if e, ok := ctEventOf(&ev); ok {
			tr.handle(&e, 1)
		}
	}
	b.Run("local", func(b *testing.B) {
		tr := newTracker()
		newMsg := ctMessage(b, false, 7, src, dst, 40000, 53, nftrules.LabelOut)
		delMsg := ctMessage(b, true, 7, src, dst, 40000, 53, 0)
		delivered = 0
		b.ReportAllocs()
		for b.Loop() {
			handle(tr, newMsg)
			handle(tr, delMsg)
		}
		if delivered != 2*b.N {
			b.Fatalf("%d events delivered for %d flows", delivered, b.N)
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(2*b.N), "ns/event")
	})
	b.Run("forwarded", func(b *testing.B) {
		tr := newTracker()
		fwd := ctMessage(b, false, 9, src, dst, 40001, 53, 0)
		delivered = 0
		b.ReportAllocs()
		for b.Loop() {
			handle(tr, fwd)
		}
		if delivered != 0 || len(tr.flows) != 0 {
			b.Fatalf("a forwarded connection reported (%d) or remembered (%d)", delivered, len(tr.flows))
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N), "ns/event")
	})
}

// BenchmarkFlowResync is what a dump after an overflow costs the reader
// (resync: the kernel filling the dump, the receives, the pre-check) in a
// namespace whose conntrack table holds 10000 connections that are not
// the handle's (a router's forwarded ones), and 100 that are, reported
// by the first dump and found alive by the next ones.
func BenchmarkFlowResync(b *testing.B) {
	netnstest.RequireRoot(b)
	const others, ours = 10000, 100
	fb := dumpBackend(b, "flrb", others+ours, func(i int) (uint16, uint16, bool) {
		return uint16(1024 + i/1000), uint16(1 + i%1000), i >= others
	})
	var delivered int
	fb.tr = newFlowTracker(flowTrackMax, func(*Address, *atomic.Bool) bool { delivered++; return true }, func(*Address) {})
	for b.Loop() {
		if err := fb.resync(); err != nil {
			b.Fatal(err)
		}
	}
	if delivered != ours || len(fb.tr.flows) != ours {
		b.Fatalf("%d established, %d remembered; want %d", delivered, len(fb.tr.flows), ours)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*(others+ours)), "ns/connection")
}
