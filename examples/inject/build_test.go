package main

import (
	"bytes"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/netdivert/divert"
)

// checkWithGopacket decodes pkt with gopacket, re-serializes it with
// checksums computed by gopacket and compares: the builder and
// divert.CalcChecksums must produce the same bytes.
func checkWithGopacket(t *testing.T, pkt []byte) gopacket.Packet {
	t.Helper()
	first := layers.LayerTypeIPv4
	if pkt[0]>>4 == 6 {
		first = layers.LayerTypeIPv6
	}
	p := gopacket.NewPacket(pkt, first, gopacket.Default)
	if e := p.ErrorLayer(); e != nil {
		t.Fatalf("gopacket: %v", e.Error())
	}
	var ls []gopacket.SerializableLayer
	var nl gopacket.NetworkLayer
	for _, l := range p.Layers() {
		switch l := l.(type) {
		case *layers.IPv4:
			nl = l
			ls = append(ls, l)
		case *layers.IPv6:
			nl = l
			ls = append(ls, l)
		case *layers.TCP:
			l.SetNetworkLayerForChecksum(nl)
			ls = append(ls, l)
		case *layers.UDP:
			l.SetNetworkLayerForChecksum(nl)
			ls = append(ls, l)
		case *layers.ICMPv6:
			l.SetNetworkLayerForChecksum(nl)
			ls = append(ls, l)
		case *layers.ICMPv4:
			ls = append(ls, l)
		case *layers.ICMPv6Echo:
			ls = append(ls, l)
		case *gopacket.Payload:
			ls = append(ls, l)
		}
	}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{ComputeChecksums: true}, ls...); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), pkt) {
		t.Fatalf("checksums differ from gopacket's\n got %x\nwant %x", pkt, buf.Bytes())
	}
	return p
}

func TestBuild(t *testing.T) {
	v4a, v4b := netip.MustParseAddr("10.201.1.1"), netip.MustParseAddr("10.201.1.2")
	v6a, v6b := netip.MustParseAddr("fd00:c9:1::1"), netip.MustParseAddr("fd00:c9:1::2")
	for _, tc := range []struct {
		name string
		s    spec
		want []gopacket.LayerType
	}{
		{"icmp4", spec{proto: "icmp", src: v4a, dst: v4b, ttl: 64, id: 7, seq: 1, ipid: 99, payload: []byte("ping")}, []gopacket.LayerType{layers.LayerTypeIPv4, layers.LayerTypeICMPv4}},
		{"icmp6", spec{proto: "icmp", src: v6a, dst: v6b, ttl: 64, id: 7, seq: 2, payload: []byte("ping6")}, []gopacket.LayerType{layers.LayerTypeIPv6, layers.LayerTypeICMPv6, layers.LayerTypeICMPv6Echo}},
		{"udp4", spec{proto: "udp", src: v4a, dst: v4b, sport: 5000, dport: 7000, ttl: 3, payload: []byte("hello")}, []gopacket.LayerType{layers.LayerTypeIPv4, layers.LayerTypeUDP}},
		{"udp6", spec{proto: "udp", src: v6a, dst: v6b, sport: 5000, dport: 7000, ttl: 64}, []gopacket.LayerType{layers.LayerTypeIPv6, layers.LayerTypeUDP}},
		{"syn4", spec{proto: "tcp", src: v4a, dst: v4b, sport: 40000, dport: 80, ttl: 64, seq: 0xdeadbeef}, []gopacket.LayerType{layers.LayerTypeIPv4, layers.LayerTypeTCP}},
		{"syn6", spec{proto: "tcp", src: v6a, dst: v6b, sport: 40000, dport: 443, ttl: 64, seq: 1}, []gopacket.LayerType{layers.LayerTypeIPv6, layers.LayerTypeTCP}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pkt, err := tc.s.build()
			if err != nil {
				t.Fatal(err)
			}
			var addr divert.Address
			if err := divert.CalcChecksums(pkt, &addr, 0); err != nil {
				t.Fatal(err)
			}
			p := checkWithGopacket(t, pkt)
			for _, lt := range tc.want {
				if p.Layer(lt) == nil {
					t.Fatalf("no %v layer in %v", lt, p)
				}
			}
			if ip, ok := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4); ok {
				if ip.TTL != tc.s.ttl || ip.Id != tc.s.ipid || ip.Flags != layers.IPv4DontFragment || !ip.SrcIP.Equal(v4a.AsSlice()) {
					t.Fatalf("IPv4 header %+v", ip)
				}
			}
			if tcp, ok := p.Layer(layers.LayerTypeTCP).(*layers.TCP); ok {
				if !tcp.SYN || tcp.ACK || tcp.Seq != tc.s.seq || len(tcp.Options) != 1 || tcp.Options[0].OptionType != layers.TCPOptionKindMSS {
					t.Fatalf("TCP header %+v", tcp)
				}
			}
			if icmp, ok := p.Layer(layers.LayerTypeICMPv4).(*layers.ICMPv4); ok {
				if icmp.TypeCode.Type() != layers.ICMPv4TypeEchoRequest || icmp.Id != 7 || icmp.Seq != 1 || string(icmp.Payload) != "ping" {
					t.Fatalf("ICMP %+v", icmp)
				}
			}
			if udp, ok := p.Layer(layers.LayerTypeUDP).(*layers.UDP); ok {
				if udp.SrcPort != 5000 || udp.DstPort != 7000 || string(udp.Payload) != string(tc.s.payload) {
					t.Fatalf("UDP %+v", udp)
				}
			}
		})
	}
}

