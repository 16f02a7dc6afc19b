package divert

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// routeAnswer builds an answer as the kernel sends it: a netlink header, an
// rtmsg and the given attributes.
func routeAnswer(typ uint16, seq uint32, attrs ...[]byte) []byte {
	b := binary.NativeEndian.AppendUint32(nil, 0)
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = binary.NativeEndian.AppendUint16(b, 0)
	b = binary.NativeEndian.AppendUint32(b, seq)
	b = binary.NativeEndian.AppendUint32(b, 0)
	b = append(b, make([]byte, unix.SizeofRtMsg)...)
	for _, a := range attrs {
		b = append(b, a...)
	}
	binary.NativeEndian.PutUint32(b, uint32(len(b)))
	return b
}

func TestRouteAnswer(t *testing.T) {
	oif := appendRouteAttr(nil, unix.RTA_OIF, binary.NativeEndian.AppendUint32(nil, 7))
	table := appendRouteAttr(nil, unix.RTA_TABLE, binary.NativeEndian.AppendUint32(nil, 254))
	errMsg := func(seq uint32, errno int32) []byte {
		b := routeAnswer(unix.NLMSG_ERROR, seq)
		binary.NativeEndian.PutUint32(b[unix.NLMSG_HDRLEN:], uint32(-errno))
		return b
	}
	for _, tc := range []struct {
		name string
		b    []byte
		oif  uint32
		done bool
		err  error
	}{
		{"route", routeAnswer(unix.RTM_NEWROUTE, 5, table, oif), 7, true, nil},
		{"earlier request's answer", routeAnswer(unix.RTM_NEWROUTE, 4, oif), 0, false, nil},
		{"earlier answer, then ours", append(routeAnswer(unix.RTM_NEWROUTE, 4, oif), routeAnswer(unix.RTM_NEWROUTE, 5, table, appendRouteAttr(nil, unix.RTA_OIF, binary.NativeEndian.AppendUint32(nil, 9)))...), 9, true, nil},
		{"no output interface", routeAnswer(unix.RTM_NEWROUTE, 5, table), 0, true, errNoOIF},
		{"unreachable", errMsg(5, int32(unix.ENETUNREACH)), 0, true, unix.ENETUNREACH},
	} {
		got, done, err := parseRouteAnswer(tc.b, 5)
		if got != tc.oif || done != tc.done || !errors.Is(err, tc.err) || (tc.err == nil) != (err == nil) {
			t.Errorf("%s: %d, %v, %v; want %d, %v, %v", tc.name, got, done, err, tc.oif, tc.done, tc.err)
		}
	}
	// The request: header length, type, and the three attributes.
	req := appendRouteGet(nil, 3, netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.1.2"), 4, 0x10, 0)
	if int(binary.NativeEndian.Uint32(req)) != len(req) || binary.NativeEndian.Uint16(req[4:]) != unix.RTM_GETROUTE || req[unix.NLMSG_HDRLEN] != unix.AF_INET || req[unix.NLMSG_HDRLEN+1] != 32 {
		t.Errorf("request header % x", req[:unix.NLMSG_HDRLEN+2])
	}
	if req[unix.NLMSG_HDRLEN+3] != 0x10 {
		t.Errorf("rtm_tos %#x, want 0x10", req[unix.NLMSG_HDRLEN+3])
	}
	if want := unix.NLMSG_HDRLEN + unix.SizeofRtMsg + 3*8; len(req) != want {
		t.Errorf("request of %d bytes, want %d", len(req), want)
	}
	// With a mark: one more attribute. IPv6 has no TOS in the request.
	req = appendRouteGet(nil, 3, netip.MustParseAddr("fd00::1"), netip.MustParseAddr("fd00::2"), 4, 0x10, 7)
	if req[unix.NLMSG_HDRLEN] != unix.AF_INET6 || req[unix.NLMSG_HDRLEN+3] != 0 {
		t.Errorf("IPv6 request header % x", req[unix.NLMSG_HDRLEN:unix.NLMSG_HDRLEN+4])
	}
	if want := unix.NLMSG_HDRLEN + unix.SizeofRtMsg + 2*20 + 8 + 8; len(req) != want {
		t.Errorf("IPv6 request with a mark of %d bytes, want %d", len(req), want)
	}
}

// FuzzParseRouteAnswer: any datagram is refused or read without a panic.
func FuzzParseRouteAnswer(f *testing.F) {
	f.Add(routeAnswer(unix.RTM_NEWROUTE, 1, appendRouteAttr(nil, unix.RTA_OIF, []byte{1, 0, 0, 0})), uint32(1))
	f.Add(routeAnswer(unix.NLMSG_ERROR, 1, []byte{0, 0, 0, 0}), uint32(1))
	f.Fuzz(func(t *testing.T, b []byte, seq uint32) {
		oif, done, err := parseRouteAnswer(b, seq)
		if !done && (oif != 0 || err != nil) {
			t.Fatalf("not done, but %d, %v", oif, err)
		}
	})
}
