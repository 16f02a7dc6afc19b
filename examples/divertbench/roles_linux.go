package main

// The child processes of a run. Each runs inside a namespace (started with
// `ip netns exec`), reads its config from the environment, prints "ready"
// once it is set up, and prints one JSON result line when it ends.

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/netdivert/divert"
)

const (
	envRole   = "DIVERTBENCH_ROLE"
	envConfig = "DIVERTBENCH_CONFIG"

	magic     = 0x44564231 // "DVB1": the sink counts only datagrams carrying it
	hdrLen    = 16         // magic(4) run(4) seq(8)
	hardCap   = 120 * time.Second
	probeWait = 200 * time.Millisecond // how long a probe reply may take
)

// childConfig is what the parent hands a child (JSON in envConfig).
type childConfig struct {
	Run     uint32        // run id written into every datagram
	Dst     netip.Addr    // receiver address (gen)
	Port    uint16        // bulk UDP port
	Probe   uint16        // echo port
	Size    int           // UDP payload bytes
	Dur     time.Duration // blast or probe duration (gen), lifetime cap (sink, consumer)
	Batch   int           // datagrams per sendmmsg (gen) / messages per RecvBatch (consumer)
	PPS     float64       // gen offered rate, 0 = flat out
	Pings   int           // gen -ping: sequential round trips
	ProbeHz float64       // gen probe: echo probes per second
	Max     int64         // gen: hard cap on datagrams

	Loop       string // consumer: "recv" (Recv→Send) or "batch" (RecvBatch→SendBatch)
	Filter     string // consumer filter
	QLen       uint64 // consumer ParamQueueLength
	QSize      uint64 // consumer ParamQueueSize
	QTime      uint64 // consumer ParamQueueTime (ms)
	CPUProfile string // consumer: pprof CPU profile path
	Kind       string // gen: "blast", "ping" (sequential round trips) or "probe" (round trips at ProbeHz for Dur)
}

// genResult is the generator's output.
type genResult struct {
	Sent, Errs int64
	Elapsed    float64 // s
	CPU        float64 // s, user+sys
	RTT        Latency
}

// sinkResult is the sink's output.
type sinkResult struct {
	Recv, Other, Echoed int64
}

// consumerResult is the consumer's output.
type consumerResult struct {
	Verdicts uint64
	Err      string
}

// childMain runs the child role named by envRole and returns the exit code.
func childMain(role string) int {
	var cfg childConfig
	if err := json.Unmarshal([]byte(os.Getenv(envConfig)), &cfg); err != nil {
		fmt.Fprintf(os.Stderr, "divertbench %s: config: %v\n", role, err)
		return 2
	}
	if cfg.Dur <= 0 || cfg.Dur > hardCap {
		cfg.Dur = hardCap
	}
	// The roles are pinned to one CPU; more than one P lets a goroutine
	// woken by the network (echo, probe replies) run at once instead of
	// waiting for a busy loop to be preempted.
	runtime.GOMAXPROCS(max(4, runtime.GOMAXPROCS(0)))
	var res any
	var err error
	switch role {
	case "gen":
		res, err = genMain(&cfg)
	case "sink":
		res, err = sinkMain(&cfg)
	case "consumer":
		res, err = consumerMain(&cfg)
	default:
		err = fmt.Errorf("unknown role %q", role)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "divertbench %s: %v\n", role, err)
		return 1
	}
	b, _ := json.Marshal(res)
	fmt.Printf("%s\n", b)
	return 0
}

func ready() { fmt.Println("ready") }

// stopSignal returns a channel closed on SIGTERM/SIGINT or after d.
func stopSignal(d time.Duration) <-chan struct{} {
	c := make(chan struct{})
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		select {
		case <-sig:
		case <-time.After(d):
		}
		close(c)
	}()
	return c
}

// ---------------------------------------------------------------- generator

// checkDst refuses any destination outside 10.0.0.0/8 and fd00::/8, and any
// run in the initial network namespace: the generator only ever sends inside
// namespaces the bench made.
func checkDst(dst netip.Addr) error {
	dst = dst.Unmap()
	if !(dst.Is4() && dst.As4()[0] == 10) && !(dst.Is6() && dst.As16()[0] == 0xfd) {
		return fmt.Errorf("refusing to send to %v: not in 10.0.0.0/8 or fd00::/8", dst)
	}
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		return err
	}
	if init, err := os.Readlink("/proc/1/ns/net"); err == nil && init == self {
		return errors.New("refusing to send from the initial network namespace")
	}
	return nil
}

