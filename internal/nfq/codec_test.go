package nfq

import (
	"bytes"
	"encoding/binary"
	"errors"
	"reflect"
	"syscall"
	"testing"
)

// h32/h16 write native-endian (netlink header) fields of the expected bytes.
func h32(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }
func h16(v uint16) []byte { return binary.NativeEndian.AppendUint16(nil, v) }

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func TestAppendVerdict(t *testing.T) {
	got := AppendVerdict(nil, 0x1234, 0xdeadbeef, Accept, nil)
	want := cat(
		h32(32), h16(0x0301), h16(0x0001), h32(0), h32(0), // nlmsghdr: len, VERDICT, REQUEST, seq, pid
		[]byte{0, 0, 0x12, 0x34}, // nfgenmsg: AF_UNSPEC, v0, queue be16
		h16(12), h16(2),          // NFQA_VERDICT_HDR
		[]byte{0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef}, // verdict be32, id be32
	)
	if !bytes.Equal(got, want) {
		t.Fatalf("verdict:\n got %x\nwant %x", got, want)
	}

	got = AppendVerdict(got[:0], 7, 9, Drop, []byte{0x45, 1, 2, 3, 4})
	want = cat(
		h32(44), h16(0x0301), h16(0x0001), h32(0), h32(0),
		[]byte{0, 0, 0, 7},
		h16(12), h16(2), []byte{0, 0, 0, 0, 0, 0, 0, 9},
		h16(9), h16(10), []byte{0x45, 1, 2, 3, 4, 0, 0, 0}, // NFQA_PAYLOAD, padded to 4
	)
	if !bytes.Equal(got, want) {
		t.Fatalf("verdict with payload:\n got %x\nwant %x", got, want)
	}

	// Several messages append to one buffer.
	b := AppendVerdict(nil, 1, 1, Accept, nil)
	b = AppendVerdictBatch(b, 1, 5, Drop)
	if len(b) != 64 {
		t.Fatalf("two messages: %d bytes, want 64", len(b))
	}
}

func TestAppendVerdictMark(t *testing.T) {
	got := AppendVerdictMark(nil, 7, 9, Accept, 0xD1000102, []byte{0x45, 1, 2, 3, 4})
	want := cat(
		h32(52), h16(0x0301), h16(0x0001), h32(0), h32(0),
		[]byte{0, 0, 0, 7},
		h16(12), h16(2), []byte{0, 0, 0, 1, 0, 0, 0, 9},
		h16(9), h16(10), []byte{0x45, 1, 2, 3, 4, 0, 0, 0}, // NFQA_PAYLOAD, padded to 4
		h16(8), h16(3), []byte{0xD1, 0, 1, 2}, // NFQA_MARK, be32
	)
	if !bytes.Equal(got, want) {
		t.Fatalf("verdict with payload and mark:\n got %x\nwant %x", got, want)
	}
	got = AppendVerdictMark(AppendVerdict(nil, 1, 1, Drop, nil), 1, 2, Accept, 5, nil)
	want = cat(AppendVerdict(nil, 1, 1, Drop, nil),
		h32(40), h16(0x0301), h16(0x0001), h32(0), h32(0),
		[]byte{0, 0, 0, 1},
		h16(12), h16(2), []byte{0, 0, 0, 1, 0, 0, 0, 2},
		h16(8), h16(3), []byte{0, 0, 0, 5},
	)
	if !bytes.Equal(got, want) {
		t.Fatalf("second message, mark only:\n got %x\nwant %x", got, want)
	}
}

func TestAppendVerdictBatch(t *testing.T) {
	got := AppendVerdictBatch(nil, 3, 100, Accept)
	want := cat(
		h32(32), h16(0x0303), h16(0x0001), h32(0), h32(0),
		[]byte{0, 0, 0, 3},
		h16(12), h16(2), []byte{0, 0, 0, 1, 0, 0, 0, 100},
	)
	if !bytes.Equal(got, want) {
		t.Fatalf("batch:\n got %x\nwant %x", got, want)
	}
}

func TestAppendConfig(t *testing.T) {
	got := appendCmd(nil, 42, 0x0102, cmdBind)
	want := cat(
		h32(28), h16(0x0302), h16(0x0005), h32(42), h32(0), // CONFIG, REQUEST|ACK
		[]byte{0, 0, 1, 2},
		h16(8), h16(1), []byte{1, 0, 0, 0}, // NFQA_CFG_CMD: BIND
	)
	if !bytes.Equal(got, want) {
		t.Fatalf("bind:\n got %x\nwant %x", got, want)
	}

	qc := QueueConfig{CopyRange: 0xffff - 4, MaxLen: 4096, Flags: FlagGSO | FlagFailOpen, Mask: FlagGSO | FlagConntrack}
	got = appendConfig(nil, 43, 5, &qc, true)
	want = cat(
		h32(56), h16(0x0302), h16(0x0005), h32(43), h32(0),
		[]byte{0, 0, 0, 5},
		h16(9), h16(2), []byte{0, 0, 0xff, 0xfb, 2, 0, 0, 0}, // PARAMS: range be32, mode PACKET, pad
		h16(8), h16(3), []byte{0, 0, 0x10, 0}, // QUEUE_MAXLEN
		h16(8), h16(4), []byte{0, 0, 0, 6}, // MASK
		h16(8), h16(5), []byte{0, 0, 0, 4}, // FLAGS (only bits in the mask)
	)
	if !bytes.Equal(got, want) {
		t.Fatalf("config:\n got %x\nwant %x", got, want)
	}

	got = appendConfig(nil, 44, 5, &QueueConfig{CopyRange: 128, MaxLen: 0}, false)
	if len(got) != 40 || binary.NativeEndian.Uint16(got[6:8]) != nlmFRequest {
		t.Fatalf("config without ack or flags: %x", got)
	}
}

