package transfer

import (
	"bytes"
	"context"
	"encoding/hex"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"lukechampine.com/blake3"

	"github.com/nbdvault/nbdvault/client"
	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// readAll reads the whole of mem.
func readAll(t *testing.T, mem *nbd.Mem) []byte {
	t.Helper()
	got := make([]byte, mem.Size())
	require.NoError(t, mem.ReadAt(context.Background(), got, 0))
	return got
}

// sparseSource writes parts at their offsets into a new sparse file of
// size bytes and returns it open, with the bytes it holds.
func sparseSource(t *testing.T, size int64, parts map[int64][]byte) (*os.File, []byte) {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "src.img"))
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	require.NoError(t, f.Truncate(size))
	want := make([]byte, size)
	for at, p := range parts {
		_, err := f.WriteAt(p, at)
		require.NoError(t, err)
		copy(want[at:], p)
	}
	return f, want
}

func pattern(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = seed + byte(i*7)
	}
	return p
}

// An import makes the export equal the source (old data gone), sends
// only what is not zeros, and skips a sparse file's holes: data inside a
// hole across two requests included.
func TestImport(t *testing.T) {
	ctx := context.Background()
	const size = 6 << 20
	mem := nbd.NewMem(8 << 20)
	require.NoError(t, mem.WriteAt(ctx, bytes.Repeat([]byte{0x77}, 8<<20), 0, false))
	src, want := sparseSource(t, size-1000, map[int64][]byte{
		0:             pattern(1<<20, 1),
		2 << 20:       make([]byte, 1<<20), // zeros written out
		4<<20 - 1000:  pattern(5000, 2),    // across requests, inside a hole
		5<<20 + 12345: pattern(1<<20-12345-1000, 3),
	})
	conn := serve(t, mem)
	var progress atomic.Int64
	res, err := Import(ctx, conn, src, size-1000, ImportOptions{Request: 1 << 20, Progress: func(n int64) { progress.Add(n) }})
	require.NoError(t, err)
	want = append(want, make([]byte, 8<<20-len(want))...)
	require.True(t, bytes.Equal(want, readAll(t, mem)), "the export after the import")
	assert.EqualValues(t, size-1000, progress.Load())
	assert.EqualValues(t, 4<<20-1000, res.Sent, "chunks 0, 3, 4 and 5 (the last one short)")
	assert.EqualValues(t, 2<<20, res.Zero)
}

// A push sends the chunks whose ID differs from the volume's, zeroes the
// ones that became zeros, and leaves the others alone.
func TestPush(t *testing.T) {
	ctx := context.Background()
	const cs, size = 1 << 20, 6 << 20
	mem := nbd.NewMem(size)
	old := append(pattern(3<<20, 1), pattern(3<<20, 9)...)
	require.NoError(t, mem.WriteAt(ctx, old, 0, false))
	// The source: chunk 1 changed, chunk 4 zeros, the rest as they are.
	src, want := sparseSource(t, size, map[int64][]byte{0: old})
	_, err := src.WriteAt(pattern(cs, 5), 1<<20)
	require.NoError(t, err)
	copy(want[1<<20:], pattern(cs, 5))
	_, err = src.WriteAt(make([]byte, cs), 4<<20)
	require.NoError(t, err)
	clear(want[4<<20 : 5<<20])

	compare := func(ctx context.Context, first uint64, sums []string) ([]int, error) {
		var differ []int
		for i, want := range sums {
			buf := make([]byte, cs)
			require.NoError(t, mem.ReadAt(ctx, buf, int64(first+uint64(i))*cs))
			have := ""
			if !IsZero(buf) {
				sum := blake3.Sum256(buf)
				have = hex.EncodeToString(sum[:])
			}
			if have != want {
				differ = append(differ, i)
			}
		}
		return differ, nil
	}
	conns := []*client.Conn{serve(t, mem), serve(t, mem)}
	res, err := Push(ctx, conns, src, size, PushOptions{ChunkSize: cs, Compare: compare, Batch: 4})
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, readAll(t, mem)), "the volume after the push")
	assert.EqualValues(t, PushResult{Changed: 2, Zeroed: 1, Sent: cs}, res)

	// Nothing differs now: nothing is sent.
	res, err = Push(ctx, conns, src, size, PushOptions{ChunkSize: cs, Compare: compare, Batch: 4})
	require.NoError(t, err)
	assert.Zero(t, res.Changed)
}
