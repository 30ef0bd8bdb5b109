package volume

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// TestSpace: what a collection counts is what a user would check. A
// snapshot's LREFER is the bytes it reads as data; its USED is exactly
// what deleting it frees (deleted, then collected: the repository
// shrinks by that much); the totals add up the objects the repository
// holds. USED is checked against a plain count from each manifest's
// own tree, by definition: what no other manifest (nor the volume's
// head) references.
func TestSpace(t *testing.T) {
	ctx := context.Background()
	const cs = MinChunkSize
	mem := chunkstore.NewMem()
	g := newRig(t, mem, 8*cs, cs, 1)
	g.retention = -1 // no points in time: they would hold what a deleted snapshot frees
	g.reopen()
	v := g.v
	chunks := make([][]byte, 8)
	for i := range chunks {
		chunks[i] = randomBytes(cs)
	}
	write := func(v *Volume, c int, p []byte) {
		require.NoError(t, v.WriteAt(ctx, p, int64(c)*cs, false))
	}
	for c := range 4 {
		write(v, c, chunks[c])
	}
	a, err := v.Snapshot(ctx, "a")
	require.NoError(t, err)
	require.NoError(t, v.SealAll(ctx))
	old0 := v.store.Sum(chunks[0])
	write(v, 0, chunks[6]) // chunk 0 rewritten: its old content is only a's
	write(v, 4, chunks[4])
	b, err := v.Snapshot(ctx, "b")
	require.NoError(t, err)
	require.NoError(t, v.SealAll(ctx))
	write(v, 5, chunks[5])
	require.NoError(t, v.WriteAt(ctx, randomBytes(4096), 7*cs+100, false)) // a delta's data, over a hole
	require.NoError(t, v.Zero(ctx, 1*cs+8192, 8192))                       // a delta's zeros, over data
	_, err = v.Checkpoint(ctx)
	require.NoError(t, err)
	require.NoError(t, v.SealAll(ctx))
	head := manifestKey("vol", v.base.Kind, v.base.ID)
	require.NotEmpty(t, v.base.Deltas, "the partial writes are in a delta")

	// A second volume holds one of a's chunks too: shared across volumes.
	v2, err := Create(ctx, g.env(), Config{Name: "vol2", Size: 2 * cs, ChunkSize: cs})
	require.NoError(t, err)
	t.Cleanup(func() { v2.Close() })
	write(v2, 1, chunks[2])
	_, err = v2.Checkpoint(ctx)
	require.NoError(t, err)
	require.NoError(t, v2.SealAll(ctx))

	rep, err := CollectGarbage(ctx, v.env, GCOptions{Hold: time.Millisecond, DryRun: true})
	require.NoError(t, err)
	s := rep.Space
	require.NotNil(t, s)
	saved, err := LoadSpace(g.stateDir)
	require.NoError(t, err)
	assert.Equal(t, s, saved, "kept in the state folder as counted")

	aKey, bKey := manifestKey("vol", KindSnapshot, a.ID), manifestKey("vol", KindSnapshot, b.ID)
	assert.Equal(t, int64(4*cs), s.Manifests[aKey].LogicalReferenced, "a: four chunks of data")
	assert.Equal(t, int64(5*cs), s.Manifests[bKey].LogicalReferenced, "b: five")
	assert.Equal(t, int64(6*cs+4096-8192), s.Manifests[head].LogicalReferenced, "the head: six chunks, a delta's data over a hole, a delta's zeros over data")

	// USED by its definition, from each manifest's own tree.
	size := func(id chunkstore.ID) int64 {
		obj, err := mem.Get(ctx, chunkstore.Key(id))
		require.NoError(t, err)
		return int64(len(obj))
	}
	trees := map[string]map[chunkstore.ID]bool{}
	for k := range s.Manifests {
		mf, _, err := readManifestForGC(ctx, v.env, k)
		require.NoError(t, err)
		mk := newMarker(v.store, true)
		require.NoError(t, mk.walk(ctx, mf.Root, indexLevels-1, func(_ chunkstore.ID, err error) error { return err }))
		trees[k] = map[chunkstore.ID]bool{}
		for _, id := range mk.done() {
			trees[k][id] = true
		}
	}
	require.Len(t, trees, 4, "a, b, the head, vol2's head")
	all := map[chunkstore.ID]int{}
	for _, tree := range trees {
		for id := range tree {
			all[id]++
		}
	}
	for k, tree := range trees {
		var want int64
		for id := range tree {
			if all[id] == 1 && k != head && volumeOfKey(k) == "vol" {
				want += size(id)
			}
		}
		assert.Equal(t, want, s.Manifests[k].Used, "USED of %s", k)
	}
	assert.Greater(t, s.Manifests[aKey].Used, size(old0), "a's USED has chunk 0's old content and a's index pages")
	assert.Zero(t, s.Manifests[head].Used, "the head's: the volume reads it")

	// The totals: every object referenced, counted once.
	var stored, journal int64
	for id := range all {
		stored += size(id)
	}
	require.NoError(t, mem.ListSizes(ctx, "volumes/", func(k string, n int64) error {
		if strings.HasPrefix(k, journalPrefix(volumeOfKey(k))) {
			journal += n
		}
		return nil
	}))
	r := s.Repository
	assert.Equal(t, int64(7), r.Chunks, "distinct data chunks: a's 4, b's 2, the head's 1 (vol2's is one of a's)")
	assert.Equal(t, int64(7*cs), r.Referenced)
	assert.Equal(t, stored+journal, r.Stored, "every referenced object and every journal pack, once")
	assert.Equal(t, journal, r.Journal)
	assert.Equal(t, r.DataStored+r.PageStored+r.Journal, r.Stored)
	shared := size(v.store.Sum(chunks[2]))
	assert.Equal(t, shared, r.Shared, "the chunk both volumes hold")
	vol, vol2 := s.Volumes["vol"], s.Volumes["vol2"]
	assert.Equal(t, s.Manifests[head].LogicalReferenced, vol.Logical)
	assert.Equal(t, int64(4*cs+5*cs+6*cs+4096-8192), vol.Written, "a, b and the head")
	assert.Equal(t, int64(6), vol.Chunks, "vol's chunks but the one vol2 holds too")
	assert.Equal(t, int64(6*cs), vol.Referenced)
	assert.Equal(t, r.Stored-shared, vol.Stored+vol2.Stored, "each volume's stored bytes are only its own")
	assert.Zero(t, vol2.Chunks, "vol2's one chunk is vol's too")
	assert.True(t, vol.SharesWithOthers)
	assert.True(t, vol2.SharesWithOthers)
	assert.Zero(t, vol.DedupRatio(), "not known: vol shares data with vol2")
	assert.InDelta(t, float64(vol.Written+vol2.Written)/float64(7*cs), r.DedupRatio(), 1e-9)

	// The same again: LREFER is kept from the last count, the rest
	// counted anew.
	rep2, err := CollectGarbage(ctx, v.env, GCOptions{Hold: time.Millisecond, DryRun: true})
	require.NoError(t, err)
	rep2.Space.Time = s.Time
	assert.Equal(t, s, rep2.Space, "nothing changed, nothing counts differently")

	// Deleting a frees exactly its USED.
	held := func() (n int64) {
		require.NoError(t, mem.ListSizes(ctx, "chunks/", func(_ string, size int64) error { n += size; return nil }))
		return n
	}
	before := held()
	require.NoError(t, v.DeleteSnapshot(ctx, a.ID))
	rep3, err := CollectGarbage(ctx, v.env, GCOptions{Hold: time.Millisecond})
	require.NoError(t, err)
	assert.Equal(t, s.Manifests[aKey].Used, before-held(), "deleting a freed its USED")
	assert.NotContains(t, rep3.Space.Manifests, aKey)
}

