package windivert

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"syscall"
	"testing"
	"time"
)

// A WINDIVERT_ADDRESS laid out by hand from windivert.h: Timestamp at 0,
// the bit-field word at 8 (Layer 0..7, Event 8..15, Sniffed 16, Outbound 17,
// Loopback 18, Impostor 19, IPv6 20, IPChecksum 21, TCPChecksum 22,
// UDPChecksum 23), Reserved2 at 12, the union at 16.
func TestAddrLayoutNetwork(t *testing.T) {
	var r RawAddr
	a := Addr{Timestamp: 0x0102030405060708, Layer: LayerNetworkForward, Outbound: true, IPv6: true,
		TCPChecksum: true, IfIdx: 7, SubIfIdx: 0x01020304}
	r.Encode(&a)
	want := "0807060504030201" + "01" + "00" + "52" + "00" + "00000000" + "07000000" + "04030201"
	if got := hex.EncodeToString(r[:24]); got != want {
		t.Fatalf("bytes %s\nwant  %s", got, want)
	}
	if !bytes.Equal(r[24:], make([]byte, 56)) {
		t.Fatal("union tail not zero")
	}
	var back Addr
	r.Decode(&back)
	if back != a {
		t.Fatalf("round trip %+v", back)
	}
	for _, bit := range []struct {
		set  func(*Addr)
		byte int
		mask byte
	}{
		{func(a *Addr) { a.Sniffed = true }, 10, 0x01},
		{func(a *Addr) { a.Outbound = true }, 10, 0x02},
		{func(a *Addr) { a.Loopback = true }, 10, 0x04},
		{func(a *Addr) { a.Impostor = true }, 10, 0x08},
		{func(a *Addr) { a.IPv6 = true }, 10, 0x10},
		{func(a *Addr) { a.IPChecksum = true }, 10, 0x20},
		{func(a *Addr) { a.TCPChecksum = true }, 10, 0x40},
		{func(a *Addr) { a.UDPChecksum = true }, 10, 0x80},
		{func(a *Addr) { a.Event = 9 }, 9, 0x09},
	} {
		var a Addr
		bit.set(&a)
		r.Encode(&a)
		if r[bit.byte] != bit.mask {
			t.Errorf("byte %d = %#x, want %#x", bit.byte, r[bit.byte], bit.mask)
		}
	}
}

func TestAddrLayoutFlow(t *testing.T) {
	var r RawAddr
	a := Addr{Layer: LayerFlow, Event: 1, EndpointID: 0x1122, ParentEndpointID: 0x3344, ProcessID: 4242,
		LocalAddr:  [16]byte{10: 0xff, 11: 0xff, 12: 10, 13: 0, 14: 0, 15: 1},
		RemoteAddr: [16]byte{0: 0x20, 1: 0x01, 2: 0x0d, 3: 0xb8, 15: 1},
		LocalPort:  1234, RemotePort: 443, Protocol: 6}
	r.Encode(&a)
	// LocalAddr as UINT32[4], word 0 least significant: {0x0a000001, 0x0000ffff, 0, 0}
	if got := hex.EncodeToString(r[36:52]); got != "0100000affff00000000000000000000" {
		t.Fatalf("LocalAddr words %s", got)
	}
	if got := hex.EncodeToString(r[52:68]); got != "010000000000000000000000b80d0120" {
		t.Fatalf("RemoteAddr words %s", got)
	}
	if r[16] != 0x22 || r[24] != 0x44 || r[32] != 0x92 || r[68] != 0xd2 || r[70] != 0xbb || r[72] != 6 {
		t.Fatalf("union bytes %x", r[16:80])
	}
	var back Addr
	r.Decode(&back)
	if back != a {
		t.Fatalf("round trip %+v\nwant %+v", back, a)
	}
}

func TestAddrLayoutReflect(t *testing.T) {
	var r RawAddr
	a := Addr{Layer: LayerReflect, Event: 8, ReflectTimestamp: -5, ProcessID: 9, ReflectLayer: 2,
		ReflectFlags: 0x21, ReflectPriority: -30000}
	r.Encode(&a)
	if r[24] != 9 || r[28] != 2 || r[32] != 0x21 || r[40] != 0xd0 || r[41] != 0x8a {
		t.Fatalf("union bytes %x", r[16:48])
	}
	var back Addr
	r.Decode(&back)
	if back != a {
		t.Fatalf("round trip %+v", back)
	}
}

func ipv4(n int) []byte {
	p := make([]byte, n)
	p[0] = 0x45
	p[2], p[3] = byte(n>>8), byte(n)
	return p
}

func ipv6(payload int) []byte {
	p := make([]byte, 40+payload)
	p[0] = 0x60
	p[4], p[5] = byte(payload>>8), byte(payload)
	return p
}

