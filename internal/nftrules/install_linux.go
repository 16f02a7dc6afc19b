package nftrules

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/internal/netcap"
)

// Ruleset is an installed table. Its rules live as long as the Ruleset's
// netlink socket: Close, or the death of the process, removes them (see
// share_linux.go for when Close keeps the emptied table).
type Ruleset struct {
	table  string
	family nftables.TableFamily
	exact  bool
	native bool
	ns     nsKey       // the table's network namespace
	shared bool        // ns is known: the table counts as a user of it (share_linux.go)
	bases  []baseChain // the base chains, sorted
	chains []string    // the non-base chains

	mu   sync.Mutex
	conn *tableConn // nil once closed
}

// tableConn is the lasting socket that owns a table, and google/nftables'
// Conn, which builds the batches sent on it.
//
// The Conn is a field, not embedded, and tableConn wraps only the methods
// that queue messages (AddChain, AddRule, DelChain, FlushTable): a batch
// is sent with flush, never with the Conn's own Flush, which would skip
// what flush does after a failed batch (drain the answers it left unread,
// report the ones missing); and none of the Conn's other methods, which
// send on their own (the List and Get ones) or must not be used for an
// owned table (AddTable: it would ask to clear the owner flag), can be
// called on a tableConn.
//
// The Conn does not own the socket: it is built on exchange (through
// google/nftables' only seam for a netlink transport, WithTestDial), so
// that its Flush sends on the socket and reads the answers without ever
// waiting. Conn.Flush reads one answer for each message of the batch,
// but the kernel answers some batches with a single error: when one of
// its messages fails with ENOMEM, or memory for an answer cannot be had
// (nfnetlink_rcv_batch drops the answers it has and acks the batch's
// header with ENOMEM alone), or nf_tables is missing (EOPNOTSUPP); and a
// malformed batch with none. Read as from a socket of its own, an answer
// the kernel never sends would be waited for forever (with registry.mu
// held when the batch parks a table). The kernel handles a batch, answers
// included, within the sendmsg that carries it, so an answer not queued
// when Flush reads it never comes: exchange reports it missing
// (errNoAnswer) instead.
type tableConn struct {
	nft  *nftables.Conn // builds the batches; only flush sends them
	sock *netlink.Conn  // owns the table; nil once closed
	// dirty: draining failed, so answers to an earlier batch may be
	// unread; flush sends no batch on the socket again.
	dirty bool
	// The last batch's: how many messages it had, the error sending it,
	// and how many answers Flush found missing.
	sent    int
	sendErr error
	missing int
}

// errNoAnswer is what Flush reads where the kernel sent no answer.
var errNoAnswer = errors.New("nftrules: the kernel sent no answer for a message of the batch")

// newTableConn makes the tableConn of the lasting socket sock.
func newTableConn(sock *netlink.Conn) (*tableConn, error) {
	c := &tableConn{sock: sock}
	conn, err := nftables.New(nftables.WithTestDial(c.exchange))
	if err != nil {
		return nil, err
	}
	c.nft = conn
	return c, nil
}

// AddChain queues the creation of a chain in c's batch.
func (c *tableConn) AddChain(ch *nftables.Chain) *nftables.Chain { return c.nft.AddChain(ch) }

// AddRule queues the addition of a rule in c's batch.
func (c *tableConn) AddRule(r *nftables.Rule) *nftables.Rule { return c.nft.AddRule(r) }

// DelChain queues the deletion of a chain in c's batch.
func (c *tableConn) DelChain(ch *nftables.Chain) { c.nft.DelChain(ch) }

// FlushTable queues, in c's batch, the deletion of every rule of a table
// (nft's "flush table"; it sends nothing: flush does).
func (c *tableConn) FlushTable(t *nftables.Table) { c.nft.FlushTable(t) }

// exchange is the transport of c's Conn: a request (a batch, from Flush)
// is sent on the lasting socket; an empty one (Flush reading an answer)
// reads the next datagram queued there, without waiting.
func (c *tableConn) exchange(req []netlink.Message) ([]netlink.Message, error) {
	if c.sock == nil {
		return nil, errors.New("nftrules: the table's socket is closed")
	}
	if len(req) > 0 {
		for i := range req {
			req[i].Header.PID = 0 // the socket's own, as the kernel answers it
			if t := req[i].Header.Type; t != unix.NFNL_MSG_BATCH_BEGIN && t != unix.NFNL_MSG_BATCH_END {
				c.sent++
			}
		}
		if _, err := c.sock.SendMessages(req); err != nil {
			c.sendErr = err
			return nil, err
		}
		return nil, nil
	}
	msgs, err := c.receiveQueued()
	if errors.Is(err, unix.EAGAIN) {
		c.missing++
		return nil, errNoAnswer
	}
	return msgs, err
}

