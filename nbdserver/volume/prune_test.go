package volume

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/nbdserver/retention"
)

// Prune removes what the policy does not keep, and only that: protected,
// unsealed snapshots and the kept ones read back as written, before and
// after a restart; a dry run removes nothing.
func TestPrune(t *testing.T) {
	ctx := context.Background()
	g := newRig(t, chunkstore.NewMem(), 4*MinChunkSize, MinChunkSize, 1)
	var ids []string
	for day := range 6 {
		g.tick(24 * time.Hour)
		g.writeRandom(3)
		s, err := g.v.Snapshot(ctx, "")
		require.NoError(t, err)
		g.m.snaps[s.ID] = bytes.Clone(g.m.head)
		ids = append(ids, s.ID)
		if day < 5 {
			require.NoError(t, g.v.SealAll(ctx))
		}
	}
	// ids[5] is not sealed; ids[0] is protected.
	_, err := g.v.Protect(ctx, ids[0], true)
	require.NoError(t, err)

	_, err = g.v.Prune(ctx, retention.Policy{}, time.UTC, false)
	require.ErrorIs(t, err, ErrInvalid, "an empty policy removes nothing")

	want := map[string][]string{
		ids[5]: {"not sealed yet"}, ids[4]: {"last snapshot"}, ids[3]: {"last snapshot"},
		ids[2]: nil, ids[1]: nil, ids[0]: {"protected"},
	}
	check := func(ds []PruneDecision) {
		t.Helper()
		require.Len(t, ds, 6)
		for i, d := range ds {
			assert.Equal(t, ids[5-i], d.ID, "newest first")
			assert.Equal(t, want[d.ID], d.Reasons, d.ID)
			assert.Equal(t, want[d.ID] != nil, d.Keep, d.ID)
			assert.NoError(t, d.Err)
		}
	}
	ds, err := g.v.Prune(ctx, retention.Policy{Last: 2}, time.UTC, true)
	require.NoError(t, err)
	check(ds)
	require.Len(t, g.v.Snapshots(), 6, "a dry run removes nothing")

	ds, err = g.v.Prune(ctx, retention.Policy{Last: 2}, time.UTC, false)
	require.NoError(t, err)
	check(ds)
	delete(g.m.snaps, ids[1])
	delete(g.m.snaps, ids[2])
	verify := func(what string) {
		t.Helper()
		var left []string
		for _, si := range g.v.Snapshots() {
			left = append(left, si.ID)
			got := make([]byte, len(g.m.head))
			require.NoError(t, g.v.ReadSnapshotAt(ctx, si.ID, got, 0))
			assert.True(t, bytes.Equal(g.m.snaps[si.ID], got), "%s: snapshot %s reads as written", what, si.ID)
		}
		assert.ElementsMatch(t, []string{ids[0], ids[3], ids[4], ids[5]}, left, what)
	}
	verify("after prune")
	require.NoError(t, g.v.SealAll(ctx))
	g.reopen()
	verify("after a restart")

	// Pruning again with the same policy: now ids[5] is sealed and among
	// the last two, and ids[3] goes.
	ds, err = g.v.Prune(ctx, retention.Policy{Last: 2}, time.UTC, false)
	require.NoError(t, err)
	var removed []string
	for _, d := range ds {
		if !d.Keep {
			removed = append(removed, d.ID)
		}
	}
	assert.Equal(t, []string{ids[3]}, removed)
}
