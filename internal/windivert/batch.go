package windivert

import "encoding/binary"

// PacketLen returns the length of the first item of a RecvEx buffer, where
// WinDivert packs items back to back without lengths: at the network
// layers an IP datagram (IPv4 total length, or 40 + IPv6 payload length),
// at the reflect layer a NUL-terminated filter object. It returns len(b)
// when the item claims more than b holds (a truncated packet) and 0 when b
// is empty or holds no parsable item.
func PacketLen(b []byte, layer uint8) int {
	n := itemLen(b, layer)
	if n > len(b) {
		return len(b)
	}
	return n
}

// itemLen is PacketLen without the cap: the length the item claims.
func itemLen(b []byte, layer uint8) int {
	if len(b) == 0 {
		return 0
	}
	var n int
	switch layer {
	case LayerReflect:
		for i, c := range b {
			if c == 0 {
				return i + 1
			}
		}
		return len(b) + 1 // unterminated: claims more than b holds
	case LayerNetwork, LayerNetworkForward:
		switch b[0] >> 4 {
		case 4:
			if len(b) < 4 {
				return 20
			}
			n = int(binary.BigEndian.Uint16(b[2:]))
			if n < 20 {
				return 0
			}
		case 6:
			if len(b) < 6 {
				return 40
			}
			n = 40 + int(binary.BigEndian.Uint16(b[4:]))
		default:
			return 0
		}
	default:
		return 0 // FLOW and SOCKET carry no data
	}
	return n
}

// Split cuts the first total bytes of buf into count items and stores each
// item's length in lens (len(lens) >= count). It reports false when the
// bytes do not split into exactly count items.
func Split(buf []byte, total, count int, layer uint8, lens []int) bool {
	if layer == LayerFlow || layer == LayerSocket {
		for i := 0; i < count; i++ {
			lens[i] = 0
		}
		return total == 0
	}
	b := buf[:total]
	for i := 0; i < count; i++ {
		if count == 1 {
			// Only the first item of a batch can be truncated: the driver
			// adds further items only when they fit whole.
			lens[0] = len(b)
			return len(b) > 0
		}
		n := itemLen(b, layer)
		if n == 0 || n > len(b) {
			return false
		}
		lens[i] = n
		b = b[n:]
	}
	return len(b) == 0
}
