package nftrules

import (
	"reflect"
	"testing"

	"github.com/google/nftables"
)

// TestTableConnHidesFlush: a tableConn offers none of google/nftables'
// Conn methods but the ones that queue messages (and its own
// CloseLasting), so that no batch is sent on a table's socket other than
// through tableConn.flush, which drains the answers a failed batch left
// unread (see TestFailedBatchLeavesNoAnswer); and no field of it is
// embedded, through which the Conn's methods would be promoted.
func TestTableConnHidesFlush(t *testing.T) {
	queueing := map[string]bool{"AddChain": true, "AddRule": true, "DelChain": true, "FlushTable": true,
		"CloseLasting": true} // tableConn's own: closes the lasting socket
	tc := reflect.TypeFor[*tableConn]()
	nc := reflect.TypeFor[*nftables.Conn]()
	for i := range nc.NumMethod() {
		name := nc.Method(i).Name
		if _, ok := tc.MethodByName(name); ok && !queueing[name] {
			t.Errorf("tableConn has google/nftables' Conn.%s: only the wrapped queueing methods may be reached (a batch goes through flush)", name)
		}
	}
	for f := range tc.Elem().Fields() {
		if f.Anonymous {
			t.Errorf("tableConn embeds %s (%v): its methods are promoted", f.Name, f.Type)
		}
	}
	for name := range queueing {
		if _, ok := tc.MethodByName(name); !ok {
			t.Errorf("tableConn lacks %s", name)
		}
	}
}
