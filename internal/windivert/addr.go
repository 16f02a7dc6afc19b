// Package windivert is the seam between the Windows backend and WinDivert.
//
// The pure part (this file, errors.go, batch.go, fake.go) has no build tags
// and is tested on every OS: the 80-byte WINDIVERT_ADDRESS layout, the
// splitting of batches, the error codes, and a fake Handle. The Windows part
// (imgk_windows.go) implements Handle over github.com/imgk/divert-go v0.1.0
// (GPL-3.0: a Windows binary that links it is a combined work under GPLv3).
package windivert

import "encoding/binary"

// AddrSize is sizeof(WINDIVERT_ADDRESS).
const AddrSize = 80

// RawAddr is a WINDIVERT_ADDRESS as the driver reads and writes it (little
// endian on every Windows architecture).
type RawAddr [AddrSize]byte

// Layers, as WinDivert numbers them.
const (
	LayerNetwork        = 0
	LayerNetworkForward = 1
	LayerFlow           = 2
	LayerSocket         = 3
	LayerReflect        = 4
)

// Addr is WINDIVERT_ADDRESS in Go form.
type Addr struct {
	Timestamp   int64
	Layer       uint8
	Event       uint8
	Sniffed     bool
	Outbound    bool
	Loopback    bool
	Impostor    bool
	IPv6        bool
	IPChecksum  bool
	TCPChecksum bool
	UDPChecksum bool

	// Network, NetworkForward.
	IfIdx, SubIfIdx uint32

	// Flow, Socket. Addresses in network byte order (IPv4 as ::ffff:a.b.c.d).
	EndpointID       uint64
	ParentEndpointID uint64
	ProcessID        uint32 // also Reflect
	LocalAddr        [16]byte
	RemoteAddr       [16]byte
	LocalPort        uint16
	RemotePort       uint16
	Protocol         uint8

	// Reflect.
	ReflectTimestamp int64
	ReflectLayer     uint32
	ReflectFlags     uint64
	ReflectPriority  int16
}

// Bits of the 32-bit word at offset 8:
// Layer:8 Event:8 Sniffed:1 Outbound:1 Loopback:1 Impostor:1 IPv6:1
// IPChecksum:1 TCPChecksum:1 UDPChecksum:1 Reserved1:8.
const (
	bitSniffed = 16 + iota
	bitOutbound
	bitLoopback
	bitImpostor
	bitIPv6
	bitIPChecksum
	bitTCPChecksum
	bitUDPChecksum
)

// union offsets (the union starts at byte 16)
const (
	offUnion      = 16
	offEndpoint   = offUnion + 0
	offParent     = offUnion + 8
	offProcess    = offUnion + 16
	offLocalAddr  = offUnion + 20
	offRemoteAddr = offUnion + 36
	offLocalPort  = offUnion + 52
	offRemotePort = offUnion + 54
	offProtocol   = offUnion + 56
	offRTimestamp = offUnion + 0
	offRProcess   = offUnion + 8
	offRLayer     = offUnion + 12
	offRFlags     = offUnion + 16
	offRPriority  = offUnion + 24
)

var le = binary.LittleEndian

func bit(w uint32, n uint) bool { return w>>n&1 != 0 }

func setBit(w *uint32, n uint, v bool) {
	if v {
		*w |= 1 << n
	}
}

