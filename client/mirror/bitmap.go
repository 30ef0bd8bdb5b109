// Package mirror is the source host's side of a mirror whose other leg
// is an nbdvault volume: the write-intent bitmap that MD and LVM raid1
// (dm-raid) keep, read past the page cache, to tell when every write has
// reached every leg.
package mirror

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"os"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/nbdvault/nbdvault/client/leg"
)

// An MD write-intent bitmap (drivers/md/md-bitmap.h), kept by MD arrays
// with an internal bitmap and by LVM raid1 (dm-raid, in the rmeta LV at
// 4 KiB): a 256-byte superblock, then one bit per chunk of the array, set
// while that chunk has writes not yet on every leg.
const (
	bitmapMagic     = 0x6d746962 // "bitm"
	bitmapSuperSize = 256
)

// maxBitmapBytes bounds the bits read: 2^29 chunks. MD keeps an internal
// bitmap between its superblock and its data, dm-raid in the rest of one
// extent of the rmeta LV; neither comes near it.
const maxBitmapBytes = 64 << 20

// ErrInvalid is a name that cannot be a device: a usage error.
var ErrInvalid = errors.New("invalid argument")

// readFunc reads n bytes at off, or fails.
type readFunc func(off int64, n int) ([]byte, error)

// bitmapDirty counts the set bits of the bitmap whose superblock is at
// off in the device at path. It reads past the page cache (O_DIRECT): MD
// writes the bitmap with its own I/O, which a cached read would miss.
func bitmapDirty(path string, off int64) (dirty, chunks int64, err error) {
	return countBitmap(path, off, func(off int64, n int) ([]byte, error) { return readDirect(path, off, n) })
}

// countBitmap is bitmapDirty over read, for the device called name.
// Whatever the superblock says, it reads at most maxBitmapBytes of bits,
// and dirty <= chunks.
func countBitmap(name string, off int64, read readFunc) (dirty, chunks int64, err error) {
	if off < 0 {
		return 0, 0, fmt.Errorf("%s: a write-intent bitmap at %d, before the device's start", name, off)
	}
	sb, err := read(off, bitmapSuperSize)
	if err != nil {
		return 0, 0, err
	}
	le := binary.LittleEndian
	if le.Uint32(sb[0:]) != bitmapMagic {
		return 0, 0, fmt.Errorf("%s holds no write-intent bitmap at %d (is the array's bitmap internal?)", name, off)
	}
	// bitmap_super_t: sync_size (sectors) at 40, chunksize (bytes) at 52.
	syncSectors, chunkBytes := le.Uint64(sb[40:]), le.Uint32(sb[52:])
	if chunkBytes < 512 || chunkBytes&(chunkBytes-1) != 0 { // as md requires
		return 0, 0, fmt.Errorf("%s: the write-intent bitmap at %d has chunks of %d bytes, not a power of two of 512 or more: it is damaged", name, off, chunkBytes)
	}
	chunkSectors := uint64(chunkBytes / 512)
	n := syncSectors / chunkSectors
	if syncSectors%chunkSectors != 0 {
		n++
	}
	if n > maxBitmapBytes*8 {
		return 0, 0, fmt.Errorf("%s: the write-intent bitmap at %d has %d chunks (%d sectors in chunks of %d bytes), more than the %d nbdvault reads: it is damaged", name, off, n, syncSectors, chunkBytes, maxBitmapBytes*8)
	}
	chunks = int64(n)
	bitsBytes, err := read(off+bitmapSuperSize, int((chunks+7)/8))
	if err != nil {
		return 0, 0, err
	}
	for i, b := range bitsBytes {
		if rest := chunks - int64(i)*8; rest < 8 {
			b &= byte(1<<rest - 1) // bits past the last chunk
		}
		dirty += int64(bits.OnesCount8(b))
	}
	return dirty, chunks, nil
}

// readDirect reads n bytes at off with O_DIRECT, in whole 4 KiB blocks.
// A range past the device's end fails before any buffer is allocated.
func readDirect(path string, off int64, n int) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	defer unix.Close(fd)
	end, err := unix.Seek(fd, 0, io.SeekEnd)
	if err != nil {
		return nil, fmt.Errorf("seek %s: %w", path, err)
	}
	if off < 0 || n < 0 || off > end || int64(n) > end-off {
		return nil, fmt.Errorf("read %s: %d bytes at %d: the device ends at %d", path, n, off, end)
	}
	const block = 4096
	start := off &^ (block - 1)
	length := (off + int64(n) - start + block - 1) &^ (block - 1)
	raw := make([]byte, length+block)
	shift := int(block-uintptr(unsafe.Pointer(&raw[0]))%block) % block // an aligned buffer
	buf := raw[shift : shift+int(length)]
	for done := 0; done < len(buf); {
		k, err := unix.Pread(fd, buf[done:], start+int64(done))
		if err != nil {
			return nil, fmt.Errorf("read %s at %d: %w", path, start+int64(done), err)
		}
		if k == 0 {
			if start+int64(done) >= off+int64(n) {
				break // the last block is partial, and what was asked for is in
			}
			return nil, fmt.Errorf("read %s at %d: the device ends", path, start+int64(done))
		}
		done += k
	}
	return buf[off-start : off-start+int64(n)], nil
}

