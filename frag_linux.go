package divert

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/maphash"
	"math/rand/v2"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netdivert/divert/filter"
	"github.com/netdivert/divert/internal/nfq"
	"github.com/netdivert/divert/internal/nftrules"
	"github.com/netdivert/divert/internal/packet"
	"github.com/netdivert/divert/internal/reassembly"
)

// Fragments on Linux.
//
// Where netfilter shows fragments (measured on Linux 6.18):
//
//   - prerouting, below priority -400: IP fragments as on the wire. At -400
//     conntrack's defragmentation (registered in a namespace only when
//     something uses conntrack: a ct expression, NAT, ...) reassembles them.
//   - input: IPv4 whole datagrams always (local delivery reassembles
//     first); IPv6 fragments as they arrived unless conntrack runs (IPv6
//     reassembles after the input hook, as an extension header handler).
//   - forward: fragments as routed without conntrack; whole datagrams with
//     conntrack (the kernel refragments them on output to the size they
//     came in).
//   - output and postrouting: whole datagrams (the host fragments after
//     postrouting), for datagrams the host generates as for raw sends.
//
// What a Linux handle hands the program, per layer, direction and flag:
//
//   - LayerNetwork, no flag or FlagReassemble (WinDivert's default): whole
//     datagrams, inbound and outbound, with and without conntrack. Outbound
//     and IPv4 inbound this is what the output and input hooks see. IPv6
//     fragments at the input hook (and any fragment a raw socket sends at
//     output) are queued by a fragments' chain of the handle's table, past
//     the filter's rules, and reassembled in user space
//     (internal/reassembly); the filter is evaluated on the whole
//     datagram. Reinjecting a datagram the kernel handed over whole is an
//     ACCEPT; the kernel fragments what it then sends. A datagram
//     reassembled in user space gets its verdict through its fragments,
//     held in the queue (see "Verdicts" below): sent back unchanged, they
//     are accepted and the kernel reassembles and delivers them as
//     without the handle (inbound, from the interface they came in on).
//     With FlagSniff the fragments continue and the program gets a copy
//     of the datagram.
//   - LayerNetwork with FlagFragments: inbound, the packets addressed to the
//     host as they are on the wire, fragments included, before any
//     reassembly (a prerouting chain below -400 restricted to local
//     destinations by the routing table); outbound, whole datagrams as
//     above, since Linux fragments after every hook. Each fragment is one
//     packet: reinject each (ACCEPT, it continues to reassembly), change or
//     drop it alone. A filter on transport fields cannot match non-first
//     fragments, which have no transport header (as in WinDivert).
//   - LayerNetworkForward, no flag: what the forward hook sees, i.e.
//     fragments as routed when nothing in the namespace uses conntrack, whole
//     datagrams when something does (then reinjected whole and refragmented
//     by the kernel).
//   - LayerNetworkForward with FlagReassemble: whole datagrams always. The
//     forward hook takes unfragmented packets; a prerouting chain below -400
//     takes every fragment not addressed to the host, and user space
//     reassembles them. Each fragment is held in the queue until its
//     datagram is complete; then the datagram is handed to the program, its
//     fragments still held for its verdict (see "Verdicts" below; a
//     datagram the filter does not match has its fragments accepted
//     unchanged at once, with the injection mark as below). Its IfIdx,
//     which the fragments do not carry (they are taken before routing),
//     is the interface the routing
//     table forwards it through, asked over rtnetlink once per datagram (0
//     when there is no route), as the forward hook gives it for whole
//     packets and WinDivert reports it. Its TTL (hop limit) is decremented,
//     as the kernel's forwarding does before the forward hook; a datagram
//     whose TTL would reach 0 is not handed over: its fragments go back to
//     the kernel, which drops them and answers ICMP time exceeded, as it
//     does for a whole packet. Its fragments, accepted (unchanged or
//     carrying the changed datagram's pieces), go on from prerouting as
//     without the handle: routed by the kernel, through the forward hook
//     (a firewall's forward rules judge them; lower-priority forward
//     handles see them), their TTL decremented by the kernel, ICMP
//     fragmentation needed (Packet Too Big) answered by the kernel when
//     they do not fit the route. The verdicts set the handle's injection
//     mark: with conntrack the kernel defragments them at -400 and the
//     forward hook sees the whole datagram, which the handle's own rules
//     (and those of equal or higher priority) then skip, as they skip
//     its injections. But a datagram one of whose fragments already had
//     a mark at the handle's chain (set by a rule before it, or by tc)
//     keeps its marks, on which policy routing may depend: with conntrack
//     the handle then sees it a second time, whole, at the forward hook
//     (not fixed; marks set that early are rare: kube-proxy's and
//     conntrack's restored marks come later). An IPv4 datagram has DF
//     set when its largest fragment had (as Linux's reassembly marks
//     it). With FlagSniff the fragments are accepted as they come, with
//     the injection mark likewise (unless they came with one), so that
//     with conntrack the whole datagram is not queued, and copied to the
//     program, a second time at the forward hook (see acceptSniffedFrag). A changed one the program set DF on that does not fit the
//     size its largest fragment had gives an error wrapping
//     reassembly.ErrDontFragment; it stays held.
//   - FlagDrop: the kernel rules drop what they select, fragments included
//     as each hook sees them; nothing is reassembled.
//
// A new outbound packet (Send with a fresh Address) larger than its route's
// MTU, which the kernel's header-included raw send refuses (EMSGSIZE), is
// sent as fragments of that MTU by the same code (see sendTooBig).
//
// Verdicts of a datagram reassembled in user space (not FlagSniff): its
// fragments stay held in the queue, tracked like any held packet, and the
// Address names them (sysAddr's dslot and dgen: a slot of fragState.held
// and its generation; slots and records are reused, so nothing allocates
// in steady state). Each fragment gets exactly one verdict:
//
//   - Send unchanged (its bytes hash as Recv handed them over):
//     ACCEPT of every fragment, its original bytes.
//   - Send changed: the datagram, with the checksums its Address's clear
//     bits say are unfinished computed first, is cut again to the size its
//     largest fragment had (with DF on every piece when that fragment had
//     DF: reassembly.FragmentDF) with its identification, and the pieces
//     replace the fragments' payloads in their ACCEPTs; fragments left
//     over are dropped. At LayerNetworkForward the datagram was handed
//     over with its TTL (hop limit) decremented, and the kernel decrements
//     the pieces again: each piece gets one added back (up to 255, the
//     IPv4 header checksum updated), so that what the program sent is
//     what leaves the router (a TTL of 0 or 1 the program sets becomes 1
//     or 2: the kernel drops the former and answers time exceeded).
//   - Send of a datagram the program grew past what its fragments can
//     carry (more pieces than fragments): the datagram goes out as new
//     marked raw packets, then the fragments are dropped (a raw send that
//     fails leaves them held, and Send fails), as before this
//     design (sendDgramRaw): inbound at LayerNetwork whole to the local
//     stack through lo (as fragments of lo's MTU when it exceeds that),
//     otherwise refragmented from the router's output path, which the
//     forward hook's rules do not judge, smaller when the route's MTU
//     says so (not for IPv4 DF: reassembly.ErrDontFragment).
//   - Drop: DROP of every fragment.
//   - ParamQueueTime: the reaper drops each fragment when it has waited
//     that long since it arrived (the first ones may go soon after the
//     datagram is handed over, when it was slow to complete). A datagram
//     one of whose fragments went is no longer queued: Send and Drop drop
//     what is left of it and fail as for an expired packet.
//   - Close: ACCEPT of every fragment still held (WinDivert reinjects held
//     packets on close).
//
// A copy of the Address with Outbound reversed (an answer) names a new
// packet, as for a whole packet: Send injects it raw, Drop does nothing.
//
// For every user-space reassembly: fragments whose datagram does not
// complete within ParamQueueTime are dropped (the queue drops each held
// fragment by the current value; the reassembler keeps the value a
// datagram began with, and a datagram completed after the queue dropped
// some of its fragments is not handed over, its last fragment dropped
// too: see heldAll), and so are at once those of a datagram the
// reassembler gives up to stay within its bounds (internal/reassembly's
// defaults: 1024 datagrams, 4 MiB); a malformed packet (a bad IPv4 header
// checksum or length) is dropped alone, as the kernel drops it before its fragment queue;
// overlapping or otherwise refused fragments are dropped at once, with the
// fragments held for the same datagram (the kernel's reassembly would
// refuse them too); an exact duplicate of a fragment held is not held
// too: it is dropped at once (let go on with FlagSniff).

