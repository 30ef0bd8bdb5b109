package main

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"
)

// A volume that is the NBD leg of an MD RAID1 array holds the array's
// member superblock, and the file system only from the member's data
// offset on. blkid calls such a device linux_raid_member; mount reads
// the superblock itself (the host may have no mdadm) and mounts the data.

// mdMember is where a RAID1 member's data lies.
type mdMember struct {
	Version      string // "1.0", "1.1" or "1.2"
	Offset, Size int64  // bytes
}

const mdMagic = 0xa92b4efc

// findMDMember looks for an MD version-1 superblock in the first size
// bytes of f, where each of its versions keeps it: 1.2 at 4 KiB, 1.1 at
// the start, 1.0 near the end. It returns nil if there is none.
func findMDMember(f io.ReaderAt, size int64) (*mdMember, error) {
	type place struct {
		version string
		at      int64
	}
	places := []place{{"1.2", 4096}, {"1.1", 0}}
	if size >= 8192 {
		places = append(places, place{"1.0", ((size >> 9) - 16) &^ 7 * 512}) // md's calc_dev_sboffset for 1.0
	}
	for _, p := range places {
		var sb [256]byte
		if _, err := f.ReadAt(sb[:], p.at); err != nil {
			if err == io.EOF {
				continue
			}
			return nil, fmt.Errorf("reading an MD superblock at %d: %w", p.at, err)
		}
		le := binary.LittleEndian
		if le.Uint32(sb[0:]) != mdMagic || le.Uint32(sb[4:]) != 1 {
			continue
		}
		if level := int32(le.Uint32(sb[72:])); level != 1 {
			return nil, fmt.Errorf("an MD RAID%d member (metadata %s): only a RAID1 member holds a whole file system; assemble the array from all its members to read it", level, p.version)
		}
		// Sector counts, checked before they become bytes so that none
		// can overflow into a range that looks right.
		sectors := uint64(size) / 512
		used, dataOffset, dataSize := le.Uint64(sb[80:]), le.Uint64(sb[128:]), le.Uint64(sb[136:])
		if used == 0 || used > dataSize {
			used = dataSize
		}
		damaged := func(format string, args ...any) error {
			return fmt.Errorf("an MD superblock (metadata %s) at %d with %s: it is damaged", p.version, p.at, fmt.Sprintf(format, args...))
		}
		switch {
		case dataOffset > sectors:
			return nil, damaged("a data offset of %d sectors, which does not fit the volume's %d", dataOffset, sectors)
		case used == 0:
			return nil, damaged("no data")
		case used > sectors-dataOffset:
			return nil, damaged("a data size of %d sectors from sector %d, which does not fit the volume's %d", used, dataOffset, sectors)
		}
		m := &mdMember{Version: p.version, Offset: int64(dataOffset) * 512, Size: int64(used) * 512}
		// 1.0 keeps its superblock after the data, 1.1 and 1.2 before.
		if p.version == "1.0" && m.Offset+m.Size > p.at || p.version != "1.0" && m.Offset < p.at+512 {
			return nil, damaged("data [%d, +%d) over the superblock", m.Offset, m.Size)
		}
		return m, nil
	}
	return nil, nil
}

// legData finds where the file system of a mirror leg lies on the device
// or file at path: an MD RAID1 member's data, or the raid1 image on an LVM
// physical volume. what is "" when path is neither (the file system, if
// any, starts at 0).
func legData(path string) (what string, off, size int64, err error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, 0, err
	}
	defer f.Close()
	end, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return "", 0, 0, err
	}
	md, err := findMDMember(f, end)
	if err != nil || md != nil {
		if md == nil {
			return "", 0, 0, err
		}
		return fmt.Sprintf("an MD RAID1 member (metadata %s): mounting the array's data", md.Version), md.Offset, md.Size, nil
	}
	leg, err := findLVMLeg(f, end)
	if err != nil || leg == nil {
		return "", 0, 0, err
	}
	return fmt.Sprintf("an LVM physical volume with %s's image %s: mounting it", leg.LV, leg.Image), leg.Offset, leg.Size, nil
}
