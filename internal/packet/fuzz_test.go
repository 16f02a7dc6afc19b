package packet

import (
	"testing"
)

func FuzzParse(f *testing.F) {
	for _, h := range oraclePackets {
		b := mustHex(f, h)
		f.Add(b)
		f.Add(b[:len(b)/2])
	}
	f.Add(v6(44, []byte{44, 0, 0, 1, 0, 0, 0, 1, 17, 0, 0, 0, 0, 0, 0, 1}))
	f.Add(v6(51, []byte{6, 255, 0, 0}))
	f.Add(v4(6, []byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xF0, 0, 0, 0, 0, 0, 0, 0}))
	f.Fuzz(func(t *testing.T, b []byte) {
		var p Info
		err := Parse(b, &p)
		h := Hash(b, 1)
		if err != nil {
			if h != 0 {
				t.Fatalf("Hash of unparsable packet = %x", h)
			}
			return
		}
		end := min(p.IPLen, len(b))
		switch {
		case p.Version == 4 && (p.IPHdrLen < 20 || p.IPHdrLen > 60 || p.IPHdrLen%4 != 0 || p.IPLen < p.IPHdrLen):
			t.Fatalf("bad IPv4 header fields %+v", p)
		case p.Version == 6 && (p.IPHdrLen != 40 || p.IPLen < 40):
			t.Fatalf("bad IPv6 header fields %+v", p)
		case p.Version != 4 && p.Version != 6:
			t.Fatalf("bad version %+v", p)
		case p.Truncated != (p.IPLen > len(b)):
			t.Fatalf("Truncated wrong %+v len %d", p, len(b))
		case p.NextHdrOff < p.IPHdrLen || p.NextHdrOff > end:
			t.Fatalf("NextHdrOff out of range %+v len %d", p, len(b))
		case p.PayloadOff < p.NextHdrOff || p.PayloadLen < 0 || p.PayloadOff+p.PayloadLen != end:
			t.Fatalf("payload out of range %+v len %d", p, len(b))
		case p.TransOff >= 0 && (p.TransOff != p.NextHdrOff || p.TransOff+p.TransLen != p.PayloadOff || p.TransLen < 8):
			t.Fatalf("transport header inconsistent %+v", p)
		case p.TransOff < 0 && (p.TransLen != 0 || p.PayloadOff != p.NextHdrOff):
			t.Fatalf("absent transport header inconsistent %+v", p)
		case p.TransOff >= 0 && p.FragOff != 0:
			t.Fatalf("non-first fragment with a transport header %+v", p)
		case p.Version == 4 && (p.FragHdrOff != -1 || p.RoutingHdrOff != -1 || p.NextHdrOff != p.IPHdrLen):
			t.Fatalf("IPv6 fields set on IPv4 %+v", p)
		case p.FragHdrOff >= 0 && (!p.Fragment || p.FragHdrOff < 40 || p.FragHdrOff+8 > p.NextHdrOff):
			t.Fatalf("fragment header inconsistent %+v", p)
		case p.RoutingHdrOff >= 0 && (p.RoutingHdrOff < 40 || p.RoutingHdrOff+8 > p.NextHdrOff):
			t.Fatalf("routing header inconsistent %+v", p)
		case p.Version == 6 && p.Fragment != (p.FragHdrOff >= 0):
			t.Fatalf("IPv6 Fragment flag inconsistent %+v", p)
		}
		if p.TransOff >= 0 {
			switch p.Protocol {
			case ProtoTCP:
				if p.TransLen < 20 {
					t.Fatalf("short TCP header %+v", p)
				}
			case ProtoUDP, ProtoICMP, ProtoICMPv6:
				if p.TransLen != 8 {
					t.Fatalf("bad header length %+v", p)
				}
			default:
				t.Fatalf("transport header for protocol %d", p.Protocol)
			}
		}
		if p.Truncated && h != 0 {
			t.Fatalf("Hash of truncated packet = %x", h)
		}
		if !p.Truncated && h != HashInfo(b, &p, 1) {
			t.Fatal("Hash and HashInfo disagree")
		}
		_ = HashInfo(b, &p, 2)
	})
}
