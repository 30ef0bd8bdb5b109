package volume

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// heldDeletes holds DeleteMany until release is closed, once on is set.
type heldDeletes struct {
	chunkstore.Backend
	on      bool
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

func (b *heldDeletes) DeleteMany(ctx context.Context, keys []string) error {
	if b.on {
		b.once.Do(func() { close(b.entered) })
		<-b.release
	}
	return b.Backend.DeleteMany(ctx, keys)
}

// TestGCDedupRace: a seal stores a chunk that a collection has chosen to
// delete and is deleting at that moment (the chunk a deleted snapshot
// left, written again). The seal must not take the chunk as present:
// it waits for the delete and stores it again, and the head reads it.
// Without the store's tracking of Puts the seal finds the chunk present
// (dedup), the delete then removes it, and the read fails.
func TestGCDedupRace(t *testing.T) {
	ctx := context.Background()
	b := &heldDeletes{Backend: chunkstore.NewMem(), entered: make(chan struct{}), release: make(chan struct{})}
	g := newRig(t, b, 4*MinChunkSize, MinChunkSize, 1)
	g.retention = -1       // no points in time: they would keep the chunk
	g.frameBits = []int{0} // reopen makes a new store: an empty cache
	g.reopen()
	p := randomBytes(MinChunkSize)
	require.NoError(t, g.v.WriteAt(ctx, p, 0, false))
	s1, err := g.v.Snapshot(ctx, "")
	require.NoError(t, err)
	require.NoError(t, g.v.SealAll(ctx))
	require.NoError(t, g.v.WriteAt(ctx, randomBytes(MinChunkSize), 0, false))
	_, err = g.v.Snapshot(ctx, "")
	require.NoError(t, err)
	require.NoError(t, g.v.SealAll(ctx))
	require.NoError(t, g.v.DeleteSnapshot(ctx, s1.ID)) // p is referenced by nothing now

	b.on = true
	gcDone := make(chan GCReport, 1)
	go func() {
		rep, err := CollectGarbage(ctx, g.v.env, GCOptions{Hold: time.Millisecond})
		assert.NoError(t, err)
		gcDone <- rep
	}()
	<-b.entered // the collection is deleting p (and the old index pages)
	require.NoError(t, g.v.WriteAt(ctx, p, MinChunkSize, false))
	_, err = g.v.Checkpoint(ctx)
	require.NoError(t, err)
	sealed := make(chan error, 1)
	go func() { sealed <- g.v.SealAll(ctx) }()
	waited := true
	select {
	case err := <-sealed:
		require.NoError(t, err)
		waited = false
	case <-time.After(200 * time.Millisecond):
	}
	close(b.release)
	rep := <-gcDone
	assert.Positive(t, rep.Deleted)
	if waited {
		select {
		case err := <-sealed:
			require.NoError(t, err)
		case <-time.After(30 * time.Second):
			t.Fatal("the seal did not finish after the delete")
		}
	}
	assert.True(t, waited, "the seal waits while the collection deletes the chunk it stores")
	b.on = false
	g.reopen() // an empty cache: the chunk is read from the repository
	got := make([]byte, MinChunkSize)
	require.NoError(t, g.v.ReadAt(ctx, got, MinChunkSize), "the chunk written again is in the repository")
	assert.True(t, bytes.Equal(p, got))
}
