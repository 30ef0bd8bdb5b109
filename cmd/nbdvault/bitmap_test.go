package main

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestBitmapDirty(t *testing.T) {
	img := make([]byte, 3*4096)
	const off = 4096 // as in an LVM rmeta
	le := binary.LittleEndian
	le.PutUint32(img[off:], bitmapMagic)
	le.PutUint64(img[off+40:], 100*2048) // 100 MiB of 512-byte sectors
	le.PutUint32(img[off+52:], 1<<20)    // 1 MiB chunks: 100 bits
	bitsAt := img[off+bitmapSuperSize:]
	for _, b := range []int{0, 5, 99} {
		bitsAt[b/8] |= 1 << (b % 8)
	}
	bitsAt[12] |= 0xf0 // past chunk 99: not counted
	path := filepath.Join(t.TempDir(), "rmeta")
	require.NoError(t, os.WriteFile(path, img, 0o600))

	dirty, chunks, err := bitmapDirty(path, off)
	require.NoError(t, err)
	assert.Equal(t, int64(100), chunks)
	assert.Equal(t, int64(3), dirty)

	_, _, err = bitmapDirty(path, 0)
	assert.ErrorContains(t, err, "no write-intent bitmap")
}
