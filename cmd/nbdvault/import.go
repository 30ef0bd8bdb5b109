package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/client/transfer"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

func importCommand() *cli.Command {
	return &cli.Command{
		Name:      "import",
		Usage:     "seed a volume from an image file or a block device, and snapshot it",
		ArgsUsage: "VOLUME",
		Description: "Writes the image at --from over the volume's head, flushes, takes a snapshot\n" +
			"and waits until it is sealed (uploaded), then prints the snapshot's ID.\n" +
			"The volume's bytes past the image's end become zeros. Nothing else should\n" +
			"write the volume meanwhile.\n\n" +
			"The source is read once. Chunks of zeros are not sent: the volume is zeroed\n" +
			"first, which costs the server one record. The server deduplicates the rest\n" +
			"against the repository as it seals.\n\n" +
			"A source larger than the volume is refused with exit code 1 before anything\n" +
			"is written: grow the volume with `nbdvault volume resize` first.",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "from", Usage: "the image `path`: a file or a block device (required)"},
			&cli.StringFlag{Name: "label", Usage: "a `name` for the snapshot, unique in the volume"},
			nbdFlag,
		}, clientFlags...),
		Action: importVolume,
	}
}

func importVolume(c *cli.Context) error {
	if err := needArgs(c, 1, "VOLUME"); err != nil {
		return err
	}
	vol := c.Args().First()
	if strings.Contains(vol, "@") {
		return usageErrorf("import writes a volume's head: give VOLUME, not %q (snapshots are read-only)", vol)
	}
	from := c.String("from")
	if from == "" {
		return usageErrorf("import: --from PATH is required: the image file or block device to read")
	}
	src, srcSize, err := openImportSource(from)
	if err != nil {
		return err
	}
	defer src.Close()
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	ctx := c.Context
	v, err := cl.Volume(ctx, vol)
	if err != nil {
		return err
	}
	label := c.String("label")
	if err := checkLabelFree(ctx, cl, vol, label); err != nil {
		return err
	}
	addr, err := nbdAddressOf(c, cl)
	if err != nil {
		return err
	}
	conn, err := dialExport(ctx, c, addr, vol)
	if err != nil {
		return err
	}
	defer closeExport(conn)
	if srcSize > conn.Size() {
		return fmt.Errorf("%s is %s (%d bytes), larger than volume %s (%s): grow the volume with `nbdvault volume resize %s --size %dM`, then import again; nothing was written",
			from, formatSize(srcSize), srcSize, vol, formatSize(conn.Size()), vol, (srcSize+(1<<20)-1)>>20)
	}

	p := newProgress("importing "+from+" into "+vol, srcSize)
	im, err := transfer.Import(ctx, conn, src, srcSize, transfer.ImportOptions{Request: transfer.RequestSize(conn, v.ChunkSize), Progress: p.add})
	if err != nil {
		stopProgress(p)
		return fmt.Errorf("import into %s failed: %w; the volume's head now holds part of the image: import again before relying on it", vol, err)
	}
	p.finish()
	elapsed := time.Since(p.start)

	s, err := cl.CreateSnapshot(ctx, vol, label)
	if err != nil {
		return fmt.Errorf("the image was written to %s and flushed, but taking the snapshot failed: %w; take it with `nbdvault snapshot create %s`", vol, err, vol)
	}
	sp := newProgress("sealing "+vol+"@"+s.ID, -1)
	_, err = cl.WaitSealed(ctx, vol, s.ID, func(v api.Volume) {
		if v.Status != nil {
			sp.note(sealNote(v.Status))
		}
	})
	if err != nil {
		stopProgress(sp)
		return fmt.Errorf("snapshot %s@%s of the image was taken, but waiting for its seal failed: %w; `nbdvault snapshot list %s` shows when it is sealed", vol, s.ID, err, vol)
	}
	sp.finish()
	fmt.Fprintf(os.Stderr, "imported %s into %s in %s: %s read, %s of it zero chunks not sent, %s sent; snapshot %s sealed\n",
		from, vol, elapsed.Round(10*time.Millisecond), formatSize(srcSize), formatSize(im.Zero), formatSize(im.Sent), s.ID)
	fmt.Println(s.ID)
	return nil
}

// openImportSource opens the image to import and finds its size: a
// file's from stat, a block device's by seeking to its end.
func openImportSource(path string) (*os.File, int64, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, 0, usageErrorf("--from %s does not exist", path)
	}
	if err != nil {
		return nil, 0, fmt.Errorf("cannot open %s: %w", path, err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("cannot stat %s: %w", path, err)
	}
	switch {
	case fi.Mode().IsRegular():
		return f, fi.Size(), nil
	case fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0:
		size, err := f.Seek(0, io.SeekEnd)
		if err != nil {
			f.Close()
			return nil, 0, fmt.Errorf("cannot find the size of %s: %w", path, err)
		}
		return f, size, nil
	}
	f.Close()
	return nil, 0, usageErrorf("--from %s is neither a regular file nor a block device", path)
}

// checkLabelFree refuses a label the volume already has, before anything
// is written: the snapshot taken after the import would fail.
func checkLabelFree(ctx context.Context, cl *api.Client, vol, label string) error {
	if label == "" {
		return nil
	}
	_, err := cl.Snapshot(ctx, vol, label)
	switch {
	case err == nil:
		return cli.Exit(fmt.Sprintf("volume %s already has a snapshot %q: choose another --label", vol, label), exitConflict)
	case errors.Is(err, api.ErrNotFound):
		return nil
	}
	return err
}