// fragKey identifies a datagram the way internal/reassembly keys it.
type fragKey struct {
	src, dst [16]byte
	id       uint32
	proto    uint8 // IPv4 only
	v6       bool
}

// parseFragKey returns the key of an IPv4 or IPv6 fragment; ok is false
// for a packet that is not a fragment or does not parse.
func parseFragKey(p []byte) (k fragKey, ok bool) {
	if len(p) < 1 {
		return k, false
	}
	switch p[0] >> 4 {
	case 4:
		if len(p) < 20 || binary.BigEndian.Uint16(p[6:])&0x3FFF == 0 {
			return k, false
		}
		copy(k.src[:], p[12:16])
		copy(k.dst[:], p[16:20])
		k.id = uint32(binary.BigEndian.Uint16(p[4:]))
		k.proto = p[9]
		return k, true
	case 6:
		if len(p) < 40 {
			return k, false
		}
		nh, off := p[6], 40
		for {
			switch nh {
			case unix.IPPROTO_HOPOPTS, unix.IPPROTO_ROUTING, unix.IPPROTO_DSTOPTS:
				if len(p) < off+8 {
					return k, false
				}
				nh, off = p[off], off+(int(p[off+1])+1)*8
				continue
			case unix.IPPROTO_AH:
				if len(p) < off+8 {
					return k, false
				}
				nh, off = p[off], off+(int(p[off+1])+2)*4
				continue
			case unix.IPPROTO_FRAGMENT:
				if len(p) < off+8 {
					return k, false
				}
				copy(k.src[:], p[8:24])
				copy(k.dst[:], p[24:40])
				k.id = binary.BigEndian.Uint32(p[off+4:])
				k.v6 = true
				return k, true
			}
			return k, false
		}
	}
	return k, false
}

// pendingDgram is a datagram being reassembled, or one handed to the
// program whose verdict is to come: the queue ids of its fragments, all
// held (but for those the reaper dropped after ParamQueueTime).
type pendingDgram struct {
	ids   []uint32
	first int64 // when its first fragment arrived (ns)
	// marked: a fragment came with a mark (set before the handle's chain),
	// which its verdict keeps (see sendDgram)
	marked bool
	last   int64 // delivered: when its last fragment arrived (ns)
	// gone: how many of its fragments the reaper dropped (ParamQueueTime)
	// that expirePending has seen, for Stats.Expired (see there)
	gone int
	gen  uint32 // delivered: the generation its Address names (sysAddr.dgen)
}

// fragState is a handle's user-space reassembly.
type fragState struct {
	rules *nftrules.Ruleset // the table that queues fragments (LayerNetworkForward); nil without
	route *routeQuery       // LayerNetworkForward: a datagram's outgoing interface (see forwardIf); nil without
	reasm *reassembly.Reassembler
	info  reassembly.Info

	pending map[fragKey]*pendingDgram // guarded by vmu
	spare   []*pendingDgram           // reused entries, guarded by vmu
	// held: the datagrams handed to the program whose fragments wait for
	// Send or Drop, by slot (sysAddr.dslot; nil when free); free the free
	// slots; gen the last generation given. Guarded by vmu.
	held []*pendingDgram
	free []uint32
	gen  uint32
	// evicted: datagrams the reassembler dropped for its bounds during
	// the current AddInfo, whose held fragments go at once (see evict).
	// Guarded by rmu.
	evicted []fragKey
}

// fragSend is what Send needs to emit a datagram as fragments (one
// reassembled in user space, or a new packet larger than its route's MTU),
// allocated at its first use.
type fragSend struct {
	mu    sync.Mutex
	fbuf  []byte   // the fragments, back to back
	flist [][]byte // the fragments
	cbuf  []byte   // a changed datagram whose checksums Send computes
}

