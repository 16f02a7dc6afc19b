package main

// The demo's ports when -from and -to are not given.
const (
	demoFrom = 8080
	demoTo   = 9090
)

// DemoResult is what -demo saw, part of the -json summary.
type DemoResult struct {
	Client   string   `json:"client"`   // the client's namespace and addresses
	Server   string   `json:"server"`   // the server's namespace and addresses
	Messages int      `json:"messages"` // messages the client sent per address family
	Replies  int      `json:"replies"`  // replies the client got, both families
	Served   int      `json:"served"`   // messages the server got on port To, both families
	OK       bool     `json:"ok"`       // everything behaved
	Problems []string `json:"problems,omitempty"`
}
