package divert

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/netdivert/divert/internal/nfq"
	"github.com/netdivert/divert/internal/nftrules"
	"github.com/netdivert/divert/internal/reassembly"
)

// OpenQueues on Linux.
//
// The n handles read n consecutive NFQUEUE queues Q..Q+n-1, each with its
// own socket, verdict state, tracker, reaper and injection sockets; one
// ruleset (one owned nftables table) queues the filter's packets to all of
// them with the kernel's flow balancing (nft "queue num Q-Q+n-1", or the xt
// NFQUEUE target revision 3 with queues_total = n and no CPU fanout flag),
// so that a flow stays on one handle. The kernel's flow hash
// (nfqueue_hash) covers the two addresses, and the protocol for IPv4, in
// either order, and no ports: every packet between two hosts, both ways,
// lands on the same handle (all fragments of a datagram too), so the
// packets spread only when many address pairs are diverted.
//
// Each handle is closed on its own. Close of one gives every packet it
// holds or that waits in its queue one verdict (ACCEPT), as Close of an
// Open handle does, and unbinds its queue; the rules stay until the last
// of the n handles is closed. Packets that hash to a closed handle's queue
// meet a queue without a listener: with FlagPassThrough the kernel accepts
// them (queue bypass), otherwise it drops them: the kernel's default for a
// queue with no listener. They are not moved to the other handles: the
// kernel's hash has no notion of a queue that went away. Shutdown,
// SetParam and SetReadDeadline act on one handle's queue.
//
// Fragments: user-space reassembly (FlagReassemble, and LayerNetwork's
// default) works with n > 1 as with one handle. The chains that queue the
// fragments are installed once, with the same fanout, and every fragment
// of a datagram carries the same addresses and protocol, so all of them
// reach the same handle, whose own reassembler (see frag_linux.go)
// completes the datagram. FlagFragments hands fragments one by one and
// needs nothing more.
//
// FlagDrop and FlagSendOnly handles have no queue the program reads (a
// FlagDrop handle's own goroutine reads the one it keeps for what its rules
// cannot judge): the n handles then share one backend (shareBackend), as
// on the other systems.

// queueGroup is the kernel rules OpenQueues' handles share.
type queueGroup struct {
	mu    sync.Mutex
	refs  int
	rules *nftrules.Ruleset // the filter's rules
	frag  *nftrules.Ruleset // the fragments' table (LayerNetworkForward's reassembly); nil without
}

// leave drops one reference; the last removes the rules.
func (g *queueGroup) leave() error {
	g.mu.Lock()
	g.refs--
	last := g.refs == 0
	g.mu.Unlock()
	if !last {
		return nil
	}
	var errs []error
	if g.frag != nil {
		errs = append(errs, g.frag.Close())
	}
	if g.rules != nil {
		errs = append(errs, g.rules.Close())
	}
	return errors.Join(errs...)
}

// Test seams of OpenQueues: how a queue is opened and closed (release
// closes a handle's queue with closeQueue too, for Open as well), and how
// its rules and installFrag's (Open's too) are installed.
var (
	openQueue    = nfq.Open
	closeQueue   = (*nfq.Conn).Close
	installRules = nftrules.Install
)

// openBackends opens n backends for OpenQueues.
func openBackends(cfg *openConfig, n int) ([]backend, error) {
	if n == 1 || cfg.flags&(FlagSendOnly|FlagDrop) != 0 || cfg.layer == LayerFlow {
		// LayerFlow: one event socket, shared, as WinDivert shares its
		// queue.
		b, err := openBackend(cfg)
		if err != nil {
			return nil, err
		}
		return shareBackend(b, n), nil
	}
	if err := checkLayer(cfg.layer); err != nil {
		return nil, err
	}
	// Members of the namespace before any queue can hold a packet (see
	// linuxBackend.member).
	members := make([]*nftrules.Member, n)
	for i := range members {
		members[i] = nftrules.Join()
	}
	conns, closeErrs, err := bindQueues(queueConfig(cfg), n)
	if err != nil {
		// One cleanup group: the queues' and the memberships' errors.
		cleanup := []error{closeErrs}
		for _, m := range members {
			cleanup = append(cleanup, leaveNamespace(m))
		}
		return nil, withCleanup(mapSetupError(fmt.Sprintf("bind %d consecutive NFQUEUE queues", n), err), errors.Join(cleanup...))
	}
	// On success, closeErrs (closing queues given up on the way, see
	// bindQueues) is dropped: an OpenQueues that returns its handles has
	// no error to carry it, and nothing is left to undo. nfq's Close fails
	// only for a Conn already closed, which bindQueues never does.
	bs := make([]*linuxBackend, n)
	for i := range bs {
		bs[i] = newLinuxBackend(cfg)
		bs[i].member = members[i]
		bs[i].attach(conns[i])
	}
	fail := func(err error) ([]backend, error) {
		var cleanup []error
		for _, b := range bs {
			cleanup = append(cleanup, b.release()) // leaves the group too, whose last member removes the rules
		}
		return nil, withCleanup(err, errors.Join(cleanup...))
	}
	for _, b := range bs {
		if err := b.openInjector(cfg); err != nil {
			return fail(err)
		}
	}
	rc, reasm, ok := rulesConfig(cfg, bs[0].queue, uint16(n))
	if ok {
		g := &queueGroup{refs: n}
		for _, b := range bs {
			b.group = g
		}
		if g.rules, err = installRules(rc); err != nil {
			return fail(mapSetupError("install nftables rules", err))
		}
		userSide := !g.rules.Exact()
		if reasm {
			qt := time.Duration(cfg.params[ParamQueueTime]) * time.Millisecond
			for _, b := range bs {
				b.frag = newFragState(qt)
				if cfg.layer == LayerNetworkForward {
					// Each handle asks the routing table for its
					// datagrams' IfIdx, as openFrag's does.
					if b.frag.route, err = newRouteQuery(); err != nil {
						return fail(err)
					}
				}
			}
			// openFrag's table, if any, once, spread over the n queues
			// as the main rules are.
			if g.frag, err = installFrag(rc, cfg.layer); err != nil {
				return fail(mapSetupError("install nftables rules for fragments", err))
			}
			userSide = true // the rules select every fragment
		}
		for _, b := range bs {
			b.userSide = userSide
		}
	}
	out := make([]backend, n)
	for i, b := range bs {
		b.start()
		out[i] = b
	}
	return out, nil
}

