package filter_test

import (
	"encoding/hex"
	"fmt"

	"github.com/netdivert/divert/filter"
)

func Example() {
	f, err := filter.Compile("outbound and icmp.Type == 8 or tcp.DstPort != 70000", filter.LayerNetwork)
	if err != nil {
		panic(err)
	}
	// An ICMP echo request from 10.0.0.1 to 8.8.8.8.
	pkt, _ := hex.DecodeString("4500005412344000400100000a0000010808080808003cd20d5600018ba6605400000000f9080a0000000000101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031323334353637")
	fmt.Println(f.String())
	fmt.Println(f.Match(pkt, &filter.Meta{Outbound: true}))
	fmt.Println(f.Match(pkt, &filter.Meta{Outbound: false}))

	_, err = filter.Compile("not (tcp)", filter.LayerNetwork)
	fmt.Println(err)
	// Output:
	// (outbound and icmp.Type = 8) or tcp
	// true
	// false
	// filter: Filter expression parse error at position 4
}
