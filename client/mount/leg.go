package mount

import (
	"fmt"
	"io"
	"os"

	"github.com/nbdvault/nbdvault/client/leg"
)

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
	md, err := leg.FindMD(f, end)
	if err != nil || md != nil {
		if md == nil {
			return "", 0, 0, err
		}
		return fmt.Sprintf("an MD RAID1 member (metadata %s): mounting the array's data", md.Version), md.Offset, md.Size, nil
	}
	lv, err := leg.FindLVM(f, end)
	if err != nil || lv == nil {
		return "", 0, 0, err
	}
	return fmt.Sprintf("an LVM physical volume with %s's image %s: mounting it", lv.LV, lv.Image), lv.Offset, lv.Size, nil
}