func TestBuildErrors(t *testing.T) {
	v4, v6 := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("fd00::1")
	for _, s := range []spec{
		{proto: "icmp", src: v4, dst: v6},
		{proto: "sctp", src: v4, dst: v4},
		{proto: "udp", dst: v4},
		{proto: "udp", src: v4, dst: v4, payload: make([]byte, 70000)},
	} {
		if _, err := s.build(); err == nil {
			t.Errorf("%+v built", s)
		}
	}
}

func TestParseFlags(t *testing.T) {
	for _, bad := range [][]string{
		{}, {"-dst", "nonsense"}, {"-dst", "10.0.0.1", "-proto", "udp"}, {"-dst", "10.0.0.1", "-in"},
		{"-dst", "10.0.0.1", "-proto", "gre"}, {"-dst", "10.0.0.1", "-ttl", "0"}, {"-dst", "10.0.0.1", "-payload-hex", "zz"},
		{"-dst", "10.0.0.1", "-count", "0"}, {"-dst", "10.0.0.1", "-ifidx", "4294967296"},
		{"-dst", "10.0.0.1", "-src", "fd00::1"}, {"-dst", "fd00::2", "-src", "10.0.0.2", "-in"},
	} {
		if _, err := parseFlags(bad); err == nil {
			t.Errorf("parseFlags(%q) accepted", bad)
		}
	}
	c, err := parseFlags([]string{"-dst", "::ffff:10.0.0.1", "-proto", "tcp", "-dport", "80", "-payload-hex", "0102"})
	if err != nil {
		t.Fatal(err)
	}
	if !c.dst.Is4() || c.sport < 49152 || c.dport != 80 || !bytes.Equal(c.payload, []byte{1, 2}) || c.id == 0 {
		t.Fatalf("%+v", c)
	}
}

// FuzzBuild builds packets from arbitrary fields and checks that divert's
// parser reads back what was built.
func FuzzBuild(f *testing.F) {
	f.Add("udp", []byte{10, 0, 0, 1}, []byte{10, 0, 0, 2}, uint16(1), uint16(2), []byte("x"))
	f.Add("tcp", make([]byte, 16), make([]byte, 16), uint16(1), uint16(2), []byte(nil))
	f.Add("icmp", []byte{10, 0, 0, 1}, make([]byte, 16), uint16(0), uint16(0), []byte("ping"))
	f.Fuzz(func(t *testing.T, proto string, src, dst []byte, sport, dport uint16, payload []byte) {
		s := spec{proto: proto, sport: sport, dport: dport, ttl: 64, payload: payload}
		s.src, _ = netip.AddrFromSlice(src)
		s.dst, _ = netip.AddrFromSlice(dst)
		pkt, err := s.build()
		if err != nil {
			return
		}
		if err := divert.CalcChecksums(pkt, nil, 0); err != nil {
			t.Fatalf("checksums: %v", err)
		}
		p, err := divert.ParsePacket(pkt)
		if err != nil {
			t.Fatalf("built packet does not parse: %v", err)
		}
		if p.SrcAddr() != s.src || p.DstAddr() != s.dst || !bytes.Equal(p.Payload, payload) {
			t.Fatalf("read back %v -> %v payload %x", p.SrcAddr(), p.DstAddr(), p.Payload)
		}
		if (proto == "udp" || proto == "tcp") && (p.SrcPort() != sport || p.DstPort() != dport) {
			t.Fatalf("ports %d %d", p.SrcPort(), p.DstPort())
		}
	})
}
