// Package testdev has stand-ins for block devices, for the tests of code
// that parses what is on one.
package testdev

import (
	"encoding/binary"
	"errors"
	"io"
)

// Placed is a device of Size bytes of zeros but for Parts, each at its
// offset. Reads past Size end with io.EOF, as a block device's do.
type Placed struct {
	Size  int64
	Parts map[int64][]byte
}

func (d Placed) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, errors.New("negative offset")
	}
	if off >= d.Size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), d.Size-off))
	clear(p[:n])
	for at, b := range d.Parts {
		if at < off+int64(n) && at+int64(len(b)) > off { // overlapping
			lo, hi := max(at, off), min(at+int64(len(b)), off+int64(n))
			copy(p[lo-off:hi-off], b[lo-at:hi-at])
		}
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// MDImage is a size-byte device with an MD version-1 superblock at at:
// RAID level, data offset, data size and used size (in sectors).
func MDImage(size, at int64, level uint32, dataOffset, dataSize, used uint64) []byte {
	img := make([]byte, size)
	sb := img[at:]
	le := binary.LittleEndian
	le.PutUint32(sb[0:], 0xa92b4efc) // MD_SB_MAGIC
	le.PutUint32(sb[4:], 1)
	le.PutUint32(sb[72:], level)
	le.PutUint64(sb[80:], used)
	le.PutUint64(sb[128:], dataOffset)
	le.PutUint64(sb[136:], dataSize)
	return img
}