func genMain(cfg *childConfig) (*genResult, error) {
	if err := checkDst(cfg.Dst); err != nil {
		return nil, err
	}
	if cfg.Size < hdrLen {
		cfg.Size = hdrLen
	}
	switch cfg.Kind {
	case "blast":
		return blast(cfg)
	case "ping":
		ready()
		return pingSeq(cfg)
	case "probe":
		if cfg.ProbeHz <= 0 {
			return nil, errors.New("probe needs a rate")
		}
		ready()
		return &genResult{RTT: probeLoaded(cfg, stopSignal(cfg.Dur))}, nil
	}
	return nil, fmt.Errorf("unknown generator kind %q", cfg.Kind)
}

func sockaddr(a netip.Addr, port uint16) (unix.Sockaddr, int) {
	if a.Unmap().Is4() {
		return &unix.SockaddrInet4{Addr: a.Unmap().As4(), Port: int(port)}, unix.AF_INET
	}
	return &unix.SockaddrInet6{Addr: a.As16(), Port: int(port)}, unix.AF_INET6
}

// mmsghdr is struct mmsghdr; Go pads it like C does.
type mmsghdr struct {
	hdr unix.Msghdr
	n   uint32
}

func blast(cfg *childConfig) (*genResult, error) {
	sa, fam := sockaddr(cfg.Dst, cfg.Port)
	fd, err := unix.Socket(fam, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, sa); err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	batch := max(1, min(cfg.Batch, 1024))
	bufs := make([][]byte, batch)
	iovs := make([]unix.Iovec, batch)
	hdrs := make([]mmsghdr, batch)
	for i := range hdrs {
		bufs[i] = make([]byte, cfg.Size)
		binary.BigEndian.PutUint32(bufs[i][0:], magic)
		binary.BigEndian.PutUint32(bufs[i][4:], cfg.Run)
		iovs[i].Base = &bufs[i][0]
		iovs[i].SetLen(cfg.Size)
		hdrs[i].hdr.Iov = &iovs[i]
		hdrs[i].hdr.SetIovlen(1)
	}
	maxPk := cfg.Max
	if maxPk <= 0 {
		maxPk = 100_000_000
	}

	ready()
	var ru0, ru1 unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru0)
	start := time.Now()
	deadline := start.Add(cfg.Dur)
	var res genResult
	var seq uint64
	for iter := 0; res.Sent < maxPk; iter++ {
		if iter&15 == 0 && !time.Now().Before(deadline) {
			break
		}
		if cfg.PPS > 0 {
			due := start.Add(time.Duration(float64(res.Sent) / cfg.PPS * 1e9))
			if !due.Before(deadline) {
				break
			}
			if d := time.Until(due); d > 0 {
				time.Sleep(d)
			}
		}
		k := int(min(int64(batch), maxPk-res.Sent))
		for i := 0; i < k; i++ {
			binary.BigEndian.PutUint64(bufs[i][8:], seq+uint64(i))
		}
		n, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&hdrs[0])), uintptr(k), 0, 0, 0)
		if errno != 0 {
			res.Errs++
			if res.Errs > 1_000_000 {
				return nil, fmt.Errorf("sendmmsg: %w (%d errors)", errno, res.Errs)
			}
			continue
		}
		res.Sent += int64(n)
		seq += uint64(n)
	}
	res.Elapsed = time.Since(start).Seconds()
	unix.Getrusage(unix.RUSAGE_SELF, &ru1)
	res.CPU = tv(ru1.Utime) + tv(ru1.Stime) - tv(ru0.Utime) - tv(ru0.Stime)
	return &res, nil
}

func tv(t unix.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }

func dialProbe(cfg *childConfig) (*net.UDPConn, error) {
	return net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(cfg.Dst, cfg.Probe)))
}

// pingSeq measures cfg.Pings sequential round trips (one in flight) after a
// few unmeasured warm-up ones, bounded by cfg.Dur.
func pingSeq(cfg *childConfig) (*genResult, error) {
	c, err := dialProbe(cfg)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	const warm = 20
	out := make([]byte, cfg.Size)
	in := make([]byte, 2048)
	binary.BigEndian.PutUint32(out, magic)
	binary.BigEndian.PutUint32(out[4:], cfg.Run)
	rtts := make([]time.Duration, 0, cfg.Pings)
	lost := 0
	deadline := time.Now().Add(cfg.Dur)
	for i := 0; i < warm+cfg.Pings && time.Now().Before(deadline); i++ {
		binary.BigEndian.PutUint64(out[8:], uint64(i))
		t0 := time.Now()
		if _, err := c.Write(out); err != nil {
			lost++
			continue
		}
		c.SetReadDeadline(t0.Add(probeWait))
		got := false
		for {
			m, err := c.Read(in)
			if err != nil {
				break
			}
			if m >= hdrLen && binary.BigEndian.Uint64(in[8:]) == uint64(i) {
				got = true
				break
			}
		}
		rtt := time.Since(t0)
		if i < warm {
			continue
		}
		if got {
			rtts = append(rtts, rtt)
		} else {
			lost++
		}
	}
	return &genResult{RTT: summarize(rtts, lost)}, nil
}