// TestSpaceKeptPointAndDamage: a checkpoint kept as a snapshot (the same
// ID and root: the volume's head twice) counts once in what the versions
// read; a damaged manifest's LREFER is not believed nor kept, and is
// counted once it is repaired.
func TestSpaceKeptPointAndDamage(t *testing.T) {
	ctx := context.Background()
	const cs = MinChunkSize
	mem := chunkstore.NewMem()
	g := newRig(t, mem, 4*cs, cs, 2)
	v := g.v
	require.NoError(t, v.WriteAt(ctx, randomBytes(cs), 0, false))
	_, err := v.Checkpoint(ctx)
	require.NoError(t, err)
	require.NoError(t, v.SealAll(ctx))
	cp := v.base
	require.Equal(t, KindCheckpoint, cp.Kind)
	kept, err := v.KeepPoint(ctx, cp.ID, "kept")
	require.NoError(t, err)
	require.Equal(t, cp.ID, kept.ID)
	sKey, cKey := manifestKey("vol", KindSnapshot, kept.ID), manifestKey("vol", KindCheckpoint, cp.ID)

	count := func(what string) *Space {
		t.Helper()
		rep, err := CollectGarbage(ctx, v.env, GCOptions{Hold: time.Millisecond, DryRun: true})
		require.NoError(t, err, what)
		return rep.Space
	}
	s := count("kept")
	assert.Equal(t, int64(cs), s.Manifests[sKey].LogicalReferenced)
	assert.Equal(t, int64(cs), s.Manifests[cKey].LogicalReferenced)
	assert.Equal(t, int64(cs), s.Volumes["vol"].Written, "one version, counted once")
	assert.Equal(t, int64(cs), s.Volumes["vol"].Logical)

	good, err := mem.Get(ctx, sKey)
	require.NoError(t, err)
	bad := bytes.Replace(good, []byte(`"chunk_size": 65536`), []byte(`"chunk_size": 99999`), 1)
	require.NotEqual(t, good, bad)
	require.NoError(t, mem.Put(ctx, sKey, bad))
	s = count("damaged")
	assert.Equal(t, int64(-1), s.Manifests[sKey].LogicalReferenced, "a damaged manifest's figures are not believed")
	assert.Equal(t, int64(cs), s.Volumes["vol"].Written, "the checkpoint is the head now")
	require.NoError(t, mem.Put(ctx, sKey, good))
	s = count("repaired")
	assert.Equal(t, int64(cs), s.Manifests[sKey].LogicalReferenced, "counted again once repaired")
}

