//go:build freebsd || linux

package divert

// The FreeBSD backend's bookkeeping of its ipfw set, kept free of FreeBSD
// system calls so that it is unit-tested on Linux too.

// setClaim is a handle's claim on its ipfw set. Shutdown and Close both
// remove the handle's rules, maybe at once from two goroutines: remove runs
// one deletion at a time, and a caller that comes while another deletes
// waits for it, so that Close does not close the socket (and drop what
// the rules still divert to it) before the rules are gone. The set is
// forgotten only once deleted, so that a deletion that failed at Shutdown
// is tried again at Close.
type setClaim struct {
	// sem holds one token while the set is read or deleted (a channel
	// rather than a mutex, so that a test sees a waiter as blocked).
	sem chan struct{}
	set int // guarded by sem; -1: none
}

func (c *setClaim) init() {
	c.sem = make(chan struct{}, 1)
	c.set = -1
}

// claim records the set the handle's rules are in.
func (c *setClaim) claim(set int) {
	c.sem <- struct{}{}
	c.set = set
	<-c.sem
}

// remove deletes the claimed set's rules with del, if a set is claimed,
// and forgets it once del succeeds.
func (c *setClaim) remove(del func(set int) error) error {
	c.sem <- struct{}{}
	defer func() { <-c.sem }()
	if c.set < 0 {
		return nil
	}
	if err := del(c.set); err != nil {
		return err
	}
	c.set = -1
	return nil
}
