//go:build !linux

package divert

// openBackends opens one backend and shares it between n handles: these
// backends serve concurrent readers from one queue.
func openBackends(cfg *openConfig, n int) ([]backend, error) {
	b, err := openBackend(cfg)
	if err != nil {
		return nil, err
	}
	return shareBackend(b, n), nil
}
