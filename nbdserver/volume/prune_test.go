package volume

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/integration/miniotest"
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

	_, err = g.v.Prune(ctx, retention.Policy{}, PruneOptions{})
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
	ds, err := g.v.Prune(ctx, retention.Policy{Last: 2}, PruneOptions{DryRun: true})
	require.NoError(t, err)
	check(ds)
	require.Len(t, g.v.Snapshots(), 6, "a dry run removes nothing")

	ds, err = g.v.Prune(ctx, retention.Policy{Last: 2}, PruneOptions{})
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
	ds, err = g.v.Prune(ctx, retention.Policy{Last: 2}, PruneOptions{})
	require.NoError(t, err)
	var removed []string
	for _, d := range ds {
		if !d.Keep {
			removed = append(removed, d.ID)
		}
	}
	assert.Equal(t, []string{ids[3]}, removed)
}

// pruneBackends are the repositories the prune tests run on: memory, a
// local folder, and a real MinIO through the retrying S3 backend.
func pruneBackends(t *testing.T) map[string]func(t *testing.T) chunkstore.Backend {
	return map[string]func(t *testing.T) chunkstore.Backend{
		"memory": func(t *testing.T) chunkstore.Backend { return chunkstore.NewMem() },
		"local": func(t *testing.T) chunkstore.Backend {
			l, err := chunkstore.NewLocal(t.TempDir())
			require.NoError(t, err)
			return l
		},
		"minio": func(t *testing.T) chunkstore.Backend {
			return chunkstore.NewRetry(miniotest.StartShared(t).Backend(t), chunkstore.DefaultRetryPolicy)
		},
	}
}

// A prune deletes its manifests in batches, one request per batch, not
// one per snapshot; protected and in-use snapshots stay, and what stays
// reads as written, after a restart too.
func TestPruneBatches(t *testing.T) {
	defer func(n int) { pruneBatch = n }(pruneBatch)
	pruneBatch = 10 // 25 to remove: three requests
	for name, backend := range pruneBackends(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			repo := &countingRepo{Backend: backend(t)}
			g := newRig(t, repo, 4*MinChunkSize, MinChunkSize, 1)
			var ids []string
			for range 30 {
				g.tick(time.Hour)
				g.writeRandom(100)
				s, err := g.v.Snapshot(ctx, "")
				require.NoError(t, err)
				g.m.snaps[s.ID] = bytes.Clone(g.m.head)
				ids = append(ids, s.ID)
			}
			require.NoError(t, g.v.SealAll(ctx))
			_, err := g.v.Protect(ctx, ids[0], true)
			require.NoError(t, err)
			before := repo.counts()
			ds, err := g.v.Prune(ctx, retention.Policy{Last: 3}, PruneOptions{InUse: func(id string) string {
				if id == ids[1] {
					return "exported over NBD"
				}
				return ""
			}})
			require.NoError(t, err)
			assert.Equal(t, int64(3), repo.counts().since(before).deletes, "25 manifests deleted in batches of 10")
			removed := 0
			for _, d := range ds {
				switch d.ID {
				case ids[0]:
					assert.Equal(t, []string{"protected"}, d.Reasons)
				case ids[1]:
					assert.Equal(t, []string{"exported over NBD"}, d.Reasons)
				}
				if !d.Keep {
					removed++
					delete(g.m.snaps, d.ID)
				}
			}
			assert.Equal(t, 25, removed)
			want := []string{ids[0], ids[1], ids[27], ids[28], ids[29]}
			for _, what := range []string{"after prune", "after a restart"} {
				var left []string
				for _, si := range g.v.Snapshots() {
					left = append(left, si.ID)
					got := make([]byte, len(g.m.head))
					require.NoError(t, g.v.ReadSnapshotAt(ctx, si.ID, got, 0))
					assert.True(t, bytes.Equal(g.m.snaps[si.ID], got), "%s: snapshot %s reads as written", what, si.ID)
				}
				assert.ElementsMatch(t, want, left, what)
				g.reopen()
			}
		})
	}
}

// A snapshot dated after NotAfter (a clock that stepped back) stops the
// prune before anything is removed.
func TestPruneFutureSnapshot(t *testing.T) {
	ctx := context.Background()
	g := newRig(t, chunkstore.NewMem(), 4*MinChunkSize, MinChunkSize, 1)
	for range 4 {
		g.tick(time.Hour)
		_, err := g.v.Snapshot(ctx, "")
		require.NoError(t, err)
	}
	require.NoError(t, g.v.SealAll(ctx))
	_, err := g.v.Prune(ctx, retention.Policy{Last: 1}, PruneOptions{NotAfter: g.now.Add(-time.Minute)})
	require.ErrorIs(t, err, ErrFutureSnapshot)
	assert.Len(t, g.v.Snapshots(), 4, "nothing removed")
	ds, err := g.v.Prune(ctx, retention.Policy{Last: 1}, PruneOptions{NotAfter: g.now})
	require.NoError(t, err, "the newest snapshot at the limit is not in the future")
	assert.Len(t, ds, 4)
	assert.Len(t, g.v.Snapshots(), 1)
}

// The retention policy lives in the volume's record: it survives a
// restart and a Grow; the zero policy clears it; a record without one
// (older) reads as none; a policy that keeps nothing is refused.
func TestSetRetention(t *testing.T) {
	ctx := context.Background()
	repo := chunkstore.NewMem()
	g := newRig(t, repo, 4*MinChunkSize, MinChunkSize, 1)
	raw := func() string {
		var doc map[string]any
		require.NoError(t, getJSON(ctx, repo, "", volumeKey("vol"), &doc))
		_, has := doc["retention"]
		return fmt.Sprint(has, doc["retention"])
	}
	assert.Equal(t, "false <nil>", raw(), "a record without a policy has no retention member")
	assert.True(t, g.v.Config().Retention.Empty())

	p := retention.Policy{Last: 2, Daily: 7, Within: retention.Span{Days: 3}}
	require.NoError(t, g.v.SetRetention(ctx, p))
	assert.Equal(t, p, g.v.Config().Retention)
	require.NoError(t, g.v.Grow(ctx, 8*MinChunkSize))
	g.reopen()
	assert.Equal(t, p, g.v.Config().Retention, "kept across a Grow and a restart")
	assert.Equal(t, int64(8*MinChunkSize), g.v.Config().Size)

	err := g.v.SetRetention(ctx, retention.Policy{Last: -5})
	require.ErrorIs(t, err, ErrInvalid)
	assert.Contains(t, err.Error(), "--keep-last -5")
	assert.Equal(t, p, g.v.Config().Retention, "a refused policy changes nothing")

	require.NoError(t, g.v.SetRetention(ctx, retention.Policy{}))
	g.reopen()
	assert.True(t, g.v.Config().Retention.Empty(), "cleared")
	assert.Equal(t, "false <nil>", raw())
}