func TestSplit(t *testing.T) {
	buf := append(append(append([]byte{}, ipv4(28)...), ipv6(8)...), ipv4(60)...)
	lens := make([]int, 3)
	if !Split(buf, len(buf), 3, LayerNetwork, lens) || lens[0] != 28 || lens[1] != 48 || lens[2] != 60 {
		t.Fatalf("lens %v", lens)
	}
	if Split(buf, len(buf), 2, LayerNetwork, lens) {
		t.Fatal("split 3 packets as 2")
	}
	if Split(buf, len(buf), 4, LayerNetwork, lens) {
		t.Fatal("split 3 packets as 4")
	}
	// a truncated single packet
	if !Split(buf, 10, 1, LayerNetwork, lens) || lens[0] != 10 {
		t.Fatalf("truncated: %v", lens)
	}
	obj := []byte("@WinDiv_WX_eXWWAX\x00@WinDiv_a\x00")
	if !Split(obj, len(obj), 2, LayerReflect, lens) || lens[0] != 18 || lens[1] != 10 {
		t.Fatalf("reflect lens %v", lens)
	}
	if !Split(nil, 0, 2, LayerFlow, lens) {
		t.Fatal("flow items carry no data")
	}
}

func FuzzSplit(f *testing.F) {
	f.Add(append(ipv4(20), ipv6(0)...), 2, uint8(0))
	f.Add([]byte("a\x00b\x00"), 2, uint8(4))
	f.Fuzz(func(t *testing.T, b []byte, count int, layer uint8) {
		if count < 1 || count > 255 {
			return
		}
		lens := make([]int, count)
		if !Split(b, len(b), count, layer%5, lens) {
			return
		}
		sum := 0
		for _, l := range lens {
			if l < 0 {
				t.Fatal("negative length")
			}
			sum += l
		}
		if sum != len(b) {
			t.Fatalf("lengths %v sum %d of %d bytes", lens, sum, len(b))
		}
	})
}

func TestFakeBatch(t *testing.T) {
	f := NewFake()
	f.Push(Item{Data: ipv4(40), Addr: Addr{Outbound: true, IfIdx: 1}})
	f.Push(Item{Data: ipv4(30), Addr: Addr{IfIdx: 2}})
	f.Push(Item{Data: ipv4(100), Addr: Addr{IfIdx: 3}})
	buf := make([]byte, 80)
	addrs := make([]RawAddr, 8)
	n, c, err := f.RecvEx(buf, addrs)
	if err != nil || n != 70 || c != 2 {
		t.Fatalf("RecvEx = %d, %d, %v", n, c, err)
	}
	// the third does not fit whole: it comes first next time, truncated
	n, c, err = f.RecvEx(buf[:50], addrs)
	if Code(err) != ErrorInsufficientBuffer || n != 50 || c != 1 {
		t.Fatalf("RecvEx = %d, %d, %v", n, c, err)
	}
	if _, _, err := f.RecvEx(nil, addrs); Code(err) != ErrorInvalidParameter {
		t.Fatalf("empty buffer: %v", err)
	}
	go func() { time.Sleep(10 * time.Millisecond); f.CancelRecv() }()
	if _, _, err := f.RecvEx(buf, addrs); Code(err) != ErrorOperationAborted {
		t.Fatalf("cancel: %v", err)
	}
	f.Shutdown(1)
	if _, _, err := f.RecvEx(buf, addrs); Code(err) != ErrorNoData {
		t.Fatalf("shutdown: %v", err)
	}
}

func TestDescribe(t *testing.T) {
	for _, c := range []uint32{2, 5, 577, 654, 1060, 1275, 1753} {
		if Describe(c, 8) == "" {
			t.Errorf("no description for %d", c)
		}
	}
	if d := Describe(2, 4); !bytes.Contains([]byte(d), []byte("WinDivert32.sys")) {
		t.Errorf("386 driver name: %s", d)
	}
	if Describe(1, 8) != "" {
		t.Error("description for an unrelated code")
	}
}

// Code runs on every receive: it must not allocate for nil or a bare code,
// and must still find a wrapped one.
func TestCodeAllocs(t *testing.T) {
	wrapped := fmt.Errorf("op: %w", FakeErrno(ErrorNoData))
	if Code(nil) != 0 || Code(FakeErrno(5)) != 5 || Code(syscall.Errno(6)) != 6 || Code(wrapped) != ErrorNoData ||
		Code(errors.New("x")) != 0 {
		t.Fatal("Code gives wrong codes")
	}
	var sink uint32
	if n := testing.AllocsPerRun(100, func() {
		sink += Code(nil) + Code(FakeErrno(ErrorInsufficientBuffer)) + Code(syscall.Errno(ErrorOperationAborted))
	}); n != 0 {
		t.Fatalf("Code allocates %v times", n)
	}
	_ = sink
}
