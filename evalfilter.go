package divert

import (
	"fmt"
	"os"

	"github.com/netdivert/divert/filter"
)

// Meta returns what a filter may test of a besides the packet bytes, for
// (*filter.Filter).Match and Eval: the network fields, the 5-tuple at
// LayerFlow and LayerSocket, the other handle's process, layer and
// priority at LayerReflect. With it a filter compiled once judges received
// packets as the handle's filter does; EvalFilter does the same from a
// filter text.
func (a *Address) Meta() filter.Meta {
	m := filter.Meta{
		Layer:     filter.Layer(a.Layer),
		Event:     uint8(a.Event),
		Outbound:  a.Outbound,
		Loopback:  a.Loopback,
		Impostor:  a.Impostor,
		IPv6:      a.IPv6,
		IfIdx:     a.IfIdx,
		SubIfIdx:  a.SubIfIdx,
		Timestamp: a.Timestamp,
	}
	switch a.Layer {
	case LayerFlow, LayerSocket:
		m.EndpointID = a.Flow.EndpointID
		m.ParentEndpointID = a.Flow.ParentEndpointID
		m.ProcessID = a.Flow.ProcessID
		m.LocalAddr = a.Flow.LocalAddr
		m.RemoteAddr = a.Flow.RemoteAddr
		m.LocalPort = a.Flow.LocalPort
		m.RemotePort = a.Flow.RemotePort
		m.Protocol = a.Flow.Protocol
	case LayerReflect:
		m.ProcessID = a.Reflect.ProcessID
		m.ReflectLayer = filter.Layer(a.Reflect.Layer)
		m.Priority = a.Reflect.Priority
	}
	return m
}

// EvalFilter is WinDivertHelperEvalFilter: it compiles filterText for
// a.Layer and reports whether it matches the packet b with the address a,
// a packet Recv returned or one the program made. A filter that does not
// compile is a *FilterError. As in WinDivert, a packet that does not parse
// at the network layers, a non-nil b at LayerFlow or LayerSocket, which
// carry no packet, and an a.IPv6 that is not b's IP version are errors
// (wrapping filter.ErrPacket or filter.ErrMeta). To judge many packets,
// compile the filter once and use (*filter.Filter).Match with a.Meta().
func EvalFilter(filterText string, b []byte, a *Address) (bool, error) {
	if a == nil {
		return false, fmt.Errorf("divert: nil Address: %w", os.ErrInvalid)
	}
	f, err := filter.Compile(filterText, filter.Layer(a.Layer))
	if err != nil {
		return false, err
	}
	m := a.Meta()
	ok, err := f.Eval(b, &m)
	if err != nil {
		return false, fmt.Errorf("divert: %w", err)
	}
	return ok, nil
}
