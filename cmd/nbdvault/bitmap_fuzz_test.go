package main

import (
	"encoding/binary"
	"testing"
)

// FuzzBitmap reads a write-intent bitmap at 4096 (dm-raid's place) and an
// MD superblock's bitmap offset from the same device.
func FuzzBitmap(f *testing.F) {
	valid := bitmapImage(4096+256+13, 100*2048, 1<<20) // 100 chunks
	valid[4096+256] = 0x21
	valid[4096+256+12] = 0xff // 4 bits of chunks, 4 past the last
	f.Add(valid)
	f.Add(bitmapImage(4096+256, 0, 512))
	f.Add(bitmapImage(4096+256, 1<<40, 512))
	f.Add(bitmapImage(4096+256, 100, 1000))
	f.Add(bitmapImage(4096+256, 1<<55+8, 1<<20))
	f.Add(mdSuperImage(1, 8))
	f.Add(mdSuperImage(1, -9))
	f.Add(mdSuperImage(0, 8))
	f.Fuzz(func(t *testing.T, img []byte) {
		read := func(off int64, n int) ([]byte, error) {
			if n > maxBitmapBytes {
				t.Fatalf("a read of %d bytes at %d", n, off)
			}
			return sliceRead(img)(off, n)
		}
		dirty, chunks, err := countBitmap("dev", 4096, read)
		if err == nil && (dirty < 0 || dirty > chunks || (chunks+7)/8 > int64(len(img))) {
			t.Fatalf("%d of %d chunks dirty in a bitmap on a %d-byte device", dirty, chunks, len(img))
		}
		at, err := findMDBitmap("dev", read)
		if err == nil && (at < 0 || at == 4096 && binary.LittleEndian.Uint32(img[4096:]) == mdMagic) {
			t.Fatalf("a bitmap at %d", at)
		}
	})
}
