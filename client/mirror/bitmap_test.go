package mirror

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/internal/testdev"
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

// sliceRead reads from img as readDirect reads from a device.
func sliceRead(img []byte) readFunc {
	return func(off int64, n int) ([]byte, error) {
		if off < 0 || n < 0 || off > int64(len(img)) || int64(n) > int64(len(img))-off {
			return nil, fmt.Errorf("read %d bytes at %d: the device ends at %d", n, off, len(img))
		}
		return img[off : off+int64(n)], nil
	}
}

// bitmapImage is a device with a bitmap superblock at 4096 and no bit set.
func bitmapImage(size int, syncSectors uint64, chunkBytes uint32) []byte {
	img := make([]byte, size)
	le := binary.LittleEndian
	le.PutUint32(img[4096:], bitmapMagic)
	le.PutUint64(img[4096+40:], syncSectors)
	le.PutUint32(img[4096+52:], chunkBytes)
	return img
}

// TestBitmapDamaged feeds superblocks whose sizes would overflow or ask
// for gigabytes: errors, before any big buffer is allocated. (Before the
// checks, sync_size 2^40 sectors in 512-byte chunks made readDirect
// allocate 128 GiB: "fatal error: runtime: out of memory".)
func TestBitmapDamaged(t *testing.T) {
	for _, c := range []struct {
		name        string
		syncSectors uint64
		chunkBytes  uint32
		want        string
	}{
		{"no chunk size", 100, 0, "chunks of 0 bytes"},
		{"chunk size not a power of two", 100, 1000, "chunks of 1000 bytes"},
		{"chunk size under a sector", 100, 256, "chunks of 256 bytes"},
		{"2^40 chunks", 1 << 40, 512, "1099511627776 chunks"},
		{"sync size overflowing as bytes", 1<<55 + 8, 1 << 20, "chunks"},
		{"bits past the device's end", 1 << 30, 1 << 20, "the device ends"},
	} {
		t.Run(c.name, func(t *testing.T) {
			img := bitmapImage(3*4096, c.syncSectors, c.chunkBytes)
			_, _, err := countBitmap("dev", 4096, sliceRead(img))
			assert.ErrorContains(t, err, c.want)

			path := filepath.Join(t.TempDir(), "rmeta")
			require.NoError(t, os.WriteFile(path, img, 0o600))
			_, _, err = bitmapDirty(path, 4096)
			assert.ErrorContains(t, err, c.want, "through O_DIRECT")
		})
	}
	_, _, err := countBitmap("dev", -512, sliceRead(make([]byte, 4096)))
	assert.ErrorContains(t, err, "before the device's start")

	dirty, chunks, err := countBitmap("dev", 4096, sliceRead(bitmapImage(4096+256, 0, 512)))
	require.NoError(t, err, "an empty array")
	assert.Equal(t, [2]int64{0, 0}, [2]int64{dirty, chunks})
}

// mdSuperImage is a device with an MD 1.2 superblock whose feature map
// and bitmap offset are given.
func mdSuperImage(features uint32, bitmapOffset int32) []byte {
	img := testdev.MDImage(16<<10, 4096, 1, 16, 8, 8)
	binary.LittleEndian.PutUint32(img[4096+8:], features)
	binary.LittleEndian.PutUint32(img[4096+96:], uint32(bitmapOffset))
	return img
}

func TestMDBitmapAt(t *testing.T) {
	at, err := findMDBitmap("dev", sliceRead(mdSuperImage(1, 8)))
	require.NoError(t, err)
	assert.Equal(t, int64(4096+4096), at)

	at, err = findMDBitmap("dev", sliceRead(mdSuperImage(1, -2)))
	require.NoError(t, err, "before the superblock, within the device")
	assert.Equal(t, int64(4096-1024), at)

	_, err = findMDBitmap("dev", sliceRead(mdSuperImage(0, 8)))
	assert.ErrorContains(t, err, "no internal write-intent bitmap")
	_, err = findMDBitmap("dev", sliceRead(mdSuperImage(1, -9)))
	assert.ErrorContains(t, err, "before the device's start")
	_, err = findMDBitmap("dev", sliceRead(mdSuperImage(1, 0)))
	assert.ErrorContains(t, err, "puts its bitmap on itself")
	_, err = findMDBitmap("dev", sliceRead(make([]byte, 16<<10)))
	assert.ErrorContains(t, err, "no MD metadata 1.1 or 1.2 superblock")

	path := filepath.Join(t.TempDir(), "member")
	require.NoError(t, os.WriteFile(path, mdSuperImage(1, 8), 0o600))
	at, err = mdBitmapAt(path)
	require.NoError(t, err)
	assert.Equal(t, int64(8192), at)
}

// WaitClean returns once the bitmap's bits are clear (MD clears them as
// the legs complete), and says how many were dirty when ctx ends first.
func TestWaitClean(t *testing.T) {
	img := bitmapImage(3*4096, 100*2048, 1<<20)
	img[4096+bitmapSuperSize] = 0x06 // chunks 1 and 2 dirty
	path := filepath.Join(t.TempDir(), "rmeta")
	require.NoError(t, os.WriteFile(path, img, 0o600))
	b := Bitmap{What: "vg/data", Path: path, Off: 4096}

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	err := b.WaitClean(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.ErrorContains(t, err, "vg/data still had writes in flight to a leg (2 of 100 bitmap regions dirty)")

	done := make(chan error, 1)
	go func() { done <- b.WaitClean(context.Background()) }()
	time.Sleep(100 * time.Millisecond)
	img[4096+bitmapSuperSize] = 0
	require.NoError(t, os.WriteFile(path, img, 0o600))
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("WaitClean did not see the bitmap cleaned")
	}

	_, _, err = Bitmap{What: "vg/gone", Path: filepath.Join(t.TempDir(), "none")}.Dirty()
	require.Error(t, err)
}

func TestBitmapNames(t *testing.T) {
	b, err := LVMBitmap("vg-1/my-data")
	require.NoError(t, err)
	assert.Equal(t, Bitmap{What: "vg-1/my-data", Path: "/dev/mapper/vg--1-my--data_rmeta_0", Off: 4096}, b)
	_, err = LVMBitmap("data")
	require.ErrorIs(t, err, ErrInvalid)
	_, err = MDBitmap("/dev/md-not-here")
	assert.ErrorContains(t, err, "not an MD array with members")
}

// Freeze refuses what cannot be frozen, and what it could not open;
// thaw is safe to call then, and twice. (Freezing a real file system
// would stop this machine's writes: the VM tests do that.)
func TestFreezeRefuses(t *testing.T) {
	thaw, err := Freeze([]string{filepath.Join(t.TempDir(), "missing")})
	require.ErrorIs(t, err, os.ErrNotExist)
	require.NoError(t, thaw())
	require.NoError(t, thaw())
	if os.Geteuid() == 0 {
		// tmpfs cannot be frozen (FIFREEZE needs root to be asked at all).
		thaw, err = Freeze([]string{"/dev/shm"})
		require.ErrorIs(t, err, ErrNotFreezable)
		require.NoError(t, thaw())
	}
	require.ErrorIs(t, FlushDevice(filepath.Join(t.TempDir(), "none")), os.ErrNotExist)
	f := filepath.Join(t.TempDir(), "file")
	require.NoError(t, os.WriteFile(f, []byte("x"), 0o600))
	require.NoError(t, FlushDevice(f))
}
