package filter

// fid is a field: WinDivert's WINDIVERT_FILTER_FIELD_* number for real
// fields, and two pseudo fields for the constants true and false.
type fid uint8

// WinDivert's field numbers (windivert_device.h).
const (
	fZero fid = iota
	fInbound
	fOutbound
	fIfIdx
	fSubIfIdx
	fIP
	fIPv6
	fICMP
	fTCP
	fUDP
	fICMPv6
	fIPHdrLength
	fIPTOS
	fIPLength
	fIPId
	fIPDF
	fIPMF
	fIPFragOff
	fIPTTL
	fIPProtocol
	fIPChecksum
	fIPSrcAddr
	fIPDstAddr
	fIPv6TrafficClass
	fIPv6FlowLabel
	fIPv6Length
	fIPv6NextHdr
	fIPv6HopLimit
	fIPv6SrcAddr
	fIPv6DstAddr
	fICMPType
	fICMPCode
	fICMPChecksum
	fICMPBody
	fICMPv6Type
	fICMPv6Code
	fICMPv6Checksum
	fICMPv6Body
	fTCPSrcPort
	fTCPDstPort
	fTCPSeqNum
	fTCPAckNum
	fTCPHdrLength
	fTCPUrg
	fTCPAck
	fTCPPsh
	fTCPRst
	fTCPSyn
	fTCPFin
	fTCPWindow
	fTCPChecksum
	fTCPUrgPtr
	fTCPPayloadLength
	fUDPSrcPort
	fUDPDstPort
	fUDPLength
	fUDPChecksum
	fUDPPayloadLength
	fLoopback
	fImpostor
	fProcessID
	fLocalAddr
	fRemoteAddr
	fLocalPort
	fRemotePort
	fProtocol
	fEndpointID
	fParentEndpointID
	fLayer
	fPriority
	fEvent
	fPacket
	fPacket16
	fPacket32
	fTCPPayload
	fTCPPayload16
	fTCPPayload32
	fUDPPayload
	fUDPPayload16
	fUDPPayload32
	fLength
	fTimestamp
	fRandom8
	fRandom16
	fRandom32
	fFragment

	fTrue  // the constant true (not a WinDivert field number)
	fFalse // the constant false

	numFids
)

const fMaxWD = fFragment // WINDIVERT_FILTER_FIELD_MAX

// Layer flags for the validity table.
const (
	lN = 1 << LayerNetwork
	lM = 1 << LayerNetworkForward
	lF = 1 << LayerFlow
	lS = 1 << LayerSocket
	lR = 1 << LayerReflect
)

type fieldInfo struct {
	name   string
	layers uint8
	proto  fid   // header the field needs (fIP, fIPv6, fICMP, fICMPv6, fTCP, fUDP), else fTrue
	lo, hi u128  // folding range (WinDivertSimplifyTest); fold=false: none
	negLo  bool  // the lower bound is negative
	fold   bool  // has a folding range
	eq     bool  // constant field (zero/true/false)
	size   int   // array element size, 0 for scalar fields
	big    bool  // compared on all 128 bits
	ir     Field // the IR field
	hex    bool  // formatted in hex
	boolf  bool  // formatted as "x" / "not x" when compared with 0/1
}

func r32(hi uint32) (u128, u128) { return u128{}, u128{hi} }

var fields [numFids]fieldInfo

