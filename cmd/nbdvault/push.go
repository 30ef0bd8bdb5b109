package main

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/client"
	"github.com/nbdvault/nbdvault/client/transfer"
	"github.com/nbdvault/nbdvault/nbdserver/api"
	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

func clientCommand() *cli.Command {
	return &cli.Command{
		Name:        "client",
		Usage:       "tools for the source host",
		Subcommands: []*cli.Command{attachCommand(), detachCommand(), mirrorCommand(), clientSnapshotCommand(), pushCommand(), relayCommand()},
	}
}

func pushCommand() *cli.Command {
	return &cli.Command{
		Name:  "push",
		Usage: "bring a volume up to date with an image or a block device, sending only the chunks that differ",
		Description: "For hosts without the kernel's NBD client: reads the source once, hashes each chunk and\n" +
			"compares it with the volume's (from the admin API), and writes only the chunks that differ\n" +
			"(zero chunks as zeroing requests). Then it flushes and, with --snapshot or --label, takes a\n" +
			"snapshot. The volume past the source's end is left as it is.",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "from", Usage: "the source `PATH`: an image file or a block device (required)"},
			&cli.StringFlag{Name: "to", Usage: "the volume: `VOL`, or nbd://HOST:PORT/VOL to name the NBD address too (required)"},
			&cli.IntFlag{Name: "connections", Value: 4, Usage: "NBD `connections` to write over"},
			&cli.BoolFlag{Name: "snapshot", Usage: "take a snapshot when done (prints its ID)"},
			&cli.StringFlag{Name: "label", Usage: "take a snapshot with this `label` when done"},
			nbdFlag,
		}, clientFlags...),
		Action: push,
	}
}

// pushTarget reads --to: VOL, or nbd://HOST:PORT/VOL.
func pushTarget(to string) (vol, addr string, err error) {
	if !strings.Contains(to, "://") {
		return to, "", nil
	}
	u, err := url.Parse(to)
	if err != nil || u.Scheme != "nbd" || u.Host == "" || strings.Trim(u.Path, "/") == "" {
		return "", "", usageErrorf("--to %q: want VOL or nbd://HOST:PORT/VOL", to)
	}
	addr = u.Host
	if u.Port() == "" {
		addr += ":" + nbd.Port
	}
	return strings.Trim(u.Path, "/"), addr, nil
}

func push(c *cli.Context) error {
	if err := needArgs(c, 0, "no arguments (--from PATH --to VOL)"); err != nil {
		return err
	}
	from, to := c.String("from"), c.String("to")
	if from == "" || to == "" {
		return usageErrorf("client push: --from PATH and --to VOL are required")
	}
	conns := c.Int("connections")
	if conns < 1 || conns > 16 {
		return usageErrorf("--connections %d: want 1 to 16", conns)
	}
	vol, addr, err := pushTarget(to)
	if err != nil {
		return err
	}
	ctx := c.Context
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	src, srcSize, err := openImportSource(from)
	if err != nil {
		return err
	}
	defer src.Close()
	v, err := cl.Volume(ctx, vol)
	if err != nil {
		return err
	}
	if srcSize > v.Size {
		return fmt.Errorf("%s is %s, larger than volume %s (%s): grow it first with `nbdvault volume resize %s --size %dM`",
			from, formatSize(srcSize), vol, formatSize(v.Size), vol, (srcSize+(1<<20)-1)>>20)
	}
	if addr == "" {
		if addr, err = nbdAddressOf(c, cl); err != nil {
			return err
		}
	}
	var nbdConns []*client.Conn
	for range conns {
		conn, err := dialExport(ctx, c, addr, vol)
		if err != nil {
			return err
		}
		defer closeExport(conn)
		nbdConns = append(nbdConns, conn)
	}
	cs := v.ChunkSize
	compare := func(ctx context.Context, first uint64, sums []string) ([]int, error) {
		d, err := cl.CompareChunks(ctx, vol, api.ChunkCompare{ChunkSize: cs, Hash: transfer.ChunkHash, First: first, Sums: sums})
		return d.Differ, err
	}
	p := newProgress("pushing "+from+" to "+vol, srcSize)
	start := time.Now()
	res, err := transfer.Push(ctx, nbdConns, src, srcSize, transfer.PushOptions{ChunkSize: cs, Compare: compare, Batch: api.MaxChunkIDs, Progress: p.add})
	if err != nil {
		stopProgress(p)
		return fmt.Errorf("push to %s failed: %w; what was sent is in the volume's head: push again to finish", vol, err)
	}
	p.finish()
	fmt.Fprintf(os.Stderr, "pushed %s to %s in %s: %s read, %d of %d chunks differed, %s sent, %d zero chunks zeroed\n",
		from, vol, time.Since(start).Round(10*time.Millisecond), formatSize(srcSize), res.Changed,
		(srcSize+cs-1)/cs, formatSize(res.Sent), res.Zeroed)
	label := c.String("label")
	if !c.Bool("snapshot") && label == "" {
		return nil
	}
	s, err := cl.CreateSnapshot(ctx, vol, label)
	if err != nil {
		return fmt.Errorf("the push is done and flushed, but the snapshot failed: %w", err)
	}
	fmt.Println(s.ID)
	return nil
}
