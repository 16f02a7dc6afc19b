package nftrules

import (
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// Sharing a network namespace within the process.
//
// Unregistering a netfilter hook (deleting a base chain, or a table with
// base chains) makes the kernel drop every packet queued to any NFQUEUE
// queue of the namespace: __nf_unregister_net_hook calls
// nf_queue_nf_hook_drop, and nfnetlink_queue's nfqnl_nf_hook_drop flushes
// every queue instance there. Deleting rules or non-base chains
// unregisters nothing (__nf_tables_unregister_hook returns at once for a
// chain that is not a base chain).
//
// So a Ruleset does not delete its table while another user of the same
// namespace in this process is open (another Ruleset, or a Member: a
// handle's queue): its Close flushes the table instead, deleting every
// rule and every non-base chain, which leaves its base chains empty with
// policy accept, and parks the table, with the socket that owns it, here.
// An Install in that namespace whose table would have the same family and
// the same base chains (hooks and priorities) takes a parked table over
// instead of registering new hooks. An Install whose batch fails gives
// its table up the same way, parked (emptied again if the kernel applied
// the batch) rather than deleted while another user is open (see
// Ruleset.abandon). When the last user of the namespace
// in the process goes, the parked tables are deleted with it: nobody in
// the process holds a queued packet there any more.
//
// At most maxParked tables stay parked in a namespace: each keeps a socket
// and its empty base chains cost every packet at their hooks a call. Past
// that (a program cycling through priorities or layers while a handle
// stays open), Close deletes the table as it did before.
//
// A namespace is known by the device and inode of its nsfs file; each
// entry keeps a descriptor of that file open, so that the namespace, and
// with it its inode number, stays while the entry lives.

// nsKey identifies a network namespace.
type nsKey struct{ dev, ino uint64 }

// baseChain is a base chain of a table: its hook and nft priority.
type baseChain struct {
	hook Hook
	prio int32
}

// parkedTable is a flushed table whose base chains stay registered.
type parkedTable struct {
	conn   *tableConn // owns the table
	table  string
	family nftables.TableFamily
	bases  []baseChain // sorted
}

// nsEntry is what the process has in one network namespace.
type nsEntry struct {
	fd     int // the namespace's nsfs file, kept open
	users  int // open Rulesets and Members
	parked []*parkedTable
}

var registry struct {
	mu sync.Mutex
	ns map[nsKey]*nsEntry
}

// threadNS opens the network namespace of the calling thread, which the
// caller keeps locked to its goroutine, and returns its key and an open
// descriptor of it.
func threadNS() (nsKey, int, error) {
	fd, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nsKey{}, -1, fmt.Errorf("nftrules: open this thread's network namespace: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nsKey{}, -1, fmt.Errorf("nftrules: stat this thread's network namespace: %w", err)
	}
	return nsKey{dev: st.Dev, ino: st.Ino}, fd, nil
}

// join counts one more user of the calling thread's network namespace,
// which the caller keeps locked to its goroutine. ok is false when the
// namespace cannot be told (no /proc): the caller then shares nothing.
func join() (key nsKey, ok bool) {
	key, fd, err := threadNS()
	if err != nil {
		return nsKey{}, false
	}
	registry.mu.Lock()
	defer registry.mu.Unlock()
	if registry.ns == nil {
		registry.ns = make(map[nsKey]*nsEntry)
	}
	e := registry.ns[key]
	if e == nil {
		registry.ns[key] = &nsEntry{fd: fd, users: 1}
		return key, true
	}
	unix.Close(fd) // the entry's descriptor keeps the namespace
	e.users++
	return key, true
}

// leaveLocked counts one user of the namespace less, with registry.mu
// held. The last one takes the parked tables with it: it returns their
// sockets, which the caller closes (still under registry.mu, so that a
// concurrent join waits until their hooks are gone).
func leaveLocked(key nsKey) []*tableConn {
	e := registry.ns[key]
	if e == nil {
		return nil
	}
	e.users--
	if e.users > 0 {
		return nil
	}
	conns := make([]*tableConn, 0, len(e.parked))
	for _, p := range e.parked {
		conns = append(conns, p.conn)
	}
	unix.Close(e.fd)
	delete(registry.ns, key)
	return conns
}

// maxParked bounds the tables parked in one namespace (a variable for
// tests).
var maxParked = 64

// mayParkLocked reports whether the caller, with registry.mu held, is to
// park its table rather than delete it: the namespace has another user,
// and room for one more parked table.
func mayParkLocked(key nsKey) bool {
	e := registry.ns[key]
	return e != nil && e.users > 1 && len(e.parked) < maxParked
}

// takeParked removes from the registry and returns a parked table of the
// namespace with the given family and base chains, nil if there is none.
func takeParked(key nsKey, family nftables.TableFamily, bases []baseChain) *parkedTable {
	registry.mu.Lock()
	defer registry.mu.Unlock()
	e := registry.ns[key]
	if e == nil {
		return nil
	}
	for i, p := range e.parked {
		if p.family == family && slices.Equal(p.bases, bases) {
			e.parked = slices.Delete(e.parked, i, i+1)
			return p
		}
	}
	return nil
}

// closeConns closes the sockets, deleting the tables they own.
func closeConns(conns []*tableConn) error {
	var errs []error
	for _, c := range conns {
		if err := c.CloseLasting(); err != nil {
			errs = append(errs, fmt.Errorf("nftrules: delete a parked table: %w", err))
		}
	}
	return errors.Join(errs...)
}

// Member counts as a user of a network namespace, so that no Ruleset of
// the process closed in that namespace meanwhile unregisters a netfilter
// hook there (which would make the kernel drop the packets queued to the
// member's queue). A divert handle with a queue is one from its Open to
// its Close.
type Member struct {
	mu   sync.Mutex
	key  nsKey
	live bool
}

// Join makes the caller a Member of the network namespace of the calling
// thread, until Leave. Where the namespace cannot be told (no /proc), the
// Member counts for nothing.
func Join() *Member {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	key, ok := join()
	return &Member{key: key, live: ok}
}

// Leave ends the membership; the last user of the namespace in the
// process deletes the tables parked there. It is idempotent.
func (m *Member) Leave() error {
	m.mu.Lock()
	live := m.live
	m.live = false
	m.mu.Unlock()
	if !live {
		return nil
	}
	registry.mu.Lock()
	defer registry.mu.Unlock()
	return closeConns(leaveLocked(m.key))
}
