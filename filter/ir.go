package filter

// This file holds the intermediate representation that backends lower to
// their kernel's packet filter (nftables on Linux, ipfw on FreeBSD).

// Field names a field of the filter language.
type Field uint8

// Fields of the filter language. Boolean fields (protocol presence,
// direction, flags) have the values 0 and 1.
const (
	FieldZero Field = iota
	FieldTrue
	FieldFalse
	FieldTimestamp
	FieldEvent
	FieldOutbound
	FieldInbound
	FieldLoopback
	FieldImpostor
	FieldFragment
	FieldIfIdx
	FieldSubIfIdx
	FieldLength
	FieldRandom8
	FieldRandom16
	FieldRandom32
	FieldPacket   // packet[i]: Cond.Index is the byte offset
	FieldPacket16 // packet16[i]
	FieldPacket32 // packet32[i]
	FieldIP
	FieldIPv6
	FieldICMP
	FieldICMPv6
	FieldTCP
	FieldUDP
	FieldProtocol
	FieldLocalAddr
	FieldRemoteAddr
	FieldLocalPort
	FieldRemotePort
	FieldEndpointID
	FieldParentEndpointID
	FieldProcessID
	FieldLayer
	FieldPriority
	FieldIPHdrLength
	FieldIPTOS
	FieldIPLength
	FieldIPId
	FieldIPDF
	FieldIPMF
	FieldIPFragOff
	FieldIPTTL
	FieldIPProtocol
	FieldIPChecksum
	FieldIPSrcAddr
	FieldIPDstAddr
	FieldIPv6TrafficClass
	FieldIPv6FlowLabel
	FieldIPv6Length
	FieldIPv6NextHdr
	FieldIPv6HopLimit
	FieldIPv6SrcAddr
	FieldIPv6DstAddr
	FieldICMPType
	FieldICMPCode
	FieldICMPChecksum
	FieldICMPBody
	FieldICMPv6Type
	FieldICMPv6Code
	FieldICMPv6Checksum
	FieldICMPv6Body
	FieldTCPSrcPort
	FieldTCPDstPort
	FieldTCPSeqNum
	FieldTCPAckNum
	FieldTCPHdrLength
	FieldTCPUrg
	FieldTCPAck
	FieldTCPPsh
	FieldTCPRst
	FieldTCPSyn
	FieldTCPFin
	FieldTCPWindow
	FieldTCPChecksum
	FieldTCPUrgPtr
	FieldTCPPayloadLength
	FieldTCPPayload   // tcp.Payload[i]: Cond.Index is the byte offset
	FieldTCPPayload16 // tcp.Payload16[i]
	FieldTCPPayload32 // tcp.Payload32[i]
	FieldUDPSrcPort
	FieldUDPDstPort
	FieldUDPLength
	FieldUDPChecksum
	FieldUDPPayloadLength
	FieldUDPPayload   // udp.Payload[i]: Cond.Index is the byte offset
	FieldUDPPayload16 // udp.Payload16[i]
	FieldUDPPayload32 // udp.Payload32[i]

	numFields
)

// Op is a comparison.
type Op uint8

// Comparisons.
const (
	OpEq Op = iota // ==
	OpNe           // !=
	OpLt           // <
	OpLe           // <=
	OpGt           // >
	OpGe           // >=
)

// Value is a filter constant: a 128-bit unsigned magnitude with a sign flag.
// Any negative value is below any non-negative one (WinDivert's rule, so -0 <
// 0). IPv4 addresses are IPv4-mapped: Hi == 0, Lo == 0x0000FFFF_aabbccdd.
type Value struct {
	Hi, Lo uint64 // the magnitude's high and low 64 bits
	Neg    bool   // the value is negative (the magnitude with a minus)
}

// Cond is one comparison in lowered form. It holds for a packet iff Field is
// present in the packet (its header exists and the index is in bounds) and
// "Field Op Value" is true. Boolean fields are always present at the network
// layers, so "not tcp" is Cond{Field: FieldTCP, Op: OpEq, Value: 0}.
type Cond struct {
	Field Field // the field compared
	Index int32 // byte offset for the array fields; negative counts from the end
	Op    Op    // the comparison
	Value Value // the constant compared with
}

// Term is a conjunction of Conds. An empty Term matches every packet.
type Term struct {
	Conds []Cond // every one must hold
}

// Lowered is a disjunction of Terms: the filter can match a packet only if
// some Term matches it. When Exact is set, the filter matches a packet iff
// some Term does; otherwise the Terms over-approximate the filter and user
// space must finish the match with (*Filter).Match. No Terms means the
// filter matches nothing.
type Lowered struct {
	Terms []Term // the filter can match only what some Term matches
	Exact bool   // the Terms match exactly what the filter does
}