// openFrag sets up the reassembly and, at LayerNetworkForward, installs
// the prerouting chain that queues forwarded fragments (at LayerNetwork
// the main rules queue them). Called by open, in the caller's namespace.
func (b *linuxBackend) openFrag(rc nftrules.Config, layer Layer, qt time.Duration) error {
	fs := newFragState(qt)
	b.frag = fs
	var err error
	if fs.rules, err = installFrag(rc, layer); err != nil {
		return mapSetupError("install nftables rules for fragments", err)
	}
	if layer == LayerNetworkForward {
		if fs.route, err = newRouteQuery(); err != nil {
			return err
		}
	}
	return nil
}

func (fs *fragState) close() error {
	if fs.route != nil {
		fs.route.close()
	}
	if fs.rules != nil {
		return fs.rules.Close()
	}
	return nil
}

// forwardIf returns the interface the namespace forwards dgram, received
// on iif with mark, through: the forward layer's IfIdx, which the fragments, taken
// at prerouting before routing, do not carry. 0 when the routing table has
// no answer (the kernel would not forward the datagram either).
func (fs *fragState) forwardIf(dgram []byte, iif, mark uint32) uint32 {
	var src, dst netip.Addr
	var tos byte
	switch {
	case len(dgram) >= 20 && dgram[0]>>4 == 4:
		src, dst = netip.AddrFrom4([4]byte(dgram[12:16])), netip.AddrFrom4([4]byte(dgram[16:20]))
		tos = dgram[1]
	case len(dgram) >= 40 && dgram[0]>>4 == 6:
		src, dst = netip.AddrFrom16([16]byte(dgram[8:24])), netip.AddrFrom16([16]byte(dgram[24:40]))
	default:
		return 0
	}
	oif, err := fs.route.outIf(src, dst, iif, tos, mark)
	if err != nil {
		return 0
	}
	return oif
}

// reassemble takes a fragment queued at prerouting. It returns handled
// false for a packet to go the ordinary way (an IPv6 atomic fragment, or
// anything that is not a fragment), and delivered true when buf[:n] and a
// hold a whole datagram for the program. Called with rmu held.
func (b *linuxBackend) reassemble(p *nfq.Packet, buf []byte, a *Address, now int64) (n int, handled, delivered bool, err error) {
	fs := b.frag
	outbound := p.Hook == nfq.HookOutput || p.Hook == nfq.HookPostrouting
	ifIdx := p.InDev
	if outbound {
		ifIdx = p.OutDev
	}
	if b.layer == LayerNetwork && !outbound && p.InDev == loIfIndex {
		return 0, false, false, nil // loopback is seen outbound only
	}
	k, ok := parseFragKey(p.Payload)
	if !ok {
		return 0, false, false, nil
	}
	// Capped at len(buf): the caller owns only that much of its array.
	dgram, done, rerr := fs.reasm.AddInfo(buf[:0:len(buf)], p.Payload, time.Unix(0, now), &fs.info)
	expired := false
	if done && rerr == nil && fs.route != nil && !outbound && fs.info.Fragmented && !fs.info.Atomic {
		// Asked before vmu is taken: a netlink round trip must not hold up
		// the handle's verdicts.
		ifIdx = fs.forwardIf(dgram, ifIdx, p.Mark)
		// The fragments were taken at prerouting, before the kernel's
		// forwarding decrements the TTL (hop limit) and the forward hook
		// sees the packet: the datagram is handed over decremented, as the
		// forward hook shows whole packets (its fragments' verdicts give the
		// decrement back to the kernel's forwarding: see refragment).
		// One whose TTL would reach 0 the kernel drops before the forward
		// hook, answering ICMP time exceeded: its fragments go back to the
		// kernel, which does so.
		expired = !DecrementTTL(dgram)
	}
	b.vmu.Lock()
	defer b.vmu.Unlock()
	for _, ek := range fs.evicted {
		b.finishPending(ek, nfq.Drop)
	}
	fs.evicted = fs.evicted[:0]
	b.noteID(p.ID)
	sniff := b.flags&FlagSniff != 0
	switch {
	case rerr != nil:
		// Refused: the kernel would drop it. A packet refused as malformed
		// (a bad header checksum or length, which the kernel drops alone,
		// before its fragment queue) leaves the datagram's fragments held;
		// any other refusal discarded the datagram in the reassembler, so
		// its fragments go too.
		b.verdictOnceLocked(p.ID, nfq.Drop)
		if !errors.Is(rerr, reassembly.ErrMalformed) {
			b.finishPending(k, nfq.Drop)
		}
		return 0, true, false, nil
	case !done && sniff:
		// A copy: the fragment goes on now (the reassembler has its
		// bytes), as a sniffing handle holds nothing (see acceptSniffed);
		// a duplicate too, as without the handle.
		b.acceptSniffedFrag(p.ID, p.Mark)
		return 0, true, false, nil
	case !done && fs.info.Duplicate:
		// Its data is held already: it is not held in the queue too (the
		// kernel frees a duplicate at once), so that repeating a fragment
		// cannot fill the queue. Accepted, it could join the fragments
		// Send emits for the datagram at the receiver: it is dropped.
		b.verdictOnceLocked(p.ID, nfq.Drop)
		return 0, true, false, nil
	case !done:
		pd := fs.pending[k]
		if pd == nil {
			pd = fs.newPending(now)
			fs.pending[k] = pd
		}
		pd.ids = append(pd.ids, p.ID)
		pd.marked = pd.marked || p.Mark != 0
		b.track.Add(p.ID, now)
		return 0, true, false, nil
	case fs.info.Atomic || !fs.info.Fragmented:
		return 0, false, false, nil
	case expired:
		b.verdictOnceLocked(p.ID, nfq.Accept)
		b.finishPending(k, nfq.Accept)
		return 0, true, false, nil
	}
	ipv6 := k.v6
	if b.userSide && b.filt != nil {
		b.meta = filter.Meta{
			Layer:     filter.Layer(b.layer),
			Outbound:  outbound,
			Loopback:  p.InDev == loIfIndex || p.OutDev == loIfIndex,
			IPv6:      ipv6,
			IfIdx:     ifIdx,
			Timestamp: now,
		}
		if !b.filt.Match(dgram, &b.meta) {
			// Every fragment goes on unseen: Stats.Passed.
			b.passed += uint64(b.passDgram(k, p.ID, p.Mark))
			return 0, true, false, nil
		}
	}
	var slot, gen uint32
	if sniff {
		// A copy: the fragments continue (the others went on as they
		// came).
		b.acceptSniffedFrag(p.ID, p.Mark)
	} else {
		if !b.heldAll(k, p.ID) {
			return 0, true, false, nil
		}
		// Handed to the program: the fragments stay held, this one too,
		// for the datagram's verdict (see sendDgram, dropDgram).
		b.track.Add(p.ID, now)
		slot, gen = b.holdDgram(k, p.ID, p.Mark, now)
	}
	n = copy(buf, dgram)
	ts := p.Timestamp
	if ts == 0 {
		ts = now
	}
	*a = Address{
		Timestamp:   ts,
		Layer:       b.layer,
		Event:       EventNetworkPacket,
		Outbound:    b.addrOutbound(outbound),
		Loopback:    p.InDev == loIfIndex || p.OutDev == loIfIndex,
		IPv6:        ipv6,
		IPChecksum:  true,
		TCPChecksum: true, // reassembly copies the sender's bytes: its checksum is final
		UDPChecksum: true,
		IfIdx:       ifIdx,
		sys: sysAddr{
			owner:   b.serial,
			out:     b.addrOutbound(outbound),
			dgram:   true,
			dslot:   slot,
			dgen:    gen,
			fragID:  fs.info.ID,
			fragMTU: uint32(fs.info.MaxFragLen),
			fragDF:  fs.info.DF,
			dsum:    maphash.Bytes(dgramSeed, buf[:n]),
		},
	}
	if sniff {
		a.Sniffed, a.sys = true, sysAddr{}
	}
	if n < len(dgram) {
		err = ErrTruncated
	}
	return n, true, true, err
}