// receiveQueued reads the next datagram queued on c's socket, whole, and
// fails with EAGAIN when there is none.
func (c *tableConn) receiveQueued() ([]netlink.Message, error) {
	raw, err := c.sock.SyscallConn()
	if err != nil {
		return nil, err
	}
	var b []byte
	var rerr error
	cerr := raw.Control(func(fd uintptr) {
		for {
			// The length of the next datagram (MSG_TRUNC), then the datagram.
			n, _, err := unix.Recvfrom(int(fd), nil, unix.MSG_PEEK|unix.MSG_TRUNC|unix.MSG_DONTWAIT)
			if err == nil {
				b = make([]byte, n)
				n, _, err = unix.Recvfrom(int(fd), b, unix.MSG_DONTWAIT)
				b = b[:min(n, len(b))]
			}
			if err != unix.EINTR {
				rerr = err
				return
			}
		}
	})
	if cerr != nil {
		return nil, cerr
	}
	if rerr != nil {
		return nil, os.NewSyscallError("recvfrom", rerr)
	}
	var msgs []netlink.Message
	for len(b) >= unix.NLMSG_HDRLEN {
		l := int(binary.NativeEndian.Uint32(b))
		al := (l + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1)
		if l < unix.NLMSG_HDRLEN || l > len(b) {
			return nil, errors.New("nftrules: a malformed answer from the kernel")
		}
		var m netlink.Message
		if err := m.UnmarshalBinary(b[:min(al, len(b))]); err != nil {
			return nil, err
		}
		msgs = append(msgs, m)
		b = b[min(al, len(b)):]
	}
	return msgs, nil
}

// CloseLasting closes the socket, deleting the table it owns.
func (c *tableConn) CloseLasting() error {
	s := c.sock
	if s == nil {
		return nil
	}
	c.sock = nil
	return s.Close()
}

// flush sends the batch queued on c and reads the kernel's answers with
// Conn.Flush, and leaves no answer unread when that fails.
//
// Conn.Flush returns at the first EPERM or ENOBUFS without reading the
// answers to the batch's later messages (an EPERM for one message does
// not stop the kernel from answering the batch's later ones; ENOBUFS says
// some answers were lost, while others may still be queued). Left on the
// lasting socket, those answers would be read by the next batch's Flush,
// a parked table's next Install or Close among them, as answers to its
// own messages: a batch the kernel refused could pass for applied. Every
// answer there is has been queued once Flush returns (see tableConn), and
// flush discards them all.
func (c *tableConn) flush() error {
	if c.dirty {
		return errors.New("nftrules: the table's socket may hold answers to an earlier batch")
	}
	if c.sock == nil {
		return errors.New("nftrules: the table's socket is closed")
	}
	c.sent, c.sendErr, c.missing = 0, nil, 0
	err := c.nft.Flush()
	if err == nil {
		return nil
	}
	switch {
	case c.sendErr != nil:
		err = fmt.Errorf("send the batch: %w", c.sendErr)
	case c.missing > 0:
		err = c.unanswered(err)
	}
	if derr := c.drain(); derr != nil {
		c.dirty = true
		return fmt.Errorf("%w (and draining its answers: %w)", err, derr)
	}
	return err
}

// unanswered rewrites err, Conn.Flush's for a batch some of whose
// answers were missing, as the errors the kernel answered (without the
// errNoAnswer each missing answer adds) and how many were missing.
func (c *tableConn) unanswered(err error) error {
	var kept []error
	var walk func(error)
	walk = func(e error) {
		if j, ok := e.(interface{ Unwrap() []error }); ok { // errors.Join, nested
			for _, e := range j.Unwrap() {
				walk(e)
			}
			return
		}
		if !errors.Is(e, errNoAnswer) {
			kept = append(kept, e)
		}
	}
	if u := errors.Unwrap(err); u != nil {
		if _, ok := u.(interface{ Unwrap() []error }); ok {
			err = u // Flush's "conn.Receive: %w" of the joined errors
		}
	}
	walk(err)
	if len(kept) == 0 {
		kept = append(kept, errNoAnswer)
	}
	return fmt.Errorf("%w (%d of the batch's %d messages unanswered)", errors.Join(kept...), c.missing, c.sent)
}

// maxDrain bounds the datagrams drain discards: far more than the answers
// to any batch of ours (one or two a message).
const maxDrain = 1 << 20

// drain discards every datagram queued on c's socket, without waiting.
func (c *tableConn) drain() error {
	raw, err := c.sock.SyscallConn()
	if err != nil {
		return err
	}
	derr := fmt.Errorf("nftrules: more than %d answers queued", maxDrain)
	cerr := raw.Control(func(fd uintptr) {
		var b [64]byte // MSG_TRUNC: the rest of a longer datagram goes too
		for range maxDrain {
			_, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_DONTWAIT|unix.MSG_TRUNC)
			switch err {
			case nil, unix.EINTR, unix.ENOBUFS: // ENOBUFS: the overflow, reported once
			case unix.EAGAIN:
				derr = nil
				return
			default:
				derr = err
				return
			}
		}
	})
	if cerr != nil {
		return cerr
	}
	return derr
}

// tableSeq numbers the tables the process names (see openFresh).
var tableSeq atomic.Uint32

// maxNameTries bounds the names openFresh tries for one table (a variable
// for tests).
var maxNameTries = 64

