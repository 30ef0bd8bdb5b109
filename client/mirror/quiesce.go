package mirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"time"

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

// Quiesce is how to bring a mirrored volume to a point where a snapshot
// of it is consistent: what Snapshot does, in this order.
type Quiesce struct {
	Pre    string   // a shell command run first; its failure stops the snapshot
	Freeze []string // mount points frozen while the snapshot is taken
	// Bitmap, if set, is the mirror whose write-intent bitmap must be
	// clean (every block on every leg, write-behind ones too) first.
	Bitmap  *Bitmap
	Device  string        // the NBD device to flush, if set
	Post    string        // a shell command run last, whatever failed
	Timeout time.Duration // fail, and thaw, after this long frozen (0: no limit)
	// Log gets the hooks' output and a line when the bitmap is clean;
	// nil discards them.
	Log io.Writer
}

// Snapshot runs q.Pre, freezes, waits for the bitmap, flushes the
// device, calls take, and then thaws and runs q.Post whatever failed,
// when ctx is cancelled too: only a SIGKILL of this process leaves a
// file system frozen. take gets a context that ends at q.Timeout.
// Errors say which step failed (pre, freeze, bitmap, flush, snapshot);
// a failure of Post or of the thaw after a successful take is returned
// too, since a file system left frozen needs a hand.
func (q Quiesce) Snapshot(ctx context.Context, take func(context.Context) error) (err error) {
	log := q.Log
	if log == nil {
		log = io.Discard
	}
	if q.Post != "" {
		defer func() {
			err = errors.Join(err, runHook(context.WithoutCancel(ctx), log, "--post", q.Post))
		}()
	}
	if q.Pre != "" {
		if err := runHook(ctx, log, "--pre", q.Pre); err != nil {
			return err
		}
	}
	if q.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, q.Timeout)
		defer cancel()
	}
	thaw, err := Freeze(q.Freeze)
	defer func() { err = errors.Join(err, thaw()) }()
	if err != nil {
		return fmt.Errorf("--freeze %w", err)
	}
	if q.Bitmap != nil {
		start := time.Now()
		if err := q.Bitmap.WaitClean(ctx); err != nil {
			return timedOut(ctx, q.Timeout, err)
		}
		fmt.Fprintf(log, "nbdvault: %s wrote every block to every leg (%s)\n", q.Bitmap.What, time.Since(start).Round(100*time.Millisecond))
	}
	if q.Device != "" {
		if err := FlushDevice(q.Device); err != nil {
			return fmt.Errorf("--nbd-device %w", err)
		}
	}
	if err := take(ctx); err != nil {
		return timedOut(ctx, q.Timeout, err)
	}
	return nil
}

// timedOut says so when err came from reaching the timeout.
func timedOut(ctx context.Context, timeout time.Duration, err error) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("%w (at the --timeout %s; the file systems are thawed)", err, timeout)
	}
	return err
}

// runHook runs a --pre or --post shell command, its output to log.
func runHook(ctx context.Context, log io.Writer, which, command string) error {
	cmd := exec.CommandContext(ctx, "sh", "-c", command)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %q failed: %v", which, command, err)
	}
	return nil
}
