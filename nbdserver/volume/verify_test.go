package volume

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// TestVerify damages and deletes chunks and index pages, and Verify
// names each, with the snapshots and byte ranges they hold; what it
// does not read (without ReadData) it cannot find damaged, only missing.
func TestVerify(t *testing.T) {
	ctx := context.Background()
	mem := chunkstore.NewMem()
	g := newRig(t, mem, 8*MinChunkSize, MinChunkSize, 1)
	g.retention = -1
	g.reopen()
	require.NoError(t, g.v.WriteAt(ctx, randomBytes(8*MinChunkSize), 0, false))
	a, err := g.v.Snapshot(ctx, "a")
	require.NoError(t, err)
	require.NoError(t, g.v.WriteAt(ctx, randomBytes(4*MinChunkSize), 4*MinChunkSize, false))
	b, err := g.v.Snapshot(ctx, "b")
	require.NoError(t, err)
	require.NoError(t, g.v.SealAll(ctx))

	rep, err := Verify(ctx, g.v.env, VerifyOptions{ReadData: true})
	require.NoError(t, err)
	assert.Empty(t, rep.Problems)
	assert.Equal(t, 2, rep.Manifests)
	assert.Equal(t, 12, rep.Chunks, "8 chunks, then 4 rewritten")
	assert.Equal(t, 12, rep.Read)
	half1, err := Verify(ctx, g.v.env, VerifyOptions{ReadData: true, SubsetN: 1, SubsetM: 2})
	require.NoError(t, err)
	half2, err := Verify(ctx, g.v.env, VerifyOptions{ReadData: true, SubsetN: 2, SubsetM: 2})
	require.NoError(t, err)
	assert.Equal(t, 12, half1.Read+half2.Read, "the subsets of 2 read everything once")

	root := func(id string) chunkstore.ID {
		for _, s := range g.v.snaps {
			if s.ID == id {
				return s.Root
			}
		}
		t.Fatalf("no snapshot %s", id)
		return chunkstore.ID{}
	}
	chunkOf := func(snap string, c uint64) chunkstore.ID {
		id, err := lookupIndex(ctx, g.v.store, root(snap), c)
		require.NoError(t, err)
		return id
	}
	shared := chunkOf(a.ID, 1) // in a and b
	onlyA := chunkOf(a.ID, 6)  // rewritten in b
	require.NoError(t, mem.Delete(ctx, chunkstore.Key(shared)))
	obj, err := mem.Get(ctx, chunkstore.Key(onlyA))
	require.NoError(t, err)
	obj[len(obj)-1] ^= 1
	require.NoError(t, mem.Put(ctx, chunkstore.Key(onlyA), obj))

	rep, err = Verify(ctx, g.v.env, VerifyOptions{})
	require.NoError(t, err)
	require.Len(t, rep.Problems, 1, "without reading data, the damaged chunk is present: only the missing one")
	p := rep.Problems[0]
	assert.Equal(t, chunkstore.Key(shared), p.Object)
	assert.Equal(t, "missing", p.Kind)
	assert.ElementsMatch(t, []VerifyRef{
		{Volume: "vol", Snapshot: a.ID, Kind: KindSnapshot, Offset: MinChunkSize, Length: MinChunkSize},
		{Volume: "vol", Snapshot: b.ID, Kind: KindSnapshot, Offset: MinChunkSize, Length: MinChunkSize},
	}, p.Affects)

	rep, err = Verify(ctx, g.v.env, VerifyOptions{ReadData: true})
	require.NoError(t, err)
	require.Len(t, rep.Problems, 2)
	byObject := map[string]VerifyProblem{}
	for _, p := range rep.Problems {
		byObject[p.Object] = p
	}
	damaged := byObject[chunkstore.Key(onlyA)]
	assert.Equal(t, "damaged", damaged.Kind)
	assert.Equal(t, []VerifyRef{{Volume: "vol", Snapshot: a.ID, Kind: KindSnapshot, Offset: 6 * MinChunkSize, Length: MinChunkSize}}, damaged.Affects)

	// One snapshot only, by label: b does not reference onlyA.
	rep, err = Verify(ctx, g.v.env, VerifyOptions{Targets: []string{"vol@b"}, ReadData: true})
	require.NoError(t, err)
	assert.Equal(t, 1, rep.Manifests)
	require.Len(t, rep.Problems, 1)
	assert.Equal(t, chunkstore.Key(shared), rep.Problems[0].Object)
	_, err = Verify(ctx, g.v.env, VerifyOptions{Targets: []string{"vol@nope"}})
	require.ErrorIs(t, err, ErrNoSnapshot)

	// A damaged index page: everything below it is named, by range.
	require.NoError(t, mem.Delete(ctx, chunkstore.Key(root(b.ID))))
	rep, err = Verify(ctx, g.v.env, VerifyOptions{Targets: []string{"vol@" + b.ID}})
	require.NoError(t, err)
	require.NotEmpty(t, rep.Problems)
	assert.Equal(t, chunkstore.Key(root(b.ID)), rep.Problems[0].Object)
	assert.Equal(t, "missing", rep.Problems[0].Kind)
	assert.Equal(t, []VerifyRef{{Volume: "vol", Snapshot: b.ID, Kind: KindSnapshot, Offset: 0, Length: 8 * MinChunkSize}}, rep.Problems[0].Affects)
}
