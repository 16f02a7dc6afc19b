package divert_test

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"

	"github.com/netdivert/divert"
	"github.com/netdivert/divert/filter"
)

// An IPv4 UDP DNS query (WinDivert's test packet) with zero checksums.
const dnsQuery = "4500003920900000491100000a00000108080404e0450035002522a7170801000001000000000000076578616d706c6503636f6d0000010001"

func ExampleParsePacket() {
	b, _ := hex.DecodeString(dnsQuery)
	p, err := divert.ParsePacket(b)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(p.SrcAddr(), p.SrcPort(), "->", p.DstAddr(), p.DstPort(), "protocol", p.Protocol)
	fmt.Println("IPv4 header", len(p.IPv4), "bytes, UDP header", len(p.UDP), "bytes, payload", len(p.Payload), "bytes")
	// Output:
	// 10.0.0.1 57413 -> 8.8.4.4 53 protocol 17
	// IPv4 header 20 bytes, UDP header 8 bytes, payload 29 bytes
}

func ExampleCalcChecksums() {
	b, _ := hex.DecodeString(dnsQuery)
	// Rewrite the destination to 1.1.1.1, then fix the checksums.
	copy(b[16:20], []byte{1, 1, 1, 1})
	var addr divert.Address
	if err := divert.CalcChecksums(b, &addr, 0); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("IP checksum %#04x, UDP checksum %#04x\n", binary.BigEndian.Uint16(b[10:]), binary.BigEndian.Uint16(b[26:]))
	fmt.Println("valid:", addr.IPChecksum, addr.UDPChecksum)
	// Output:
	// IP checksum 0x4522, UDP checksum 0x2cb1
	// valid: true true
}

func ExampleNextPacket() {
	one, _ := hex.DecodeString(dnsQuery)
	batch := append(append([]byte{}, one...), one...) // two packets back to back
	for n := 0; len(batch) > 0; n++ {
		pkt, rest, err := divert.NextPacket(batch)
		if err != nil {
			fmt.Println(err)
			return
		}
		fmt.Println("packet", n, len(pkt), "bytes")
		batch = rest
	}
	// Output:
	// packet 0 57 bytes
	// packet 1 57 bytes
}

// WinDivertHelperEvalFilter: judge a packet and its Address by a filter in
// user space, e.g. to sort what one handle receives by several rules.
func ExampleEvalFilter() {
	b, _ := hex.DecodeString(dnsQuery)
	addr := divert.Address{Outbound: true, IfIdx: 2} // as Recv fills it
	for _, rule := range []string{
		"outbound and udp.DstPort == 53",
		"inbound",
		"ip.DstAddr == 8.8.4.4 and udp.PayloadLength > 20",
		"ipv6",
	} {
		ok, err := divert.EvalFilter(rule, b, &addr)
		fmt.Printf("%-50s %v %v\n", rule, ok, err)
	}
	_, err := divert.EvalFilter("tcp.DstPort = = 80", b, &addr)
	fmt.Println(err)

	// Many packets: compile once, match with the Address's Meta.
	f := filter.MustCompile("ifIdx == 2 and udp", filter.LayerNetwork)
	m := addr.Meta()
	fmt.Println(f.Match(b, &m))
	// Output:
	// outbound and udp.DstPort == 53                     true <nil>
	// inbound                                            false <nil>
	// ip.DstAddr == 8.8.4.4 and udp.PayloadLength > 20   true <nil>
	// ipv6                                               false <nil>
	// filter: Filter expression parse error at position 14
	// true
}
