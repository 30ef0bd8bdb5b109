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

// ChunkHash names the hashes Push compares: BLAKE3-256 of each chunk,
// zero-padded to the chunk size; an all-zero chunk has the hash "".
const ChunkHash = "blake3-256"

// Compare tells which of the volume's chunks from chunk first on differ
// from chunks whose hashes (hex, ChunkHash) are sums: their indexes in
// sums, in order. The server compares, so that an encrypted repository's
// chunk IDs never leave it.
type Compare func(ctx context.Context, first uint64, sums []string) (differ []int, err error)

// PushOptions tune a Push.
type PushOptions struct {
	ChunkSize int64   // the volume's
	Compare   Compare // compares the source's chunks with the volume's
	Batch     int     // the most chunks compared at once
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
	p := &pusher{cmp: o.Compare, batch: max(o.Batch, 1), src: src, size: size, cs: o.ChunkSize, conns: conns, progress: o.Progress}
	if p.progress == nil {
		p.progress = func(int64) {}
	}
	err := p.run(ctx)
	return PushResult{Changed: p.changed.Load(), Zeroed: p.zeroed.Load(), Sent: p.sent.Load()}, err
}

// pusher compares the source's chunks with the volume's and writes those
// that differ over several connections.
type pusher struct {
	cmp      Compare
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
	pool := NewBufPool(perConn*len(p.conns)+2, p.cs) // and one compare hashes with
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

// compare hashes the source in runs of as many chunks as one request to
// the admin API compares, and queues the chunks that differ from the
// volume's, read again (the source's pages are likely still cached).
func (p *pusher) compare(ctx context.Context, pool *BufPool, work chan<- *pushPiece) error {
	total := uint64((p.size + p.cs - 1) / p.cs)
	buf, err := pool.Get(ctx)
	if err != nil {
		return err
	}
	for first := uint64(0); first < total; {
		count := int(min(total-first, uint64(p.batch)))
		sums := make([]string, count)
		for i := range sums {
			off := int64(first+uint64(i)) * p.cs
			if err := p.read(buf, off); err != nil {
				return err
			}
			p.progress(min(p.cs, p.size-off))
			if !IsZero(buf) {
				sum := blake3.Sum256(buf)
				sums[i] = hex.EncodeToString(sum[:])
			}
		}
		differ, err := p.cmp(ctx, first, sums)
		if err != nil {
			return fmt.Errorf("compare with the volume's chunks: %w", err)
		}
		last := -1
		for _, i := range differ {
			if i <= last || i >= count {
				return fmt.Errorf("the server's comparison of chunks %d to %d names chunk %d out of order", first, first+uint64(count)-1, first+uint64(i))
			}
			last = i
			off := int64(first+uint64(i)) * p.cs
			n := min(p.cs, p.size-off)
			pc := &pushPiece{off: off, n: n}
			if sums[i] != "" {
				b, err := pool.Get(ctx)
				if err != nil {
					return err
				}
				if err := p.read(b, off); err != nil {
					return err
				}
				pc.data = b[:n]
			}
			select {
			case work <- pc:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		first += uint64(count)
	}
	pool.Put(buf)
	return nil
}

// read fills buf (a chunk) with the source's chunk at off, zero-padded
// past its end: the volume's last chunk counts so.
func (p *pusher) read(buf []byte, off int64) error {
	n := min(p.cs, p.size-off)
	if _, err := io.ReadFull(io.NewSectionReader(p.src, off, n), buf[:n]); err != nil {
		return fmt.Errorf("read %s at %d: %w", p.src.Name(), off, err)
	}
	clear(buf[n:])
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
