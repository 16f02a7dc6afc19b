package divert

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

const kernelPacketsFile = "internal/packet/testdata/kernel-packets.txt"

// genPacket builds a random IPv4 or IPv6 packet with gopacket, checksums
// computed by gopacket: the independent truth for CalcChecksums.
func genPacket(t testing.TB, r *rand.Rand) []byte {
	t.Helper()
	randIP := func(n int) net.IP {
		ip := make(net.IP, n)
		for i := range ip {
			ip[i] = byte(r.Uint32())
		}
		return ip
	}
	payload := make([]byte, r.IntN(1400))
	for i := range payload {
		payload[i] = byte(r.Uint32())
	}
	isV6 := r.IntN(2) == 1
	var ls []gopacket.SerializableLayer
	var netLayer gopacket.NetworkLayer
	var proto layers.IPProtocol
	switch r.IntN(3) {
	case 0:
		proto = layers.IPProtocolTCP
	case 1:
		proto = layers.IPProtocolUDP
	default:
		proto = layers.IPProtocolICMPv4
		if isV6 {
			proto = layers.IPProtocolICMPv6
		}
	}
	if !isV6 {
		ip := &layers.IPv4{Version: 4, TTL: uint8(r.IntN(256)), Protocol: proto, SrcIP: randIP(4), DstIP: randIP(4),
			Id: uint16(r.Uint32()), TOS: uint8(r.Uint32())}
		if r.IntN(2) == 0 {
			ip.Flags = layers.IPv4DontFragment
		}
		if r.IntN(4) == 0 { // options: record route, padded
			ip.Options = []layers.IPv4Option{{OptionType: 7, OptionLength: 7, OptionData: []byte{4, 0, 0, 0, 0}}, {OptionType: 0, OptionLength: 1}}
		}
		ls = append(ls, ip)
		netLayer = ip
	} else {
		ip := &layers.IPv6{Version: 6, HopLimit: uint8(r.IntN(256)), NextHeader: proto, SrcIP: randIP(16), DstIP: randIP(16),
			TrafficClass: uint8(r.Uint32()), FlowLabel: r.Uint32() & 0xFFFFF}
		ls = append(ls, ip)
		netLayer = ip
		// Extension headers as raw bytes: Hop-by-Hop, Destination Options,
		// Routing (Segments Left 0: the header's destination is final).
		var ext []byte
		n := r.IntN(4)
		nh := byte(proto)
		for i := 0; i < n; i++ {
			kinds := []byte{0, 60, 43}
			if i > 0 {
				kinds = kinds[1:] // Hop-by-Hop must come first
			}
			k := kinds[r.IntN(len(kinds))]
			l := r.IntN(3)
			h := make([]byte, (l+1)*8)
			h[0], h[1] = nh, byte(l)
			if k == 43 {
				h[2] = 0 // type 0, Segments Left 0
			} else {
				h[2], h[3] = 1, byte(len(h)-4) // PadN option
			}
			ext = append(h, ext...) // built inside out
			nh = k
		}
		ip.NextHeader = layers.IPProtocol(nh)
		if len(ext) > 0 {
			ls = append(ls, gopacket.Payload(ext))
		}
	}
	switch proto {
	case layers.IPProtocolTCP:
		tcp := &layers.TCP{SrcPort: layers.TCPPort(r.Uint32()), DstPort: layers.TCPPort(r.Uint32()), Seq: r.Uint32(), Ack: r.Uint32(),
			Window: uint16(r.Uint32()), ACK: true, PSH: r.IntN(2) == 0, Urgent: uint16(r.Uint32())}
		if r.IntN(2) == 0 {
			tcp.Options = []layers.TCPOption{{OptionType: layers.TCPOptionKindMSS, OptionLength: 4, OptionData: []byte{5, 0xb4}},
				{OptionType: layers.TCPOptionKindNop, OptionLength: 1}, {OptionType: layers.TCPOptionKindWindowScale, OptionLength: 3, OptionData: []byte{7}}}
		}
		if err := tcp.SetNetworkLayerForChecksum(netLayer); err != nil {
			t.Fatal(err)
		}
		ls = append(ls, tcp)
	case layers.IPProtocolUDP:
		udp := &layers.UDP{SrcPort: layers.UDPPort(r.Uint32()), DstPort: layers.UDPPort(r.Uint32())}
		if err := udp.SetNetworkLayerForChecksum(netLayer); err != nil {
			t.Fatal(err)
		}
		ls = append(ls, udp)
	case layers.IPProtocolICMPv4:
		ls = append(ls, &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(8, 0), Id: uint16(r.Uint32()), Seq: uint16(r.Uint32())})
	case layers.IPProtocolICMPv6:
		icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(128, 0)}
		if err := icmp.SetNetworkLayerForChecksum(netLayer); err != nil {
			t.Fatal(err)
		}
		ls = append(ls, icmp, gopacket.Payload{byte(r.Uint32()), 1, 0, 2}) // echo id and seq
	}
	ls = append(ls, gopacket.Payload(payload))
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{ComputeChecksums: true, FixLengths: true}, ls...); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// checksumOffsets returns the offsets of the IPv4 header checksum (or -1)
// and the transport checksum (or -1) of a parsed packet.
func checksumOffsets(b []byte, p *Packet) (ip, trans int) {
	ip, trans = -1, -1
	if p.IPv4 != nil {
		ip = 10
	}
	at := func(h []byte, off int) int { return offsetIn(b, h) + off }
	switch {
	case p.TCP != nil:
		trans = at(p.TCP, 16)
	case p.UDP != nil:
		trans = at(p.UDP, 6)
	case p.ICMP != nil:
		trans = at(p.ICMP, 2)
	case p.ICMPv6 != nil:
		trans = at(p.ICMPv6, 2)
	}
	return ip, trans
}