// acceptSniffedFrag accepts fragment id, which came with mark, for a
// sniffing handle. At LayerNetworkForward the ACCEPT sets the handle's
// injection mark, as sendDgram's verdicts do: with conntrack the kernel
// defragments the fragments at -400 and the forward hook sees the whole
// datagram, which the handle's own rules then skip instead of queueing a
// second copy of it. A fragment that came with a mark keeps it (see
// sendDgram), and so does one the reaper's batch accepted first (see
// acceptSniffed): a datagram that came so is seen twice with conntrack.
// Called with vmu held.
func (b *linuxBackend) acceptSniffedFrag(id, mark uint32) {
	if b.layer != LayerNetworkForward || mark != 0 || b.sniffed(id) {
		b.verdictOnceLocked(id, nfq.Accept)
		return
	}
	b.vbuf = nfq.AppendVerdictMark(b.vbuf, b.queue, id, nfq.Accept, b.ownMark, nil)
}

// passDgram accepts the fragments of the datagram k, which the filter
// does not match: id, the last, which came with mark, and those held for
// k. It returns how many (Stats.Passed). At LayerNetworkForward the
// ACCEPTs set the handle's injection mark, as sendDgram's verdicts do:
// with conntrack the kernel defragments the fragments at -400 and the
// forward hook sees the whole datagram, which the handle's own rules,
// wider than the filter, would otherwise queue, and count, again. A
// datagram a fragment of which came with a mark keeps its marks (see
// sendDgram). Called with vmu held.
func (b *linuxBackend) passDgram(k fragKey, id, mark uint32) int {
	fs := b.frag
	pd := fs.pending[k]
	if b.layer != LayerNetworkForward || mark != 0 || pd != nil && pd.marked || b.sniffed(id) {
		b.verdictOnceLocked(id, nfq.Accept)
		return 1 + b.finishPending(k, nfq.Accept)
	}
	b.vbuf = nfq.AppendVerdictMark(b.vbuf, b.queue, id, nfq.Accept, b.ownMark, nil)
	if pd == nil {
		return 1
	}
	delete(fs.pending, k)
	return 1 + b.recycleDgram(pd, nfq.Accept, b.ownMark)
}

// heldAll reports whether the queue holds every fragment of the datagram k
// that id, the last of them, completed in the reassembler (fs.info): the
// fragments held for k, and id, are as many as the reassembler counted
// (duplicates are counted by neither). The two differ when ParamQueueTime
// changed while the datagram was being reassembled, since the
// reassembler keeps the timeout a datagram began with and the queue's
// expiry (and expirePending) takes the current one. Lowered, the queue
// dropped the first fragments while the reassembler kept their data:
// handed over, the datagram could not be sent back through its fragments
// (Send would accept the one left and report success), so id and what is
// held for k are dropped, as the kernel drops a fragment whose
// datagram's others it no longer has, and heldAll returns false. Raised,
// the reassembler gave the datagram up while its first fragments stayed
// held, and those of a new one under the same key joined them: the
// oldest ids left over from the first are dropped, and the rest carry
// the datagram. Called with vmu held.
func (b *linuxBackend) heldAll(k fragKey, id uint32) bool {
	fs := b.frag
	pd := fs.pending[k]
	held := 0
	if pd != nil {
		held = len(pd.ids)
	}
	switch want := fs.info.Fragments - 1; {
	case held < want:
		b.verdictOnceLocked(id, nfq.Drop)
		b.finishPending(k, nfq.Drop)
		return false
	case held > want:
		stale := held - want
		for _, old := range pd.ids[:stale] {
			if b.track.Release(old) {
				b.vbuf = nfq.AppendVerdict(b.vbuf, b.queue, old, nfq.Drop, nil)
			}
		}
		pd.ids = append(pd.ids[:0], pd.ids[stale:]...)
	}
	return true
}

// verdictOnceLocked gives packet id, read and noted, verdict v, unless a
// sniffing handle's reaper accepted it already (see acceptOnceLocked).
// Called with vmu held.
func (b *linuxBackend) verdictOnceLocked(id uint32, v nfq.Verdict) {
	switch {
	case b.sniffed(id):
	case v == nfq.Accept:
		b.acc = append(b.acc, id)
	default:
		b.vbuf = nfq.AppendVerdict(b.vbuf, b.queue, id, v, nil)
	}
}

