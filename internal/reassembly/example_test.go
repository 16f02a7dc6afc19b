package reassembly_test

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/netdivert/divert/internal/reassembly"
)

// A backend with FlagReassemble hands Recv whole datagrams, and refragments
// them the way they came when they are sent back.
func Example() {
	// A 3000-byte IPv4 UDP datagram from 10.0.0.1 to 10.0.0.2.
	dgram := make([]byte, 3000)
	dgram[0] = 0x45
	binary.BigEndian.PutUint16(dgram[2:4], 3000)
	binary.BigEndian.PutUint16(dgram[4:6], 0x1234)
	dgram[8], dgram[9] = 64, 17
	copy(dgram[12:20], []byte{10, 0, 0, 1, 10, 0, 0, 2})
	frags, _ := reassembly.Fragment(nil, nil, dgram, 1500, 0) // fixes the header checksums too

	r := reassembly.New(reassembly.Config{})
	buf := make([]byte, 0, 65535)
	var info reassembly.Info
	for i := len(frags) - 1; i >= 0; i-- { // any order
		whole, done, err := r.AddInfo(buf, frags[i], time.Now(), &info)
		if err != nil {
			fmt.Println("refused:", err)
			return
		}
		if done {
			fmt.Println("datagram of", len(whole), "bytes from", info.Fragments, "fragments of at most", info.MaxFragLen)
			again, _ := reassembly.Fragment(nil, nil, whole, info.MaxFragLen, info.ID)
			fmt.Println("sent back as", len(again), "fragments")
		}
	}
	// Output:
	// datagram of 3000 bytes from 3 fragments of at most 1500
	// sent back as 3 fragments
}