// packetMsg builds a kernel NFQNL_MSG_PACKET the way nfqnl_build_packet_message does.
func packetMsg(id uint32, hook uint8, payload []byte, extra ...[]byte) []byte {
	attr := func(typ uint16, v []byte) []byte {
		b := cat(h16(uint16(4+len(v))), h16(typ), v)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
		return b
	}
	be := func(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
	body := cat(
		[]byte{2, 0, 0, 9}, // AF_INET, v0, queue 9
		attr(attrPacketHdr, cat(be(id), []byte{0x08, 0x00, hook})),
		attr(attrMark, be(0xd1007530)),
		attr(attrTimestamp, cat(binary.BigEndian.AppendUint64(nil, 1700000000), binary.BigEndian.AppendUint64(nil, 123456))),
		attr(attrInDev|0x8000, be(3)), // a nested-flag bit must be masked off
		attr(attrOutDev, be(4)),
		attr(attrSkbInfo, be(SkbCsumNotReady|SkbGSO)),
		attr(attrCapLen, be(3000)),
		attr(99, []byte{1, 2, 3}), // unknown attributes are skipped
		cat(extra...),
		attr(attrPayload, payload),
	)
	return cat(h32(uint32(16+len(body))), h16(msgPacket), h16(0), h32(0), h32(0), body)
}

func TestDecodePacket(t *testing.T) {
	payload := []byte{0x45, 0, 0, 20, 1, 2, 3}
	msg := packetMsg(0x01020304, HookOutput, payload)
	msg = append(msg, 0) // the kernel pads the datagram; next message offset is aligned
	var p Packet
	var ke KernelError
	n, kind, err := Decode(msg, &p, &ke)
	if err != nil || kind != KindPacket {
		t.Fatalf("Decode: kind %d err %v", kind, err)
	}
	if n != align4(len(msg)-1) {
		t.Fatalf("n = %d, want %d", n, align4(len(msg)-1))
	}
	want := Packet{ID: 0x01020304, HwProto: 0x0800, Hook: HookOutput, Family: 2, Queue: 9,
		InDev: 3, OutDev: 4, Mark: 0xd1007530, SkbInfo: SkbCsumNotReady | SkbGSO, CapLen: 3000,
		Timestamp: 1700000000*1e9 + 123456*1e3}
	got := p
	got.Payload = nil
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got  %+v\nwant %+v", got, want)
	}
	if !bytes.Equal(p.Payload, payload) || cap(p.Payload) != len(payload) {
		t.Fatalf("payload %x cap %d", p.Payload, cap(p.Payload))
	}
	if !p.Truncated() {
		t.Fatal("CapLen 3000 > 7 bytes must be truncated")
	}
	if &p.Payload[0] != &msg[len(msg)-1-8] {
		t.Fatal("payload must alias the message")
	}
	if a := testing.AllocsPerRun(100, func() { Decode(msg, &p, &ke) }); a != 0 {
		t.Fatalf("Decode allocates %v times", a)
	}
}

