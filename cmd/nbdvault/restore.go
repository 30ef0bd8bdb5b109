package main

import (
	"errors"
	"fmt"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/client/transfer"
)

func restoreCommand() *cli.Command {
	return &cli.Command{
		Name:      "restore",
		Usage:     "write a snapshot to a file or a block device",
		ArgsUsage: "VOLUME@SNAPSHOT",
		Description: "Reads the snapshot (SNAPSHOT is an ID or a label, or an RFC 3339 time such as\n" +
			"2026-11-30T17:55:03Z for the volume as it was then: the newest checkpoint at or\n" +
			"before it, within the server's --journal-retention) over NBD, many chunks at a\n" +
			"time, and writes it to --to. The server verifies every chunk it reads; a\n" +
			"damaged one stops the restore.\n\n" +
			"A file is written as PATH.partial, sparse where the snapshot has holes, and\n" +
			"renamed to PATH once complete and synced: a failed or interrupted restore\n" +
			"never leaves a file that looks whole. An existing file is replaced only with\n" +
			"--force. A block device is written in place, holes as zeros (it may hold\n" +
			"old data), and must be at least the snapshot's size; it is opened\n" +
			"exclusively, so a mounted one is refused.\n\n" +
			"The last line ends with a digest of the bytes restored, holes included:\n" +
			"with --checksum blake3 (the default) their BLAKE3, which b3sum prints for\n" +
			"the file; with sha256 their SHA-256, which sha256sum prints (slower: it\n" +
			"takes more of the client's CPU than BLAKE3); with none, no digest.",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "to", Usage: "the `path` to write: a new file, or a block device (required)"},
			&cli.BoolFlag{Name: "force", Usage: "replace the file at --to if there is one"},
			&cli.StringFlag{Name: "checksum", Value: "blake3", Usage: "the `digest` of the restored bytes to print: blake3, sha256 or none"},
			nbdFlag,
		}, clientFlags...),
		Action: restore,
	}
}

func restore(c *cli.Context) error {
	if err := needArgs(c, 1, "VOLUME@SNAPSHOT"); err != nil {
		return err
	}
	vol, snap, err := splitSnapshot(c.Args().First())
	if err != nil {
		return err
	}
	to := c.String("to")
	if to == "" {
		return usageErrorf("restore: --to PATH is required: the file or block device to write")
	}
	sum, err := parseChecksum(c.String("checksum"))
	if err != nil {
		return err
	}
	device, err := checkRestorePath(to, c.Bool("force"))
	if err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	ctx := c.Context
	s, err := cl.Snapshot(ctx, vol, snap)
	if err != nil {
		return err
	}
	v, err := cl.Volume(ctx, vol)
	if err != nil {
		return err
	}
	addr, err := nbdAddressOf(c, cl)
	if err != nil {
		return err
	}
	export := vol + "@" + s.ID
	conn, err := dialExport(ctx, c, addr, export)
	if err != nil {
		return err
	}
	defer closeExport(conn)

	dst, err := transfer.OpenTarget(to, device, conn.Size())
	if err != nil {
		return err
	}
	p := newProgress("restoring "+export, conn.Size())
	res, err := transfer.Restore(ctx, conn, dst, transfer.RestoreOptions{Request: transfer.RequestSize(conn, v.ChunkSize), Checksum: sum, Progress: p.add})
	if err == nil {
		err = dst.Commit()
	}
	if err != nil {
		stopProgress(p)
		return dst.Abort(export, err)
	}
	p.finish()

	elapsed := time.Since(p.start)
	name := export
	name += describePoint(s)
	holes := "holes not written"
	if device {
		holes = "holes written as zeros"
	}
	digest := ""
	if res.Sum != nil {
		digest = fmt.Sprintf("; %s %x", sum.Name, res.Sum)
	}
	fmt.Printf("restored %s to %s: %s in %s (%s/s), %s of it %s%s\n",
		name, to, formatSize(res.Size), elapsed.Round(10*time.Millisecond),
		formatSize(int64(float64(res.Size)/max(elapsed.Seconds(), 1e-3))), formatSize(res.Holes), holes, digest)
	return nil
}

// parseChecksum returns the checksum --checksum names.
func parseChecksum(name string) (transfer.Checksum, error) {
	cs, ok := transfer.ParseChecksum(name)
	if !ok {
		return cs, usageErrorf("--checksum %q: want blake3 (the default; b3sum prints the same), sha256 (as sha256sum prints) or none", name)
	}
	return cs, nil
}

// checkRestorePath says whether --to is a block device to write in place,
// and words transfer.CheckPath's refusals for the command line.
func checkRestorePath(path string, force bool) (device bool, err error) {
	device, err = transfer.CheckPath(path, force)
	switch {
	case errors.Is(err, transfer.ErrExists):
		return false, cli.Exit(fmt.Sprintf("%s exists: pass --force to replace it (the restore is written to %s and renamed over it once complete), or choose another --to",
			path, transfer.PartialPath(path)), exitConflict)
	case errors.Is(err, transfer.ErrNotFileOrDevice):
		return false, usageErrorf("--to %v: give the path of a file to create, or of a block device", err)
	}
	return device, err
}
