package reassembly

// Buffer classes. The largest holds any datagram: a 40-byte IPv6 header plus
// a 65535-byte payload, or a 60-byte IPv4 header area plus 65515 bytes of data.
const (
	maxBuf     = 40 + maxDatagram
	numClasses = 6
)

var classSizes = [numClasses]int{2048, 4096, 8192, 16384, 32768, maxBuf}

// classFor returns the smallest class holding n bytes, or -1.
func classFor(n int) int {
	for c, s := range classSizes {
		if n <= s {
			return c
		}
	}
	return -1
}

// getBuf returns a buffer of class c for the pending datagram keep, from the
// pool or newly allocated, keeping held+pooled <= maxBytes: free buffers are
// released first, then the oldest other pending datagrams are evicted. It
// reports false when even that does not make room.
func (r *Reassembler) getBuf(c int, keep int32) ([]byte, bool) {
	size := classSizes[c]
	for {
		if n := len(r.pool[c]); n > 0 {
			b := r.pool[c][n-1]
			r.pool[c][n-1] = nil
			r.pool[c] = r.pool[c][:n-1]
			r.pooled -= size
			r.held += size
			return b, true
		}
		if r.held+r.pooled+size <= r.maxBytes {
			r.held += size
			return make([]byte, size), true
		}
		if r.pooled > 0 {
			r.dropPooled()
			continue
		}
		if !r.evictOldest(keep) {
			return nil, false
		}
	}
}

// putBuf takes back a buffer of class c from a pending datagram.
func (r *Reassembler) putBuf(b []byte, c int8) {
	size := classSizes[c]
	r.held -= size
	r.pooled += size
	r.pool[c] = append(r.pool[c], b[:size])
}

// dropPooled lets the garbage collector have the largest free buffer.
func (r *Reassembler) dropPooled() {
	for c := numClasses - 1; c >= 0; c-- {
		if n := len(r.pool[c]); n > 0 {
			r.pool[c][n-1] = nil
			r.pool[c] = r.pool[c][:n-1]
			r.pooled -= classSizes[c]
			return
		}
	}
}
