package main

// DemoResult is what -demo measured, part of the -json summary.
type DemoResult struct {
	Sender    string   `json:"sender"`
	Receiver  string   `json:"receiver"`
	Filter    string   `json:"filter"`
	Pings     int      `json:"pings"`     // echo requests sent per address family
	Replies4  int      `json:"replies4"`  // IPv4 echo replies received
	Replies6  int      `json:"replies6"`  // IPv6 echo replies received
	Datagrams int      `json:"datagrams"` // UDP datagrams sent per address family
	Delivered int      `json:"delivered"` // UDP datagrams the receiver's sockets got (both families)
	OK        bool     `json:"ok"`        // everything behaved
	Problems  []string `json:"problems,omitempty"`
}
