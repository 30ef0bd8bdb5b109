// Package transfer moves a volume's bytes between the source host and
// nbdvault over NBD: restore (a snapshot to a file or block device,
// parallel, sparse, with a checksum of what was written), and the pieces
// import and push share with it: request sizes, a bounded buffer pool,
// zero detection.
package transfer

import (
	"context"

	"github.com/nbdvault/nbdvault/client"
	"github.com/nbdvault/nbdvault/internal/zeros"
)

// RequestSize is the length of the NBD requests a transfer sends: the
// volume's chunk size, so that each asks the server for whole chunks,
// within the server's largest payload and a whole number of its minimum
// block.
func RequestSize(conn *client.Conn, chunkSize int64) int64 {
	minBlock, _, maxPayload := conn.BlockSizes()
	n := min(chunkSize, int64(maxPayload))
	if n <= 0 {
		n = 1 << 20
	}
	return max(n/int64(minBlock)*int64(minBlock), int64(minBlock))
}

// InFlight is how many requests a transfer keeps in flight: at least 16;
// more with small chunks, about 32 MiB of payload, up to the 64 the
// server runs at once on one connection.
func InFlight(requestSize int64) int {
	return int(min(max((32<<20)/requestSize, 16), 64))
}

// BufPool hands out at most Max buffers of size bytes, made as needed:
// what bounds the memory of a pipeline. Get is for one goroutine only;
// Put never blocks.
type BufPool struct {
	free chan []byte
	made int
	Max  int
	size int64
}

// NewBufPool returns a pool of at most max buffers of size bytes.
func NewBufPool(max int, size int64) *BufPool {
	return &BufPool{free: make(chan []byte, max), Max: max, size: size}
}

// Get returns a buffer of full size, waiting for one to come back once
// Max are out.
func (b *BufPool) Get(ctx context.Context) ([]byte, error) {
	select {
	case buf := <-b.free:
		return buf, nil
	default:
	}
	if b.made < b.Max {
		b.made++
		return make([]byte, b.size), nil
	}
	select {
	case buf := <-b.free:
		return buf, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Put gives back a buffer from Get (any length: it is restored to full).
func (b *BufPool) Put(buf []byte) { b.free <- buf[:cap(buf)] }

// IsZero reports whether p is all zeros.
func IsZero(p []byte) bool { return zeros.Is(p) }
