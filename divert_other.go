//go:build !linux && !freebsd && !windows

package divert

import (
	"fmt"
	"runtime"
)

// sysAddr is empty where there is no backend.
type sysAddr struct{}

func openBackend(cfg *openConfig) (backend, error) {
	return nil, fmt.Errorf("%w: no divert backend for %s", ErrNotSupported, runtime.GOOS)
}
