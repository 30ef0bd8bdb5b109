package transfer

import (
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"sync/atomic"

	"golang.org/x/sync/errgroup"
	"lukechampine.com/blake3"

	"github.com/nbdvault/nbdvault/client"
)

// ChunkIDScheme names the chunk IDs Push compares: BLAKE3-256 of each
// chunk, zero-padded, as the repository's "blake3-256"; an all-zero chunk
// has the ID "".
const ChunkIDScheme = "blake3-256"

// ChunkIDs returns the volume's chunk IDs from chunk first on, as hex (""
// for a hole), at most count of them and at least one.
type ChunkIDs func(ctx context.Context, first uint64, count int) ([]string, error)

// PushOptions tune a Push.
type PushOptions struct {
	ChunkSize int64    // the volume's
	IDs       ChunkIDs // the volume's chunk IDs
	Batch     int      // the most IDs asked for at once
	// Progress, if set, is told of the bytes of the source compared.
	Progress func(n int64)
}

// PushResult says what a Push did.
type PushResult struct {
	Changed int64 // chunks that differed and were written or zeroed
	Zeroed  int64 // of them, chunks of zeros, sent as one zeroing request
	Sent    int64 // bytes of data sent
}

// Push makes the first size bytes of a volume equal src, sending only the
// chunks whose ID differs from the volume's over conns (each with many
// requests in flight), then flushes every connection.
func Push(ctx context.Context, conns []*client.Conn, src *os.File, size int64, o PushOptions) (PushResult, error) {
	p := &pusher{ids: o.IDs, batch: max(o.Batch, 1), src: src, size: size, cs: o.ChunkSize, conns: conns, progress: o.Progress}
	if p.progress == nil {
		p.progress = func(int64) {}
	}
	err := p.run(ctx)
	return PushResult{Changed: p.changed.Load(), Zeroed: p.zeroed.Load(), Sent: p.sent.Load()}, err
}

// pusher compares the source's chunks with the volume's and writes those
// that differ over several connections.
type pusher struct {
	ids      ChunkIDs
	batch    int
	src      *os.File
	size, cs int64
	conns    []*client.Conn
	progress func(n int64)

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
	perConn := InFlight(p.cs)
	pool := NewBufPool(perConn*len(p.conns)+1, p.cs)
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
func (p *pusher) compare(ctx context.Context, pool *BufPool, work chan<- *pushPiece) error {
	total := uint64((p.size + p.cs - 1) / p.cs)
	for first := uint64(0); first < total; {
		count := int(min(total-first, uint64(p.batch)))
		ids, err := p.ids(ctx, first, count)
		if err != nil {
			return fmt.Errorf("the volume's chunk IDs: %w", err)
		}
		if len(ids) == 0 || len(ids) > count {
			return fmt.Errorf("asked for %d of the volume's chunk IDs from chunk %d, got %d", count, first, len(ids))
		}
		count = len(ids)
		for i, want := range ids {
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
			p.progress(n)
			zero := IsZero(buf)
			have := ""
			if !zero {
				sum := blake3.Sum256(buf)
				have = hex.EncodeToString(sum[:])
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
