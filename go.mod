module github.com/netdivert/divert

go 1.26.0

require (
	github.com/florianl/go-nfqueue/v2 v2.0.4
	github.com/google/nftables v0.3.0
	github.com/gopacket/gopacket v1.7.7
	github.com/imgk/divert-go v0.1.0
	github.com/mdlayher/netlink v1.11.2
	github.com/stretchr/testify v1.12.1
	github.com/ti-mo/conntrack v0.6.0
	golang.org/x/net v0.55.0
	golang.org/x/sys v0.50.0
)

require (
	github.com/google/go-cmp v0.7.0 // indirect
	github.com/mdlayher/socket v0.6.0 // indirect
	github.com/pkg/errors v0.9.1 // indirect
	github.com/ti-mo/netfilter v0.5.3 // indirect
	go.yaml.in/yaml/v3 v3.0.5 // indirect
	golang.org/x/sync v0.20.0 // indirect
)