func init() {
	const all = lN | lM | lF | lS | lR
	set := func(f fid, name string, layers uint8, proto fid, ir Field) *fieldInfo {
		fields[f] = fieldInfo{name: name, layers: layers, proto: proto, ir: ir}
		return &fields[f]
	}
	rng := func(fi *fieldInfo, hi uint32) *fieldInfo {
		fi.lo, fi.hi = r32(hi)
		fi.fold = true
		return fi
	}
	t := fTrue
	rng(set(fZero, "zero", all, t, FieldZero), 0).eq = true
	rng(set(fTrue, "true", all, t, FieldTrue), 1).eq = true
	fields[fTrue].lo = u128{1}
	rng(set(fFalse, "false", all, t, FieldFalse), 0).eq = true
	rng(set(fInbound, "inbound", lN|lF|lS, t, FieldInbound), 1).boolf = true
	rng(set(fOutbound, "outbound", lN|lF|lS, t, FieldOutbound), 1).boolf = true
	rng(set(fIfIdx, "ifIdx", lN|lM, t, FieldIfIdx), 0xFFFFFFFF)
	rng(set(fSubIfIdx, "subIfIdx", lN|lM, t, FieldSubIfIdx), 0xFFFFFFFF)
	rng(set(fIP, "ip", lN|lM|lF|lS, t, FieldIP), 1).boolf = true
	rng(set(fIPv6, "ipv6", lN|lM|lF|lS, t, FieldIPv6), 1).boolf = true
	rng(set(fICMP, "icmp", lN|lM|lF|lS, t, FieldICMP), 1).boolf = true
	rng(set(fTCP, "tcp", lN|lM|lF|lS, t, FieldTCP), 1).boolf = true
	rng(set(fUDP, "udp", lN|lM|lF|lS, t, FieldUDP), 1).boolf = true
	rng(set(fICMPv6, "icmpv6", lN|lM|lF|lS, t, FieldICMPv6), 1).boolf = true
	nm := uint8(lN | lM)
	rng(set(fIPHdrLength, "ip.HdrLength", nm, fIP, FieldIPHdrLength), 0xF)
	rng(set(fIPTOS, "ip.TOS", nm, fIP, FieldIPTOS), 0xFFFF) // sic
	rng(set(fIPLength, "ip.Length", nm, fIP, FieldIPLength), 0xFFFF)
	rng(set(fIPId, "ip.Id", nm, fIP, FieldIPId), 0xFFFF).hex = true
	rng(set(fIPDF, "ip.DF", nm, fIP, FieldIPDF), 1).boolf = true
	rng(set(fIPMF, "ip.MF", nm, fIP, FieldIPMF), 1).boolf = true
	rng(set(fIPFragOff, "ip.FragOff", nm, fIP, FieldIPFragOff), 0x1FFF)
	rng(set(fIPTTL, "ip.TTL", nm, fIP, FieldIPTTL), 0xFF)
	rng(set(fIPProtocol, "ip.Protocol", nm, fIP, FieldIPProtocol), 0xFF)
	rng(set(fIPChecksum, "ip.Checksum", nm, fIP, FieldIPChecksum), 0xFFFF).hex = true
	for _, f := range []fid{fIPSrcAddr, fIPDstAddr} {
		name, ir := "ip.SrcAddr", FieldIPSrcAddr
		if f == fIPDstAddr {
			name, ir = "ip.DstAddr", FieldIPDstAddr
		}
		fi := set(f, name, nm, fIP, ir)
		fi.lo, fi.hi = u128{0, 0xFFFF}, u128{0xFFFFFFFF, 0xFFFF}
		fi.fold, fi.big = true, true
	}
	rng(set(fIPv6TrafficClass, "ipv6.TrafficClass", nm, fIPv6, FieldIPv6TrafficClass), 0xFF)
	rng(set(fIPv6FlowLabel, "ipv6.FlowLabel", nm, fIPv6, FieldIPv6FlowLabel), 0xFFFFF)
	rng(set(fIPv6Length, "ipv6.Length", nm, fIPv6, FieldIPv6Length), 0xFFFF)
	rng(set(fIPv6NextHdr, "ipv6.NextHdr", nm, fIPv6, FieldIPv6NextHdr), 0xFF)
	rng(set(fIPv6HopLimit, "ipv6.HopLimit", nm, fIPv6, FieldIPv6HopLimit), 0xFF)
	addr := func(fi *fieldInfo) {
		fi.hi = u128{0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF}
		fi.fold, fi.big = true, true
	}
	addr(set(fIPv6SrcAddr, "ipv6.SrcAddr", nm, fIPv6, FieldIPv6SrcAddr))
	addr(set(fIPv6DstAddr, "ipv6.DstAddr", nm, fIPv6, FieldIPv6DstAddr))
	rng(set(fICMPType, "icmp.Type", nm, fICMP, FieldICMPType), 0xFF)
	rng(set(fICMPCode, "icmp.Code", nm, fICMP, FieldICMPCode), 0xFF)
	rng(set(fICMPChecksum, "icmp.Checksum", nm, fICMP, FieldICMPChecksum), 0xFFFF).hex = true
	set(fICMPBody, "icmp.Body", nm, fICMP, FieldICMPBody)
	rng(set(fICMPv6Type, "icmpv6.Type", nm, fICMPv6, FieldICMPv6Type), 0xFF)
	rng(set(fICMPv6Code, "icmpv6.Code", nm, fICMPv6, FieldICMPv6Code), 0xFF)
	rng(set(fICMPv6Checksum, "icmpv6.Checksum", nm, fICMPv6, FieldICMPv6Checksum), 0xFFFF).hex = true
	set(fICMPv6Body, "icmpv6.Body", nm, fICMPv6, FieldICMPv6Body)
	rng(set(fTCPSrcPort, "tcp.SrcPort", nm, fTCP, FieldTCPSrcPort), 0xFFFF)
	rng(set(fTCPDstPort, "tcp.DstPort", nm, fTCP, FieldTCPDstPort), 0xFFFF)
	set(fTCPSeqNum, "tcp.SeqNum", nm, fTCP, FieldTCPSeqNum)
	set(fTCPAckNum, "tcp.AckNum", nm, fTCP, FieldTCPAckNum)
	rng(set(fTCPHdrLength, "tcp.HdrLength", nm, fTCP, FieldTCPHdrLength), 0xF)
	rng(set(fTCPUrg, "tcp.Urg", nm, fTCP, FieldTCPUrg), 1).boolf = true
	rng(set(fTCPAck, "tcp.Ack", nm, fTCP, FieldTCPAck), 1).boolf = true
	rng(set(fTCPPsh, "tcp.Psh", nm, fTCP, FieldTCPPsh), 1).boolf = true
	rng(set(fTCPRst, "tcp.Rst", nm, fTCP, FieldTCPRst), 1).boolf = true
	rng(set(fTCPSyn, "tcp.Syn", nm, fTCP, FieldTCPSyn), 1).boolf = true
	rng(set(fTCPFin, "tcp.Fin", nm, fTCP, FieldTCPFin), 1).boolf = true
	rng(set(fTCPWindow, "tcp.Window", nm, fTCP, FieldTCPWindow), 0xFFFF)
	rng(set(fTCPChecksum, "tcp.Checksum", nm, fTCP, FieldTCPChecksum), 0xFFFF).hex = true
	rng(set(fTCPUrgPtr, "tcp.UrgPtr", nm, fTCP, FieldTCPUrgPtr), 0xFFFF)
	rng(set(fTCPPayloadLength, "tcp.PayloadLength", nm, fTCP, FieldTCPPayloadLength), 0xFFFF)
	rng(set(fUDPSrcPort, "udp.SrcPort", nm, fUDP, FieldUDPSrcPort), 0xFFFF)
	rng(set(fUDPDstPort, "udp.DstPort", nm, fUDP, FieldUDPDstPort), 0xFFFF)
	rng(set(fUDPLength, "udp.Length", nm, fUDP, FieldUDPLength), 0xFFFF)
	rng(set(fUDPChecksum, "udp.Checksum", nm, fUDP, FieldUDPChecksum), 0xFFFF).hex = true
	rng(set(fUDPPayloadLength, "udp.PayloadLength", nm, fUDP, FieldUDPPayloadLength), 0xFFFF)
	set(fLoopback, "loopback", lN|lF|lS, t, FieldLoopback).boolf = true
	set(fImpostor, "impostor", nm, t, FieldImpostor).boolf = true
	rng(set(fProcessID, "processId", lF|lS|lR, t, FieldProcessID), 0xFFFFFFFF)
	addr(set(fLocalAddr, "localAddr", lN|lF|lS, t, FieldLocalAddr))
	addr(set(fRemoteAddr, "remoteAddr", lN|lF|lS, t, FieldRemoteAddr))
	rng(set(fLocalPort, "localPort", lN|lF|lS, t, FieldLocalPort), 0xFFFF)
	rng(set(fRemotePort, "remotePort", lN|lF|lS, t, FieldRemotePort), 0xFFFF)
	rng(set(fProtocol, "protocol", lN|lF|lS, t, FieldProtocol), 0xFF)
	for _, f := range []fid{fEndpointID, fParentEndpointID} {
		name, ir := "endpointId", FieldEndpointID
		if f == fParentEndpointID {
			name, ir = "parentEndpointId", FieldParentEndpointID
		}
		fi := set(f, name, lF|lS, t, ir)
		fi.hi = u128{0xFFFFFFFF, 0xFFFFFFFF}
		fi.fold, fi.big = true, true
	}
	rng(set(fLayer, "layer", lR, t, FieldLayer), 4)
	pr := set(fPriority, "priority", lR, t, FieldPriority)
	pr.lo, pr.hi, pr.negLo, pr.fold = u128{30000}, u128{30000}, true, true
	rng(set(fEvent, "event", all, t, FieldEvent), 9)
	arr := func(f fid, name string, proto fid, ir Field, size int) {
		hi := uint32(0xFF)
		switch size {
		case 2:
			hi = 0xFFFF
		case 4:
			hi = 0xFFFFFFFF
		}
		fi := rng(set(f, name, nm, proto, ir), hi)
		fi.size, fi.hex = size, true
		if f == fPacket32 {
			fi.fold = false // WinDivert's range table omits packet32
		}
	}
	arr(fPacket, "packet", t, FieldPacket, 1)
	arr(fPacket16, "packet16", t, FieldPacket16, 2)
	arr(fPacket32, "packet32", t, FieldPacket32, 4)
	arr(fTCPPayload, "tcp.Payload", fTCP, FieldTCPPayload, 1)
	arr(fTCPPayload16, "tcp.Payload16", fTCP, FieldTCPPayload16, 2)
	arr(fTCPPayload32, "tcp.Payload32", fTCP, FieldTCPPayload32, 4)
	arr(fUDPPayload, "udp.Payload", fUDP, FieldUDPPayload, 1)
	arr(fUDPPayload16, "udp.Payload16", fUDP, FieldUDPPayload16, 2)
	arr(fUDPPayload32, "udp.Payload32", fUDP, FieldUDPPayload32, 4)
	ln := rng(set(fLength, "length", nm, t, FieldLength), mtuMax)
	ln.lo = u128{20}
	ts := set(fTimestamp, "timestamp", all, t, FieldTimestamp)
	ts.lo, ts.hi, ts.negLo, ts.fold, ts.big = u128{0, 0x80000000}, u128{0xFFFFFFFF, 0x7FFFFFFF}, true, true, true
	rng(set(fRandom8, "random8", nm, t, FieldRandom8), 0xFF)
	rng(set(fRandom16, "random16", nm, t, FieldRandom16), 0xFFFF)
	rng(set(fRandom32, "random32", nm, t, FieldRandom32), 0xFFFFFFFF)
	rng(set(fFragment, "fragment", nm, t, FieldFragment), 1).boolf = true

	fieldNames = make(map[string]fieldName, numFids)
	for f := fid(0); f < numFids; f++ {
		fieldNames[fields[f].name] = fieldName{id: f, wd: f <= fMaxWD}
		irToFid[fields[f].ir] = f
	}
}

type fieldName struct {
	id fid
	wd bool // a WinDivert field number (checked against the layer)
}

var (
	fieldNames map[string]fieldName
	irToFid    [numFields]fid
)

// validField is WinDivertValidateField.
func validField(layer Layer, f fid) bool {
	if f > fMaxWD || layer > LayerReflect {
		return false
	}
	return fields[f].layers&(1<<layer) != 0
}
