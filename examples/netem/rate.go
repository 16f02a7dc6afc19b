package main

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// parseRate parses a rate as tc(8) writes it and returns bytes per second:
// a number with the unit bit, kbit, mbit, gbit (bits per second; a bare
// number is bits per second too) or B, kB, MB, GB (bytes per second);
// decimal multiples, "bps" is bytes per second as in tc. Empty means no
// limit (0).
func parseRate(s string) (float64, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, nil
	}
	i := 0
	for i < len(s) && (s[i] >= '0' && s[i] <= '9' || s[i] == '.') {
		i++
	}
	v, err := strconv.ParseFloat(s[:i], 64)
	if err != nil || v <= 0 {
		return 0, fmt.Errorf("rate %q: want a positive number with a unit such as 512kbit or 2MB", s)
	}
	unit := strings.TrimSuffix(strings.TrimSpace(s[i:]), "/s")
	var bits float64
	switch unit {
	case "", "bit":
		bits = 1
	case "kbit", "Kbit":
		bits = 1e3
	case "mbit", "Mbit":
		bits = 1e6
	case "gbit", "Gbit":
		bits = 1e9
	case "B", "bps":
		bits = 8
	case "kB", "KB", "kbps":
		bits = 8e3
	case "MB", "mbps":
		bits = 8e6
	case "GB", "gbps":
		bits = 8e9
	default:
		return 0, fmt.Errorf("rate %q: unknown unit %q (bit, kbit, mbit, gbit, B, kB, MB, GB)", s, unit)
	}
	r := v * bits / 8
	if math.IsInf(r, 0) || math.IsNaN(r) {
		return 0, fmt.Errorf("rate %q is out of range", s)
	}
	return r, nil
}

// bucket is a token bucket in its virtual-scheduling form (GCRA): a packet
// of n bytes ready at time t leaves at the returned time; the bucket holds
// up to burst bytes of credit and refills at rate bytes per second.
type bucket struct {
	rate  float64 // bytes per second; 0 = unlimited
	burst time.Duration
	tat   time.Time // theoretical arrival time of the next packet
}

func newBucket(rate float64, burst int) bucket {
	b := bucket{rate: rate}
	if rate > 0 {
		b.burst = time.Duration(float64(burst) / rate * float64(time.Second))
	}
	return b
}

// depart returns when a packet of n bytes ready at t may leave, and charges
// the bucket for it.
func (b *bucket) depart(t time.Time, n int) time.Time {
	if b.rate <= 0 {
		return t
	}
	if b.tat.Before(t) {
		b.tat = t
	}
	leave := t
	if wait := b.tat.Sub(t); wait > b.burst {
		leave = b.tat.Add(-b.burst)
	}
	b.tat = b.tat.Add(time.Duration(float64(n) / b.rate * float64(time.Second)))
	return leave
}
