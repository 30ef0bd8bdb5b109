package volume

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// Two deltas whose pages have the same bytes at different offsets (one
// whole-chunk base extent each): the decoded-page cache is keyed by the
// page's hash only, and the page's offsets are relative to pr.first.
func TestPageCacheKnowsWhereAPageIs(t *testing.T) {
	ctx := context.Background()
	mem := chunkstore.NewMem()
	store, err := chunkstore.NewStore(mem, chunkstore.Options{})
	require.NoError(t, err)
	env := &Env{Repo: mem, Store: store, StateDir: t.TempDir()}
	const cs = MinChunkSize
	const size = 64 * cs
	v, err := Create(ctx, env, Config{Name: "v", Size: size, ChunkSize: cs})
	require.NoError(t, err)
	defer func() { v.Close() }()
	want := make([]byte, size)
	write := func(off int64, p []byte) {
		require.NoError(t, v.WriteAt(ctx, p, off, false))
		copy(want[off:], p)
	}
	seal := func() {
		_, err := v.Checkpoint(ctx)
		require.NoError(t, err)
		require.NoError(t, v.SealAll(ctx))
	}
	// D1: 100 scattered extents, one of them in chunk 9.
	for i := range int64(100) {
		write(30*cs+i*4096, randomBytes(512))
	}
	write(9*cs+1000, randomBytes(512))
	seal()
	// D2 = [base chunk 5]; read it so its page is cached.
	write(5*cs, randomBytes(cs))
	seal()
	require.Len(t, v.base.Deltas, 2)
	got := make([]byte, size)
	require.NoError(t, v.ReadAt(ctx, got, 0))
	require.Equal(t, want, got)
	// D3 (5 extents) merges with D2 only.
	for i := range int64(5) {
		write(50*cs+i*4096, randomBytes(512))
	}
	seal()
	require.Len(t, v.base.Deltas, 2)
	// D4 = [base chunk 9]: the same page bytes as D2's.
	write(9*cs, randomBytes(cs))
	seal()
	require.Len(t, v.base.Deltas, 3)
	require.NoError(t, v.ReadAt(ctx, got, 0))
	require.True(t, bytes.Equal(want, got), "the head reads what was written")
	// A merge reads D4 through the cache and stores what it decoded.
	write(60*cs, randomBytes(512))
	seal()
	require.NoError(t, v.Close())
	store2, err := chunkstore.NewStore(mem, chunkstore.Options{})
	require.NoError(t, err)
	v, err = Open(ctx, &Env{Repo: mem, Store: store2, StateDir: env.StateDir}, "v")
	require.NoError(t, err)
	require.NoError(t, v.ReadAt(ctx, got, 0))
	require.True(t, bytes.Equal(want[9*cs:10*cs], got[9*cs:10*cs]), "after a restart with empty caches, chunk 9 reads what was written last")
}
