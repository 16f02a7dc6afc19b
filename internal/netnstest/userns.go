//go:build linux

package netnstest

import (
	"context"
	"os"
	"os/exec"
	"testing"
	"time"
)

// UserNSChild runs the test binary again, selecting no test, with env
// (KEY=value) added to its environment, inside ns and under unshare
// --user --map-root-user: as root of a user namespace of its own, with
// every capability there and none over ns, which the host's user namespace
// owns (as in a rootless container). The test's TestMain acts on env. It
// returns what the child printed, and fails t when unshare(1) is missing
// or the child does not exit 0 within a minute.
func UserNSChild(t testing.TB, ns *NS, env string) string {
	t.Helper()
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Fatalf("netnstest: unshare(1) (util-linux) is needed: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns.Name, "unshare", "--user", "--map-root-user", os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), env)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("netnstest: child in a user namespace: %v: %s", err, out)
	}
	return string(out)
}