// evict is the reassembler's OnEvict: a datagram it dropped to stay
// within its bounds cannot complete, so its fragments held in the queue are
// dropped as soon as AddInfo returns, rather than when ParamQueueTime runs
// out. Called inside AddInfo, with rmu held.
func (fs *fragState) evict(k reassembly.Key) {
	fs.evicted = append(fs.evicted, fragKey{src: k.Src, dst: k.Dst, id: k.ID, proto: k.Proto, v6: k.V6})
}

// finishPending gives verdict v to every fragment held for k that the
// reaper has not dropped yet, forgets k, and returns how many it gave a
// verdict. Called with vmu held.
func (b *linuxBackend) finishPending(k fragKey, v nfq.Verdict) (n int) {
	fs := b.frag
	pd := fs.pending[k]
	if pd == nil {
		return 0
	}
	delete(fs.pending, k)
	return b.recycleDgram(pd, v, 0)
}

// recycleDgram gives verdict v to every fragment of pd that the reaper has
// not dropped yet (after ParamQueueTime), puts pd back for reuse, and
// returns how many it gave a verdict. An ACCEPT sets mark when it is not 0
// (see passDgram). Called with vmu held.
func (b *linuxBackend) recycleDgram(pd *pendingDgram, v nfq.Verdict, mark uint32) (n int) {
	for _, id := range pd.ids {
		if !b.track.Release(id) {
			continue
		}
		n++
		switch {
		case v == nfq.Accept && mark != 0:
			b.vbuf = nfq.AppendVerdictMark(b.vbuf, b.queue, id, v, mark, nil)
		case v == nfq.Accept:
			b.acc = append(b.acc, id)
		default:
			b.vbuf = nfq.AppendVerdict(b.vbuf, b.queue, id, v, nil)
		}
	}
	pd.ids = pd.ids[:0]
	b.frag.spare = append(b.frag.spare, pd)
	return n
}

// expirePending forgets datagrams whose fragments the reaper dropped (they
// waited ParamQueueTime): those being reassembled, and those handed to the
// program whose last fragment did (the others went before it). It returns
// what to add to the reaper's count of expired packets, which counted each
// fragment it dropped, so that Stats.Expired counts a datagram once, as
// Stats.Received does: when the first of its fragments goes, whether it
// was still being reassembled (as WinDivert counts) or waited for its
// verdict. Called with vmu held, after the reaper's drops of the tick.
func (b *linuxBackend) expirePending(now, qt int64) (adjust int64) {
	fs := b.frag
	for k, pd := range fs.pending {
		adjust += b.expiredFrags(pd)
		if now-pd.first >= qt {
			b.finishPending(k, nfq.Drop)
		}
	}
	for i, pd := range fs.held {
		if pd == nil {
			continue
		}
		adjust += b.expiredFrags(pd)
		if now-pd.last >= qt {
			b.releaseDgram(uint32(i), nfq.Drop)
		}
	}
	fs.reasm.Expire(time.Unix(0, now))
	return adjust
}

// expiredFrags returns what the fragments of pd the reaper dropped since
// expirePending last looked add to Stats.Expired beyond the reaper's own
// count (one each): minus their number, plus one for the datagram if they
// are its first to go. The reaper drops in id order, and pd.ids are in
// id order: those dropped are a prefix. Called with vmu held.
func (b *linuxBackend) expiredFrags(pd *pendingDgram) (adjust int64) {
	n := 0
	for _, id := range pd.ids {
		if _, ok := b.track.Lookup(id); ok {
			break
		}
		n++
	}
	if n == pd.gone {
		return 0
	}
	adjust = -int64(n - pd.gone)
	if pd.gone == 0 {
		adjust++
	}
	pd.gone = n
	return adjust
}

// holdDgram moves the fragments held for k, and id, the last one (which
// came with mark), to a slot of fs.held for the program's verdict, and
// returns the slot and its generation. The record and the slot are reused: nothing allocates in
// steady state. Called with vmu held.
func (b *linuxBackend) holdDgram(k fragKey, id, mark uint32, now int64) (slot, gen uint32) {
	fs := b.frag
	pd := fs.pending[k]
	if pd != nil {
		delete(fs.pending, k)
	} else {
		pd = fs.newPending(now)
	}
	pd.ids = append(pd.ids, id)
	pd.marked = pd.marked || mark != 0
	pd.last = now
	fs.gen++
	if fs.gen == 0 {
		fs.gen = 1
	}
	pd.gen = fs.gen
	if m := len(fs.free); m > 0 {
		slot, fs.free = fs.free[m-1], fs.free[:m-1]
		fs.held[slot] = pd
	} else {
		slot = uint32(len(fs.held))
		fs.held = append(fs.held, pd)
	}
	return slot, pd.gen
}

// newPending returns a record for a datagram whose first fragment came at
// now: a spare one when there is one. Called with vmu held.
func (fs *fragState) newPending(now int64) *pendingDgram {
	var pd *pendingDgram
	if m := len(fs.spare); m > 0 {
		pd, fs.spare = fs.spare[m-1], fs.spare[:m-1]
	} else {
		pd = &pendingDgram{ids: make([]uint32, 0, 8)}
	}
	pd.first, pd.marked, pd.gone = now, false, 0
	return pd
}

// heldDgram returns the record of the datagram a names, nil when its slot
// was released (Send, Drop, or expiry). Called with vmu held.
func (b *linuxBackend) heldDgram(a *Address) *pendingDgram {
	fs := b.frag
	if int(a.sys.dslot) >= len(fs.held) {
		return nil
	}
	pd := fs.held[a.sys.dslot]
	if pd == nil || pd.gen != a.sys.dgen {
		return nil
	}
	return pd
}

// releaseDgram gives verdict v to every fragment of the datagram in slot
// that is still held, and frees the slot. Called with vmu held.
func (b *linuxBackend) releaseDgram(slot uint32, v nfq.Verdict) {
	fs := b.frag
	pd := fs.held[slot]
	fs.held[slot] = nil
	fs.free = append(fs.free, slot)
	b.recycleDgram(pd, v, 0)
}

// dgramQueued reports whether every fragment of pd is still held: one the
// reaper dropped (ParamQueueTime) leaves the datagram no longer queued.
// Called with vmu held.
func (b *linuxBackend) dgramQueued(pd *pendingDgram) bool {
	for _, id := range pd.ids {
		if _, ok := b.track.Lookup(id); !ok {
			return false
		}
	}
	return true
}

