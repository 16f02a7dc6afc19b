package main

import (
	"fmt"
	"sync/atomic"

	"github.com/netdivert/divert/internal/nfq"
)

// connLoop is the floor under the batch loop: the queue socket layer alone
// (internal/nfq), without a Handle. It decodes each packet in place and
// accepts everything a read brought with one batch verdict: no copy into
// a caller's buffer, no Address, no exactly-one-verdict tracking, no
// change detection. What the batch loop costs beyond it is the Handle's.
type connLoop struct {
	*nfq.Conn
}

// openConnLoop binds queue as the Handle of the other loops would: copy
// the whole packet, no fail-open.
func openConnLoop(queue uint16, qlen, rcvbuf uint64) (*connLoop, error) {
	c, err := nfq.Open(nfq.Config{Queue: queue, MaxLen: uint32(qlen), RcvBuf: int(rcvbuf)})
	if err != nil {
		return nil, err
	}
	return &connLoop{c}, nil
}

// run reinjects every packet until the stop.
func (c *connLoop) run(stopping *atomic.Bool) (verdicts, batches uint64, err error) {
	var p nfq.Packet
	msg := make([]byte, 0, 64)
	for {
		if err := c.Next(&p, true); err != nil {
			if stopErr(err, stopping) {
				return verdicts, batches, nil
			}
			return verdicts, batches, fmt.Errorf("Next: %w", err)
		}
		last, n := p.ID, uint64(1)
		var nerr error
		for nerr == nil && c.Buffered() {
			if nerr = c.Next(&p, false); nerr == nil {
				last = p.ID
				n++
			}
		}
		msg = nfq.AppendVerdictBatch(msg[:0], c.Queue(), last, nfq.Accept)
		if err := c.Send(msg); err != nil {
			if stopErr(err, stopping) {
				return verdicts, batches, nil
			}
			return verdicts, batches, fmt.Errorf("Send: %w", err)
		}
		verdicts += n
		batches++
		if nerr != nil && nerr != nfq.ErrNoData {
			return verdicts, batches, fmt.Errorf("Next: %w", nerr)
		}
	}
}
