package netcap

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"
)

// Over reports whether the caller has CAP_NET_ADMIN over the network
// namespace of socket fd, as nfnetlink requires of a request's sender
// (netlink_net_capable: ns_capable(net->user_ns, CAP_NET_ADMIN)).
//
// The kernel is asked: the SIOCGSKNS ioctl, which opens the socket's
// namespace, requires just that capability (net/socket.c) and fails with
// EPERM without it. The effective capability set alone cannot tell: a
// process with every capability in a user namespace of its own (a
// rootless container, unshare --user --map-root-user) has CAP_NET_ADMIN
// there but not over a network namespace another user namespace owns.
// Where the ioctl cannot answer (a kernel before 4.9, or without network
// namespaces), Effective decides.
func Over(fd int) bool {
	nsfd, err := unix.IoctlRetInt(fd, unix.SIOCGSKNS)
	switch {
	case err == nil:
		unix.Close(nsfd)
		return true
	case errors.Is(err, unix.EPERM):
		return false
	}
	return Effective()
}

// Effective reports whether the calling thread's effective capability set
// holds CAP_NET_ADMIN (root's does, unless dropped).
func Effective() bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return os.Geteuid() == 0
	}
	return data[0].Effective&(1<<unix.CAP_NET_ADMIN) != 0
}
