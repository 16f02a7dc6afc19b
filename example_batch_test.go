package divert_test

import (
	"errors"
	"log"
	"os"
	"os/signal"

	"github.com/netdivert/divert"
)

// relay is the fast loop: batches of packets, one call each way, until the
// handle is shut down and what was queued is received.
func relay(h *divert.Handle) error {
	ms := make([]divert.Message, 64)
	for i := range ms {
		// MTUMax never truncates (WinDivert's batch buffers are as large).
		// A smaller Buf gets a larger packet cut, with ErrTruncated, and
		// only Linux can send a cut packet back (whole, when unchanged):
		// elsewhere Send refuses it.
		ms[i].Buf = make([]byte, divert.MTUMax)
	}
	for {
		n, err := h.RecvBatch(ms)
		if errors.Is(err, divert.ErrShutdown) {
			return nil
		}
		// ErrTruncated here is Linux's: a packet longer than the kernel's
		// queue hands over, which goes on whole when sent back unchanged.
		if err != nil && !errors.Is(err, divert.ErrTruncated) {
			return err
		}
		if _, err := h.SendBatch(ms[:n]); err != nil {
			return err
		}
	}
}

// The fast loop and a clean stop: on Ctrl-C, Shutdown stops new packets
// (they pass, unseen), the loop sends back what was queued and ends at
// ErrShutdown, and Close removes the rules.
func ExampleHandle_RecvBatch() {
	h, err := divert.Open("udp", divert.LayerNetwork, 0, 0)
	if err != nil {
		log.Fatal(err)
	}
	defer h.Close()
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt)
	go func() {
		<-stop
		h.Shutdown(divert.ShutdownRecv)
	}()
	if err := relay(h); err != nil {
		log.Fatal(err)
	}
}