// dgramGone is the error of Send and Drop for a datagram no longer
// queued, the one verdictLocked gives a packet.
func (b *linuxBackend) dgramGone(a *Address) error {
	return fmt.Errorf("%w: datagram %d (already sent, dropped, or expired after %v)", ErrNotQueued, a.sys.fragID, time.Duration(b.queueTime.Load()))
}

// dropDgram drops every held fragment of the datagram a names. Called
// without vmu.
func (b *linuxBackend) dropDgram(a *Address) error {
	b.vmu.Lock()
	defer b.vmu.Unlock()
	if b.closed.Load() {
		return errClosed
	}
	pd := b.heldDgram(a)
	if pd == nil {
		return b.dgramGone(a)
	}
	ok := b.dgramQueued(pd)
	b.releaseDgram(a.sys.dslot, nfq.Drop) // what is left of it goes too
	if !ok {
		return b.dgramGone(a)
	}
	return b.flushLocked()
}

// sendDgram gives a datagram reassembled in user space, which the handle
// holds as its fragments (see holdDgram), its verdict through them. Sent
// back unchanged (its bytes hash as those Recv handed over; a change that
// hashes equal, odds 2^-64, is taken for none), every fragment is accepted
// as it came: the kernel then forwards or delivers them as without the
// handle. Changed, it is cut again (see refragment) and the pieces replace
// the fragments' payloads in their ACCEPTs, the fragments left over
// dropped; one cut into more pieces than it came in fragments goes out as
// marked raw packets instead (sendDgramRaw). At LayerNetworkForward the
// verdicts also set the handle's injection mark, which its own rules (and
// those of handles of higher priority) skip when conntrack has
// defragmented the datagram before the forward hook, unless a fragment
// came with a mark (set before the handle's chain, at -30401 and below),
// which the kernel's routing may depend on: it is kept. A datagram some of
// whose fragments the reaper dropped (ParamQueueTime) is no longer queued:
// what is left of it is dropped and Send fails as for an expired packet.
// hold leaves the verdicts for the caller to flush (SendBatch).
func (b *linuxBackend) sendDgram(pkt []byte, a *Address, hold bool) (int, error) {
	pkt, err := sendable(pkt)
	if err != nil {
		return 0, err
	}
	n := len(pkt) // the IP length, as WinDivertSend counts
	changed := maphash.Bytes(dgramSeed, pkt) != a.sys.dsum
	var frags [][]byte
	fs := &b.fsend
	if changed {
		// Held until the pieces are copied into the verdicts.
		fs.mu.Lock()
		if frags, err = b.refragment(pkt, a); err != nil {
			fs.mu.Unlock()
			return 0, err
		}
	}
	unlock := func() {
		b.vmu.Unlock()
		if changed {
			fs.mu.Unlock()
		}
	}
	b.vmu.Lock()
	if b.closed.Load() {
		unlock()
		return 0, errClosed
	}
	pd := b.heldDgram(a)
	if pd == nil {
		unlock()
		return 0, b.dgramGone(a)
	}
	if !b.dgramQueued(pd) {
		b.releaseDgram(a.sys.dslot, nfq.Drop)
		if !hold {
			err = b.flushLocked()
		}
		unlock()
		return 0, errors.Join(b.dgramGone(a), err)
	}
	if changed && len(frags) > len(pd.ids) {
		// Grown past the fragments it came in: a new datagram, emitted
		// raw (the forward hook's rules do not judge it). The fragments
		// are dropped once it went: a raw send that fails leaves them
		// held, for the program to Send again or Drop.
		unlock()
		slot, gen := a.sys.dslot, a.sys.dgen
		if n, err = b.sendDgramRaw(pkt, a); err != nil {
			return 0, err
		}
		b.vmu.Lock()
		if pd := b.frag.held[slot]; pd != nil && pd.gen == gen {
			b.releaseDgram(slot, nfq.Drop)
			if !hold {
				err = b.flushLocked()
			}
		}
		b.vmu.Unlock()
		return n, err
	}
	mark := b.layer == LayerNetworkForward && !pd.marked
	slot := a.sys.dslot
	fsl := b.frag
	fsl.held[slot] = nil
	fsl.free = append(fsl.free, slot)
	for i, id := range pd.ids {
		b.track.Release(id) // held: dgramQueued says so
		switch {
		case changed && i >= len(frags):
			b.vbuf = nfq.AppendVerdict(b.vbuf, b.queue, id, nfq.Drop, nil)
		case mark:
			var piece []byte
			if changed {
				piece = frags[i]
			}
			b.vbuf = nfq.AppendVerdictMark(b.vbuf, b.queue, id, nfq.Accept, b.ownMark, piece)
		case changed:
			b.vbuf = nfq.AppendVerdict(b.vbuf, b.queue, id, nfq.Accept, frags[i])
		default:
			b.acc = append(b.acc, id)
		}
	}
	pd.ids = pd.ids[:0]
	fsl.spare = append(fsl.spare, pd)
	// As verdictLocked: held back for SendBatch while one sendmsg can
	// still take the verdicts (a datagram's pieces add at most 64 KiB and
	// a header per fragment).
	if !hold || len(b.vbuf) >= nfq.SendLimit/2 || len(b.acc) >= accInitCap {
		err = b.flushLocked()
	}
	unlock()
	if err != nil {
		return 0, err
	}
	a.sys = sysAddr{}
	return n, nil
}

