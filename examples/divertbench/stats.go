package main

import (
	"math"
	"slices"
	"strconv"
	"time"
)

// Latency summarises round-trip times.
type Latency struct {
	N    int // replies measured
	Lost int // probes without a reply in time
	P50  num // µs
	P99  num // µs
	Max  num // µs
}

// summarize sorts rtts in place and returns its percentiles.
func summarize(rtts []time.Duration, lost int) Latency {
	nan := num(math.NaN())
	l := Latency{N: len(rtts), Lost: lost, P50: nan, P99: nan, Max: nan}
	if len(rtts) == 0 {
		return l
	}
	slices.Sort(rtts)
	l.P50 = us(percentile(rtts, 50))
	l.P99 = us(percentile(rtts, 99))
	l.Max = us(rtts[len(rtts)-1])
	return l
}

// percentile returns the nearest-rank p-th percentile of sorted, which must
// not be empty.
func percentile(sorted []time.Duration, p float64) time.Duration {
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	i = max(0, min(i, len(sorted)-1))
	return sorted[i]
}

func us(d time.Duration) num { return num(float64(d.Nanoseconds()) / 1e3) }

// median returns the median of the non-NaN values of xs, NaN if there are
// none. xs is not modified.
func median(xs []float64) float64 {
	v := make([]float64, 0, len(xs))
	for _, x := range xs {
		if !math.IsNaN(x) {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		return math.NaN()
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

// minMax returns the smallest and largest non-NaN values of xs.
func minMax(xs []float64) (lo, hi float64) {
	lo, hi = math.NaN(), math.NaN()
	for _, x := range xs {
		if math.IsNaN(x) {
			continue
		}
		if math.IsNaN(lo) || x < lo {
			lo = x
		}
		if math.IsNaN(hi) || x > hi {
			hi = x
		}
	}
	return lo, hi
}

// ratio is a/b, NaN when either is unknown or b is zero.
func ratio(a, b float64) float64 {
	if math.IsNaN(a) || math.IsNaN(b) || b == 0 {
		return math.NaN()
	}
	return a / b
}

// num is a float64 that encodes NaN and ±Inf (unknown) as JSON null.
type num float64

// MarshalJSON encodes n, NaN and ±Inf as null.
func (n num) MarshalJSON() ([]byte, error) {
	f := float64(n)
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return []byte("null"), nil
	}
	return strconv.AppendFloat(nil, f, 'g', -1, 64), nil
}

// UnmarshalJSON decodes a number, or null as NaN.
func (n *num) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		*n = num(math.NaN())
		return nil
	}
	f, err := strconv.ParseFloat(string(b), 64)
	if err != nil {
		return err
	}
	*n = num(f)
	return nil
}
