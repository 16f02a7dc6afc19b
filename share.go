package divert

import (
	"fmt"
	"sync/atomic"
)

// sharedBackend lets several Handles use one backend: WinDivert and divert(4)
// serve concurrent readers from one queue, so OpenQueues gives every handle
// a view of the same backend. The backend closes with the last view; the
// views share its read deadline and its Shutdown state.
type sharedBackend struct {
	backend
	refs   *atomic.Int32
	closed atomic.Bool
}

// shareBackend returns n views of b.
func shareBackend(b backend, n int) []backend {
	if n == 1 {
		return []backend{b}
	}
	refs := new(atomic.Int32)
	refs.Store(int32(n))
	bs := make([]backend, n)
	for i := range bs {
		bs[i] = &sharedBackend{backend: b, refs: refs}
	}
	return bs
}

func (s *sharedBackend) close() error {
	if s.closed.Swap(true) {
		return nil
	}
	if s.refs.Add(-1) == 0 {
		return s.backend.close()
	}
	return nil
}

// stats reports the shared backend's counters: every view of it shows the
// same totals.
func (s *sharedBackend) stats() (Stats, error) {
	st, ok := s.backend.(statser)
	if !ok {
		return Stats{}, fmt.Errorf("divert: stats: %w", ErrNotSupported)
	}
	return st.stats()
}
