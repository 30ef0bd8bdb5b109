// Package leg finds the data inside a mirror leg: the file system a
// source host mirrored onto an nbdvault volume lies behind an MD RAID1
// member's superblock, or inside a raid1 image on an LVM physical volume.
// Its parsers take an io.ReaderAt and read only within the size they are
// given, whatever the metadata says: a volume's bytes are outside input.
package leg

import (
	"encoding/binary"
	"fmt"
	"io"
)

// A volume that is the NBD leg of an MD RAID1 array holds the array's
// member superblock, and the file system only from the member's data
// offset on. blkid calls such a device linux_raid_member; mount reads
// the superblock itself (the host may have no mdadm) and mounts the data.

// MDMember is where a RAID1 member's data lies.
type MDMember struct {
	Version      string // "1.0", "1.1" or "1.2"
	Offset, Size int64  // bytes
}

// MDMagic opens an MD superblock (MD_SB_MAGIC).
const MDMagic = 0xa92b4efc

// FindMD looks for an MD version-1 superblock in the first size
// bytes of f, where each of its versions keeps it: 1.2 at 4 KiB, 1.1 at
// the start, 1.0 near the end. It returns nil if there is none.
func FindMD(f io.ReaderAt, size int64) (*MDMember, error) {
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
		if le.Uint32(sb[0:]) != MDMagic || le.Uint32(sb[4:]) != 1 {
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
		m := &MDMember{Version: p.version, Offset: int64(dataOffset) * 512, Size: int64(used) * 512}
		// 1.0 keeps its superblock after the data, 1.1 and 1.2 before.
		if p.version == "1.0" && m.Offset+m.Size > p.at || p.version != "1.0" && m.Offset < p.at+512 {
			return nil, damaged("data [%d, +%d) over the superblock", m.Offset, m.Size)
		}
		return m, nil
	}
	return nil, nil
}