// probeLoaded sends echo probes at cfg.ProbeHz until stop, then waits
// probeWait for the last replies.
func probeLoaded(cfg *childConfig, stop <-chan struct{}) Latency {
	c, err := dialProbe(cfg)
	if err != nil {
		return Latency{}
	}
	defer c.Close()
	maxN := int(cfg.ProbeHz*cfg.Dur.Seconds()) + 2
	sentAt := make([]int64, maxN) // unix ns, 0 = not sent
	rtts := make([]time.Duration, 0, maxN)
	var mu sync.Mutex
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		in := make([]byte, 2048)
		for {
			m, err := c.Read(in)
			if err != nil {
				return // closed or deadline after stop
			}
			now := time.Now().UnixNano()
			if m < hdrLen || binary.BigEndian.Uint32(in) != magic {
				continue
			}
			seq := binary.BigEndian.Uint64(in[8:])
			mu.Lock()
			if seq < uint64(len(sentAt)) && sentAt[seq] != 0 {
				if d := time.Duration(now - sentAt[seq]); d <= probeWait {
					rtts = append(rtts, d)
				}
				sentAt[seq] = 0
			}
			mu.Unlock()
		}
	}()
	out := make([]byte, cfg.Size)
	binary.BigEndian.PutUint32(out, magic)
	binary.BigEndian.PutUint32(out[4:], cfg.Run)
	tick := time.NewTicker(time.Duration(float64(time.Second) / cfg.ProbeHz))
	defer tick.Stop()
	sent := 0
loop:
	for sent < maxN {
		select {
		case <-stop:
			break loop
		case <-tick.C:
		}
		binary.BigEndian.PutUint64(out[8:], uint64(sent))
		mu.Lock()
		sentAt[sent] = time.Now().UnixNano()
		mu.Unlock()
		if _, err := c.Write(out); err != nil {
			mu.Lock()
			sentAt[sent] = 0
			mu.Unlock()
			continue
		}
		sent++
	}
	c.SetReadDeadline(time.Now().Add(probeWait))
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	return summarize(rtts, sent-len(rtts))
}

// ---------------------------------------------------------------- sink

func sinkMain(cfg *childConfig) (*sinkResult, error) {
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	// Dual-stack socket; a 4 MiB buffer so the sink is not where packets go.
	unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0)
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4<<20)
	tv := unix.NsecToTimeval((50 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return nil, fmt.Errorf("SO_RCVTIMEO: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet6{Port: int(cfg.Port)}); err != nil {
		return nil, fmt.Errorf("bind :%d: %w", cfg.Port, err)
	}
	echo, err := net.ListenUDP("udp", &net.UDPAddr{Port: int(cfg.Probe)})
	if err != nil {
		return nil, err
	}
	defer echo.Close()
	var res sinkResult
	var echoed atomic.Int64
	go func() {
		b := make([]byte, 2048)
		for {
			n, from, err := echo.ReadFromUDPAddrPort(b)
			if err != nil {
				return
			}
			if _, err := echo.WriteToUDPAddrPort(b[:n], from); err == nil {
				echoed.Add(1)
			}
		}
	}()

	const batch = 64
	bufs := make([][]byte, batch)
	iovs := make([]unix.Iovec, batch)
	hdrs := make([]mmsghdr, batch)
	for i := range hdrs {
		bufs[i] = make([]byte, 2048)
		iovs[i].Base = &bufs[i][0]
		iovs[i].SetLen(len(bufs[i]))
		hdrs[i].hdr.Iov = &iovs[i]
		hdrs[i].hdr.SetIovlen(1)
	}
	stop := stopSignal(cfg.Dur)
	ready()
	var stopAt time.Time
	for {
		select {
		case <-stop:
			if stopAt.IsZero() {
				stopAt = time.Now()
			}
		default:
		}
		if !stopAt.IsZero() && time.Since(stopAt) > time.Second {
			break // still busy 1 s after the stop: stop draining
		}
		n, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, uintptr(fd), uintptr(unsafe.Pointer(&hdrs[0])), batch, unix.MSG_WAITFORONE, 0, 0)
		if errno != 0 {
			if errno == unix.EAGAIN && !stopAt.IsZero() {
				break // drained
			}
			if errno == unix.EAGAIN || errno == unix.EINTR {
				continue
			}
			return nil, fmt.Errorf("recvmmsg: %w", errno)
		}
		for i := 0; i < int(n); i++ {
			b := bufs[i][:hdrs[i].n]
			if len(b) >= hdrLen && binary.BigEndian.Uint32(b) == magic && binary.BigEndian.Uint32(b[4:]) == cfg.Run {
				res.Recv++
			} else {
				res.Other++
			}
		}
	}
	res.Echoed = echoed.Load()
	return &res, nil
}