// mdBitmapAt is where the internal bitmap of MD member dev lies: the
// version-1 superblock's bitmap_offset, in sectors from the superblock.
func mdBitmapAt(dev string) (int64, error) {
	return findMDBitmap(dev, func(off int64, n int) ([]byte, error) { return readDirect(dev, off, n) })
}

// findMDBitmap is mdBitmapAt over read, for the device called dev.
func findMDBitmap(dev string, read readFunc) (int64, error) {
	for _, at := range []int64{4096, 0} { // metadata 1.2, 1.1 (1.0 arrays: see below)
		sb, err := read(at, 256)
		if err != nil {
			return 0, err
		}
		le := binary.LittleEndian
		if le.Uint32(sb[0:]) == leg.MDMagic && le.Uint32(sb[4:]) == 1 {
			if le.Uint32(sb[8:])&1 == 0 { // feature_map: MD_FEATURE_BITMAP_OFFSET
				return 0, fmt.Errorf("%s: the array has no internal write-intent bitmap (mdadm --grow --bitmap=internal adds one)", dev)
			}
			rel := int64(int32(le.Uint32(sb[96:]))) // signed
			switch off := at + rel*512; {
			case rel == 0:
				return 0, fmt.Errorf("%s: the MD superblock at %d puts its bitmap on itself: it is damaged", dev, at)
			case off < 0:
				return 0, fmt.Errorf("%s: the MD superblock at %d puts its bitmap %d sectors away, before the device's start: it is damaged", dev, at, rel)
			default:
				return off, nil
			}
		}
	}
	return 0, fmt.Errorf("%s: no MD metadata 1.1 or 1.2 superblock (metadata 1.0 and 0.90 arrays are not supported here)", dev)
}

// lvmBitmap is where LVM keeps the bitmap of raid1 logical volume VG/LV:
// 4 KiB into its first rmeta sub-LV (dm-raid's layout).
func lvmBitmap(lv string) (string, int64, error) {
	vg, name, ok := strings.Cut(lv, "/")
	if !ok {
		return "", 0, fmt.Errorf("%w: LVM logical volume %q: want VG/LV", ErrInvalid, lv)
	}
	esc := func(s string) string { return strings.ReplaceAll(s, "-", "--") }
	return "/dev/mapper/" + esc(vg) + "-" + esc(name) + "_rmeta_0", 4096, nil
}

// Bitmap is the write-intent bitmap of a raid1: the MD array or LVM
// logical volume What, its superblock at Off in the device Path.
type Bitmap struct {
	What, Path string
	Off        int64
}

// MDBitmap finds the internal bitmap of MD array md (/dev/mdN), on its
// first member.
func MDBitmap(md string) (Bitmap, error) {
	members, err := MDMembers(md)
	if err != nil {
		return Bitmap{}, err
	}
	off, err := mdBitmapAt(members[0])
	return Bitmap{What: md, Path: members[0], Off: off}, err
}

// LVMBitmap finds the bitmap of LVM raid1 logical volume VG/LV.
func LVMBitmap(lv string) (Bitmap, error) {
	path, off, err := lvmBitmap(lv)
	return Bitmap{What: lv, Path: path, Off: off}, err
}

// Dirty counts the bitmap's set bits, read past the page cache.
func (b Bitmap) Dirty() (dirty, chunks int64, err error) {
	return bitmapDirty(b.Path, b.Off)
}

// WaitClean waits until no bit of the bitmap is set, or ctx ends. MD (and
// dm-raid) clears a bit only when every leg, write-mostly and write-behind
// ones included, has completed the writes of its region (and its bitmap
// daemon has run, every few seconds): with writes stopped, a clean bitmap
// means the NBD leg has everything.
func (b Bitmap) WaitClean(ctx context.Context) error {
	for {
		dirty, chunks, err := b.Dirty()
		if err != nil {
			return fmt.Errorf("%s: %w", b.What, err)
		}
		if dirty == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s still had writes in flight to a leg (%d of %d bitmap regions dirty): %w", b.What, dirty, chunks, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// MDMembers lists an MD array's member devices, from sysfs.
func MDMembers(md string) ([]string, error) {
	name := strings.TrimPrefix(md, "/dev/")
	entries, err := os.ReadDir("/sys/block/" + name + "/slaves")
	if err != nil || len(entries) == 0 {
		return nil, fmt.Errorf("%s: not an MD array with members (%v)", md, err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, "/dev/"+e.Name())
	}
	return out, nil
}
