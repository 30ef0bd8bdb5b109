package main

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// An MD write-intent bitmap (drivers/md/md-bitmap.h), kept by MD arrays
// with an internal bitmap and by LVM raid1 (dm-raid, in the rmeta LV at
// 4 KiB): a 256-byte superblock, then one bit per chunk of the array, set
// while that chunk has writes not yet on every leg.
const (
	bitmapMagic     = 0x6d746962 // "bitm"
	bitmapSuperSize = 256
)

// bitmapDirty counts the set bits of the bitmap whose superblock is at
// off in the device at path. It reads past the page cache (O_DIRECT): MD
// writes the bitmap with its own I/O, which a cached read would miss.
func bitmapDirty(path string, off int64) (dirty, chunks int64, err error) {
	sb, err := readDirect(path, off, bitmapSuperSize)
	if err != nil {
		return 0, 0, err
	}
	le := binary.LittleEndian
	if le.Uint32(sb[0:]) != bitmapMagic {
		return 0, 0, fmt.Errorf("%s holds no write-intent bitmap at %d (is the array's bitmap internal?)", path, off)
	}
	syncSectors, chunkBytes := int64(le.Uint64(sb[40:])), int64(le.Uint32(sb[52:]))
	if chunkBytes <= 0 {
		return 0, 0, fmt.Errorf("%s: a bitmap with chunks of %d bytes is damaged", path, chunkBytes)
	}
	chunks = (syncSectors*512 + chunkBytes - 1) / chunkBytes
	bitsBytes, err := readDirect(path, off+bitmapSuperSize, int((chunks+7)/8))
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
func readDirect(path string, off int64, n int) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	defer unix.Close(fd)
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
			return nil, fmt.Errorf("read %s at %d: the device ends", path, start+int64(done))
		}
		done += k
	}
	return buf[off-start : off-start+int64(n)], nil
}

// mdBitmapAt is where the internal bitmap of MD member dev lies: the
// version-1 superblock's bitmap_offset, in sectors from the superblock.
func mdBitmapAt(dev string) (int64, error) {
	for _, at := range []int64{4096, 0} { // metadata 1.2, 1.1 (1.0 arrays: see below)
		sb, err := readDirect(dev, at, 256)
		if err != nil {
			return 0, err
		}
		le := binary.LittleEndian
		if le.Uint32(sb[0:]) == mdMagic && le.Uint32(sb[4:]) == 1 {
			if le.Uint32(sb[8:])&1 == 0 { // feature_map: MD_FEATURE_BITMAP_OFFSET
				return 0, fmt.Errorf("%s: the array has no internal write-intent bitmap (mdadm --grow --bitmap=internal adds one)", dev)
			}
			return at + int64(int32(le.Uint32(sb[96:])))*512, nil
		}
	}
	return 0, fmt.Errorf("%s: no MD metadata 1.1 or 1.2 superblock (metadata 1.0 and 0.90 arrays are not supported here)", dev)
}

// lvmBitmap is where LVM keeps the bitmap of raid1 logical volume VG/LV:
// 4 KiB into its first rmeta sub-LV (dm-raid's layout).
func lvmBitmap(lv string) (string, int64, error) {
	vg, name, ok := strings.Cut(lv, "/")
	if !ok {
		return "", 0, usageErrorf("--lvm %q: want VG/LV", lv)
	}
	esc := func(s string) string { return strings.ReplaceAll(s, "-", "--") }
	return "/dev/mapper/" + esc(vg) + "-" + esc(name) + "_rmeta_0", 4096, nil
}