// refragment cuts pkt, the program's changed datagram a names, into the
// pieces that replace its fragments: the checksums a's clear bits say are
// unfinished computed first (in a copy), then cut to the size its largest
// fragment had, with DF on every piece when that fragment had it
// (reassembly.FragmentDF) as Linux forwards such a datagram, and the
// identification it came with. At LayerNetworkForward each piece's TTL
// (hop limit) is one more than the program's (up to 255), the IPv4 header
// checksum updated: the datagram was handed over decremented, and the
// kernel decrements the pieces again as it forwards them, so what the
// program sent is what leaves. Called with b.fsend.mu held.
func (b *linuxBackend) refragment(pkt []byte, a *Address) ([][]byte, error) {
	fs := &b.fsend
	if !(a.IPChecksum && a.TCPChecksum && a.UDPChecksum) {
		fs.cbuf = append(fs.cbuf[:0], pkt...)
		pkt = fs.cbuf
		_ = CalcChecksums(pkt, nil, unfinished(a))
	}
	if fs.fbuf == nil {
		fs.fbuf = make([]byte, 0, 2*MTUMax)
		fs.flist = make([][]byte, 0, 64)
	}
	cut := reassembly.Fragment
	if a.sys.fragDF {
		cut = reassembly.FragmentDF
	}
	mtu := int(a.sys.fragMTU)
	frags, err := cut(fs.fbuf[:0], fs.flist, pkt, mtu, a.sys.fragID)
	if err != nil {
		if errors.Is(err, reassembly.ErrDontFragment) {
			return nil, fmt.Errorf("divert: send: the %d-byte datagram exceeds the %d bytes of its largest fragment and has DF set, so it cannot be refragmented: %w", len(pkt), mtu, err)
		}
		return nil, fmt.Errorf("divert: send: fragment the %d-byte datagram to %d bytes: %w", len(pkt), mtu, err)
	}
	if cap(frags) > cap(fs.flist) {
		fs.flist = frags[:0]
	}
	oneV4ID(pkt, frags)
	if b.layer == LayerNetworkForward {
		for _, f := range frags {
			incrementTTL(f)
		}
	}
	return frags, nil
}

// incrementTTL adds one to the TTL (hop limit) of an IPv4 (IPv6) packet
// below 255, updating the IPv4 header checksum.
func incrementTTL(p []byte) {
	switch p[0] >> 4 {
	case 4:
		if p[8] == 255 {
			return
		}
		p[8]++
		hl := int(p[0]&0xf) * 4
		p[10], p[11] = 0, 0
		binary.BigEndian.PutUint16(p[10:], ^packet.Checksum(p[:hl], 0))
	case 6:
		if p[7] < 255 {
			p[7]++
		}
	}
}

// sendDgramRaw emits a datagram reassembled in user space that its held
// fragments cannot carry (the program grew it) as new packets: inbound at
// LayerNetwork whole to the local stack (as fragments when it exceeds lo's
// MTU, see inboundFragments), otherwise refragmented to the size
// it came in (or the route's MTU when smaller), each fragment a marked raw
// packet, with the checksums a's clear bits say are unfinished computed
// first (in a copy).
func (b *linuxBackend) sendDgramRaw(pkt []byte, a *Address) (int, error) {
	if b.inj == nil {
		return 0, errors.New("divert: handle cannot inject")
	}
	pkt, err := sendable(pkt)
	if err != nil {
		return 0, err
	}
	n := len(pkt) // the IP length, as WinDivertSend counts
	b.flushBeforeRaw()
	fs := &b.fsend
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if !(a.IPChecksum && a.TCPChecksum && a.UDPChecksum) {
		fs.cbuf = append(fs.cbuf[:0], pkt...)
		pkt = fs.cbuf
		_ = CalcChecksums(pkt, nil, unfinished(a))
	}
	if b.layer == LayerNetwork && !a.Outbound {
		// Delivered whole to the local stack (the raw send loops
		// through lo), or as fragments when it exceeds lo's MTU.
		if err := b.inj.Inbound(pkt, a.IfIdx); err != nil {
			if !errors.Is(err, unix.EMSGSIZE) {
				return 0, injectError(err)
			}
			if err := b.inboundFragments(pkt, a.IfIdx, a.sys.fragID, err); err != nil {
				return 0, err
			}
		}
		a.sys = sysAddr{}
		return n, nil
	}
	zone := a.IfIdx
	if b.layer == LayerNetworkForward && pkt[0]>>4 == 4 {
		// A forwarded IPv4 datagram leaves by its route, even to a
		// link-scoped destination (169.254/16, which Linux forwards like
		// any address): its IfIdx (the route's interface, or 0 when there
		// was none) names no link to force. An IPv6 one to a link-scoped
		// destination (fe80::/10) is routed only back onto the link it
		// came in on, which its IfIdx names (the route lookup's answer
		// for such a destination is the incoming interface), and the
		// raw send needs that zone: without one the kernel sends it onto
		// the link of its first fe80::/64 route.
		zone = 0
	}
	if err := b.sendFragments(pkt, int(a.sys.fragMTU), a.sys.fragID, zone, false, a.sys.fragDF); err != nil {
		return 0, err
	}
	a.sys = sysAddr{}
	return n, nil
}

// inboundFragments delivers pkt, a datagram reassembled in user space whose
// raw send to the local stack the kernel refused as larger than lo's MTU
// (err, EMSGSIZE), as fragments of that MTU, which the kernel reassembles
// on input as it would have reassembled the datagram's own: an IPv6
// datagram of 65,537 to 65,575 bytes (a payload of up to 65,535 bytes, which
// the kernel's reassembly takes) exceeds lo's default MTU of 65,536 bytes,
// and a smaller MTU set on lo leaves more datagrams too big. id is the
// identification of IPv6 fragments; ifIdx the interface the datagram came
// in on, the zone of a link-local destination, without which the kernel
// cannot look up its route (a UDP connect to fe80::/10 without one is
// EINVAL). A datagram that cannot be fragmented (IPv4 with DF set, or an
// MTU too small for its headers) gives an error wrapping reassembly's
// reason and EMSGSIZE. Called with b.fsend.mu held.
func (b *linuxBackend) inboundFragments(pkt []byte, ifIdx, id uint32, err error) error {
	mtu, merr := b.inj.RouteMTU(pkt, ifIdx) // a local destination's route: lo's
	if merr != nil {
		return fmt.Errorf("divert: %w (route MTU: %w)", err, merr)
	}
	if mtu >= len(pkt) {
		return fmt.Errorf("divert: %w (the route's MTU is %d)", err, mtu)
	}
	fs := &b.fsend
	if fs.fbuf == nil {
		fs.fbuf = make([]byte, 0, 2*MTUMax)
		fs.flist = make([][]byte, 0, 64)
	}
	frags, ferr := reassembly.Fragment(fs.fbuf[:0], fs.flist, pkt, mtu, id)
	if ferr != nil {
		return fmt.Errorf("divert: send: the %d-byte datagram exceeds the %d-byte MTU of lo, through which it is delivered, and cannot be fragmented: %w (%w)", len(pkt), mtu, ferr, unix.EMSGSIZE)
	}
	if cap(frags) > cap(fs.flist) {
		fs.flist = frags[:0]
	}
	oneV4ID(pkt, frags)
	for i, f := range frags {
		if err := b.inj.Inbound(f, 0); err != nil {
			return fmt.Errorf("divert: fragment %d of %d: %w", i+1, len(frags), err) // err says "inject: ..."
		}
	}
	return nil
}

