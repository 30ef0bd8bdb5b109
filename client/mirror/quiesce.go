package mirror

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// FIFREEZE and FITHAW from linux/fs.h: _IOWR('X', 119, int) and
// _IOWR('X', 120, int). x/sys/unix does not name them.
const (
	ioctlFIFREEZE = 0xc0045877
	ioctlFITHAW   = 0xc0045878
)

// ErrNotFreezable is a mount point whose file system cannot be frozen.
var ErrNotFreezable = errors.New("its file system cannot be frozen")

// Freeze freezes the file system of each mount point (writes to it wait
// until it is thawed), and returns what thaws those it froze, safe to
// call more than once and to be called on error too. A thaw that fails
// is an error naming the mount point: fsfreeze -u thaws it by hand.
func Freeze(mounts []string) (thaw func() error, err error) {
	var frozen []*os.File
	thaw = func() error {
		var errs []error
		for _, f := range frozen {
			if err := unix.IoctlSetInt(int(f.Fd()), ioctlFITHAW, 0); err != nil {
				errs = append(errs, fmt.Errorf("thaw %s: %w: run fsfreeze -u %s", f.Name(), err, f.Name()))
			}
			f.Close()
		}
		frozen = nil
		return errors.Join(errs...)
	}
	for _, m := range mounts {
		f, err := os.Open(m)
		if err != nil {
			return thaw, err
		}
		if err := unix.IoctlSetInt(int(f.Fd()), ioctlFIFREEZE, 0); err != nil {
			f.Close()
			if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) {
				return thaw, fmt.Errorf("%s: %w (%v): is it a mount point of ext4, xfs or btrfs?", m, ErrNotFreezable, err)
			}
			return thaw, fmt.Errorf("%s: %w", m, err)
		}
		frozen = append(frozen, f)
	}
	return thaw, nil
}

// FlushDevice makes the block device dev flush its write cache: an fsync
// of the device sends a FLUSH, which nbdvault answers once its write log
// is durable.
func FlushDevice(dev string) error {
	f, err := os.Open(dev)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("flushing %s: %w", dev, err)
	}
	return nil
}
