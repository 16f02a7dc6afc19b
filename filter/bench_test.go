package filter

import "testing"

func benchMatch(b *testing.B, text string, pkt []byte, want bool) {
	f := MustCompile(text, LayerNetwork)
	m := &Meta{Outbound: true, IPv6: pkt[0]>>4 == 6}
	if f.Match(pkt, m) != want {
		b.Fatalf("%q: Match != %v", text, want)
	}
	b.ReportAllocs()
	b.SetBytes(int64(len(pkt)))
	for b.Loop() {
		f.Match(pkt, m)
	}
}

func BenchmarkMatchTCPRange(b *testing.B) {
	benchMatch(b, "tcp.DstPort == 443 and ip.DstAddr >= 10.0.0.0 and ip.DstAddr <= 10.255.255.255", pktTCPv4, true)
}

func BenchmarkMatchUDPPayload(b *testing.B) {
	benchMatch(b, "udp and udp.PayloadLength > 100", pktUDPv4, true)
}

func BenchmarkMatchIPv6(b *testing.B) {
	benchMatch(b, "ipv6 and ipv6.DstAddr == fd00::2 and tcp.DstPort == 80 and tcp.Psh", pktTCPv6, true)
}

func BenchmarkMatchRandom(b *testing.B) {
	benchMatch(b, "random8 >= 0x10 or tcp", pktTCPv4, true)
}

func BenchmarkCompile(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Compile("outbound and (tcp.DstPort == 443 or udp.DstPort == 53) and ip.DstAddr >= 10.0.0.0 and ip.DstAddr <= 10.255.255.255", LayerNetwork); err != nil {
			b.Fatal(err)
		}
	}
}
