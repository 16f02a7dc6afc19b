// Package packet locates and checks the headers of raw IP packets: a parser
// with WinDivert's exact semantics (WinDivertHelperParsePacket in
// windivert_shared.c), WinDivert's packet hash (WinDivertHelperHashPacket,
// bit-exact), and the Internet checksum (RFC 1071) with the IPv4/IPv6
// pseudo-headers and RFC 1624 incremental updates.
//
// Everything here is pure Go, works on any OS, reads caller-owned buffers in
// place and never allocates.
package packet
