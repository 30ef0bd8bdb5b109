package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/client/mirror"
)

func clientSnapshotCommand() *cli.Command {
	return &cli.Command{
		Name:  "snapshot",
		Usage: "take a consistent snapshot of a volume mirrored from this host",
		Description: "Runs --pre, freezes every --freeze file system, waits until the MD array\n" +
			"(--md) has written every block to every leg, write-behind ones included, flushes\n" +
			"the NBD device (--nbd-device), asks the server for the snapshot, then thaws and\n" +
			"runs --post: the thaw and --post happen whatever failed, and on Ctrl-C or SIGTERM\n" +
			"too. Only SIGKILL leaves a file system frozen (then: fsfreeze -u MOUNTPOINT).",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "volume", Usage: "the `VOLUME` to snapshot (required)"},
			&cli.StringSliceFlag{Name: "freeze", Usage: "a `MOUNTPOINT` to freeze while the snapshot is taken; repeat for more"},
			&cli.StringFlag{Name: "md", Usage: "the MD `ARRAY` (/dev/mdN) whose NBD leg is the volume: wait until its write-intent bitmap is clean"},
			&cli.StringFlag{Name: "lvm", Usage: "the LVM raid1 logical volume `VG/LV` whose leg is the volume: the same wait"},
			&cli.StringFlag{Name: "nbd-device", Usage: "the NBD `DEVICE` (/dev/nbdN) attached to the volume: flush it"},
			&cli.StringFlag{Name: "label", Usage: "the snapshot's `label`"},
			&cli.StringFlag{Name: "pre", Usage: "a shell `COMMAND` to run first (a database's checkpoint, say); its failure stops the snapshot"},
			&cli.StringFlag{Name: "post", Usage: "a shell `COMMAND` to run last, always"},
			&cli.DurationFlag{Name: "timeout", Value: 2 * time.Minute, Usage: "thaw after this `long` frozen, and fail, whatever is still waiting"},
		}, clientFlags...),
		Action: clientSnapshot,
	}
}

func clientSnapshot(c *cli.Context) error {
	if err := needArgs(c, 0, "no arguments (--volume VOL)"); err != nil {
		return err
	}
	vol := c.String("volume")
	if vol == "" {
		return usageErrorf("client snapshot: --volume is required")
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	if _, err := cl.Volume(c.Context, vol); err != nil {
		return err // before anything is frozen: a wrong name or server costs nothing
	}
	q := mirror.Quiesce{
		Pre: c.String("pre"), Post: c.String("post"), Freeze: c.StringSlice("freeze"),
		Device: c.String("nbd-device"), Timeout: c.Duration("timeout"), Log: os.Stderr,
	}
	if md, lv := c.String("md"), c.String("lvm"); md != "" || lv != "" {
		b, err := bitmapOf(md, lv)
		if err != nil {
			return err
		}
		q.Bitmap = &b
	}
	var id string
	err = q.Snapshot(c.Context, func(ctx context.Context) error {
		s, err := cl.CreateSnapshot(ctx, vol, c.String("label"))
		id = s.ID
		return err
	})
	if id != "" {
		fmt.Println(id) // taken, even if the thaw or --post failed after
	}
	return err
}

// bitmapOf finds the write-intent bitmap of the MD array md or the LVM
// raid1 logical volume lv.
func bitmapOf(md, lv string) (mirror.Bitmap, error) {
	if lv != "" {
		b, err := mirror.LVMBitmap(lv)
		if errors.Is(err, mirror.ErrInvalid) {
			return b, usageErrorf("--lvm %q: want VG/LV", lv)
		}
		return b, err
	}
	b, err := mirror.MDBitmap(md)
	if err != nil {
		return b, fmt.Errorf("--md: %w", err)
	}
	return b, nil
}
