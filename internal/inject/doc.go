// Package inject sends packets that a divert handle made itself into the
// Linux network stack, marked so that divert rules of equal or higher
// priority do not take them again (see nftrules.Mark).
//
// Outbound packets go out as if this host sent them: a header-included raw
// socket (IPPROTO_RAW) routes them by their destination address through the
// OUTPUT and POSTROUTING hooks (OutboundOn sends a packet to a destination
// scoped to one link through the interface given: an IPv6 zone, an IPv4
// IP_PKTINFO control message). For IPv4 the kernel fills the total length
// and header checksum (and the source address and id when zero); for IPv6 it
// fills nothing. Packets larger than the route's MTU fail with EMSGSIZE
// (RouteMTU tells the MTU to fragment them to).
//
// Inbound packets are delivered to the local stack as if received: they are
// sent on the same raw sockets to their (local) destination address, loop
// through the lo interface and reach PREROUTING and INPUT there and then the
// listening socket. The kernel therefore reports lo as their ingress
// interface, not the ifIdx given, and they traverse OUTPUT and POSTROUTING
// first (carrying the mark). A destination that is not local would be
// routed like an outbound packet, out of the host: Inbound asks the routing
// table first and refuses such a packet (ErrNotLocal).
package inject