// openFresh creates, as openOwned does, an owned table of the family with
// a name the process has not used before, prefix_<pid>_<n>, and returns
// the name.
//
// The name may still be taken: a process of another PID namespace that
// shares the network namespace (another container of a pod, both PID 1)
// makes the same names, and nf_tables refuses a NEWTABLE naming a table
// another socket owns with EPERM, whatever the caller's capabilities
// (see mapTableErr). A table of the name that nobody owns (one an
// administrator made with nft) is refused too, with EEXIST. Either refusal
// makes openFresh try the next name, maxNameTries names at most; when
// every one is refused, the error names the last and wraps the last
// refusal (ErrTableOwned and os.ErrPermission, or EEXIST). Any other error
// ends the tries.
func openFresh(prefix string, family nftables.TableFamily) (string, *tableConn, error) {
	for try := 1; ; try++ {
		name := fmt.Sprintf("%s_%d_%d", prefix, os.Getpid(), tableSeq.Add(1))
		c, err := openOwned(name, family)
		switch {
		case err == nil:
			return name, c, nil
		case !errors.Is(err, ErrTableOwned) && !errors.Is(err, unix.EEXIST):
			return "", nil, err
		case try >= maxNameTries:
			return "", nil, fmt.Errorf("nftrules: %d table names tried, each taken; the last: %w", try, err)
		}
	}
}

// Install creates an owned table with the rules cfg describes, in the
// network namespace of the calling thread. A table of the same family and
// base chains that a Close parked in that namespace (see share_linux.go)
// is taken over instead of a new one, so that no hook is registered.
//
// The new table is named divert_<pid>_<n>. A process with the same PID
// in another PID namespace sharing the network namespace makes the same
// names; when one is taken (a table another netlink socket owns, or one
// an administrator made), which nf_tables refuses to create again,
// Install retries with the next name (see openFresh), as the probe for
// the native queue expression does.
//
// Errors wrap os.ErrPermission when the caller lacks CAP_NET_ADMIN, or
// when every name tried was that of a table another netlink socket owns
// (then also ErrTableOwned), and ErrUnsupported when the kernel lacks
// nf_tables, table ownership or NFQUEUE.
func Install(cfg Config) (*Ruleset, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	// The namespace is told, and the table's socket opened, on one thread.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var native bool
	if cfg.Action == ActionQueue || cfg.UnclearQueue {
		var err error
		if native, err = nativeQueue(); errors.Is(err, ErrTableOwned) {
			// Not an answer: the xt target, chosen instead, may be
			// missing where the native expression is not.
			return nil, fmt.Errorf("nftrules: probe for the native queue expression: %w", err)
		}
	}
	r := &Ruleset{family: cfg.family(), native: native, bases: cfg.bases()}
	return r.install(func(reused bool) (bool, error) { return r.program(&cfg, reused) })
}

// install takes over a parked table of r's family and base chains, or
// creates a new one, and programs it with prog, which adds the base
// chains unless reused and reports whether the rules are exact. It is
// called with the OS thread locked. A failed prog gives the table up (see
// abandon).
func (r *Ruleset) install(prog func(reused bool) (bool, error)) (*Ruleset, error) {
	r.ns, r.shared = join()
	var reused bool
	if r.shared {
		if p := takeParked(r.ns, r.family, r.bases); p != nil {
			r.table, r.conn, reused = p.table, p.conn, true
		}
	}
	if r.conn == nil {
		name, conn, err := openFresh("divert", r.family)
		if err != nil {
			r.leave(nil)
			return nil, err
		}
		r.table, r.conn = name, conn
	}
	exact, err := prog(reused)
	if err != nil {
		r.abandon()
		return nil, err
	}
	r.exact = exact
	return r, nil
}

// abandon gives up the table of an Install whose batch failed, and counts
// the Ruleset out of its namespace. The batch is atomic, but whether the
// kernel applied it is unknown when its answer could not be read, so the
// table is asked for: deleting base chains, a parked table's or those the
// batch added, would make the kernel drop every packet queued in the
// namespace (see share_linux.go). So, as Close does, the table is parked
// (emptied first if the batch was applied) while another user of the
// namespace in the process is open; else, or when it cannot be brought
// back to its base chains alone, or its socket no longer works, it is
// deleted. A new table the batch left
// without chains is deleted: that unregisters nothing.
func (r *Ruleset) abandon() {
	c := r.conn
	r.conn = nil
	if !r.shared {
		_ = closeConns([]*tableConn{c})
		return
	}
	registry.mu.Lock()
	defer registry.mu.Unlock()
	_ = r.closeLocked(c, r.reempty)
}

// reempty brings the table owned by c, which a failed batch may have
// changed or not, back to its base chains alone, empty, and reports
// whether it is so, as the kernel lists it, and c still works. A table
// without any chain (new, the batch not applied) is left as it is, and
// reported false.
func (r *Ruleset) reempty(c *tableConn) bool {
	parked, some := r.isParked()
	switch {
	case !some:
		return false
	case parked:
		// The batch was not applied, maybe not even sent: google/nftables
		// keeps a serialization error on c and returns it from every
		// later Flush, so a batch that empties the empty table says
		// whether c is any use to the Install that takes it over.
		c.FlushTable(&nftables.Table{Name: r.table, Family: r.family})
		return c.flush() == nil
	}
	if r.park(c) != nil {
		return false
	}
	parked, _ = r.isParked()
	return parked
}

