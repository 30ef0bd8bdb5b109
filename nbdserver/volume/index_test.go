package volume

import (
	"context"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
)

func memStore(t testing.TB) (*chunkstore.Store, *chunkstore.Mem) {
	mem := chunkstore.NewMem()
	s, err := chunkstore.NewStore(mem, chunkstore.Options{})
	require.NoError(t, err)
	return s, mem
}

func objects(t testing.TB, b chunkstore.Backend) int {
	n := 0
	require.NoError(t, b.List(context.Background(), "chunks/", func(string) error { n++; return nil }))
	return n
}

func fakeID(n uint64) chunkstore.ID {
	var id chunkstore.ID
	for i := range 8 {
		id[i] = byte(n >> (8 * i))
	}
	id[31] = 1 // never the zero ID
	return id
}

// TestIndexModel applies random batches of points and zero ranges, some of
// them huge, and checks lookups against a map.
func TestIndexModel(t *testing.T) {
	ctx := context.Background()
	s, _ := memStore(t)
	r := rand.New(rand.NewPCG(1, 2))
	model := map[uint64]chunkstore.ID{}
	var probes []uint64
	root := chunkstore.ZeroID
	for batch := range 40 {
		// Zero ranges first, then points outside them.
		var u indexUpdate
		next := uint64(r.Int64N(1 << 20))
		for range r.IntN(3) {
			first := next + uint64(r.Int64N(1<<20))
			length := uint64(1 + r.Int64N(1<<uint(r.IntN(30))))
			if first+length > MaxChunks {
				break
			}
			u.zeros = append(u.zeros, chunkRange{first, first + length})
			next = first + length + 1
		}
		inZero := func(c uint64) bool {
			for _, z := range u.zeros {
				if c >= z.first && c < z.end {
					return true
				}
			}
			return false
		}
		for range r.IntN(200) {
			var c uint64
			switch r.IntN(3) {
			case 0:
				c = uint64(r.Int64N(10000))
			case 1:
				c = uint64(r.Int64N(int64(MaxChunks)))
			default:
				if len(probes) > 0 {
					c = probes[r.IntN(len(probes))]
				}
			}
			if inZero(c) || slices.ContainsFunc(u.points, func(p pointUpdate) bool { return p.c == c }) {
				continue
			}
			id := fakeID(uint64(batch)<<32 | c)
			if r.IntN(5) == 0 {
				id = chunkstore.ZeroID // a chunk that became all zeros
			}
			u.points = append(u.points, pointUpdate{c, id})
		}
		slices.SortFunc(u.points, func(a, b pointUpdate) int { return cmpUint(a.c, b.c) })

		var err error
		root, err = updateIndex(ctx, s, root, u)
		require.NoError(t, err)
		for c := range model {
			if inZero(c) {
				delete(model, c)
			}
		}
		for _, p := range u.points {
			if p.id.IsZero() {
				delete(model, p.c)
			} else {
				model[p.c] = p.id
			}
			probes = append(probes, p.c)
		}
		for _, z := range u.zeros {
			probes = append(probes, z.first, z.end-1, z.end)
		}
		for _, c := range probes {
			if c >= MaxChunks {
				continue
			}
			got, err := lookupIndex(ctx, s, root, c)
			require.NoError(t, err)
			require.Equal(t, model[c], got, "batch %d chunk %d", batch, c)
		}
	}
}

func TestIndexSharesUnchangedPages(t *testing.T) {
	ctx := context.Background()
	s, mem := memStore(t)
	var u indexUpdate
	for c := range uint64(3 * indexFanout) { // three full leaves
		u.points = append(u.points, pointUpdate{c, fakeID(c)})
	}
	root, err := updateIndex(ctx, s, chunkstore.ZeroID, u)
	require.NoError(t, err)
	assert.Equal(t, 3+1+1, objects(t, mem), "three leaves, one inner page, a root")

	// One chunk changes: one leaf, the inner page and the root are new.
	root2, err := updateIndex(ctx, s, root, indexUpdate{points: []pointUpdate{{5000, fakeID(99)}}})
	require.NoError(t, err)
	assert.Equal(t, 5+3, objects(t, mem), "a change costs three objects, whatever the size")
	got, err := lookupIndex(ctx, s, root, 5000)
	require.NoError(t, err)
	assert.Equal(t, fakeID(5000), got, "the old index is untouched")
	got, err = lookupIndex(ctx, s, root2, 5000)
	require.NoError(t, err)
	assert.Equal(t, fakeID(99), got)

	// Zeroing everything is a zero root: the empty index.
	root3, err := updateIndex(ctx, s, root2, indexUpdate{zeros: []chunkRange{{0, MaxChunks}}})
	require.NoError(t, err)
	assert.True(t, root3.IsZero())
	assert.Equal(t, 8, objects(t, mem), "nothing written for a hole")

	// A 64 TiB volume with one chunk written: three pages.
	root4, err := updateIndex(ctx, s, chunkstore.ZeroID, indexUpdate{points: []pointUpdate{{MaxChunks - 1, fakeID(1)}}})
	require.NoError(t, err)
	got, err = lookupIndex(ctx, s, root4, MaxChunks-1)
	require.NoError(t, err)
	assert.Equal(t, fakeID(1), got)
	got, err = lookupIndex(ctx, s, root4, 0)
	require.NoError(t, err)
	assert.True(t, got.IsZero())
}