// bindQueues binds n consecutive free queue numbers, the first at or above
// nc.Queue, each on its own socket. On its way it may bind a run of queues
// cut short by a busy one, close them and try further up; closeErrs joins
// the errors of closing every queue it closed (each is closed all the
// same: its socket is released, and the kernel unbinds the queue with it).
// When it fails (err), it has closed every queue it had bound; the caller
// reports closeErrs with err, as the errors of cleaning up. When it
// succeeds, closeErrs is still returned, for the caller to drop or report.
func bindQueues(nc nfq.Config, n int) (conns []*nfq.Conn, closeErrs, err error) {
	conns = make([]*nfq.Conn, 0, n)
	var cleanup []error
	closeAll := func() {
		for _, c := range conns {
			if err := closeQueue(c); err != nil {
				cleanup = append(cleanup, fmt.Errorf("close queue %d: %w", c.Queue(), err))
			}
		}
		conns = conns[:0]
	}
	failed := func(err error) ([]*nfq.Conn, error, error) {
		closeAll()
		return nil, errors.Join(cleanup...), err
	}
	next := int(nc.Queue)
	for next+n-1 <= 0xFFFF {
		first := nc
		first.Queue, first.Auto = uint16(next), true
		c, err := openQueue(first)
		if err != nil {
			return failed(err)
		}
		conns = append(conns, c)
		base := int(c.Queue())
		if base+n-1 > 0xFFFF {
			break
		}
		busy := false
		for q := base + 1; q < base+n; q++ {
			qc := nc
			qc.Queue, qc.Auto = uint16(q), false
			c, err := openQueue(qc)
			if errors.Is(err, nfq.ErrQueueBusy) {
				closeAll()
				next, busy = q+1, true
				break
			}
			if err != nil {
				return failed(err)
			}
			conns = append(conns, c)
		}
		if !busy {
			return conns, errors.Join(cleanup...), nil
		}
	}
	return failed(fmt.Errorf("nfq: %w: no %d consecutive free queue numbers from %d up", nfq.ErrQueueBusy, n, nc.Queue))
}

// fragRulesConfig is the configuration of the table openFrag installs for
// the fragments, from the main rules' rc (keep the two in step); ok is
// false when there is none. For LayerNetworkForward, one prerouting chain
// takes the fragments of forwarded packets before conntrack reassembles
// them. Otherwise the main rules queue the fragments themselves
// (rc.QueueFragments).
func fragRulesConfig(rc nftrules.Config, layer Layer) (c nftrules.Config, ok bool) {
	if layer != LayerNetworkForward {
		return c, false
	}
	rc.Lowered = nil // every fragment: the filter is evaluated on the datagram
	rc.Fragments = nftrules.FragOnly
	rc.QueueFragments = false
	rc.KeepNDP = false
	rc.Hooks = []nftrules.Hook{nftrules.HookPrerouting}
	rc.Dest = nftrules.DestRemote
	return rc, true
}

// installFrag installs the fragments' table for the main rules' rc; nil
// when there is none (see fragRulesConfig).
func installFrag(rc nftrules.Config, layer Layer) (*nftrules.Ruleset, error) {
	c, ok := fragRulesConfig(rc, layer)
	if !ok {
		return nil, nil
	}
	return installRules(c)
}

// newFragState is the reassembly state of a handle without its chains
// (openFrag installs them per handle; OpenQueues once for all its handles).
func newFragState(qt time.Duration) *fragState {
	fs := &fragState{
		pending: make(map[fragKey]*pendingDgram),
	}
	fs.reasm = reassembly.New(reassembly.Config{Timeout: qt, OnEvict: fs.evict})
	return fs
}
