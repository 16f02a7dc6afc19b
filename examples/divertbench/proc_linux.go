package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// userHZ is the unit of the CPU times in /proc/PID/stat (USER_HZ, 100 on
// every Linux architecture Go supports).
const userHZ = 100

// procCPU returns the CPU time (user+system, all threads, in seconds) the
// process pid has used so far.
func procCPU(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatCPU(b)
}

// parseStatCPU reads utime and stime (fields 14 and 15) of a /proc/PID/stat
// line; the command name in parentheses may contain spaces and ')'.
func parseStatCPU(b []byte) (float64, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("proc stat: no ')' in %q", b)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state), so field n is f[n-3].
	if len(f) < 13 {
		return 0, fmt.Errorf("proc stat: %d fields after the name", len(f))
	}
	u, err1 := strconv.ParseUint(f[11], 10, 64)
	s, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("proc stat: bad utime/stime %q %q", f[11], f[12])
	}
	return float64(u+s) / userHZ, nil
}

// queueStats is the sum over the NFQUEUE queues of a namespace
// (/proc/net/netfilter/nfnetlink_queue).
type queueStats struct {
	Queues  int    // queues bound
	Total   uint64 // packets waiting for a verdict now
	Dropped uint64 // dropped because the queue was full
	UserDrp uint64 // dropped because the netlink socket buffer was full
	IDSeq   uint64 // packets ever queued (each queue's last packet id)
}

// handed is how many packets between s and later reached the consumer.
// The kernel numbers a packet only once it is in the queue (after the
// queue-full check) and before it is sent to the socket, so the id
// sequence counts packets queued, including those then lost at a full
// socket (user_dropped), but not those dropped at a full queue.
func (s queueStats) handed(later queueStats) uint64 {
	if later.IDSeq < s.IDSeq || later.UserDrp < s.UserDrp {
		return 0 // not a later reading of the same queues
	}
	enq := later.IDSeq - s.IDSeq
	lost := later.UserDrp - s.UserDrp
	if lost > enq {
		return 0
	}
	return enq - lost
}

// nfqStats reads the NFQUEUE statistics of the network namespace pid lives
// in. No file (nfnetlink_queue not loaded) means no queues.
func nfqStats(pid int) (queueStats, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/netfilter/nfnetlink_queue", pid))
	if os.IsNotExist(err) {
		return queueStats{}, nil
	}
	if err != nil {
		return queueStats{}, err
	}
	return parseNFQ(b)
}

// parseNFQ parses nfnetlink_queue lines: queue_number peer_portid
// queue_total copy_mode copy_range queue_dropped user_dropped id_sequence 1.
func parseNFQ(b []byte) (queueStats, error) {
	var s queueStats
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		if len(f) < 8 {
			return s, fmt.Errorf("nfnetlink_queue: short line %q", sc.Text())
		}
		var v [8]uint64
		for i := range v {
			x, err := strconv.ParseUint(f[i], 10, 64)
			if err != nil {
				return s, fmt.Errorf("nfnetlink_queue: %q: %w", sc.Text(), err)
			}
			v[i] = x
		}
		s.Queues++
		s.Total += v[2]
		s.Dropped += v[5]
		s.UserDrp += v[6]
		s.IDSeq += v[7]
	}
	return s, sc.Err()
}

// udpRcvbufErrors returns Udp RcvbufErrors + Udp6RcvbufErrors of the
// network namespace pid lives in: datagrams dropped at a full socket buffer.
func udpRcvbufErrors(pid int) (uint64, error) {
	b4, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/snmp", pid))
	if err != nil {
		return 0, err
	}
	b6, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/snmp6", pid))
	if err != nil && !os.IsNotExist(err) {
		return 0, err
	}
	return parseRcvbufErrors(b4, b6)
}

// parseRcvbufErrors finds RcvbufErrors in the header/value line pair of
// "Udp:" in snmp and Udp6RcvbufErrors in snmp6 (name value lines).
func parseRcvbufErrors(snmp, snmp6 []byte) (uint64, error) {
	var total uint64
	var hdr []string
	found := false
	for _, line := range strings.Split(string(snmp), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "Udp:" {
			continue
		}
		if hdr == nil {
			hdr = f
			continue
		}
		for i := 1; i < len(hdr) && i < len(f); i++ {
			if hdr[i] == "RcvbufErrors" {
				v, err := strconv.ParseUint(f[i], 10, 64)
				if err != nil {
					return 0, fmt.Errorf("snmp: RcvbufErrors %q: %w", f[i], err)
				}
				total += v
				found = true
			}
		}
		break
	}
	if !found {
		return 0, fmt.Errorf("snmp: no Udp RcvbufErrors")
	}
	for _, line := range strings.Split(string(snmp6), "\n") {
		f := strings.Fields(line)
		if len(f) == 2 && f[0] == "Udp6RcvbufErrors" {
			v, err := strconv.ParseUint(f[1], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("snmp6: %q: %w", line, err)
			}
			total += v
		}
	}
	return total, nil
}

// busyCores samples /proc/stat over d and returns how many CPUs were busy
// (not idle or iowait) on average.
func busyCores(d time.Duration) (float64, error) {
	a, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	time.Sleep(d)
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	ta, ia, err1 := parseCPULine(a)
	tb, ib, err2 := parseCPULine(b)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	if tb <= ta {
		return 0, nil
	}
	return float64((tb-ta)-(ib-ia)) / float64(tb-ta) * float64(runtime.NumCPU()), nil
}

// parseCPULine returns the total and idle+iowait ticks of the "cpu " line
// of /proc/stat.
func parseCPULine(stat []byte) (total, idle uint64, err error) {
	for _, line := range strings.Split(string(stat), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 || f[0] != "cpu" {
			continue
		}
		for i, s := range f[1:min(len(f), 9)] {
			v, err := strconv.ParseUint(s, 10, 64)
			if err != nil {
				return 0, 0, fmt.Errorf("/proc/stat: %q: %w", line, err)
			}
			total += v
			if i == 3 || i == 4 {
				idle += v
			}
		}
		return total, idle, nil
	}
	return 0, 0, errors.New("/proc/stat: no cpu line")
}
