package exutil

import (
	"encoding/hex"
	"net/netip"
	"strconv"

	"github.com/netdivert/divert"
)

// Endpoints returns a parsed packet's source and destination, with ports
// for TCP and UDP ("10.0.0.1:53", "[fd00::1]:53").
func Endpoints(p *divert.Packet) (src, dst string) {
	if p.TCP == nil && p.UDP == nil {
		return p.SrcAddr().String(), p.DstAddr().String()
	}
	return netip.AddrPortFrom(p.SrcAddr(), p.SrcPort()).String(),
		netip.AddrPortFrom(p.DstAddr(), p.DstPort()).String()
}

var protoNames = map[uint8]string{
	1: "ICMP", 2: "IGMP", 4: "IPIP", 6: "TCP", 17: "UDP", 41: "IPv6", 47: "GRE",
	50: "ESP", 51: "AH", 58: "ICMPv6", 89: "OSPF", 103: "PIM", 112: "VRRP", 132: "SCTP",
}

// ProtoName names an IP protocol number ("ICMP", "TCP", ...; "proto-N"
// when unknown).
func ProtoName(p uint8) string {
	if n, ok := protoNames[p]; ok {
		return n
	}
	return "proto-" + strconv.Itoa(int(p))
}

// HexPrefix returns the first n bytes of b in hex, a space between bytes.
func HexPrefix(b []byte, n int) string {
	if len(b) > n {
		b = b[:n]
	}
	if len(b) == 0 {
		return ""
	}
	out := make([]byte, 0, len(b)*3-1)
	for i, c := range b {
		if i > 0 {
			out = append(out, ' ')
		}
		out = hex.AppendEncode(out, []byte{c})
	}
	return string(out)
}
