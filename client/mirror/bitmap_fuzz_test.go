package mirror

import (
	"fmt"
	"testing"

	"github.com/nbdvault/nbdvault/internal/testdev"
)

// bitmapSuper is a bitmap superblock, as bitmapImage writes it.
func bitmapSuper(syncSectors uint64, chunkBytes uint32) []byte {
	return bitmapImage(4096+bitmapSuperSize, syncSectors, chunkBytes)[4096:]
}

// FuzzBitmap reads a write-intent bitmap at 4096 (dm-raid's place, the
// superblock then the bits) and an MD superblock's bitmap offset from
// a device with an MD superblock at 4096 or 0 (which).
func FuzzBitmap(f *testing.F) {
	valid := bitmapSuper(100*2048, 1<<20) // 100 chunks
	valid = append(valid, make([]byte, 13)...)
	valid[bitmapSuperSize] = 0x21
	valid[bitmapSuperSize+12] = 0xff // 4 bits of chunks, 4 past the last
	md := func(features uint32, offset int32) []byte { return mdSuperImage(features, offset)[4096 : 4096+256] }
	for _, c := range []struct {
		bitmap, md []byte
		which      bool
	}{
		{valid, md(1, 8), false},
		{bitmapSuper(0, 512), md(1, -2), true},
		{bitmapSuper(1<<40, 512), md(1, -9), true},
		{bitmapSuper(100, 1000), md(0, 8), false},
		{bitmapSuper(1<<55+8, 1<<20), md(1, 0), false},
		{bitmapSuper(1<<30, 1<<20), md(1, 1<<30), false},
	} {
		f.Add(c.bitmap, c.md, c.which, int64(64<<10))
	}
	f.Fuzz(func(t *testing.T, bitmap, md []byte, which bool, size int64) {
		if size < 0 {
			return
		}
		mdAt := int64(4096)
		if which {
			mdAt = 0
		}
		dev := testdev.Placed{Size: size, Parts: map[int64][]byte{mdAt: md}}
		read := func(dev testdev.Placed) readFunc {
			return func(off int64, n int) ([]byte, error) {
				if n > maxBitmapBytes {
					t.Fatalf("a read of %d bytes at %d", n, off)
				}
				if off < 0 || n < 0 || off > dev.Size || int64(n) > dev.Size-off {
					return nil, fmt.Errorf("read %d bytes at %d: the device ends at %d", n, off, dev.Size)
				}
				p := make([]byte, n)
				_, err := dev.ReadAt(p, off)
				return p, err
			}
		}
		at, err := findMDBitmap("dev", read(dev))
		if err == nil && (at < 0 || at == mdAt) {
			t.Fatalf("a bitmap at %d, the superblock being at %d", at, mdAt)
		}
		dev = testdev.Placed{Size: size, Parts: map[int64][]byte{4096: bitmap}}
		dirty, chunks, err := countBitmap("dev", 4096, read(dev))
		if err == nil && (dirty < 0 || dirty > chunks || (chunks+7)/8 > size) {
			t.Fatalf("%d of %d chunks dirty in a bitmap on a %d-byte device", dirty, chunks, size)
		}
	})
}
