package main

import (
	"bytes"
	"testing"
)

// The fuzz targets here feed damaged on-disk structures to the parsers
// mount and client snapshot use on a mirror leg: they must return an
// error or a result that lies within the device, never panic or allocate
// by a length read from the disk. Seeds are the test fixtures, valid and
// damaged, plus what fuzzing found (testdata/fuzz); `make test` runs them,
// `make fuzz` explores.

func FuzzMDSuperblock(f *testing.F) {
	const small = 16 << 10
	f.Add(mdImage(small, 4096, 1, 16, 16, 16)) // 1.2
	f.Add(mdImage(small, 0, 1, 8, 24, 0))      // 1.1, used 0: the data size
	f.Add(mdImage(small, 8192, 1, 0, 16, 16))  // 1.0, near the end
	f.Add(mdImage(small, 4096, 5, 16, 16, 16)) // RAID5
	f.Add(mdImage(small, 4096, 1, 1<<55+16, 16, 16))
	f.Add(mdImage(small, 4096, 1, 16, 1<<55+16, 0))
	f.Add(mdImage(small, 4096, 1, 8, 16, 16)) // data over the superblock
	f.Add(make([]byte, small))
	f.Fuzz(func(t *testing.T, img []byte) {
		size := int64(len(img))
		m, err := findMDMember(bytes.NewReader(img), size)
		if err != nil || m == nil {
			return
		}
		if m.Offset < 0 || m.Size <= 0 || m.Offset > size || m.Size > size-m.Offset {
			t.Fatalf("member data [%d, +%d) outside the %d-byte device", m.Offset, m.Size, size)
		}
	})
}
