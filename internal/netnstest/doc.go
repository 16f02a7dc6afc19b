// Package netnstest makes throw-away network namespaces for end-to-end tests
// and demos: namespaces joined by veth pairs, code run inside a namespace on a
// locked OS thread, and bounded traffic (UDP, ICMP echo) between them.
//
// Everything it makes is removed by Close, and the T-taking constructors
// register that with t.Cleanup, so a failing test leaves nothing behind. All
// addresses live inside the namespaces (10.x.y.z and fd00::/8); the host's
// root namespace is never touched.
//
// Namespaces are made and configured with the ip(8) binary (iproute2), the
// way `ip netns add` does it, so that other tools (nft, ping) can be pointed
// at them with `ip netns exec`.
package netnstest