// oneV4ID gives the fragments of pkt, an IPv4 datagram whose
// identification is 0, one random identification (the kernel would give
// each fragment one of its own), their header checksums updated.
func oneV4ID(pkt []byte, frags [][]byte) {
	if pkt[0]>>4 != 4 || len(frags) < 2 || binary.BigEndian.Uint16(pkt[4:]) != 0 {
		return
	}
	v := uint16(rand.Uint32N(1<<16-1) + 1)
	for _, f := range frags {
		binary.BigEndian.PutUint16(f[4:], v)
		hl := int(f[0]&0xf) * 4
		f[10], f[11] = 0, 0
		binary.BigEndian.PutUint16(f[10:], ^packet.Checksum(f[:hl], 0))
	}
}

// sendTooBig sends pkt, a new outbound packet the kernel refused as larger
// than the MTU of its route (EMSGSIZE; the header-included raw send does
// not fragment), as fragments of that route's MTU, as the host fragments
// its own datagrams: IPv4 with its identification (one chosen at random
// when it is 0, where the kernel would choose one for each fragment), IPv6
// with a Fragment header of a random identification. An IPv4 packet with
// DF set is refused, and so is an IPv6 packet that is a fragment already
// (or whose headers leave no room for data in a fragment), with errors
// that wrap EMSGSIZE and name the MTU. err is the refused send's error.
func (b *linuxBackend) sendTooBig(pkt []byte, ifIdx uint32, err error) error {
	rm, merr := b.inj.RouteMTU(pkt, ifIdx)
	if merr != nil {
		return fmt.Errorf("divert: %w (route MTU: %w)", err, merr)
	}
	if rm >= len(pkt) {
		return fmt.Errorf("divert: %w (the route's MTU is %d)", err, rm) // the device's MTU is smaller than its route's
	}
	fs := &b.fsend
	fs.mu.Lock()
	defer fs.mu.Unlock()
	var id uint32
	if pkt[0]>>4 == 6 {
		id = rand.Uint32N(1<<32-1) + 1
	}
	if err := b.sendFragments(pkt, rm, id, ifIdx, true, false); err != nil {
		switch {
		case errors.Is(err, reassembly.ErrDontFragment):
			return fmt.Errorf("divert: send: the %d-byte packet exceeds the %d-byte MTU of its route and has DF set, so it is not fragmented (a router would drop it and answer ICMP fragmentation needed, MTU %d): %w (%w)", len(pkt), rm, rm, reassembly.ErrDontFragment, unix.EMSGSIZE)
		case errors.Is(err, reassembly.ErrFragmented), errors.Is(err, reassembly.ErrMTU):
			// Too big, and not to be fragmented: still the send's EMSGSIZE.
			why := reassembly.ErrMTU
			if errors.Is(err, reassembly.ErrFragmented) {
				why = reassembly.ErrFragmented
			}
			return fmt.Errorf("divert: send: the %d-byte packet exceeds the %d-byte MTU of its route and cannot be fragmented: %w (%w)", len(pkt), rm, why, unix.EMSGSIZE)
		}
		return err
	}
	return nil
}

// sendFragments sends pkt outbound as fragments of at most mtu bytes, each
// a marked raw packet leaving through ifIdx for a link-scoped destination;
// id is the identification of IPv6 fragments (IPv4 ones keep pkt's, or get
// a random one when it is 0). When the first fragment is refused as too big
// (EMSGSIZE) and asked is false, it asks the route's MTU and, if smaller,
// fragments again to it. keepDF is set for a datagram that came as
// fragments whose largest had DF (reassembly.Info.DF): as Linux forwards
// such a datagram, an IPv4 one with DF set is cut to mtu (the size it came
// in) with DF on every fragment, and refused (ErrDontFragment) when its
// route's MTU is smaller. Called with b.fsend.mu held.
func (b *linuxBackend) sendFragments(pkt []byte, mtu int, id uint32, ifIdx uint32, asked, keepDF bool) error {
	fs := &b.fsend
	if fs.fbuf == nil {
		fs.fbuf = make([]byte, 0, 2*MTUMax)
		fs.flist = make([][]byte, 0, 64)
	}
	for {
		cut := reassembly.Fragment
		if keepDF {
			cut = reassembly.FragmentDF
		}
		frags, err := cut(fs.fbuf[:0], fs.flist, pkt, mtu, id)
		if err != nil {
			if errors.Is(err, reassembly.ErrDontFragment) {
				return fmt.Errorf("divert: send: the %d-byte datagram exceeds the %d-byte MTU and has DF set, so it cannot be refragmented: %w", len(pkt), mtu, err)
			}
			return fmt.Errorf("divert: send: fragment the %d-byte datagram to %d bytes: %w", len(pkt), mtu, err)
		}
		if cap(frags) > cap(fs.flist) {
			fs.flist = frags[:0]
		}
		oneV4ID(pkt, frags)
		for i, f := range frags {
			if err = b.inj.OutboundOn(f, ifIdx); err != nil { // the link of a link-scoped destination
				if i == 0 && !asked && errors.Is(err, unix.EMSGSIZE) {
					break // the route's MTU is smaller: ask it, then again
				}
				return fmt.Errorf("divert: fragment %d of %d: %w", i+1, len(frags), err) // err says "inject: ..."
			}
		}
		if err == nil {
			return nil
		}
		asked = true
		// The same interface as the send's: a link-scoped destination's
		// route depends on it.
		rm, merr := b.inj.RouteMTU(pkt, ifIdx)
		if merr != nil {
			return fmt.Errorf("divert: %w (route MTU: %w)", err, merr)
		}
		if rm >= mtu {
			return fmt.Errorf("divert: %w", err)
		}
		mtu = rm
		keepDF = false // smaller than it came in: a router refuses a DF datagram
	}
}
