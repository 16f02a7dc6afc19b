package main

import (
	"fmt"
	"io"
	"strings"
	"time"
)

// histBounds are the upper bounds of the latency histogram's buckets; the
// last bucket holds everything above the last bound.
var histBounds = [...]time.Duration{
	100 * time.Microsecond, 500 * time.Microsecond,
	time.Millisecond, 2 * time.Millisecond, 5 * time.Millisecond,
	10 * time.Millisecond, 20 * time.Millisecond, 50 * time.Millisecond,
	100 * time.Millisecond, 200 * time.Millisecond, 500 * time.Millisecond,
	time.Second, 2 * time.Second, 5 * time.Second, 10 * time.Second,
}

// histogram counts how long packets were held, from receive to send.
type histogram struct {
	buckets  [len(histBounds) + 1]uint64
	n        uint64
	sum      time.Duration
	min, max time.Duration
}

func (h *histogram) add(d time.Duration) {
	i := 0
	for i < len(histBounds) && d > histBounds[i] {
		i++
	}
	h.buckets[i]++
	if h.n == 0 || d < h.min {
		h.min = d
	}
	h.max = max(h.max, d)
	h.n++
	h.sum += d
}

// quantile returns the upper bound of the bucket holding quantile q.
func (h *histogram) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(q*float64(h.n-1)) + 1
	var acc uint64
	for i, c := range h.buckets {
		acc += c
		if acc >= rank {
			if i < len(histBounds) {
				return min(histBounds[i], h.max)
			}
			return h.max
		}
	}
	return h.max
}

// Bucket is one bar of the latency histogram in the -json output.
type Bucket struct {
	UpTo    string `json:"up_to"` // upper bound, "inf" for the last
	Packets uint64 `json:"packets"`
}

// Summary is the final statistics (-json prints it).
type Summary struct {
	Packets     uint64   `json:"packets"`
	Bytes       uint64   `json:"bytes"`
	In          uint64   `json:"in"`
	Out         uint64   `json:"out"`
	Sent        uint64   `json:"sent"`
	Dropped     uint64   `json:"dropped"`      // by -loss
	QueueDrops  uint64   `json:"queue_drops"`  // queue full or rate limit past the queue time
	Delayed     uint64   `json:"delayed"`      // held before sending
	Duplicated  uint64   `json:"duplicated"`   // extra copies injected
	Reordered   uint64   `json:"reordered"`    // held back by -reorder-gap
	RateLimited uint64   `json:"rate_limited"` // held by the rate limit
	Tampered    uint64   `json:"tampered"`
	SendErrors  uint64   `json:"send_errors"`
	Seconds     float64  `json:"seconds"`
	LatencyMin  float64  `json:"latency_min_ms"`
	LatencyAvg  float64  `json:"latency_avg_ms"`
	LatencyP50  float64  `json:"latency_p50_ms"` // bucket upper bound
	LatencyP99  float64  `json:"latency_p99_ms"` // bucket upper bound
	LatencyMax  float64  `json:"latency_max_ms"`
	Histogram   []Bucket `json:"histogram"`
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func (e *emulator) summary() Summary {
	e.mu.Lock()
	h := e.hist
	e.mu.Unlock()
	c := &e.cnt
	s := Summary{
		Packets: c.packets.Load(), Bytes: c.bytes.Load(), In: c.in.Load(), Out: c.out.Load(),
		Sent: c.sent.Load(), Dropped: c.dropped.Load(), QueueDrops: c.queueDrops.Load(),
		Delayed: c.delayed.Load(), Duplicated: c.duplicated.Load(), Reordered: c.reordered.Load(),
		RateLimited: c.rateLimited.Load(), Tampered: c.tampered.Load(), SendErrors: c.sendErrors.Load(),
		Seconds: time.Since(e.start).Seconds(),
	}
	if h.n > 0 {
		s.LatencyMin, s.LatencyMax = ms(h.min), ms(h.max)
		s.LatencyAvg = ms(h.sum / time.Duration(h.n))
		s.LatencyP50, s.LatencyP99 = ms(h.quantile(0.5)), ms(h.quantile(0.99))
	}
	for i, n := range h.buckets {
		b := Bucket{UpTo: "inf", Packets: n}
		if i < len(histBounds) {
			b.UpTo = histBounds[i].String()
		}
		s.Histogram = append(s.Histogram, b)
	}
	return s
}

// print writes the report with the histogram drawn as bars.
func (s *Summary) print(w io.Writer) {
	fmt.Fprintf(w, "\n%d packets (%d in, %d out), %d bytes in %.1fs: %d sent, %d dropped (loss), %d dropped (queue), %d delayed, %d duplicated, %d reordered, %d rate-limited, %d tampered, %d send errors\n",
		s.Packets, s.In, s.Out, s.Bytes, s.Seconds, s.Sent, s.Dropped, s.QueueDrops, s.Delayed,
		s.Duplicated, s.Reordered, s.RateLimited, s.Tampered, s.SendErrors)
	if s.Sent == 0 {
		return
	}
	fmt.Fprintf(w, "hold time: min %.3f ms, avg %.3f ms, p50 <= %.3f ms, p99 <= %.3f ms, max %.3f ms\n",
		s.LatencyMin, s.LatencyAvg, s.LatencyP50, s.LatencyP99, s.LatencyMax)
	// Draw from the first to the last non-empty bucket.
	first, last := -1, -1
	var most uint64
	for i, b := range s.Histogram {
		if b.Packets > 0 {
			if first < 0 {
				first = i
			}
			last = i
			most = max(most, b.Packets)
		}
	}
	const width = 50
	for i := first; i <= last && first >= 0; i++ {
		b := s.Histogram[i]
		label := "<= " + b.UpTo
		if b.UpTo == "inf" {
			label = "> " + s.Histogram[i-1].UpTo
		}
		bar := int((b.Packets*width + most - 1) / most)
		fmt.Fprintf(w, "%10s |%-*s %d\n", label, width, strings.Repeat("█", bar), b.Packets)
	}
}
