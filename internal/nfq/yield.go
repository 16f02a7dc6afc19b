package nfq

import "time"

// The CPU yield of a reader that keeps finding a backlog (see Conn).
const (
	// yieldBacklog is how many datagrams the last read must have taken
	// for the reader to yield before its next wait: one means the reader
	// keeps up packet by packet, and yielding would only delay the next.
	yieldBacklog = 2
	// yieldIdle: a yield shorter than this found nothing else to run on
	// the CPU.
	yieldIdle = int64(1500 * time.Nanosecond)
	// yieldLong: a yield longer than this ran something other than a
	// quick consumer of the reinjected packets, which a reader must not
	// hand its CPU to batch after batch.
	yieldLong = int64(200 * time.Microsecond)
	// yieldHold is how long the reader does not yield after a long yield.
	yieldHold = int64(100 * time.Millisecond)
	// yieldBackMax bounds the back-off after yields that found nothing to
	// run: at most that many yield points are skipped before the next try.
	yieldBackMax = 8
)

// yielder decides when a reader yields its CPU before a wait. It is owned
// by the reader.
type yielder struct {
	skip int   // yield points to let pass
	back int   // the back-off: skip after the next idle yield
	hold int64 // no yield before this time (mono)
}

// due reports whether to yield now; now is the time of the last read
// (Conn.rtime), which is recent enough for the hold.
func (y *yielder) due(now int64) bool {
	if y.skip > 0 {
		y.skip--
		return false
	}
	return now >= y.hold
}

// done records a yield that started at t0 and took d nanoseconds.
func (y *yielder) done(t0, d int64) {
	switch {
	case d < yieldIdle:
		// Nothing else wanted the CPU: try less often.
		y.back = min(2*y.back+1, yieldBackMax)
		y.skip = y.back
	case d > yieldLong:
		y.back = 0
		y.hold = t0 + d + yieldHold
	default:
		// Something ran briefly, such as the consumer of the packets just
		// reinjected: keep yielding while the backlog lasts.
		y.back = 0
	}
}