func TestCalcChecksumsGopacket(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	kinds := map[string]int{}
	for i := 0; i < 3000; i++ {
		want := genPacket(t, r)
		p, err := ParsePacket(want)
		if err != nil {
			t.Fatalf("packet %d: %v\n%x", i, err, want)
		}
		ipOff, tOff := checksumOffsets(want, &p)
		if tOff < 0 {
			t.Fatalf("packet %d: no transport header\n%x", i, want)
		}
		kind := strconv.Itoa(len(p.IPv6)/40*2+4) + "/" + strconv.Itoa(int(p.Protocol)) + "/ext=" + strconv.FormatBool(len(p.Ext) > 0)
		kinds[kind]++
		got := append([]byte(nil), want...)
		// Scramble the checksums, then recompute them.
		binary.BigEndian.PutUint16(got[tOff:], uint16(r.Uint32()))
		if ipOff >= 0 {
			binary.BigEndian.PutUint16(got[ipOff:], uint16(r.Uint32()))
		}
		var a Address
		if err := CalcChecksums(got, &a, 0); err != nil {
			t.Fatalf("packet %d: %v", i, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("packet %d (%s): CalcChecksums differs from gopacket:\n got %x\nwant %x", i, kind, got, want)
		}
		if a.IPChecksum != (p.IPv4 != nil) || a.TCPChecksum != (p.TCP != nil) || a.UDPChecksum != (p.UDP != nil) {
			t.Fatalf("packet %d: address flags %+v", i, a)
		}
		checkViewsGopacket(t, want, &p)
	}
	for _, k := range []string{"4/1/ext=false", "4/6/ext=false", "4/17/ext=false", "6/58/ext=false", "6/6/ext=false", "6/17/ext=false", "6/58/ext=true", "6/6/ext=true", "6/17/ext=true"} {
		if kinds[k] < 50 {
			t.Errorf("only %d packets of kind %s", kinds[k], k)
		}
	}
}

// checkViewsGopacket compares ParsePacket's views with gopacket's decoding.
func checkViewsGopacket(t *testing.T, b []byte, p *Packet) {
	t.Helper()
	first := layers.LayerTypeIPv4
	if p.IsIPv6() {
		first = layers.LayerTypeIPv6
	}
	g := gopacket.NewPacket(b, first, gopacket.Default)
	if el := g.ErrorLayer(); el != nil {
		t.Fatalf("gopacket: %v", el.Error())
	}
	src, dst := g.NetworkLayer().NetworkFlow().Endpoints()
	if p.SrcAddr() != netip.MustParseAddr(src.String()) || p.DstAddr() != netip.MustParseAddr(dst.String()) {
		t.Fatalf("addresses %v %v, gopacket %v %v", p.SrcAddr(), p.DstAddr(), src, dst)
	}
	var payload []byte
	switch {
	case p.TCP != nil:
		tcp := g.Layer(layers.LayerTypeTCP).(*layers.TCP)
		if p.SrcPort() != uint16(tcp.SrcPort) || p.DstPort() != uint16(tcp.DstPort) || !bytes.Equal(p.TCP, tcp.Contents) {
			t.Fatalf("TCP view differs from gopacket")
		}
		payload = tcp.Payload
	case p.UDP != nil:
		udp := g.Layer(layers.LayerTypeUDP).(*layers.UDP)
		if p.SrcPort() != uint16(udp.SrcPort) || p.DstPort() != uint16(udp.DstPort) || !bytes.Equal(p.UDP, udp.Contents) {
			t.Fatalf("UDP view differs from gopacket")
		}
		payload = udp.Payload
	case p.ICMP != nil:
		icmp := g.Layer(layers.LayerTypeICMPv4).(*layers.ICMPv4)
		if !bytes.Equal(p.ICMP, icmp.Contents) {
			t.Fatalf("ICMP view differs from gopacket")
		}
		payload = icmp.Payload
	case p.ICMPv6 != nil:
		icmp := g.Layer(layers.LayerTypeICMPv6).(*layers.ICMPv6)
		// gopacket's ICMPv6 header is 4 bytes, WinDivert's 8.
		if !bytes.Equal(p.ICMPv6[:4], icmp.Contents) {
			t.Fatalf("ICMPv6 view differs from gopacket")
		}
		payload = icmp.Payload[4:]
	}
	if !bytes.Equal(p.Payload, payload) || (len(payload) == 0) != (p.Payload == nil) {
		t.Fatalf("payload %x, gopacket %x", p.Payload, payload)
	}
}

func TestCalcChecksumsFlags(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	for i := 0; i < 500; i++ {
		want := genPacket(t, r)
		p, err := ParsePacket(want)
		if err != nil {
			t.Fatal(err)
		}
		ipOff, tOff := checksumOffsets(want, &p)
		var skip ChecksumFlag
		switch {
		case p.TCP != nil:
			skip = NoTCPChecksum
		case p.UDP != nil:
			skip = NoUDPChecksum
		case p.ICMP != nil:
			skip = NoICMPChecksum
		case p.ICMPv6 != nil:
			skip = NoICMPv6Checksum
		}
		for _, flags := range []ChecksumFlag{NoIPChecksum, skip, NoIPChecksum | skip, checksumFlagsAll &^ skip} {
			got := append([]byte(nil), want...)
			got[tOff] ^= 0x5A
			if ipOff >= 0 {
				got[ipOff] ^= 0xA5
			}
			scrambled := append([]byte(nil), got...)
			var a Address
			if err := CalcChecksums(got, &a, flags); err != nil {
				t.Fatal(err)
			}
			wantIP := flags&NoIPChecksum == 0 && ipOff >= 0
			if ipOff >= 0 && (got[ipOff] == want[ipOff]) != wantIP {
				t.Fatalf("flags %#x: IP checksum %x, scrambled %x, want %x", flags, got[ipOff], scrambled[ipOff], want[ipOff])
			}
			if (got[tOff] == want[tOff]) != (flags&skip == 0) {
				t.Fatalf("flags %#x: transport checksum wrongly handled", flags)
			}
			if a.IPChecksum != wantIP || a.TCPChecksum != (p.TCP != nil && flags&skip == 0) || a.UDPChecksum != (p.UDP != nil && flags&skip == 0) {
				t.Fatalf("flags %#x: address %+v", flags, a)
			}
		}
	}
	if err := CalcChecksums(genPacket(t, r), nil, 1<<5); err == nil {
		t.Fatal("unknown flag accepted")
	}
}

func TestCalcChecksumsSpecial(t *testing.T) {
	ipv4Frag0 := mustHex(t, "4500001c12342000400100000a0000010808080808003cd20d560001")
	ipv4Frag1 := mustHex(t, "4500004c12340001400100000a000001080808088ba6605400000000f9080a0000000000101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031323334353637")
	// First fragment: IP checksum fixed, transport checksum not computable.
	b := append([]byte(nil), ipv4Frag0...)
	if err := CalcChecksums(b, nil, 0); !errors.Is(err, ErrFragment) || errors.Is(err, ErrTruncated) {
		t.Fatalf("first fragment: err %v, want ErrFragment", err)
	}
	if binary.BigEndian.Uint16(b[22:]) != 0x3cd2 {
		t.Fatal("first fragment: ICMP checksum changed")
	}
	if p, _ := ParsePacket(b); checksum16(p.IPv4) != 0xFFFF {
		t.Fatal("first fragment: IP checksum not fixed")
	}
	// Non-first fragment: only the IP header.
	b = append([]byte(nil), ipv4Frag1...)
	var a Address
	if err := CalcChecksums(b, &a, 0); err != nil || !a.IPChecksum || a.TCPChecksum || a.UDPChecksum {
		t.Fatalf("non-first fragment: %v %+v", err, a)
	}
	if !bytes.Equal(b[20:], ipv4Frag1[20:]) || checksum16(b[:20]) != 0xFFFF {
		t.Fatal("non-first fragment: wrong bytes changed")
	}
	// Truncated buffer.
	r := rand.New(rand.NewPCG(1, 1))
	for {
		w := genPacket(t, r)
		if len(w) < 100 {
			continue
		}
		if err := CalcChecksums(w[:len(w)-1], nil, 0); !errors.Is(err, ErrTruncated) {
			t.Fatalf("truncated: err %v", err)
		}
		break
	}
	// Unparsable.
	if err := CalcChecksums(make([]byte, 19), nil, 0); err == nil {
		t.Fatal("19-byte buffer accepted")
	}
	// UDP checksum 0 is sent as 0xFFFF: find a payload word that makes it 0.
	u := mustHex(t, "4500001e0000000040110000 0a000001 0a000002 1234 5678 000a 0000 0000")
	if err := CalcChecksums(u, nil, 0); err != nil {
		t.Fatal(err)
	}
	c := binary.BigEndian.Uint16(u[26:])
	binary.BigEndian.PutUint16(u[28:], c) // the payload word now cancels the sum
	if err := CalcChecksums(u, nil, 0); err != nil {
		t.Fatal(err)
	}
	if got := binary.BigEndian.Uint16(u[26:]); got != 0xFFFF {
		t.Fatalf("UDP checksum %#04x, want 0xffff", got)
	}
}

// offsetIn returns the offset of view h in b.
func offsetIn(b, h []byte) int {
	return int(uintptr(unsafe.Pointer(unsafe.SliceData(h))) - uintptr(unsafe.Pointer(unsafe.SliceData(b))))
}

// checksum16 is the textbook RFC 1071 sum, independent of internal/packet.
func checksum16(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xFFFF {
		s = s&0xFFFF + s>>16
	}
	return uint16(s)
}

func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// loadKernelPackets reads packets the Linux kernel made (see
// TestKernelChecksums): lines "kind hex".
func loadKernelPackets(t testing.TB) map[string][][]byte {
	t.Helper()
	f, err := os.Open(kernelPacketsFile)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m := map[string][][]byte{}
	s := bufio.NewScanner(f)
	s.Buffer(nil, 1<<20)
	for s.Scan() {
		line := strings.TrimSpace(s.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		kind, h, ok := strings.Cut(line, " ")
		if !ok {
			t.Fatalf("bad line %q", line)
		}
		m[kind] = append(m[kind], mustHex(t, h))
	}
	if err := s.Err(); err != nil {
		t.Fatal(err)
	}
	return m
}

// checkKernelPacket zeroes the checksums of a packet the kernel made and
// checks that CalcChecksums puts back the kernel's values.
func checkKernelPacket(t *testing.T, kind string, want []byte) {
	t.Helper()
	p, err := ParsePacket(want)
	if err != nil {
		t.Fatalf("%s: %v", kind, err)
	}
	ipOff, tOff := checksumOffsets(want, &p)
	if tOff < 0 {
		t.Fatalf("%s: no transport header", kind)
	}
	got := append([]byte(nil), want...)
	got[tOff], got[tOff+1] = 0, 0
	if ipOff >= 0 {
		got[ipOff], got[ipOff+1] = 0, 0
	}
	if err := CalcChecksums(got, nil, 0); err != nil {
		t.Fatalf("%s: %v", kind, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: CalcChecksums differs from the kernel:\n got %x\nwant %x", kind, got, want)
	}
}

func TestKernelPacketsTestdata(t *testing.T) {
	m := loadKernelPackets(t)
	for _, kind := range kernelKinds {
		if len(m[kind]) == 0 {
			t.Errorf("no kernel-made %s packet in %s", kind, kernelPacketsFile)
		}
	}
	for kind, bs := range m {
		for _, b := range bs {
			checkKernelPacket(t, kind, b)
		}
	}
}

// kernelKinds are the packet kinds the kernel test must see.
var kernelKinds = []string{"ipv4-icmp", "ipv4-udp", "ipv4-tcp", "ipv6-icmpv6", "ipv6-udp", "ipv6-tcp"}

func TestParsePacketViews(t *testing.T) {
	// WinDivert's ipv6_exthdrs_udp test packet.
	b := mustHex(t, "60000000002d006400000000000000000000000000000001000000000000000000000000000000013c000000000000003c0000000000000011000000000000001234aaaa0015eff448656c6c6f20576f726c642101")
	p, err := ParsePacket(b)
	if err != nil {
		t.Fatal(err)
	}
	if p.IPv4 != nil || len(p.IPv6) != 40 || len(p.Ext) != 24 || len(p.UDP) != 8 || p.TCP != nil || p.ICMP != nil || p.ICMPv6 != nil ||
		string(p.Payload) != "Hello World!\x01" || p.Protocol != 17 || p.Fragment || p.Truncated {
		t.Fatalf("views %+v", p)
	}
	if p.SrcPort() != 0x1234 || p.DstPort() != 0xaaaa || p.SrcAddr() != netip.MustParseAddr("::1") || p.TTL() != 0x64 || !p.IsIPv6() {
		t.Fatalf("accessors: %d %d %v %d", p.SrcPort(), p.DstPort(), p.SrcAddr(), p.TTL())
	}
	// Views are capped: appending to one never overwrites the next header.
	if cap(p.IPv6) != 40 || cap(p.Ext) != 24 || cap(p.UDP) != 8 {
		t.Fatal("views not capped")
	}
	// Truncated: an error, but the headers that fit are there.
	p, err = ParsePacket(b[:75])
	if !errors.Is(err, ErrTruncated) || !p.Truncated || p.UDP == nil || len(p.Payload) != 3 {
		t.Fatalf("truncated: %v %+v", err, p)
	}
	if _, err := ParsePacket(b[:30]); err == nil || errors.Is(err, ErrTruncated) {
		t.Fatalf("30 bytes of IPv6: err %v", err)
	}
	var zero Packet
	if zero.SrcAddr().IsValid() || zero.DstAddr().IsValid() || zero.SrcPort() != 0 || zero.TTL() != 0 {
		t.Fatal("zero Packet accessors")
	}
}

func TestNextPacket(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	var batch []byte
	var want [][]byte
	for i := 0; i < 50; i++ {
		p := genPacket(t, r)
		want = append(want, p)
		batch = append(batch, p...)
	}
	rest := batch
	for i := 0; len(rest) > 0; i++ {
		pkt, next, err := NextPacket(rest)
		if err != nil {
			t.Fatalf("packet %d: %v", i, err)
		}
		if i >= len(want) || !bytes.Equal(pkt, want[i]) {
			t.Fatalf("packet %d differs", i)
		}
		if cap(pkt) != len(pkt) {
			t.Fatal("packet not capped")
		}
		rest = next
		if len(rest) == 0 && i != len(want)-1 {
			t.Fatalf("walked %d packets, want %d", i+1, len(want))
		}
	}
	if _, _, err := NextPacket(batch[:len(batch)-1][len(batch)-len(want[49]):]); !errors.Is(err, ErrTruncated) {
		t.Fatalf("truncated last packet: err %v", err)
	}
	if _, rest, err := NextPacket([]byte{0x45, 0}); err == nil || len(rest) != 2 {
		t.Fatalf("garbage: err %v", err)
	}
}

func TestDecrementTTL(t *testing.T) {
	r := rand.New(rand.NewPCG(13, 14))
	for i := 0; i < 2000; i++ {
		b := genPacket(t, r)
		p, _ := ParsePacket(b)
		ttl := p.TTL()
		orig := append([]byte(nil), b...)
		ok := DecrementTTL(b)
		if ttl <= 1 {
			if ok || !bytes.Equal(b, orig) {
				t.Fatalf("TTL %d: ok=%v, changed=%v", ttl, ok, !bytes.Equal(b, orig))
			}
			continue
		}
		if !ok {
			t.Fatalf("TTL %d: not decremented", ttl)
		}
		p, _ = ParsePacket(b)
		if p.TTL() != ttl-1 {
			t.Fatalf("TTL %d → %d", ttl, p.TTL())
		}
		// The incremental update equals a full recomputation.
		full := append([]byte(nil), b...)
		if err := CalcChecksums(full, nil, NoTCPChecksum|NoUDPChecksum|NoICMPChecksum|NoICMPv6Checksum); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(full, b) {
			t.Fatalf("incremental IPv4 checksum %x, full %x", b[10:12], full[10:12])
		}
		n := 0
		for j := range b {
			if b[j] != orig[j] {
				n++
			}
		}
		if n > 3 {
			t.Fatalf("%d bytes changed", n)
		}
	}
	if DecrementTTL(make([]byte, 19)) || DecrementTTL(make([]byte, 40)) {
		t.Fatal("DecrementTTL on garbage")
	}
	v6 := make([]byte, 39)
	v6[0], v6[7] = 0x60, 9
	if DecrementTTL(v6) {
		t.Fatal("DecrementTTL on a 39-byte IPv6 packet")
	}
}

func TestHashPacketVectors(t *testing.T) {
	data, err := os.ReadFile("internal/packet/testdata/windivert-hash-vectors.json")
	if err != nil {
		t.Fatal(err)
	}
	var vs []struct {
		Hex    string `json:"packet_hex"`
		Seed   int64  `json:"seed_timestamp"`
		Hash64 string `json:"hash64"`
	}
	if err := json.Unmarshal(data, &vs); err != nil {
		t.Fatal(err)
	}
	if len(vs) != 40 {
		t.Fatalf("%d vectors", len(vs))
	}
	for _, v := range vs {
		want, err := strconv.ParseUint(v.Hash64, 16, 64)
		if err != nil {
			t.Fatal(err)
		}
		if got := HashPacket(mustHex(t, v.Hex), uint64(v.Seed)); got != want {
			t.Errorf("HashPacket = %016x, want %016x", got, want)
		}
	}
}

func TestPacketHelpersAllocs(t *testing.T) {
	b := genPacket(t, rand.New(rand.NewPCG(5, 5)))
	var a Address
	n := testing.AllocsPerRun(100, func() {
		_, _ = ParsePacket(b)
		_, _, _ = NextPacket(b)
		_ = CalcChecksums(b, &a, 0)
		_ = DecrementTTL(b)
		_ = HashPacket(b, 1)
	})
	if n != 0 {
		t.Fatalf("%v allocations", n)
	}
}

func FuzzParsePacket(f *testing.F) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 20; i++ {
		f.Add(genPacket(f, r))
	}
	f.Add(mustHex(f, "4500001c12342000400100000a0000010808080808003cd20d560001"))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParsePacket(b)
		if err != nil && !errors.Is(err, ErrTruncated) {
			if p.IPv4 != nil || p.IPv6 != nil {
				t.Fatal("views on error")
			}
			return
		}
		if (err != nil) != p.Truncated {
			t.Fatalf("err %v, Truncated %v", err, p.Truncated)
		}
		if (p.IPv4 == nil) == (p.IPv6 == nil) {
			t.Fatal("not exactly one IP header")
		}
		n := 0
		for _, h := range [][]byte{p.ICMP, p.ICMPv6, p.TCP, p.UDP} {
			if h != nil {
				n++
			}
		}
		if n > 1 {
			t.Fatal("several transport headers")
		}
		// Views are in order and inside b.
		end := 0
		for _, h := range [][]byte{p.IPv4, p.IPv6, p.Ext, p.ICMP, p.ICMPv6, p.TCP, p.UDP, p.Payload} {
			if h == nil {
				continue
			}
			off := offsetIn(b, h)
			if off < end || off+len(h) > len(b) {
				t.Fatalf("view at %d+%d, previous end %d, len %d", off, len(h), end, len(b))
			}
			end = off + len(h)
		}
		if !p.Truncated {
			pkt, rest, err := NextPacket(b)
			if err != nil || len(pkt)+len(rest) != len(b) || end > len(pkt) {
				t.Fatalf("NextPacket: %v %d+%d", err, len(pkt), len(rest))
			}
		}
	})
}

