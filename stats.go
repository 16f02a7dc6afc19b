package divert

import (
	"bytes"
	"fmt"
)

// Stats are a handle's counters since Open. Every counter only grows. A
// backend counts what it can observe: counters it cannot observe stay 0
// (see each field). On Windows and FreeBSD, whose OS keeps no counters for
// a handle, they are what the handle itself saw and did.
type Stats struct {
	// Received is the number of packets handed to the program by Recv and
	// RecvBatch (a datagram reassembled in user space counts once); 0 for
	// a FlagDrop handle.
	Received uint64
	// Sent is the number of packets Send and SendBatch sent: received
	// packets reinjected plus new packets injected. (On Windows, a batch
	// whose driver call could not inject one of its packets, and says so
	// in SendBatch's error, counts one less.)
	Sent uint64
	// Injected is the part of Sent that were new packets: an Address not
	// taken from Recv on this handle, or already sent or dropped, or a
	// FlagSniff copy's, whose original went on, or one whose Outbound was
	// reversed (an answer to the received packet). (On Windows and FreeBSD a
	// copy of a received Address taken before its Send or Drop names the
	// received packet too: each such copy sent counts as a reinjection, not
	// in Injected.)
	Injected uint64
	// Dropped is the number of Drop calls that dropped a packet the handle
	// held (Drop of a FlagSniff copy or of a new packet drops nothing and
	// is not counted; on Windows and FreeBSD a packet is held from its Recv
	// until its Address is given to Send or Drop, and, as for Injected, a
	// copy of the Address taken before counts as held once more). For a FlagDrop handle on
	// Linux and FreeBSD: the packets its kernel rules could not judge and
	// the filter dropped in user space (what the rules drop themselves is
	// not counted).
	Dropped uint64
	// Expired is the number of queued packets released because they
	// waited ParamQueueTime: held by the program without Send or Drop, or
	// left unread. They are dropped; with FlagSniff the original went on
	// and only the copy is lost. On Linux a datagram reassembled in user
	// space counts once (as in Received), when the first of its fragments
	// goes: one handed over, or one that did not complete in time. On
	// Windows, where WinDivert expires
	// packets without telling: with FlagReassemble, the incomplete
	// datagrams whose fragments waited ParamQueueTime; otherwise 0. 0 on
	// FreeBSD (divert(4) has no queue time). Linux LayerFlow: events
	// that waited ParamQueueTime unread, dropped.
	Expired uint64
	// Passed is the number of packets the OS queued for the handle but
	// that were accepted without the program seeing them: packets the
	// kernel (or ipfw) rules over-approximate and the user-space filter
	// rejected, and on Linux loopback packets seen on the input hook
	// (WinDivert shows loopback outbound only) and the packets an
	// administrator's rule (OpenPort) queued that the handle, or one of
	// its priority or higher, injected. 0 on Windows, where
	// WinDivert evaluates the filter itself. Linux LayerFlow: the
	// events the filter rejected.
	Passed uint64
	// Overflows counts the packets lost to a full receive buffer (Linux:
	// the packets missing from the queue's id sequence among those read,
	// which the kernel could not put in the socket; they were dropped, or
	// went on uncopied with FlagSniff or FlagFailOpen). For a Pipe: packets
	// dropped because the queue was full. FreeBSD: packets the filter did
	// not match that could not be written back (the kernel had no buffer
	// for them). 0 on Windows, which does not tell. Linux LayerFlow: the
	// events lost to a full queue (ParamQueueLength), the times the event
	// socket's buffer overflowed (ENOBUFS: one or more events lost each
	// time, which a dump of conntrack's table then makes up for), and the
	// deletions of established flows the handle forgot, remembering too
	// many, that will not be reported (not when an overflow since the
	// flow was added, counted already and not yet made up for, may have
	// lost its deletion: one loss is counted once).
	Overflows uint64
	// KernelQueueDropped is the kernel's count of packets dropped because
	// the queue was full (Linux: queue_dropped in
	// /proc/net/netfilter/nfnetlink_queue of the handle's namespace; 0
	// where the OS does not tell).
	KernelQueueDropped uint64
	// KernelUserDropped is the kernel's count of packets it failed to
	// deliver to the socket, its receive buffer being full (Linux:
	// user_dropped in /proc/net/netfilter/nfnetlink_queue; 0 where the OS
	// does not tell).
	KernelUserDropped uint64
	// RefusedVerdicts counts the verdicts the kernel refused after Send,
	// SendBatch or Drop had returned (Linux: the packet was no longer
	// queued, as when another program removed a netfilter hook and the
	// kernel dropped every queued packet, and answered ENOENT). On Linux a
	// verdict is a message the kernel answers only on failure, and the
	// answer is read by the next receive call, so the count lags behind the
	// Send, and a batch verdict that covered several packets counts once.
	// 0 on Windows and FreeBSD, where Send reports such a failure itself.
	RefusedVerdicts uint64
}

