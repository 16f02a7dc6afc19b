package divert

// openBackends opens n backends for OpenQueues.
// TODO(queues): spread over n NFQUEUE queues with one ruleset (fanout).
func openBackends(cfg *openConfig, n int) ([]backend, error) {
	b, err := openBackend(cfg)
	if err != nil {
		return nil, err
	}
	return shareBackend(b, n), nil
}
