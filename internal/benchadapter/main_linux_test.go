package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/netdivert/divert/filter"
	"github.com/netdivert/divert/internal/netnstest"
	"github.com/netdivert/divert/internal/nftrules"
)

const envMain = "BENCHADAPTER_TEST_MAIN"

// TestMain lets the test binary run as the adapter itself, so the test
// drives the real command (flags, signals, output) inside a namespace.
func TestMain(m *testing.M) {
	if os.Getenv(envMain) != "" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestAdapterContract checks what run.sh relies on: the adapter binds the
// queue in copy-packet mode, reinjects every queued packet unchanged, exits
// within 3 s of SIGTERM and then reports exactly the verdicts it gave.
func TestAdapterContract(t *testing.T) {
	for _, loop := range []string{"batch", "single", "conn", "floor-recv", "floor-mmsg", "floor-poll"} {
		// One P is what the bench gives the adapter (PIN=split pins it to
		// one CPU): the stop must get through a wait that holds the P.
		for _, procs := range []int{1, 2} {
			t.Run(fmt.Sprintf("%s/procs=%d", loop, procs), func(t *testing.T) { testContract(t, loop, procs) })
		}
	}
}

func testContract(t *testing.T, loop string, procs int) {
	netnstest.RequireRoot(t)
	const (
		queue = 7
		port  = 9300
		count = 300
	)
	l := netnstest.Pair(t, "dba", 0)
	tx, rx := l.A.NS, l.B.NS

	// An external rule, as an administrator would set one up for OpenPort:
	// IPv4 UDP to the port goes to the queue.
	f, err := filter.Compile(fmt.Sprintf("udp.DstPort == %d", port), filter.LayerNetwork)
	if err != nil {
		t.Fatal(err)
	}
	var rs *nftrules.Ruleset
	if err := rx.Do(func() error {
		var err error
		rs, err = nftrules.Install(nftrules.Config{
			Hooks: []nftrules.Hook{nftrules.HookInput}, IPv4: true, Lowered: f.Lower(),
			Action: nftrules.ActionQueue, QueueNum: queue, QueueCount: 1,
		})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rs.Close() })

	sink, err := rx.ListenUDP(fmt.Sprintf("%v:%d", l.B.V4, port))
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()

	cmd := exec.Command("ip", "netns", "exec", rx.Name, os.Args[0], "-q", fmt.Sprint(queue), "-t", "60s", "-loop", loop)
	cmd.Env = append(os.Environ(), envMain+"=1", fmt.Sprintf("GOMAXPROCS=%d", procs))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})

	// run.sh waits for the queue to show up in copy-packet mode (2).
	bound := false
	for i := 0; i < 250 && !bound; i++ {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/net/netfilter/nfnetlink_queue", cmd.Process.Pid))
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) >= 4 && f[0] == fmt.Sprint(queue) && f[3] == "2" {
				bound = true
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !bound {
		t.Fatalf("queue %d not bound in copy-packet mode; stderr: %s", queue, stderr.String())
	}

	payload := []byte("benchadapter contract test payload")
	type recvResult struct {
		got [][]byte
		err error
	}
	rc := make(chan recvResult, 1)
	go func() {
		got, err := netnstest.RecvUDP(sink, count, 5*time.Second)
		rc <- recvResult{got, err}
	}()
	// A small gap keeps the sink's socket buffer from overflowing: loss
	// there would not be the adapter's.
	if err := tx.SendUDP(netip.AddrPortFrom(l.B.V4, port), payload, count, 100*time.Microsecond); err != nil {
		t.Fatal(err)
	}
	r := <-rc
	if r.err != nil {
		t.Fatal(r.err)
	}
	got := r.got
	if len(got) != count {
		t.Errorf("sink got %d of %d datagrams through the adapter", len(got), count)
	}
	for i, d := range got {
		if !bytes.Equal(d, payload) {
			t.Fatalf("datagram %d changed: %q", i, d)
		}
	}

	start := time.Now()
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		exited <- err // for the cleanup
		if err != nil {
			t.Fatalf("adapter failed: %v; stderr: %s", err, stderr.String())
		}
	case <-time.After(3 * time.Second):
		t.Fatal("adapter still running 3 s after SIGTERM")
	}
	t.Logf("exited %v after SIGTERM", time.Since(start).Round(time.Millisecond))
	var verdicts int
	found := false
	sc := bufio.NewScanner(&stdout)
	for sc.Scan() {
		if _, err := fmt.Sscanf(sc.Text(), "daemon_verdicts=%d", &verdicts); err == nil {
			found = true
		}
	}
	if !found {
		t.Fatalf("no daemon_verdicts line in %q", stdout.String())
	}
	if verdicts != count {
		t.Errorf("daemon_verdicts=%d, want %d (one per queued packet)", verdicts, count)
	}
}
