//go:build linux || windows

package divert

import "hash/maphash"

// dgramSeed seeds the hash that tells a datagram reassembled in user space
// sent back changed: Recv stores the hash of the datagram it handed over in
// the Address (sysAddr.dsum), Send compares (sendDgram on Linux, refragment
// on Windows). A change that hashes equal, odds 2^-64, is taken for none.
var dgramSeed = maphash.MakeSeed()

// unfinished returns the CalcChecksums flags that compute the checksums a's
// clear bits say are unfinished, as WinDivert's driver does on every send:
// IPv4, TCP and UDP (no Address bit covers ICMP's, which stay as given).
func unfinished(a *Address) ChecksumFlag {
	fl := NoICMPChecksum | NoICMPv6Checksum
	if a.IPChecksum {
		fl |= NoIPChecksum
	}
	if a.TCPChecksum {
		fl |= NoTCPChecksum
	}
	if a.UDPChecksum {
		fl |= NoUDPChecksum
	}
	return fl
}
