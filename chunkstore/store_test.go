package chunkstore_test

import (
	"context"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/chunkstore/storetest"
)

// failingPut fails every Put.
type failingPut struct{ chunkstore.Backend }

func (failingPut) Put(context.Context, string, []byte) error { return errors.New("test: no answer") }

// TestWrittenSizes: Options.Written is told each chunk object's stored
// size, the length of the object the PUT carries, before the PUT and
// again when it failed.
func TestWrittenSizes(t *testing.T) {
	type call struct {
		id     chunkstore.ID
		size   int64
		failed bool
	}
	var calls []call
	written := func(id chunkstore.ID, size int64, failed bool) { calls = append(calls, call{id, size, failed}) }
	mem := chunkstore.NewMem()
	s, err := chunkstore.NewStore(mem, chunkstore.Options{Written: written})
	require.NoError(t, err)
	chunks := [][]byte{storetest.CompressibleBytes(200<<10, 1), storetest.RandomBytes(3000), storetest.RandomBytes(64 << 10)}
	var ids []chunkstore.ID
	for _, c := range chunks {
		id, err := s.Put(t.Context(), c)
		require.NoError(t, err)
		ids = append(ids, id)
	}
	_, err = s.Put(t.Context(), chunks[0]) // present: not written again
	require.NoError(t, err)
	stored := map[chunkstore.ID]int64{}
	require.NoError(t, mem.ListSizes(t.Context(), "chunks/", func(k string, size int64) error {
		id, err := chunkstore.ParseID(k[len(k)-64:])
		require.NoError(t, err)
		stored[id] = size
		return nil
	}))
	require.Len(t, calls, len(chunks))
	for i, c := range calls {
		assert.Equal(t, call{ids[i], stored[ids[i]], false}, c, "chunk %d", i)
	}
	assert.Less(t, calls[0].size, int64(len(chunks[0])), "the stored size, compressed, not the chunk's")

	calls = nil
	f, err := chunkstore.NewStore(failingPut{chunkstore.NewMem()}, chunkstore.Options{Written: written})
	require.NoError(t, err)
	_, err = f.Put(t.Context(), chunks[1])
	require.Error(t, err)
	assert.Equal(t, []call{{ids[1], stored[ids[1]], false}, {ids[1], stored[ids[1]], true}}, calls,
		"a failed PUT is recorded again with its size")
}