// cancelOnRange cancels a context at the first ranged read (a delta's
// frames are read so; index pages are not).
type cancelOnRange struct {
	chunkstore.Backend
	cancel context.CancelFunc
}

func (b *cancelOnRange) GetRange(ctx context.Context, key string, off, n int64) ([]byte, error) {
	b.cancel()
	return nil, context.Canceled
}

// TestSpaceCancelled: a collection cancelled while it counts LREFER (it
// reads a delta) fails, and keeps no count with LREFER missing.
func TestSpaceCancelled(t *testing.T) {
	ctx := context.Background()
	const cs = MinChunkSize
	mem := chunkstore.NewMem()
	g := newRig(t, mem, 4*cs, cs, 3)
	require.NoError(t, g.v.WriteAt(ctx, randomBytes(4096), 100, false))
	_, err := g.v.Checkpoint(ctx)
	require.NoError(t, err)
	require.NoError(t, g.v.SealAll(ctx))
	require.NotEmpty(t, g.v.base.Deltas, "the write is in a delta")

	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	repo := &cancelOnRange{Backend: mem, cancel: cancel}
	store, err := chunkstore.NewStore(repo, chunkstore.Options{})
	require.NoError(t, err)
	dir := t.TempDir()
	_, err = CollectGarbage(cctx, &Env{Repo: repo, Store: store, StateDir: dir}, GCOptions{DryRun: true})
	require.ErrorIs(t, err, context.Canceled)
	sp, err := LoadSpace(dir)
	require.NoError(t, err)
	assert.Nil(t, sp, "nothing kept")
}
