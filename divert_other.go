//go:build !linux && !freebsd && !windows

package divert

import (
	"fmt"
	"runtime"
)

// sysAddr is empty where there is no backend.
type sysAddr struct{}

// layerSupport accepts every layer: openBackend refuses them all.
func layerSupport(Layer) error { return nil }

func openBackend(cfg *openConfig) (backend, error) {
	return nil, fmt.Errorf("%w: no divert backend for %s", ErrNotSupported, runtime.GOOS)
}
