package main

import (
	"math"
	"testing"
	"time"
)

func TestSummarize(t *testing.T) {
	var rtts []time.Duration
	for i := 100; i >= 1; i-- { // 1..100 µs, reversed
		rtts = append(rtts, time.Duration(i)*time.Microsecond)
	}
	l := summarize(rtts, 3)
	if l.N != 100 || l.Lost != 3 || l.P50 != 50 || l.P99 != 99 || l.Max != 100 {
		t.Fatalf("summarize = %+v, want N 100 Lost 3 P50 50 P99 99 Max 100", l)
	}
	if e := summarize(nil, 5); e.N != 0 || e.Lost != 5 || !math.IsNaN(float64(e.P50)) {
		t.Fatalf("summarize(nil) = %+v", e)
	}
	one := summarize([]time.Duration{7 * time.Microsecond}, 0)
	if one.P50 != 7 || one.P99 != 7 {
		t.Fatalf("summarize(one) = %+v", one)
	}
}

func TestMedianMinMaxRatio(t *testing.T) {
	nan := math.NaN()
	for _, c := range []struct {
		in   []float64
		want float64
	}{
		{[]float64{3, 1, 2}, 2},
		{[]float64{4, 1, 3, 2}, 2.5},
		{[]float64{nan, 5, nan}, 5},
	} {
		if got := median(c.in); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
	if !math.IsNaN(median([]float64{nan})) {
		t.Error("median of only NaN is not NaN")
	}
	if lo, hi := minMax([]float64{nan, 3, -1, 7}); lo != -1 || hi != 7 {
		t.Errorf("minMax = %v, %v", lo, hi)
	}
	if r := ratio(1, 4); r != 0.25 {
		t.Errorf("ratio(1,4) = %v", r)
	}
	if !math.IsNaN(ratio(1, 0)) || !math.IsNaN(ratio(nan, 1)) {
		t.Error("ratio of unknowns is not NaN")
	}
}