// statser is implemented by backends that keep Stats.
type statser interface {
	stats() (Stats, error)
}

// Stats returns the handle's counters. It may be called at any time from
// any goroutine, also after Close (then the counters are final and the
// kernel's are as of Close). The error wraps ErrNotSupported for a backend
// that keeps no counters; every backend of this package keeps some.
func (h *Handle) Stats() (Stats, error) {
	s, ok := h.b.(statser)
	if !ok {
		return Stats{}, fmt.Errorf("divert: stats: %w", ErrNotSupported)
	}
	return s.stats()
}

// kernelQueueStats are the counters of one queue in
// /proc/net/netfilter/nfnetlink_queue.
type kernelQueueStats struct {
	total       uint64 // queue_total: packets waiting now
	dropped     uint64 // queue_dropped
	userDropped uint64 // user_dropped
	idSeq       uint32 // id_sequence: the last packet id given out
}

// parseNfqueueProc finds the line of queue in the text of
// /proc/net/netfilter/nfnetlink_queue. Its columns are queue_number
// peer_portid queue_total copy_mode copy_range queue_dropped user_dropped
// id_sequence 1, right-aligned with spaces. It does not allocate.
func parseNfqueueProc(data []byte, queue uint16) (kernelQueueStats, bool) {
	for len(data) > 0 {
		line := data
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			line, data = data[:i], data[i+1:]
		} else {
			data = nil
		}
		var f [9][]byte
		n := 0
		for n < len(f) {
			line = bytes.TrimLeft(line, " \t")
			if len(line) == 0 {
				break
			}
			end := bytes.IndexAny(line, " \t")
			if end < 0 {
				end = len(line)
			}
			f[n], line = line[:end], line[end:]
			n++
		}
		if n < 8 {
			continue
		}
		q, ok := parseDec(f[0], 16)
		if !ok || q != uint64(queue) {
			continue
		}
		var s kernelQueueStats
		var ok1, ok2, ok3, ok4 bool
		s.total, ok1 = parseDec(f[2], 64)
		s.dropped, ok2 = parseDec(f[5], 64)
		s.userDropped, ok3 = parseDec(f[6], 64)
		seq, ok4 := parseDec(f[7], 32)
		s.idSeq = uint32(seq)
		if ok1 && ok2 && ok3 && ok4 {
			return s, true
		}
		return kernelQueueStats{}, false
	}
	return kernelQueueStats{}, false
}

// parseDec parses an unsigned decimal of at most bits bits without
// allocating.
func parseDec(b []byte, bits uint) (uint64, bool) {
	if len(b) == 0 {
		return 0, false
	}
	limit := uint64(1)<<bits - 1
	if bits >= 64 {
		limit = ^uint64(0)
	}
	var v uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		d := uint64(c - '0')
		if v > (limit-d)/10 {
			return 0, false
		}
		v = v*10 + d
	}
	return v, true
}