// isParked reports whether the table has exactly its base chains, without
// rules (parked), and whether it has any chain at all, asking the kernel
// on sockets of their own (the table's may hold a failed batch's
// unread answers when draining them failed; see tableConn.flush). An
// answer that cannot be had counts as not parked.
func (r *Ruleset) isParked() (parked, some bool) {
	lc, err := nftables.New()
	if err != nil {
		return false, true
	}
	chains, err := lc.ListChainsOfTableFamily(r.family)
	if err != nil {
		return false, true
	}
	t := &nftables.Table{Name: r.table, Family: r.family}
	var names []string
	for _, ch := range chains {
		if ch.Table != nil && ch.Table.Name == r.table {
			names = append(names, ch.Name)
		}
	}
	if len(names) != len(r.bases) {
		return false, len(names) > 0
	}
	for _, b := range r.bases {
		if !slices.Contains(names, b.hook.String()) {
			return false, true
		}
		rules, err := lc.GetRules(t, &nftables.Chain{Name: b.hook.String(), Table: t})
		if err != nil || len(rules) != 0 {
			return false, true
		}
	}
	return true, true
}

// bases returns the base chains of cfg's table, sorted.
func (c *Config) bases() []baseChain {
	out := make([]baseChain, 0, len(c.Hooks))
	for _, h := range c.Hooks {
		out = append(out, baseChain{hook: h, prio: ChainPriority(h, c.Priority)})
	}
	slices.SortFunc(out, func(a, b baseChain) int { return int(a.hook) - int(b.hook) })
	return out
}

// leave deletes the table owned by conn (if not nil) and counts the
// Ruleset out of its namespace.
func (r *Ruleset) leave(conn *tableConn) error {
	var conns []*tableConn
	if conn != nil {
		conns = append(conns, conn)
	}
	if !r.shared {
		return closeConns(conns)
	}
	registry.mu.Lock()
	defer registry.mu.Unlock()
	return closeConns(append(conns, leaveLocked(r.ns)...))
}

// openOwned opens a lasting nftables netlink socket and creates the table
// name of the given family on it with NFT_TABLE_F_OWNER.
//
// google/nftables v0.3.0 always sends table flags 0, so the table is created
// with one raw NEWTABLE batch on the socket; chains and rules then travel
// over the same socket with the library's API (see tableConn). AddTable
// must never be called for this table (it would ask to clear OWNER).
func openOwned(name string, family nftables.TableFamily) (*tableConn, error) {
	// As nftables.New(AsLasting()) would: a socket in the calling thread's
	// network namespace.
	sock, err := dialNetfilter()
	if err != nil {
		return nil, mapErr("open an nftables netlink socket", err)
	}
	growBuffers(sock)
	attrs, err := netlink.MarshalAttributes([]netlink.Attribute{
		{Type: unix.NFTA_TABLE_NAME, Data: append([]byte(name), 0)},
		{Type: unix.NFTA_TABLE_FLAGS, Data: binary.BigEndian.AppendUint32(nil, nftTableFOwner)},
	})
	if err != nil {
		sock.Close()
		return nil, err
	}
	batchHdr := []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, unix.NFNL_SUBSYS_NFTABLES}
	msgs := []netlink.Message{
		{Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_MSG_BATCH_BEGIN), Flags: netlink.Request}, Data: batchHdr},
		{
			Header: netlink.Header{
				Type:  netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWTABLE),
				Flags: netlink.Request | netlink.Acknowledge | netlink.Create | netlink.Excl,
			},
			Data: append([]byte{byte(family), unix.NFNETLINK_V0, 0, 0}, attrs...),
		},
		{Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_MSG_BATCH_END), Flags: netlink.Request}, Data: batchHdr},
	}
	// One message, one answer: its ack, or the error the kernel answers
	// the whole batch with.
	if _, err := sock.SendMessages(msgs); err != nil {
		err = mapTableErr("create table "+name, name, sock, err)
		sock.Close()
		return nil, err
	}
	// The kernel answers within the sendmsg; the deadline only keeps Open
	// from waiting forever should no answer ever come.
	if err := sock.SetReadDeadline(time.Now().Add(ackTimeout)); err != nil {
		sock.Close()
		return nil, fmt.Errorf("nftrules: create table %s: set a deadline for the answer: %w", name, err)
	}
	if _, err := sock.Receive(); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			err = fmt.Errorf("nftrules: create table %s: the kernel sent no answer within %v: %w", name, ackTimeout, err)
		} else {
			err = mapTableErr("create table "+name, name, sock, err)
		}
		sock.Close()
		return nil, err
	}
	if err := sock.SetReadDeadline(time.Time{}); err != nil {
		sock.Close()
		return nil, fmt.Errorf("nftrules: create table %s: clear the answer's deadline: %w", name, err)
	}
	c, err := newTableConn(sock)
	if err != nil {
		sock.Close()
		return nil, err
	}
	return c, nil
}

// dialNetfilter opens a netlink socket of nfnetlink in the calling
// thread's network namespace (a variable for tests: one that never
// answers).
var dialNetfilter = func() (*netlink.Conn, error) {
	return netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{})
}

// ackTimeout bounds openOwned's wait for the answer to its NEWTABLE (a
// variable for tests). The kernel queues it before the sendmsg returns;
// the bound only turns an answer that never comes into an error instead
// of an Open that waits forever.
var ackTimeout = 5 * time.Second

// batchBuf is the send and receive buffer of the rule socket. The rules go
// in one batch, one sendmsg bounded by the send buffer, and the kernel
// echoes every rule added (google/nftables asks it to) into the receive
// buffer before the library reads any: with the default buffers (208 KiB
// at most without privilege) a filter of some 40 rules failed with
// ENOBUFS, and a larger one with EMSGSIZE.
const batchBuf = 8 << 20

