//go:build freebsd || linux

package divert

// The FreeBSD backend's read deadline after Shutdown, kept free of FreeBSD
// system calls so that it is unit-tested on Linux too.

import (
	"sync/atomic"
	"time"
)

// pastDeadline is the read deadline that wakes blocked readers at once.
var pastDeadline = time.Unix(1, 0)

// setDeadlineUnlessShut sets the program's read deadline t with set,
// unless the handle is shut down for receiving: then the deadline in force
// must stay in the past, so that readers drain the socket and stop.
// Shutdown stores shut, then sets a past deadline; a call that checked
// shut just before could land its deadline after Shutdown's and leave a
// reader blocked: checking again after setting puts the past one back.
func setDeadlineUnlessShut(shut *atomic.Bool, set func(time.Time) error, t time.Time) error {
	if shut.Load() {
		return nil
	}
	if err := set(t); err != nil {
		return err
	}
	if shut.Load() {
		return set(pastDeadline)
	}
	return nil
}
