// Package filter implements WinDivert's filter language.
package filter

import "fmt"

// Layer is a WinDivert layer; the values equal divert.Layer's.
type Layer uint8

// Error is a filter that does not compile.
type Error struct {
	Pos int    // character position of the fault
	Msg string // WinDivert's message
}

func (e *Error) Error() string { return fmt.Sprintf("filter: %s at position %d", e.Msg, e.Pos) }

// Filter is a compiled filter. TODO(filter helper): implement.
type Filter struct{}

// Compile compiles text for layer. TODO(filter helper): implement.
func Compile(text string, layer Layer) (*Filter, error) {
	return &Filter{}, nil
}