// growBuffers raises the socket's buffers to batchBuf, past the sysctl
// limits with CAP_NET_ADMIN (which installing rules needs anyway), else as
// far as they allow. Buffers are allocated as used, not up front.
func growBuffers(c *netlink.Conn) {
	raw, err := c.SyscallConn()
	if err != nil {
		return
	}
	_ = raw.Control(func(fd uintptr) {
		for _, o := range [][2]int{{unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}, {unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}} {
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o[0], batchBuf) != nil {
				_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o[1], batchBuf)
			}
		}
	})
}

// family is the table's family: ip6 when the rules can match only IPv6, so
// that IPv4 packets never traverse the table; inet otherwise. An IPv4-only
// table stays inet: nft (1.0.x) aborts listing our IPv4 fragment test in
// an ip table (payload_expr_complete assertion), and an administrator's
// `nft list ruleset` must keep working while a handle is open.
func (c *Config) family() nftables.TableFamily {
	if c.IPv6 && !c.IPv4 {
		return nftables.TableFamilyIPv6
	}
	return nftables.TableFamilyINet
}

// program adds the chains and rules in one batch and reports whether they
// are exact.
//
// The filter comes first: each term of the lowered filter is one rule of
// the base chain that jumps to a chain of its own, which accepts the
// packets the handle must skip (its own and higher-priority handles'
// injections, neighbour discovery, the fragments or destinations cfg
// leaves out), returns on the term's guards, and queues or drops what is
// left. A packet the filter does not match, the bulk of the traffic under
// a narrow filter, costs only the filter's own expressions.
//
// With reused, the table is a parked one (see share_linux.go): its base
// chains are there already, empty, and only the rules and the other
// chains are added.
func (r *Ruleset) program(cfg *Config, reused bool) (bool, error) {
	t := &nftables.Table{Name: r.table, Family: r.family}
	// addSub adds a non-base chain, which parking deletes.
	addSub := func(name string) *nftables.Chain {
		r.chains = append(r.chains, name)
		return r.conn.AddChain(&nftables.Chain{Name: name, Table: t})
	}
	exact := true
	var action, queue []expr.Any
	switch {
	case r.native:
		queue = []expr.Any{queueExpr(cfg)}
	default:
		queue = []expr.Any{queueTarget(cfg)}
	}
	action = queue
	if cfg.Action == ActionDrop {
		action = []expr.Any{&expr.Verdict{Kind: expr.VerdictDrop}}
	}
	var fam []expr.Any
	if r.family == nftables.TableFamilyINet {
		switch {
		case cfg.IPv4 && !cfg.IPv6:
			fam = isV4
		case cfg.IPv6 && !cfg.IPv4:
			fam = isV6
		}
	}
	for _, h := range cfg.Hooks {
		// With QueueFragments, the fragments go to a chain that queues
		// them past the filter (its skips: Dest's and the marks).
		var frags *nftables.Chain
		if cfg.QueueFragments && (cfg.IPv4 || cfg.IPv6) {
			frags = addSub(h.String() + "_frag")
			for _, sk := range append(destSkips(cfg), markSkip(cfg.Priority)) {
				r.conn.AddRule(&nftables.Rule{Table: t, Chain: frags, Exprs: sk})
			}
			r.conn.AddRule(&nftables.Rule{Table: t, Chain: frags, Exprs: queue})
		}
		// The skips all accept (or hand a fragment to frags), so their
		// order changes only what a packet costs. The selection's come
		// first: in a fragments-only rule set, which sees every packet and
		// selects few, they let most packets go.
		skips := append(selectSkips(cfg, frags), markSkip(cfg.Priority))
		if cfg.KeepNDP && cfg.IPv6 {
			skips = append(skips, ndpKeep())
		}
		l := lowerer{hook: h}
		d := l.lower(cfg.Lowered)
		if l.inexact {
			exact = false
		}
		base := r.baseChain(t, h, cfg.Priority, reused)
		if !cfg.IPv4 && !cfg.IPv6 {
			continue
		}
		// actionChain makes a chain that applies the skips, then the
		// guards (a match returns), then the action.
		actionChain := func(name string, guards [][]expr.Any, act []expr.Any) *nftables.Chain {
			c := addSub(name)
			for _, sk := range skips {
				r.conn.AddRule(&nftables.Rule{Table: t, Chain: c, Exprs: sk})
			}
			for _, g := range guards {
				r.conn.AddRule(&nftables.Rule{Table: t, Chain: c, Exprs: concat(g, []expr.Any{&expr.Verdict{Kind: expr.VerdictReturn}})})
			}
			r.conn.AddRule(&nftables.Rule{Table: t, Chain: c, Exprs: act})
			return c
		}
		// IPv6 packets whose headers the kernel walks otherwise than
		// WinDivert go to user space, which decides (see v6Unclear): one
		// rule in the base chain, which IPv4 leaves at once. Queueing
		// rules have it after the terms (a packet they take is queued
		// anyway); drop rules before them, so that they never judge such a
		// packet.
		unclear := cfg.IPv6 && !(len(d) == 1 && len(d[0].exprs) == 0 && len(d[0].guards) == 0) &&
			(cfg.Action == ActionQueue || cfg.UnclearQueue)
		addUnclear := func() {
			sub := actionChain(h.String()+"_v6q", nil, queue)
			v6 := addSub(h.String() + "_v6")
			for _, p := range v6Plain() {
				r.conn.AddRule(&nftables.Rule{Table: t, Chain: v6, Exprs: concat(p,
					[]expr.Any{&expr.Verdict{Kind: expr.VerdictReturn}})})
			}
			if frags != nil {
				// Past the plain packets: no Fragment header to walk for.
				r.conn.AddRule(&nftables.Rule{Table: t, Chain: v6, Exprs: concat(v6HasFrag,
					[]expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: frags.Name}})})
			}
			for _, u := range v6Unclear() {
				r.conn.AddRule(&nftables.Rule{Table: t, Chain: v6, Exprs: concat(u,
					[]expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: sub.Name}})})
			}
			// A transport header the kernel can load: back to the base
			// chain. None: the kernel could not walk the headers.
			r.conn.AddRule(&nftables.Rule{Table: t, Chain: v6, Exprs: concat(v6NoTransport(),
				[]expr.Any{&expr.Verdict{Kind: expr.VerdictReturn}})})
			r.conn.AddRule(&nftables.Rule{Table: t, Chain: v6, Exprs: []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: sub.Name}}})
			r.conn.AddRule(&nftables.Rule{Table: t, Chain: base, Exprs: concat(isV6,
				[]expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: v6.Name}})})
		}
		if unclear && cfg.Action == ActionDrop {
			addUnclear()
		}
		for i, c := range d {
			sub := actionChain(fmt.Sprintf("%s_%d", h, i), c.guards, action)
			r.conn.AddRule(&nftables.Rule{Table: t, Chain: base, Exprs: concat(fam, c.exprs,
				[]expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: sub.Name}})})
		}
		// The fragments the terms did not take. IPv6 ones are found in the
		// unclear chain, after its plain packets (with a filter matching
		// everything there is none, and the terms take them all). IPv4 ones
		// reach every hook but input.
		if frags != nil && cfg.IPv4 && h != HookInput {
			r.conn.AddRule(&nftables.Rule{Table: t, Chain: base, Exprs: concat(v4Frag,
				[]expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: frags.Name}})})
		}
		if unclear && cfg.Action == ActionQueue {
			addUnclear()
		}
	}
	if testBatch != nil {
		testBatch(r.conn.nft, t)
	}
	if err := r.conn.flush(); err != nil {
		return false, mapTableErr("add chains and rules to "+r.table, r.table, r.conn.sock, err)
	}
	if testFlushErr != nil {
		return false, mapTableErr("add chains and rules to "+r.table, r.table, r.conn.sock, testFlushErr)
	}
	return exact, nil
}

