package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"
)

// pcapng block types and options (draft-ietf-opsawg-pcapng).
const (
	blockSHB = 0x0A0D0D0A
	blockIDB = 0x00000001
	blockEPB = 0x00000006

	byteOrderMagic = 0x1A2B3C4D

	optEndOfOpt   = 0
	optComment    = 1
	shbUserAppl   = 4
	ifName        = 2
	ifDescription = 3
	ifTSResol     = 9
	epbFlags      = 2

	// linkTypeRaw is LINKTYPE_RAW: the packet starts with an IPv4 or IPv6
	// header.
	linkTypeRaw = 101

	// Direction bits of epb_flags.
	epbInbound  = 1
	epbOutbound = 2
)

// pcapngWriter writes a pcapng file with one section, little-endian, with
// nanosecond timestamps (if_tsresol = 9) and LINKTYPE_RAW interfaces added
// as packets name them. It is not safe for concurrent use. WritePacket does
// not allocate.
type pcapngWriter struct {
	w       *bufio.Writer
	snaplen uint32
	ifaces  map[uint32]uint32 // interface key -> interface id
	scratch []byte
	tail    [20]byte // padding, options and trailer of a packet block
	packets uint64
	bytes   uint64 // bytes written to the file
}

var le = binary.LittleEndian

// newPcapngWriter writes the section header block to w. snaplen 0 means
// packets are never cut.
func newPcapngWriter(w io.Writer, snaplen uint32, userAppl string) (*pcapngWriter, error) {
	pw := &pcapngWriter{
		w:       bufio.NewWriterSize(w, 1<<16),
		snaplen: snaplen,
		ifaces:  make(map[uint32]uint32),
		scratch: make([]byte, 0, 256),
	}
	b := pw.scratch[:0]
	b = le.AppendUint32(b, blockSHB)
	b = le.AppendUint32(b, 0) // length, set below
	b = le.AppendUint32(b, byteOrderMagic)
	b = le.AppendUint16(b, 1)                  // major
	b = le.AppendUint16(b, 0)                  // minor
	b = le.AppendUint64(b, 0xFFFFFFFFFFFFFFFF) // section length unknown
	b = appendOption(b, shbUserAppl, []byte(userAppl))
	b = appendOption(b, optEndOfOpt, nil)
	if err := pw.writeBlock(b); err != nil {
		return nil, err
	}
	return pw, nil
}

// appendOption appends one option, its value padded to 4 bytes.
func appendOption(b []byte, code uint16, value []byte) []byte {
	b = le.AppendUint16(b, code)
	b = le.AppendUint16(b, uint16(len(value)))
	b = append(b, value...)
	return padTo4(b) // blocks start 4-aligned, so padding b pads the value
}

// padTo4 pads b with zero bytes to a multiple of 4 bytes.
func padTo4(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// writeBlock fills in the total length of the block in b (whose first 8
// bytes are type and a length placeholder), appends the trailing length and
// writes it.
func (pw *pcapngWriter) writeBlock(b []byte) error {
	total := uint32(len(b) + 4)
	le.PutUint32(b[4:8], total)
	b = le.AppendUint32(b, total)
	pw.scratch = b[:0]
	_, err := pw.w.Write(b)
	if err != nil {
		return fmt.Errorf("pcapng: %w", err)
	}
	pw.bytes += uint64(total)
	return nil
}

// Interface returns the id of the interface known by key, if it was
// added.
func (pw *pcapngWriter) Interface(key uint32) (uint32, bool) {
	id, ok := pw.ifaces[key]
	return id, ok
}

// AddInterface writes an interface description block for the interface
// known by key (the divert interface index) with a name and a description,
// and returns its interface id. An interface already added keeps its id.
func (pw *pcapngWriter) AddInterface(key uint32, name, desc string) (uint32, error) {
	if id, ok := pw.ifaces[key]; ok {
		return id, nil
	}
	b := pw.scratch[:0]
	b = le.AppendUint32(b, blockIDB)
	b = le.AppendUint32(b, 0)
	b = le.AppendUint16(b, linkTypeRaw)
	b = le.AppendUint16(b, 0) // reserved
	b = le.AppendUint32(b, pw.snaplen)
	if name != "" {
		b = appendOption(b, ifName, []byte(name))
	}
	if desc != "" {
		b = appendOption(b, ifDescription, []byte(desc))
	}
	b = appendOption(b, ifTSResol, []byte{9}) // 10^-9 s
	b = appendOption(b, optEndOfOpt, nil)
	if err := pw.writeBlock(b); err != nil {
		return 0, err
	}
	id := uint32(len(pw.ifaces))
	pw.ifaces[key] = id
	return id, nil
}

// errUnknownInterface is WritePacket's error for an interface id that was
// never added.
var errUnknownInterface = errors.New("pcapng: packet for an interface that was not added")

// WritePacket writes an enhanced packet block: pkt (cut to the snap length)
// on interface id, taken at ts, in the direction outbound says.
func (pw *pcapngWriter) WritePacket(id uint32, ts time.Time, pkt []byte, outbound bool) error {
	if id >= uint32(len(pw.ifaces)) {
		return errUnknownInterface
	}
	data := pkt
	if pw.snaplen > 0 && uint32(len(data)) > pw.snaplen {
		data = data[:pw.snaplen]
	}
	ns := uint64(ts.UnixNano())
	b := pw.scratch[:0]
	b = le.AppendUint32(b, blockEPB)
	b = le.AppendUint32(b, 0)
	b = le.AppendUint32(b, id)
	b = le.AppendUint32(b, uint32(ns>>32))
	b = le.AppendUint32(b, uint32(ns))
	b = le.AppendUint32(b, uint32(len(data)))
	b = le.AppendUint32(b, uint32(len(pkt)))
	// The packet data is written straight from pkt, not copied into the
	// block: header, data, padding, options, trailer.
	pad := (4 - len(data)%4) % 4
	t := pw.tail[:0]
	for range pad {
		t = append(t, 0)
	}
	dir := uint32(epbInbound)
	if outbound {
		dir = epbOutbound
	}
	t = le.AppendUint16(t, epbFlags)
	t = le.AppendUint16(t, 4)
	t = le.AppendUint32(t, dir)
	t = le.AppendUint32(t, 0) // opt_endofopt
	total := uint32(len(b) + len(data) + len(t) + 4)
	le.PutUint32(b[4:8], total)
	t = le.AppendUint32(t, total)
	pw.scratch = b[:0]
	if _, err := pw.w.Write(b); err != nil {
		return fmt.Errorf("pcapng: %w", err)
	}
	if _, err := pw.w.Write(data); err != nil {
		return fmt.Errorf("pcapng: %w", err)
	}
	if _, err := pw.w.Write(t); err != nil {
		return fmt.Errorf("pcapng: %w", err)
	}
	pw.packets++
	pw.bytes += uint64(total)
	return nil
}

// Flush writes buffered blocks to the underlying writer.
func (pw *pcapngWriter) Flush() error {
	if err := pw.w.Flush(); err != nil {
		return fmt.Errorf("pcapng: %w", err)
	}
	return nil
}
