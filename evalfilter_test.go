package divert_test

import (
	"encoding/hex"
	"errors"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/netdivert/divert"
	"github.com/netdivert/divert/filter"
)

// EvalFilter and Address.Meta carry every field a filter tests at each
// layer from the Address, as WinDivertHelperEvalFilter reads them from
// its WINDIVERT_ADDRESS.
func TestEvalFilter(t *testing.T) {
	pkt, _ := hex.DecodeString(dnsQuery)
	v4 := func(s string) [16]byte { return netip.AddrFrom16(netip.MustParseAddr(s).As16()).As16() }
	for _, c := range []struct {
		a     divert.Address
		b     []byte
		match string // must match
		miss  string // must not match: the same tests, one changed
	}{
		{
			divert.Address{Layer: divert.LayerNetwork, Outbound: true, Loopback: true, Impostor: true, IfIdx: 7, SubIfIdx: 3, Timestamp: 5},
			pkt,
			"outbound and loopback and impostor and ifIdx == 7 and subIfIdx == 3 and timestamp == 5 and udp.DstPort == 53",
			"outbound and loopback and impostor and ifIdx == 7 and subIfIdx == 4 and udp.DstPort == 53",
		},
		{
			divert.Address{Layer: divert.LayerNetworkForward, IfIdx: 9},
			pkt,
			"ifIdx == 9 and ip.SrcAddr == 10.0.0.1",
			"ifIdx == 8 and ip.SrcAddr == 10.0.0.1",
		},
		{
			divert.Address{Layer: divert.LayerFlow, Event: divert.EventFlowEstablished, Outbound: true, Flow: divert.FlowData{
				EndpointID: 11, ParentEndpointID: 12, ProcessID: 1234, LocalAddr: v4("::ffff:10.0.0.1"),
				RemoteAddr: v4("::ffff:10.0.0.2"), LocalPort: 4321, RemotePort: 80, Protocol: 6,
			}},
			nil,
			"event == ESTABLISHED and outbound and endpointId == 11 and parentEndpointId == 12 and processId == 1234 and " +
				"localAddr == 10.0.0.1 and remoteAddr == 10.0.0.2 and localPort == 4321 and remotePort == 80 and tcp",
			"processId == 1234 and remotePort == 443",
		},
		{
			divert.Address{Layer: divert.LayerSocket, Event: divert.EventSocketConnect, IPv6: true, Flow: divert.FlowData{
				ProcessID: 7, RemoteAddr: v4("fd00::2"), RemotePort: 53, Protocol: 17,
			}},
			nil,
			"event == CONNECT and ipv6 and processId == 7 and remoteAddr == fd00::2 and remotePort == 53 and udp",
			"event == CONNECT and ip",
		},
		{
			divert.Address{Layer: divert.LayerReflect, Event: divert.EventReflectOpen, Reflect: divert.ReflectData{
				ProcessID: 77, Layer: divert.LayerNetworkForward, Priority: -5,
			}},
			nil,
			"event == OPEN and processId == 77 and layer == NETWORK_FORWARD and priority == -5",
			"processId == 77 and priority == 5",
		},
	} {
		ok, err := divert.EvalFilter(c.match, c.b, &c.a)
		require.NoError(t, err, c.match)
		require.True(t, ok, "%v: %s", c.a.Layer, c.match)
		ok, err = divert.EvalFilter(c.miss, c.b, &c.a)
		require.NoError(t, err, c.miss)
		require.False(t, ok, "%v: %s", c.a.Layer, c.miss)

		f := filter.MustCompile(c.match, filter.Layer(c.a.Layer))
		m := c.a.Meta()
		require.True(t, f.Match(c.b, &m), "%v: Match with Meta: %s", c.a.Layer, c.match)
	}

	var fe *divert.FilterError
	_, err := divert.EvalFilter("tcp.DstPort ==", pkt, &divert.Address{})
	require.True(t, errors.As(err, &fe), "a bad filter: %v", err)
	_, err = divert.EvalFilter("udp", pkt, &divert.Address{IPv6: true})
	require.ErrorIs(t, err, filter.ErrMeta, "IPv6 set for an IPv4 packet")
	_, err = divert.EvalFilter("udp", pkt[:10], &divert.Address{})
	require.ErrorIs(t, err, filter.ErrPacket, "a packet that does not parse")
	_, err = divert.EvalFilter("tcp", []byte{}, &divert.Address{Layer: divert.LayerFlow})
	require.ErrorIs(t, err, filter.ErrPacket, "a packet at the flow layer")
	_, err = divert.EvalFilter("true", pkt, nil)
	require.ErrorContains(t, err, "divert: nil Address")
}
