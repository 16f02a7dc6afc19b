//go:build linux

package extest

import "syscall"

const interrupt = syscall.SIGINT
