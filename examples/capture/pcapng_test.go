package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"

	"github.com/netdivert/divert"
	"github.com/netdivert/divert/examples/internal/extest"
)

// testPackets are an IPv4 UDP datagram (inbound) and an IPv6 ICMPv6 echo
// request (outbound), with lengths that exercise the padding.
var testPackets = []struct {
	data     []byte
	outbound bool
	ifKey    uint32
}{
	{append([]byte{0x45, 0, 0, 31, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 201, 1, 1, 10, 201, 1, 2,
		0x30, 0x39, 0x27, 0x0f, 0, 11, 0, 0}, 'a', 'b', 'c'), false, 3},
	{append([]byte{0x60, 0, 0, 0, 0, 9, 58, 64,
		0xfd, 0, 0, 0xc9, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
		0xfd, 0, 0, 0xc9, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
		128, 0, 0, 0, 0, 7, 0, 1}, 'z'), true, 7},
	{[]byte{0x45, 0, 0, 20, 0, 2, 0, 0, 64, 6, 0, 0, 10, 201, 1, 2, 10, 201, 1, 1}, true, 3},
}

func writeTestFile(t testing.TB, snaplen uint32, base time.Time) []byte {
	t.Helper()
	var buf bytes.Buffer
	pw, err := newPcapngWriter(&buf, snaplen, "test")
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range testPackets {
		id, err := pw.AddInterface(p.ifKey, "eth"+string(rune('0'+p.ifKey)), "")
		if err != nil {
			t.Fatal(err)
		}
		if err := pw.WritePacket(id, base.Add(time.Duration(i)*1234567*time.Nanosecond), p.data, p.outbound); err != nil {
			t.Fatal(err)
		}
	}
	if err := pw.Flush(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestPcapngReadBack(t *testing.T) {
	base := time.Unix(1700000000, 123456789)
	for _, snaplen := range []uint32{0, 24} {
		file := writeTestFile(t, snaplen, base)
		if len(file)%4 != 0 {
			t.Fatalf("file length %d is not a multiple of 4", len(file))
		}
		r, err := pcapgo.NewNgReader(bytes.NewReader(file), pcapgo.NgReaderOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if r.LinkType() != layers.LinkTypeRaw {
			t.Fatalf("link type %v, want raw", r.LinkType())
		}
		wantIface := map[uint32]int{3: 0, 7: 1}
		for i, p := range testPackets {
			data, ci, opts, err := r.ReadPacketDataWithOptions()
			if err != nil {
				t.Fatalf("snaplen %d packet %d: %v", snaplen, i, err)
			}
			want := p.data
			if snaplen > 0 && len(want) > int(snaplen) {
				want = want[:snaplen]
			}
			if !bytes.Equal(data, want) {
				t.Errorf("packet %d data\n got %x\nwant %x", i, data, want)
			}
			if ci.Length != len(p.data) || ci.CaptureLength != len(want) {
				t.Errorf("packet %d: length %d/%d, want %d/%d", i, ci.CaptureLength, ci.Length, len(want), len(p.data))
			}
			if wt := base.Add(time.Duration(i) * 1234567 * time.Nanosecond); !ci.Timestamp.Equal(wt) {
				t.Errorf("packet %d: timestamp %v, want %v", i, ci.Timestamp, wt)
			}
			if ci.InterfaceIndex != wantIface[p.ifKey] {
				t.Errorf("packet %d: interface %d, want %d", i, ci.InterfaceIndex, wantIface[p.ifKey])
			}
			wantDir := pcapgo.NgEpbFlagDirectionInbound
			if p.outbound {
				wantDir = pcapgo.NgEpbFlagDirectionOutbound
			}
			if opts.Flags == nil || opts.Flags.Direction != wantDir {
				t.Errorf("packet %d: epb_flags %+v, want direction %v", i, opts.Flags, wantDir)
			}
			// The data decodes as the IP packet it is.
			pk := gopacket.NewPacket(data, layers.LayerTypeIPv4, gopacket.Default)
			if p.data[0]>>4 == 6 {
				pk = gopacket.NewPacket(data, layers.LayerTypeIPv6, gopacket.Default)
			}
			if pk.NetworkLayer() == nil {
				t.Errorf("packet %d does not decode: %v", i, pk.ErrorLayer())
			}
		}
		if _, _, err := r.ReadPacketData(); !errors.Is(err, io.EOF) {
			t.Errorf("after the last packet: %v, want EOF", err)
		}
		if r.NInterfaces() != 2 {
			t.Fatalf("%d interfaces, want 2", r.NInterfaces())
		}
		for i, name := range []string{"eth3", "eth7"} {
			ifc, err := r.Interface(i)
			if err != nil {
				t.Fatal(err)
			}
			if ifc.Name != name || ifc.LinkType != layers.LinkTypeRaw || ifc.SnapLength != snaplen {
				t.Errorf("interface %d: %+v", i, ifc)
			}
			if ifc.TimestampResolution != 9 {
				t.Errorf("interface %d: resolution %v, want 9 (ns)", i, ifc.TimestampResolution)
			}
		}
		if app := r.SectionInfo().Application; app != "test" {
			t.Errorf("shb_userappl %q", app)
		}
	}
}

// TestPcapngLayout checks the bytes of the blocks against the format: every
// block's leading and trailing lengths agree and tile the file exactly.
func TestPcapngLayout(t *testing.T) {
	file := writeTestFile(t, 0, time.Unix(0, 0))
	var types []uint32
	for off := 0; off < len(file); {
		if off+12 > len(file) {
			t.Fatalf("truncated block at %d", off)
		}
		typ := binary.LittleEndian.Uint32(file[off:])
		n := int(binary.LittleEndian.Uint32(file[off+4:]))
		if n%4 != 0 || n < 12 || off+n > len(file) {
			t.Fatalf("block at %d: bad length %d", off, n)
		}
		if tail := int(binary.LittleEndian.Uint32(file[off+n-4:])); tail != n {
			t.Fatalf("block at %d: trailing length %d != %d", off, tail, n)
		}
		types = append(types, typ)
		off += n
	}
	want := []uint32{blockSHB, blockIDB, blockEPB, blockIDB, blockEPB, blockEPB}
	if len(types) != len(want) {
		t.Fatalf("blocks %x, want %x", types, want)
	}
	for i := range want {
		if types[i] != want[i] {
			t.Fatalf("blocks %x, want %x", types, want)
		}
	}
}

func TestPcapngUnknownInterface(t *testing.T) {
	pw, err := newPcapngWriter(io.Discard, 0, "")
	if err != nil {
		t.Fatal(err)
	}
	if err := pw.WritePacket(0, time.Now(), []byte{0x45}, false); !errors.Is(err, errUnknownInterface) {
		t.Fatalf("got %v", err)
	}
}

func TestPcapngWritePacketAllocs(t *testing.T) {
	pw, err := newPcapngWriter(io.Discard, 0, "")
	if err != nil {
		t.Fatal(err)
	}
	id, _ := pw.AddInterface(1, "x", "")
	pkt := testPackets[0].data
	now := time.Now()
	if a := testing.AllocsPerRun(1000, func() { pw.WritePacket(id, now, pkt, true) }); a != 0 {
		t.Fatalf("WritePacket allocates %v times per packet", a)
	}
}

func BenchmarkPcapngWritePacket(b *testing.B) {
	pw, _ := newPcapngWriter(io.Discard, 0, "")
	id, _ := pw.AddInterface(1, "x", "")
	pkt := make([]byte, 1400)
	pkt[0] = 0x45
	now := time.Now()
	b.SetBytes(int64(len(pkt)))
	b.ReportAllocs()
	for b.Loop() {
		pw.WritePacket(id, now, pkt, false)
	}
}

// TestFlushWhenIdle: a packet written reaches the file within the flush
// period although no other packet follows it.
func TestFlushWhenIdle(t *testing.T) {
	var out extest.SyncBuffer
	pw, err := newPcapngWriter(&out, 0, "test")
	if err != nil {
		t.Fatal(err)
	}
	fw := &flushingWriter{pw: pw}
	stop := fw.flushEvery(50 * time.Millisecond)
	defer stop()
	before := len(out.String())
	addr := divert.Address{IfIdx: 1}
	if err := fw.write(&addr, make([]byte, 60)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for len(out.String()) == before {
		if time.Now().After(deadline) {
			t.Fatal("the packet was not flushed within 2 s of idle time")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
