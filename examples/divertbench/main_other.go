//go:build !linux

package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "divertbench: needs Linux (network namespaces, NFQUEUE)")
	os.Exit(1)
}
