package nftrules

import (
	"testing"

	"golang.org/x/sys/unix"
)

func TestQueueFlagsFanout(t *testing.T) {
	for _, c := range []struct {
		cfg  Config
		want uint16
	}{
		{Config{QueueCount: 1}, 0},
		{Config{QueueCount: 1, FlowBalance: true}, 0},
		{Config{QueueCount: 4}, unix.NFT_QUEUE_FLAG_CPU_FANOUT},
		{Config{QueueCount: 4, FlowBalance: true}, 0},
		{Config{QueueCount: 4, FlowBalance: true, Bypass: true}, unix.NFT_QUEUE_FLAG_BYPASS},
		{Config{QueueCount: 2, Bypass: true}, unix.NFT_QUEUE_FLAG_BYPASS | unix.NFT_QUEUE_FLAG_CPU_FANOUT},
	} {
		if got := queueFlags(&c.cfg); got != c.want {
			t.Errorf("queueFlags(count %d, flow %v, bypass %v) = %#x, want %#x", c.cfg.QueueCount, c.cfg.FlowBalance, c.cfg.Bypass, got, c.want)
		}
	}
}
