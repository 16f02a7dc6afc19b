package divert

import "fmt"

// sysAddr is the backend's reference to a queued packet. TODO: real backend.
type sysAddr struct{}

func openBackend(cfg *openConfig) (backend, error) {
	return nil, fmt.Errorf("%w: linux backend not written yet", ErrNotSupported)
}
