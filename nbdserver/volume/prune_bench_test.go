package volume

import (
	"context"
	"flag"
	"fmt"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/integration/miniotest"
	"github.com/nbdvault/nbdvault/nbdserver/retention"
)

var benchPruneSnapshots = flag.Int("bench-prune-snapshots", 10_000, "BenchmarkPrune: snapshots of the volume")

// BenchmarkPrune: a prune to --keep-last 10 of a volume with
// -bench-prune-snapshots snapshots (default 10,000, one an hour) on
// MinIO. The snapshots are copies of one real sealed snapshot's manifest
// under new IDs, times and sequence numbers, written directly (sealing
// 10,000 snapshots one by one would take minutes); all are older than
// the point-in-time window, so no checkpoint takes their place. Reports
// the prune's wall time and S3 requests by kind.
func BenchmarkPrune(b *testing.B) {
	ctx := context.Background()
	m := miniotest.StartShared(b)
	repo := &countingRepo{Backend: chunkstore.NewRetry(m.Backend(b), chunkstore.DefaultRetryPolicy)}
	store, err := chunkstore.NewStore(repo, chunkstore.Options{})
	if err != nil {
		b.Fatal(err)
	}
	n := *benchPruneSnapshots
	start := time.Now().Add(-time.Duration(n+1) * time.Hour).UTC().Truncate(time.Millisecond)
	env := &Env{Repo: repo, Store: store, StateDir: b.TempDir(), clock: func() time.Time { return start }}
	v, err := Create(ctx, env, Config{Name: "bench", Size: 16 * MinChunkSize, ChunkSize: MinChunkSize})
	if err != nil {
		b.Fatal(err)
	}
	if err := v.WriteAt(ctx, make([]byte, MinChunkSize), 0, false); err != nil {
		b.Fatal(err)
	}
	first, err := v.Snapshot(ctx, "")
	if err != nil {
		b.Fatal(err)
	}
	if err := v.SealAll(ctx); err != nil {
		b.Fatal(err)
	}
	m0 := v.snaps[0].Manifest
	if m0.ID != first.ID {
		b.Fatalf("sealed %s, want %s", m0.ID, first.ID)
	}
	if err := v.Close(); err != nil {
		b.Fatal(err)
	}
	var g errgroup.Group
	g.SetLimit(64)
	for i := 1; i < n; i++ {
		g.Go(func() error {
			mf := m0
			mf.Seq = m0.Seq + uint64(i)
			mf.Time = m0.Time.Add(time.Duration(i) * time.Hour)
			mf.ID = snapshotID(mf.Time, mf.Seq)
			mf.Parent = ""
			return putJSON(ctx, repo, "", manifestKey("bench", KindSnapshot, mf.ID), mf)
		})
	}
	if err := g.Wait(); err != nil {
		b.Fatal(err)
	}
	env.clock = nil
	if v, err = Open(ctx, env, "bench"); err != nil {
		b.Fatal(err)
	}
	defer v.Close()
	if got := len(v.Snapshots()); got != n {
		b.Fatalf("%d snapshots, want %d", got, n)
	}
	// One prune, whatever b.N: the next would find nothing to remove.
	b.ResetTimer()
	before := repo.counts()
	t0 := time.Now()
	ds, err := v.Prune(ctx, retention.Policy{Last: 10}, PruneOptions{})
	elapsed := time.Since(t0)
	if err != nil {
		b.Fatal(err)
	}
	removed := 0
	for _, d := range ds {
		if !d.Keep {
			removed++
		}
	}
	if removed != n-10 || len(v.Snapshots()) != 10 {
		b.Fatalf("removed %d, %d left; want %d and 10", removed, len(v.Snapshots()), n-10)
	}
	k := repo.counts().since(before)
	b.ReportMetric(elapsed.Seconds(), "s/prune")
	b.ReportMetric(float64(removed), "removed")
	b.ReportMetric(float64(k.deletes), "DELETE-requests")
	b.ReportMetric(float64(k.lists), "LIST")
	b.ReportMetric(float64(k.gets), "GET")
	b.ReportMetric(float64(k.has+k.objects()), "HEAD+PUT")
	fmt.Printf("BenchmarkPrune: %d snapshots, removed %d in %s: %d DELETE requests, %d LIST, %d GET, %d HEAD+PUT\n",
		n, removed, elapsed.Round(time.Millisecond), k.deletes, k.lists, k.gets, k.has+k.objects())
}