// TestAppendPacket checks that Decode reads back what AppendPacket wrote,
// for a packet with every attribute and for one with only those the
// kernel always sends.
func TestAppendPacket(t *testing.T) {
	full := Packet{ID: 0x01020304, HwProto: 0x86dd, Hook: HookForward, Family: 10, Queue: 0xbeef,
		InDev: 3, OutDev: 4, Mark: 0xd1007530, SkbInfo: SkbCsumNotReady | SkbGSO, CapLen: 3000,
		Timestamp: 1700000000*1e9 + 123456*1e3, Payload: []byte{0x60, 1, 2, 3, 4}}
	bare := Packet{ID: 7, HwProto: 0x0800, Hook: HookInput, Family: 2, Payload: []byte{0x45}}
	for _, want := range []Packet{full, bare} {
		msg := AppendPacket([]byte{0xaa, 0xbb, 0xcc, 0xdd}, &want)[4:]
		if len(msg)%4 != 0 || int(ne.Uint32(msg)) != len(msg) {
			t.Fatalf("%+v: message of %d bytes says %d, or is not aligned", want, len(msg), ne.Uint32(msg))
		}
		var got Packet
		n, kind, err := Decode(msg, &got, nil)
		if err != nil || kind != KindPacket || n != len(msg) {
			t.Fatalf("Decode: %d bytes of %d, kind %d, %v", n, len(msg), kind, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("got  %+v\nwant %+v", got, want)
		}
	}
	buf := make([]byte, 0, 256)
	if a := testing.AllocsPerRun(100, func() { AppendPacket(buf, &full) }); a != 0 {
		t.Fatalf("AppendPacket into a large enough buffer allocates %v times", a)
	}
}

func TestDecodeErrorAndAck(t *testing.T) {
	orig := AppendVerdict(nil, 1, 77, Accept, nil)
	binary.NativeEndian.PutUint32(orig[8:], 555) // seq
	for _, tc := range []struct {
		code int32
		kind Kind
	}{{0, KindAck}, {-int32(syscall.ENOENT), KindError}} {
		msg := cat(h32(uint32(16+4+16)), h16(nlmsgError), h16(0), h32(555), h32(0), h32(uint32(tc.code)), orig[:16])
		var ke KernelError
		n, kind, err := Decode(msg, nil, &ke)
		if err != nil || kind != tc.kind || n != len(msg) {
			t.Fatalf("code %d: n %d kind %d err %v", tc.code, n, kind, err)
		}
		if ke.Seq != 555 || ke.Type != msgVerdict || ke.Errno != syscall.Errno(-tc.code) {
			t.Fatalf("code %d: %+v", tc.code, ke)
		}
		if tc.kind == KindError && !errors.Is(&ke, syscall.ENOENT) {
			t.Fatal("KernelError must unwrap to its errno")
		}
	}
}

func TestDecodeMalformed(t *testing.T) {
	good := packetMsg(1, HookInput, []byte{0x60})
	cases := map[string][]byte{
		"short":         good[:10],
		"len too big":   cat(h32(1000), good[4:]),
		"len too small": cat(h32(8), good[4:]),
		"no packet hdr": cat(h32(24), h16(msgPacket), h16(0), h32(0), h32(0), []byte{2, 0, 0, 0}, h16(8), h16(attrMark), []byte{0, 0, 0, 1}),
		"bad attr len":  cat(h32(24), h16(msgPacket), h16(0), h32(0), h32(0), []byte{2, 0, 0, 0}, h16(40), h16(attrMark), []byte{0, 0, 0, 1}),
		"short error":   cat(h32(20), h16(nlmsgError), h16(0), h32(0), h32(0), h32(0)),
	}
	for name, b := range cases {
		var p Packet
		if _, _, err := Decode(b, &p, nil); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: err %v, want ErrMalformed", name, err)
		}
	}
	// Unknown message types are skipped, not errors.
	noop := cat(h32(16), h16(nlmsgNoop), h16(0), h32(0), h32(0))
	if n, kind, err := Decode(noop, nil, nil); err != nil || kind != KindOther || n != 16 {
		t.Fatalf("noop: %d %d %v", n, kind, err)
	}
}

// FuzzDecode feeds arbitrary datagrams to the decoder, walking them message
// by message as Conn.Next does: it must never panic, never run past the
// buffer, and a decoded payload must lie inside the input.
func FuzzDecode(f *testing.F) {
	f.Add(packetMsg(1, HookInput, []byte{0x45, 0, 0, 20}))
	f.Add(cat(packetMsg(2, HookOutput, nil), packetMsg(3, HookForward, make([]byte, 40))))
	f.Add(AppendVerdict(nil, 1, 2, Accept, []byte{1, 2, 3}))
	f.Add(cat(h32(36), h16(nlmsgError), h16(0), h32(1), h32(0), h32(0xfffffffe), make([]byte, 16)))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		var p Packet
		var ke KernelError
		for off := 0; off < len(b); {
			n, kind, err := Decode(b[off:], &p, &ke)
			if err != nil {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("error %v does not wrap ErrMalformed", err)
				}
				return
			}
			if n <= 0 || n > len(b)-off {
				t.Fatalf("bad length %d at %d of %d", n, off, len(b))
			}
			if kind == KindPacket && len(p.Payload) > 0 {
				first := &p.Payload[0]
				last := &p.Payload[len(p.Payload)-1]
				if !inside(b[off:off+n], first) || !inside(b[off:off+n], last) {
					t.Fatal("payload outside its message")
				}
			}
			if kind == KindPacket {
				// What AppendPacket writes for p decodes to p.
				var q Packet
				if _, k, err := Decode(AppendPacket(nil, &p), &q, nil); err != nil || k != KindPacket {
					t.Fatalf("re-encoded %+v: kind %d, %v", p, k, err)
				}
				if !bytes.Equal(q.Payload, p.Payload) {
					t.Fatalf("re-encoded payload %x, want %x", q.Payload, p.Payload)
				}
				if p.Timestamp%1000 != 0 {
					q.Timestamp = p.Timestamp // seconds times 1e9 wrapped: no µs value gives it back
				}
				want := p
				want.Payload, q.Payload = nil, nil
				if !reflect.DeepEqual(q, want) {
					t.Fatalf("re-encoded packet decodes to %+v, want %+v", q, want)
				}
			}
			off += n
		}
	})
}

func inside(b []byte, p *byte) bool {
	for i := range b {
		if &b[i] == p {
			return true
		}
	}
	return false
}
