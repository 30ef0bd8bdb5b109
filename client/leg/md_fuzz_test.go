package leg

import (
	"testing"

	"github.com/nbdvault/nbdvault/internal/testdev"
)

// The fuzz targets here feed damaged on-disk structures to the parsers
// mount and client snapshot use on a mirror leg: they must return an
// error or a result that lies within the device, never panic or allocate
// by a length read from the disk. Each fuzzes the few hundred bytes the
// parser looks at, placed where it looks, on a device of a fuzzed size
// that is zeros elsewhere: small inputs keep fuzzing (and minimizing)
// fast. Seeds are the test fixtures, valid and damaged, plus what
// fuzzing found (testdata/fuzz); `make test` runs them, `make fuzz`
// explores.

// mdPlaces are where FindMD looks on a size-byte device.
func mdPlaces(size int64) []int64 {
	return []int64{4096, 0, ((size >> 9) - 16) &^ 7 * 512}
}

// mdSuper is a version-1 superblock, as mdImage writes it.
func mdSuper(level uint32, dataOffset, dataSize, used uint64) []byte {
	return testdev.MDImage(256, 0, level, dataOffset, dataSize, used)
}

func FuzzMDSuperblock(f *testing.F) {
	const size = 64 << 20
	f.Add(mdSuper(1, 2048, 129024, 129024), uint8(0), int64(size))        // 1.2
	f.Add(mdSuper(1, 16, 131000, 0), uint8(1), int64(size))               // 1.1, used 0: the data size
	f.Add(mdSuper(1, 0, size/512-16, size/512-16), uint8(2), int64(size)) // 1.0
	f.Add(mdSuper(5, 2048, 129024, 129024), uint8(0), int64(size))        // RAID5
	f.Add(mdSuper(1, 1<<55+2048, 129024, 129024), uint8(0), int64(size))  // the offset wraps as bytes
	f.Add(mdSuper(1, 2048, 1<<55+2048, 0), uint8(0), int64(size))         // the size wraps as bytes
	f.Add(mdSuper(1, 8, 1024, 1024), uint8(0), int64(size))               // data over the superblock
	f.Add(mdSuper(1, 0, size/512-8, size/512-8), uint8(2), int64(size))   // data over the superblock
	f.Add(mdSuper(1, 2048, 129024, 129024), uint8(0), int64(16<<20))      // past the end
	f.Add(mdSuper(1, 2048, 129024, 129024), uint8(0), int64(4096+100))    // cut short
	f.Fuzz(func(t *testing.T, sb []byte, where uint8, size int64) {
		if size < 0 {
			return
		}
		places := mdPlaces(size)
		at := places[int(where)%len(places)]
		m, err := FindMD(testdev.Placed{Size: size, Parts: map[int64][]byte{at: sb}}, size)
		if err != nil || m == nil {
			return
		}
		if m.Offset < 0 || m.Size <= 0 || m.Offset > size || m.Size > size-m.Offset {
			t.Fatalf("member data [%d, +%d) outside the %d-byte device", m.Offset, m.Size, size)
		}
	})
}