func FuzzCalcChecksums(f *testing.F) {
	r := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < 20; i++ {
		f.Add(genPacket(f, r), uint8(0))
	}
	f.Add(mustHex(f, "4500001c12342000400100000a0000010808080808003cd20d560001"), uint8(1))
	f.Fuzz(func(t *testing.T, b []byte, flags uint8) {
		fl := ChecksumFlag(flags) & checksumFlagsAll
		var a Address
		err := CalcChecksums(b, &a, fl)
		if err != nil {
			return
		}
		p, _ := ParsePacket(b)
		if p.IPv4 != nil && fl&NoIPChecksum == 0 && checksum16(p.IPv4) != 0xFFFF {
			t.Fatal("IPv4 checksum invalid after CalcChecksums")
		}
		if a.IPChecksum && checksum16(p.IPv4) != 0xFFFF {
			t.Fatal("IPChecksum set, checksum invalid")
		}
		// Verify with an independent computation.
		if a.TCPChecksum || a.UDPChecksum {
			seg := p.TCP
			if seg == nil {
				seg = p.UDP
			}
			off := offsetIn(b, seg)
			end := off + len(seg) + len(p.Payload)
			n := end - off
			var ph []byte
			if p.IPv4 != nil {
				ph = append(append([]byte{}, p.IPv4[12:20]...), 0, p.Protocol, byte(n>>8), byte(n))
			} else {
				if len(p.Ext) > 0 {
					return // a routing header may change the destination
				}
				ph = append(append([]byte{}, p.IPv6[8:40]...), 0, 0, byte(n>>8), byte(n), 0, 0, 0, p.Protocol)
			}
			if checksum16(append(ph, b[off:end]...)) != 0xFFFF {
				t.Fatalf("transport checksum invalid after CalcChecksums: %x", b)
			}
		}
	})
}

