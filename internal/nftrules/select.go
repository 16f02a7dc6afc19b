package nftrules

// FragSelect restricts the packets a handle's chains select by
// fragmentation.
type FragSelect uint8

// Fragment selections.
const (
	// FragAny selects fragments and whole packets alike (the default).
	FragAny FragSelect = iota
	// FragOnly selects IP fragments only: IPv4 packets with MF set or a
	// non-zero offset, IPv6 packets with a Fragment header. Every other
	// packet is accepted before the filter's rules.
	FragOnly
	// FragNone never selects IP fragments: they are accepted before the
	// filter's rules.
	FragNone
)

// DestSelect restricts the packets a handle's chains select by the type of
// their destination address, as the routing table (FIB) of the namespace
// says. It is meant for the prerouting hook, where the routing decision is
// not made yet: DestLocal keeps the packets the host will deliver to itself
// (the input path), DestRemote those it will forward.
type DestSelect uint8

// Destination selections.
const (
	// DestAny selects packets whatever their destination (the default).
	DestAny DestSelect = iota
	// DestLocal selects packets the host delivers to itself: addressed to
	// one of its addresses, or broadcast, anycast or multicast (fib daddr
	// type local to multicast); others are accepted before the filter's
	// rules.
	DestLocal
	// DestRemote selects the other packets, those the host may forward;
	// packets it delivers to itself are accepted before the filter's rules.
	DestRemote
)
