package main

// DemoResult is what -demo checked, part of the -json summary.
type DemoResult struct {
	Host     string   `json:"host"`
	Peer     string   `json:"peer"`
	Filter   string   `json:"filter"`
	OK       bool     `json:"ok"` // every flow was reported established, then deleted
	Problems []string `json:"problems,omitempty"`
}