// tcp1500 is a 1500-byte IPv4 TCP packet.
func tcp1500(b *testing.B) []byte {
	r := rand.New(rand.NewPCG(21, 22))
	for {
		p := genPacket(b, r)
		if pk, _ := ParsePacket(p); pk.TCP != nil && pk.IPv4 != nil && len(p) >= 200 {
			// Grow the payload to 1500 bytes and fix the lengths.
			q := make([]byte, 1500)
			copy(q, p)
			binary.BigEndian.PutUint16(q[2:], 1500)
			return q
		}
	}
}

func BenchmarkParsePacket(b *testing.B) {
	pkt := tcp1500(b)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParsePacket(pkt); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkCalcChecksums(b *testing.B) {
	pkt := tcp1500(b)
	var a Address
	b.SetBytes(int64(len(pkt)))
	b.ReportAllocs()
	for b.Loop() {
		if err := CalcChecksums(pkt, &a, 0); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkHashPacket(b *testing.B) {
	pkt := tcp1500(b)
	b.ReportAllocs()
	for b.Loop() {
		if HashPacket(pkt, 42) == 0 {
			b.Fatal("zero hash")
		}
	}
}

func BenchmarkDecrementTTL(b *testing.B) {
	pkt := tcp1500(b)
	b.ReportAllocs()
	for b.Loop() {
		pkt[8] = 64
		DecrementTTL(pkt)
	}
}

// TestCalcChecksumsTruncatedTransport: a buffer that ends inside the TCP
// header cannot have its TCP checksum computed: ErrTruncated, as for a
// buffer that ends later; with the TCP checksum skipped by flag nothing is
// left undone and there is no error.
func TestCalcChecksumsTruncatedTransport(t *testing.T) {
	b := make([]byte, 40) // IPv4 TCP, total length 60: the buffer is cut
	b[0], b[3], b[8], b[9] = 0x45, 60, 64, 6
	b[20+12] = 5 << 4
	for _, n := range []int{40, 30} {
		if err := CalcChecksums(b[:n], nil, 0); !errors.Is(err, ErrTruncated) {
			t.Errorf("%d of 60 bytes: %v, want ErrTruncated", n, err)
		}
		if err := CalcChecksums(b[:n], nil, NoTCPChecksum); err != nil {
			t.Errorf("%d of 60 bytes, TCP checksum skipped: %v", n, err)
		}
	}
}

// TestSendable: Send refuses what is not a whole IPv4 or IPv6 packet, with
// a message that says why, and leaves out bytes past the packet's length,
// as WinDivert's driver does.
func TestSendable(t *testing.T) {
	v4 := make([]byte, 28)
	v4[0], v4[3] = 0x45, 28
	v6 := make([]byte, 48)
	v6[0], v6[5] = 0x60, 8
	with := func(b []byte, i int, v byte) []byte {
		c := append([]byte(nil), b...)
		c[i] = v
		return c
	}
	for _, tc := range []struct {
		name string
		b    []byte
		n    int    // the length sent
		want string // the error, "" for none
	}{
		{"v4", v4, 28, ""},
		{"v6", v6, 48, ""},
		{"v4 trailing bytes", append(append([]byte(nil), v4...), 0), 28, ""},
		{"v4 total length short", with(v4, 3, 27), 27, ""},
		{"v6 payload length short", with(v6, 5, 7), 47, ""},
		{"empty", nil, 0, "empty packet"},
		{"not IP", []byte{1, 2, 3}, 0, "IP version 0"},
		{"v4 short", v4[:19], 0, "no whole header"},
		{"v4 IHL < 5", with(v4, 0, 0x44), 0, "no whole header"},
		{"v4 IHL past end", with(v4, 0, 0x48), 0, "no whole header"},
		{"v4 total length inside the header", with(v4, 3, 19), 0, "total length 19"},
		{"v4 total length past the end", with(v4, 3, 29), 0, "total length 29"},
		{"v6 short", v6[:39], 0, "no whole header"},
		{"v6 payload length past the end", with(v6, 5, 9), 0, "payload length 9"},
	} {
		got, err := sendable(tc.b)
		if tc.want == "" {
			if err != nil || len(got) != tc.n {
				t.Errorf("%s: %d bytes, %v; want %d", tc.name, len(got), err, tc.n)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
}
