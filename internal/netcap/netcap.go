// Package netcap tells whether the calling process may administer a
// network namespace: whether it has CAP_NET_ADMIN over it, which
// nfnetlink requires of every NFQUEUE and nf_tables request. It is
// Linux-only; elsewhere it is empty.
package netcap
