package nfq

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/netdivert/divert/internal/netnstest"
)

// childEnv makes the test binary the child of TestBindNoPermissionUserNS.
const childEnv = "NFQ_TEST_CHILD"

// TestMain lets the test binary act as the child of the permission test.
func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "userns" {
		os.Exit(m.Run())
	}
	// In a user namespace of its own: every capability there, none over
	// the network namespace, which the parent's user namespace owns.
	for _, auto := range []bool{true, false} {
		start := time.Now()
		c, err := Open(Config{Queue: 100, Auto: auto})
		if err == nil {
			c.Close()
		}
		fmt.Printf("auto=%v perm=%v busy=%v took=%v err=%v\n", auto, errors.Is(err, os.ErrPermission), errors.Is(err, ErrQueueBusy), time.Since(start).Round(time.Millisecond), err)
	}
	os.Exit(0)
}

// TestBindNoPermissionUserNS: a process with every capability in a user
// namespace of its own (a rootless container) but none over the network
// namespace is refused NFQUEUE with EPERM, as one without the capability
// is. Its Open must say so (os.ErrPermission), not take the refusal for a
// queue another socket holds (EPERM too, for a privileged caller): that
// made a fixed queue read as busy, and an automatic one try every number
// up to 65535 before it failed with ErrQueueBusy.
func TestBindNoPermissionUserNS(t *testing.T) {
	netnstest.RequireRoot(t)
	ns := netnstest.NewT(t, "nqus")
	s := netnstest.UserNSChild(t, ns, childEnv+"=userns")
	t.Logf("child:\n%s", s)
	for _, auto := range []string{"auto=true", "auto=false"} {
		line := ""
		for _, l := range strings.Split(s, "\n") {
			if strings.HasPrefix(l, auto+" ") {
				line = l
			}
		}
		if !strings.Contains(line, "perm=true") || !strings.Contains(line, "busy=false") || !strings.Contains(line, "CAP_NET_ADMIN") {
			t.Errorf("%s: want a permission error that names CAP_NET_ADMIN, not a busy queue: %q", auto, line)
		}
	}
}