// Decode reads r into a. Only the union member of r's layer is read.
func (r *RawAddr) Decode(a *Addr) {
	w := le.Uint32(r[8:])
	*a = Addr{
		Timestamp:   int64(le.Uint64(r[0:])),
		Layer:       uint8(w),
		Event:       uint8(w >> 8),
		Sniffed:     bit(w, bitSniffed),
		Outbound:    bit(w, bitOutbound),
		Loopback:    bit(w, bitLoopback),
		Impostor:    bit(w, bitImpostor),
		IPv6:        bit(w, bitIPv6),
		IPChecksum:  bit(w, bitIPChecksum),
		TCPChecksum: bit(w, bitTCPChecksum),
		UDPChecksum: bit(w, bitUDPChecksum),
	}
	switch a.Layer {
	case LayerNetwork, LayerNetworkForward:
		a.IfIdx = le.Uint32(r[offUnion:])
		a.SubIfIdx = le.Uint32(r[offUnion+4:])
	case LayerFlow, LayerSocket:
		a.EndpointID = le.Uint64(r[offEndpoint:])
		a.ParentEndpointID = le.Uint64(r[offParent:])
		a.ProcessID = le.Uint32(r[offProcess:])
		a.LocalAddr = addrFromWords(r[offLocalAddr:])
		a.RemoteAddr = addrFromWords(r[offRemoteAddr:])
		a.LocalPort = le.Uint16(r[offLocalPort:])
		a.RemotePort = le.Uint16(r[offRemotePort:])
		a.Protocol = r[offProtocol]
	case LayerReflect:
		a.ReflectTimestamp = int64(le.Uint64(r[offRTimestamp:]))
		a.ProcessID = le.Uint32(r[offRProcess:])
		a.ReflectLayer = le.Uint32(r[offRLayer:])
		a.ReflectFlags = le.Uint64(r[offRFlags:])
		a.ReflectPriority = int16(le.Uint16(r[offRPriority:]))
	}
}

// Encode writes a into r, zeroing the reserved bits and the rest of the
// union.
func (r *RawAddr) Encode(a *Addr) {
	*r = RawAddr{}
	le.PutUint64(r[0:], uint64(a.Timestamp))
	w := uint32(a.Layer) | uint32(a.Event)<<8
	setBit(&w, bitSniffed, a.Sniffed)
	setBit(&w, bitOutbound, a.Outbound)
	setBit(&w, bitLoopback, a.Loopback)
	setBit(&w, bitImpostor, a.Impostor)
	setBit(&w, bitIPv6, a.IPv6)
	setBit(&w, bitIPChecksum, a.IPChecksum)
	setBit(&w, bitTCPChecksum, a.TCPChecksum)
	setBit(&w, bitUDPChecksum, a.UDPChecksum)
	le.PutUint32(r[8:], w)
	switch a.Layer {
	case LayerNetwork, LayerNetworkForward:
		le.PutUint32(r[offUnion:], a.IfIdx)
		le.PutUint32(r[offUnion+4:], a.SubIfIdx)
	case LayerFlow, LayerSocket:
		le.PutUint64(r[offEndpoint:], a.EndpointID)
		le.PutUint64(r[offParent:], a.ParentEndpointID)
		le.PutUint32(r[offProcess:], a.ProcessID)
		addrToWords(r[offLocalAddr:], a.LocalAddr)
		addrToWords(r[offRemoteAddr:], a.RemoteAddr)
		le.PutUint16(r[offLocalPort:], a.LocalPort)
		le.PutUint16(r[offRemotePort:], a.RemotePort)
		r[offProtocol] = a.Protocol
	case LayerReflect:
		le.PutUint64(r[offRTimestamp:], uint64(a.ReflectTimestamp))
		le.PutUint32(r[offRProcess:], a.ProcessID)
		le.PutUint32(r[offRLayer:], a.ReflectLayer)
		le.PutUint64(r[offRFlags:], a.ReflectFlags)
		le.PutUint16(r[offRPriority:], uint16(a.ReflectPriority))
	}
}

// WinDivert keeps flow addresses as UINT32[4] in host order with word 0 the
// least significant (IPv4 ::ffff:a.b.c.d is {a.b.c.d, 0xFFFF, 0, 0}).
func addrFromWords(b []byte) (a [16]byte) {
	for i := 0; i < 4; i++ {
		binary.BigEndian.PutUint32(a[12-4*i:], le.Uint32(b[4*i:]))
	}
	return a
}

func addrToWords(b []byte, a [16]byte) {
	for i := 0; i < 4; i++ {
		le.PutUint32(b[4*i:], binary.BigEndian.Uint32(a[12-4*i:]))
	}
}