// baseChain returns the base chain of table t at hook h for a handle of
// WinDivert priority p, adding it to the batch unless reused (a parked
// table has it already). Its policy is accept.
func (r *Ruleset) baseChain(t *nftables.Table, h Hook, p int16, reused bool) *nftables.Chain {
	if reused {
		return &nftables.Chain{Name: h.String(), Table: t}
	}
	accept := nftables.ChainPolicyAccept
	return r.conn.AddChain(&nftables.Chain{
		Name:     h.String(),
		Table:    t,
		Type:     nftables.ChainTypeFilter,
		Hooknum:  hookNum(h),
		Priority: nftables.ChainPriorityRef(nftables.ChainPriority(ChainPriority(h, p))),
		Policy:   &accept,
	})
}

// Test seams of program: testBatch adds to the batch before it is sent
// (a broken message makes the kernel refuse it), and testFlushErr is
// returned after the batch was applied (an answer that could not be
// read).
var (
	testBatch    func(b batchBuilder, t *nftables.Table)
	testFlushErr error
)

// batchBuilder is what testBatch adds to the batch with: the methods of
// google/nftables' Conn that only queue messages, no Flush.
type batchBuilder interface {
	AddChain(*nftables.Chain) *nftables.Chain
	AddRule(*nftables.Rule) *nftables.Rule
	AddSet(*nftables.Set, []nftables.SetElement) error
}

// selectSkips returns the rules that accept, before a selected packet is
// queued, the packets cfg.Fragments and cfg.Dest exclude. Fragments that
// FragNone excludes jump to frags instead when it is not nil.
func selectSkips(cfg *Config, frags *nftables.Chain) [][]expr.Any {
	acc := []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}}
	fragAct := acc
	if frags != nil {
		fragAct = []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: frags.Name}}
	}
	var out [][]expr.Any
	switch cfg.Fragments {
	case FragOnly:
		if cfg.IPv4 {
			out = append(out, concat(v4NotFrag, acc))
		}
		if cfg.IPv6 {
			// The common IPv6 packet has no extension header at all: it
			// leaves after a one-byte load instead of a header walk.
			for _, h := range v6NoExt() {
				out = append(out, concat(isV6, h, acc))
			}
			out = append(out, concat(v6NotFrag, acc))
		}
	case FragNone:
		if cfg.IPv4 {
			out = append(out, concat(v4Frag, fragAct))
		}
		if cfg.IPv6 {
			out = append(out, concat(v6Frag, fragAct))
		}
	}
	return append(out, destSkips(cfg)...)
}

