package netcap

import (
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// TestRootOver: root in the initial user namespace has CAP_NET_ADMIN over
// its network namespace, by the ioctl and by the capability set. (The
// other answer, a user namespace's root over a namespace it does not own,
// is internal/nfq's TestBindNoPermissionUserNS.)
func TestRootOver(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (CI runs as root)")
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if !Over(fd) {
		t.Error("Over: false for root")
	}
	if !Effective() {
		t.Error("Effective: false for root")
	}
}

// TestDroppedEffective: a thread whose effective set lacks CAP_NET_ADMIN
// is told so by Effective.
func TestDroppedEffective(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (CI runs as root)")
	}
	done := make(chan bool)
	go func() {
		// A thread of its own, never given back to the runtime: the
		// capability sets are per thread.
		runtime.LockOSThread()
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if err := unix.Capget(&hdr, &data[0]); err != nil {
			t.Error(err)
			done <- true
			return
		}
		data[0].Effective &^= 1 << unix.CAP_NET_ADMIN
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			t.Error(err)
			done <- true
			return
		}
		done <- Effective()
	}()
	if <-done {
		t.Error("Effective: true with CAP_NET_ADMIN dropped from the effective set")
	}
}
