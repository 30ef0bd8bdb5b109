package main

import (
	"context"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sync/errgroup"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/client"
	"github.com/nbdvault/nbdvault/client/transfer"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

func clientCommand() *cli.Command {
	return &cli.Command{
		Name:        "client",
		Usage:       "tools for the source host",
		Subcommands: []*cli.Command{attachCommand(), detachCommand(), mirrorCommand(), clientSnapshotCommand(), pushCommand()},
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
		addr += ":10809"
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
	p := &pusher{cl: cl, vol: vol, src: src, size: srcSize, cs: v.ChunkSize}
	for range conns {
		conn, err := dialExport(ctx, addr, vol)
		if err != nil {
			return err
		}
		defer closeExport(conn)
		p.conns = append(p.conns, conn)
	}
	p.progress = newProgress("pushing "+from+" to "+vol, srcSize)
	start := time.Now()
	if err := p.run(ctx); err != nil {
		stopProgress(p.progress)
		return fmt.Errorf("push to %s failed: %w; what was sent is in the volume's head: push again to finish", vol, err)
	}
	p.progress.finish()
	fmt.Fprintf(os.Stderr, "pushed %s to %s in %s: %s read, %d of %d chunks differed, %s sent, %d zero chunks zeroed\n",
		from, vol, time.Since(start).Round(10*time.Millisecond), formatSize(srcSize), p.changed.Load(),
		(srcSize+p.cs-1)/p.cs, formatSize(p.sent.Load()), p.zeroed.Load())
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

// pusher compares the source's chunks with the volume's and writes those
// that differ over several connections.
type pusher struct {
	cl       *api.Client
	vol      string
	src      *os.File
	size, cs int64
	conns    []*client.Conn
	progress *progress

	changed, zeroed atomic.Int64
	sent            atomic.Int64
}

// pushPiece is one chunk to write: data, or zeros when data is nil.
type pushPiece struct {
	off  int64
	n    int64
	data []byte
}

func (p *pusher) run(ctx context.Context) error {
	perConn := transfer.InFlight(p.cs)
	pool := transfer.NewBufPool(perConn*len(p.conns)+1, p.cs)
	work := make(chan *pushPiece, perConn)
	g, gctx := errgroup.WithContext(ctx) // ends with Wait: flush below on ctx
	g.Go(func() error {
		defer close(work)
		return p.compare(gctx, pool, work)
	})
	for i := range perConn * len(p.conns) {
		conn := p.conns[i%len(p.conns)]
		g.Go(func() error {
			for pc := range work {
				if err := p.send(gctx, conn, pc); err != nil {
					return err
				}
				if pc.data != nil {
					pool.Put(pc.data)
				}
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	for _, conn := range p.conns {
		if err := conn.Flush(ctx); err != nil {
			return fmt.Errorf("flush: %w", err)
		}
	}
	return nil
}

// compare reads the source chunk by chunk, in runs of as many chunks as
// one answer of the admin API gives, and queues the chunks whose ID
// differs from the volume's.
func (p *pusher) compare(ctx context.Context, pool *transfer.BufPool, work chan<- *pushPiece) error {
	hasher := chunkstore.BLAKE3{}
	total := uint64((p.size + p.cs - 1) / p.cs)
	for first := uint64(0); first < total; {
		count := int(min(total-first, api.MaxChunkIDs))
		ids, err := p.cl.ChunkIDs(ctx, p.vol, first, count)
		if err != nil {
			return fmt.Errorf("the volume's chunk IDs: %w", err)
		}
		if ids.Hash != hasher.Scheme() || ids.ChunkSize != p.cs || len(ids.IDs) != count {
			return fmt.Errorf("the server names chunks with %q in chunks of %d bytes; this client hashes with %q in chunks of %d: use a matching nbdvault release",
				ids.Hash, ids.ChunkSize, hasher.Scheme(), p.cs)
		}
		for i, want := range ids.IDs {
			buf, err := pool.Get(ctx)
			if err != nil {
				return err
			}
			off := int64(first+uint64(i)) * p.cs
			n := min(p.cs, p.size-off)
			if _, err := io.ReadFull(io.NewSectionReader(p.src, off, n), buf[:n]); err != nil {
				return fmt.Errorf("read %s at %d: %w", p.src.Name(), off, err)
			}
			clear(buf[n:]) // the volume's last chunk counts zero-padded
			p.progress.add(n)
			zero := transfer.IsZero(buf)
			have := ""
			if !zero {
				have = hasher.Sum(buf).String()
			}
			if have == want {
				pool.Put(buf)
				continue
			}
			pc := &pushPiece{off: off, n: n, data: buf[:n]}
			if zero {
				pool.Put(buf)
				pc.data = nil
			}
			select {
			case work <- pc:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		first += uint64(count)
	}
	return nil
}

func (p *pusher) send(ctx context.Context, conn *client.Conn, pc *pushPiece) error {
	p.changed.Add(1)
	if pc.data == nil {
		p.zeroed.Add(1)
		if err := conn.Zero(ctx, pc.off, pc.n, false, false, false); err != nil {
			return fmt.Errorf("zero %d+%d: %w", pc.off, pc.n, err)
		}
		return nil
	}
	if err := conn.WriteAt(ctx, pc.data, pc.off, false); err != nil {
		return fmt.Errorf("write %d+%d: %w", pc.off, pc.n, err)
	}
	p.sent.Add(pc.n)
	return nil
}