// destSkips returns the rule that accepts the packets cfg.Dest excludes,
// if any.
func destSkips(cfg *Config) [][]expr.Any {
	acc := []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}}
	var out [][]expr.Any
	if cfg.Dest != DestAny {
		// Delivered to the host: local, broadcast, anycast and multicast
		// destinations (RTN_LOCAL..RTN_MULTICAST, 2..5). The register holds
		// a native-endian u32 below 256, which compares as bytes (as
		// nft_range does) in the right order on either byte order.
		op := expr.CmpOpNeq // DestLocal: accept what is not delivered here
		if cfg.Dest == DestRemote {
			op = expr.CmpOpEq
		}
		out = append(out, concat([]expr.Any{
			&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
			&expr.Range{Op: op, Register: 1,
				FromData: binary.NativeEndian.AppendUint32(nil, unix.RTN_LOCAL),
				ToData:   binary.NativeEndian.AppendUint32(nil, unix.RTN_MULTICAST)},
		}, acc))
	}
	return out
}

func hookNum(h Hook) *nftables.ChainHook {
	switch h {
	case HookPrerouting:
		return nftables.ChainHookPrerouting
	case HookInput:
		return nftables.ChainHookInput
	case HookForward:
		return nftables.ChainHookForward
	case HookOutput:
		return nftables.ChainHookOutput
	}
	return nftables.ChainHookPostrouting
}

func queueFlags(cfg *Config) uint16 {
	var f uint16
	if cfg.Bypass {
		f |= unix.NFT_QUEUE_FLAG_BYPASS
	}
	if cfg.QueueCount > 1 && !cfg.FlowBalance {
		f |= unix.NFT_QUEUE_FLAG_CPU_FANOUT
	}
	return f
}

// queueExpr is the native nft queue expression.
func queueExpr(cfg *Config) expr.Any {
	return &expr.Queue{Num: cfg.QueueNum, Total: cfg.QueueCount, Flag: expr.QueueFlag(queueFlags(cfg))}
}

// queueTarget is the xt NFQUEUE target, revision 3, through nft_compat:
// struct xt_NFQ_info_v3 {u16 queuenum; u16 queues_total; u16 flags;} in host
// byte order, padded to 8 bytes (XT_ALIGN). The flag bits equal nft's.
func queueTarget(cfg *Config) expr.Any {
	info := make(xt.Unknown, 8)
	binary.NativeEndian.PutUint16(info[0:], cfg.QueueNum)
	binary.NativeEndian.PutUint16(info[2:], cfg.QueueCount)
	binary.NativeEndian.PutUint16(info[4:], queueFlags(cfg))
	return &expr.Target{Name: "NFQUEUE", Rev: 3, Info: &info}
}

// WouldBeExact reports whether the rules Install would make of cfg select
// exactly what cfg.Lowered does, without installing anything: a caller can
// choose its action before any rule is in place.
func WouldBeExact(cfg Config) bool {
	for _, h := range cfg.Hooks {
		l := lowerer{hook: h}
		l.lower(cfg.Lowered)
		if l.inexact {
			return false
		}
	}
	return true
}

// Exact reports whether the kernel rules select exactly the filter's
// packets, so user space need not evaluate the filter again.
func (r *Ruleset) Exact() bool { return r.exact }

// Native reports whether the rules use the native nft queue expression
// (rather than the xt NFQUEUE target through nft_compat).
func (r *Ruleset) Native() bool { return r.native }

// Table is the name of the table (family inet).
func (r *Ruleset) Table() string { return r.table }

// Close removes the rules. It deletes the table, by closing the socket
// that owns it, unless another user of the table's network namespace in
// this process is open (another Ruleset, or a Member): then deleting the
// table's base chains would make the kernel drop the packets queued to
// that user, so Close empties the table instead and parks it until the
// last user goes (see share_linux.go). If emptying fails, or too many
// tables are parked there already, the table is deleted. It is
// idempotent.
func (r *Ruleset) Close() error {
	r.mu.Lock()
	c := r.conn
	r.conn = nil
	r.mu.Unlock()
	if c == nil {
		return nil
	}
	if !r.shared {
		return r.closeErr(c.CloseLasting())
	}
	registry.mu.Lock()
	defer registry.mu.Unlock()
	return r.closeLocked(c, func(c *tableConn) bool { return r.park(c) == nil })
}

// closeLocked parks the table owned by c when the namespace has room and
// another user (mayParkLocked) and emptied reports it emptied, else
// deletes it; then counts r out of the namespace. Called with registry.mu
// held.
func (r *Ruleset) closeLocked(c *tableConn, emptied func(*tableConn) bool) error {
	if mayParkLocked(r.ns) && emptied(c) {
		e := registry.ns[r.ns]
		e.parked = append(e.parked, &parkedTable{conn: c, table: r.table, family: r.family, bases: r.bases})
		c = nil
	}
	var errs []error
	if c != nil {
		errs = append(errs, r.closeErr(c.CloseLasting()))
	}
	errs = append(errs, closeConns(leaveLocked(r.ns)))
	return errors.Join(errs...)
}

func (r *Ruleset) closeErr(err error) error {
	if err != nil {
		return fmt.Errorf("nftrules: close table %s: %w", r.table, err)
	}
	return nil
}

// park empties the table in one batch on its socket c: every rule goes,
// then every non-base chain, so that only the base chains stay (empty,
// policy accept), and with them the hooks.
func (r *Ruleset) park(c *tableConn) error {
	t := &nftables.Table{Name: r.table, Family: r.family}
	c.FlushTable(t)
	for _, name := range r.chains {
		c.DelChain(&nftables.Chain{Name: name, Table: t})
	}
	if err := c.flush(); err != nil {
		return mapTableErr("empty table "+r.table, r.table, c.sock, err)
	}
	return nil
}

