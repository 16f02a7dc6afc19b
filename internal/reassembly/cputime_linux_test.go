package reassembly

import (
	"runtime"
	"syscall"
	"testing"
	"time"
)

// threadCPU returns the calling thread's CPU time (user+system). The
// benchmarks lock their goroutine to its thread and report cpu-ns/op, which
// stays meaningful on a loaded machine where wall time does not.
func threadCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(1 /* RUSAGE_THREAD */, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// cpuMeter reports cpu-ns/op for the b.Loop it brackets.
func cpuMeter(b *testing.B) func() {
	runtime.LockOSThread()
	start := threadCPU()
	return func() {
		d := threadCPU() - start
		runtime.UnlockOSThread()
		if b.N > 0 && d > 0 {
			b.ReportMetric(float64(d.Nanoseconds())/float64(b.N), "cpu-ns/op")
		}
	}
}