// ---------------------------------------------------------------- consumer

// consumerMain opens a divert handle with cfg.Filter and reinjects every
// packet unchanged until SIGTERM, with the loop named by cfg.Loop.
func consumerMain(cfg *childConfig) (*consumerResult, error) {
	h, err := divert.Open(cfg.Filter, divert.LayerNetwork, 0, 0)
	if err != nil {
		return nil, fmt.Errorf("open %q: %w", cfg.Filter, err)
	}
	defer h.Close()
	if cfg.QLen != 0 {
		if err := h.SetParam(divert.ParamQueueLength, cfg.QLen); err != nil {
			return nil, err
		}
	}
	if cfg.QSize != 0 {
		if err := h.SetParam(divert.ParamQueueSize, cfg.QSize); err != nil {
			return nil, err
		}
	}
	if cfg.QTime != 0 {
		if err := h.SetParam(divert.ParamQueueTime, cfg.QTime); err != nil {
			return nil, err
		}
	}
	if cfg.CPUProfile != "" {
		f, err := os.Create(cfg.CPUProfile)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return nil, err
		}
		defer pprof.StopCPUProfile()
	}
	stop := stopSignal(cfg.Dur)
	var stopping atomic.Bool
	go func() {
		<-stop
		stopping.Store(true)
		h.SetReadDeadline(time.Unix(1, 0)) // unblocks Recv with os.ErrDeadlineExceeded
	}()
	ready()
	var res consumerResult
	var lerr error
	switch cfg.Loop {
	case "recv":
		res.Verdicts, lerr = recvLoop(h, &stopping)
	case "batch":
		res.Verdicts, lerr = batchLoop(h, max(1, min(cfg.Batch, divert.BatchMax)), &stopping)
	default:
		lerr = fmt.Errorf("unknown loop %q", cfg.Loop)
	}
	if lerr != nil {
		res.Err = lerr.Error()
	}
	return &res, nil
}

func stopped(err error, stopping *atomic.Bool) bool {
	return stopping.Load() && (errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, net.ErrClosed))
}

// recvLoop is the package documentation's classic loop.
func recvLoop(h *divert.Handle, stopping *atomic.Bool) (uint64, error) {
	buf := make([]byte, divert.MTUMax)
	var addr divert.Address
	var v uint64
	for {
		n, err := h.Recv(buf, &addr)
		if err != nil {
			if stopped(err, stopping) {
				return v, nil
			}
			return v, fmt.Errorf("Recv: %w", err)
		}
		if _, err := h.Send(buf[:n], &addr); err != nil {
			return v, fmt.Errorf("Send: %w", err)
		}
		v++
	}
}

// batchLoop is the batch loop: RecvBatch, then SendBatch of the same
// messages, unchanged.
func batchLoop(h *divert.Handle, batch int, stopping *atomic.Bool) (uint64, error) {
	ms := make([]divert.Message, batch)
	for i := range ms {
		ms[i].Buf = make([]byte, divert.MTUMax)
	}
	var v uint64
	for {
		n, err := h.RecvBatch(ms)
		if errors.Is(err, divert.ErrTruncated) {
			return v, fmt.Errorf("RecvBatch: %w", err) // never echo a cut packet
		}
		if n > 0 {
			sent, serr := h.SendBatch(ms[:n])
			v += uint64(sent)
			if serr != nil {
				return v, fmt.Errorf("SendBatch: %w", serr)
			}
		}
		if err != nil {
			if stopped(err, stopping) {
				return v, nil
			}
			return v, fmt.Errorf("RecvBatch: %w", err)
		}
	}
}