var probe struct {
	mu     sync.Mutex
	done   bool
	native bool
}

// HasNativeQueue reports whether the kernel has the native nft queue
// expression (CONFIG_NFT_QUEUE). The probe builds a queue rule in a
// non-base chain of a scratch owned table, which never sees a packet and
// vanishes with its socket. A definite answer is cached.
func HasNativeQueue() bool {
	native, _ := nativeQueue()
	return native
}

// nativeQueue is HasNativeQueue, with the error that kept the probe from
// an answer (native is then false, and nothing is cached). The probe's
// table is named divert_probe_<pid>_<n>, tried as openFresh does, so
// that a name another socket owns (ErrTableOwned: say, a process of the
// same PID in another PID namespace probing as well) is not taken for
// the lack of the expression.
func nativeQueue() (native bool, err error) {
	probe.mu.Lock()
	defer probe.mu.Unlock()
	if probe.done {
		return probe.native, nil
	}
	name, conn, err := openFresh("divert_probe", nftables.TableFamilyINet)
	if err != nil {
		return false, err
	}
	defer conn.CloseLasting()
	t := &nftables.Table{Name: name, Family: nftables.TableFamilyINet}
	c := conn.AddChain(&nftables.Chain{Name: "probe", Table: t})
	conn.AddRule(&nftables.Rule{Table: t, Chain: c, Exprs: []expr.Any{&expr.Queue{Num: 0, Total: 1, Flag: expr.QueueFlagBypass}}})
	err = conn.flush()
	switch {
	case err == nil:
		probe.done, probe.native = true, true
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.EOPNOTSUPP):
		probe.done, probe.native = true, false
	default:
		return false, fmt.Errorf("nftrules: probe table %s: %w", name, err)
	}
	return probe.native, nil
}

// ErrPermission is os.ErrPermission; errors for a missing CAP_NET_ADMIN,
// and for a table another netlink socket owns, wrap it.
var ErrPermission = os.ErrPermission

// ErrTableOwned is wrapped, with os.ErrPermission, by the errors of a
// request the kernel refused because a table it names is owned by another
// netlink socket, though the caller has CAP_NET_ADMIN.
var ErrTableOwned = errors.New("table owned by another netlink socket")

// mapTableErr is mapErr for op on table over its socket sock (nil when
// there is none).
//
// nf_tables answers EPERM for two reasons. nfnetlink refuses a batch from
// a sender without CAP_NET_ADMIN over the socket's network namespace
// (netlink_net_capable in nfnetlink_rcv). And nf_tables_api.c's
// nft_table_lookup (and nft_table_lookup_byhandle) refuse, whatever the
// sender's capabilities, a message that names a table created with
// NFT_TABLE_F_OWNER by another socket (table->nlpid is the owner's port
// id): a table of another process, or of another socket of this one; a
// NEWTABLE for such a name gets EPERM, not EEXIST. A process of another
// PID namespace sharing the network namespace (another container of a
// pod) can have the same PID, and so make the same table names (for a
// new table's name, openFresh then tries the next). When the caller has
// CAP_NET_ADMIN there (netAdminOver), the error says that the table is
// another socket's, not that a capability is missing. Only EPERM: an
// EACCES (a security module refusing the message) also wraps
// os.ErrPermission but never means a table is owned.
func mapTableErr(op, table string, sock *netlink.Conn, err error) error {
	if errors.Is(err, unix.EPERM) && sock != nil && netAdminOver(sock) {
		return fmt.Errorf("nftrules: %s: %w: %s belongs to another process or socket, and only its owner may change it, capabilities or not: %w", op, ErrTableOwned, table, err)
	}
	return mapErr(op, err)
}

// netAdminOver reports whether the caller has CAP_NET_ADMIN over the
// network namespace of sock, which nfnetlink requires of a batch's sender
// (see netcap.Over).
func netAdminOver(sock *netlink.Conn) bool {
	raw, err := sock.SyscallConn()
	if err != nil {
		return netcap.Effective()
	}
	over := false
	if err := raw.Control(func(fd uintptr) { over = netcap.Over(int(fd)) }); err != nil {
		return netcap.Effective()
	}
	return over
}

func mapErr(op string, err error) error {
	switch {
	case errors.Is(err, os.ErrPermission):
		return fmt.Errorf("nftrules: %s: CAP_NET_ADMIN in this network namespace is needed to install nftables rules (run as root or grant the capability): %w", op, err)
	case errors.Is(err, unix.EPROTONOSUPPORT), errors.Is(err, unix.EAFNOSUPPORT):
		return fmt.Errorf("%w: %s: the kernel has no nfnetlink/nf_tables: %w", ErrUnsupported, op, err)
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.EOPNOTSUPP):
		return fmt.Errorf("%w: %s: the kernel lacks a needed nf_tables feature (inet tables, table ownership, the nft queue expression or the xt NFQUEUE target): %w", ErrUnsupported, op, err)
	}
	return fmt.Errorf("nftrules: %s: %w", op, err)
}

// nftTableFOwner is NFT_TABLE_F_OWNER (linux/netfilter/nf_tables.h, 5.12).
const nftTableFOwner = 0x2
