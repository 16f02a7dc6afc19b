package divert_test

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"

	"github.com/netdivert/divert"
)

// Redirect a DNS query to another resolver and port, as a divert program
// between Recv and Send would: the setters update the checksums in place.
func ExamplePacket_SetDstPort() {
	b, _ := hex.DecodeString(dnsQuery)
	_ = divert.CalcChecksums(b, nil, 0) // as received: valid checksums

	p, err := divert.ParsePacket(b)
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := p.SetDstAddr(netip.MustParseAddr("192.0.2.53")); err != nil {
		fmt.Println(err)
		return
	}
	if err := p.SetDstPort(5353); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(p.SrcAddr(), p.SrcPort(), "->", p.DstAddr(), p.DstPort())
	fmt.Printf("IP checksum %#04x, UDP checksum %#04x\n", binary.BigEndian.Uint16(p.IPv4[10:]), binary.BigEndian.Uint16(p.UDP[6:]))

	// The same bytes as a full recomputation.
	full := bytes.Clone(b)
	_ = divert.CalcChecksums(full, nil, 0)
	fmt.Println("as recomputed:", bytes.Equal(b, full))

	// An address of the other family is an error (os.ErrInvalid), and
	// the packet is left as it was.
	fmt.Println(p.SetSrcAddr(netip.MustParseAddr("2001:db8::1")))
	// Output:
	// 10.0.0.1 57413 -> 192.0.2.53 5353
	// IP checksum 0x84ee, UDP checksum 0x57c9
	// as recomputed: true
	// divert: set address: 2001:db8::1 is not an IPv4 address: invalid argument
}
