package volume

import (
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"runtime"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/integration/miniotest"
)

var benchGCChunks = flag.Int("bench-gc-chunks", 100_000, "BenchmarkGC: chunks in the repository")

// BenchmarkGC: a collection on MinIO over a repository of
// -bench-gc-chunks chunks (default 100,000), half of them referenced by
// nothing: two snapshots of a volume, one referencing every chunk, one
// every other, and the first deleted, after a first collection that
// lists the chunks into the inventory. The repository is made directly
// (small unique chunks, index pages, manifests), not through writes, to
// get to 100,000 chunks in a minute. Reports the wall time, S3 requests
// by kind, and the peak live Go heap during the run per chunk (it
// includes the chunk cache's pages).
func BenchmarkGC(b *testing.B) {
	ctx := context.Background()
	m := miniotest.StartShared(b)
	repo := &countingRepo{Backend: chunkstore.NewRetry(m.Backend(b), chunkstore.DefaultRetryPolicy)}
	dir := b.TempDir()
	inv, err := OpenInventory(dir, InventoryOptions{})
	if err != nil {
		b.Fatal(err)
	}
	store, err := chunkstore.NewStore(repo, chunkstore.Options{Written: inv.Written})
	if err != nil {
		b.Fatal(err)
	}
	env := &Env{Repo: repo, Store: store, StateDir: dir, Inventory: inv}
	n := *benchGCChunks
	ids := make([]chunkstore.ID, n)
	var g errgroup.Group
	g.SetLimit(64)
	for i := range n {
		g.Go(func() error {
			var p [64]byte
			binary.LittleEndian.PutUint64(p[:], uint64(i)+1)
			id, err := store.Put(ctx, p[:])
			ids[i] = id
			return err
		})
	}
	if err := g.Wait(); err != nil {
		b.Fatal(err)
	}
	manifest := func(id string, every int) {
		var u indexUpdate
		for i := 0; i < n; i += every {
			u.points = append(u.points, pointUpdate{c: uint64(i), id: ids[i]})
		}
		root, err := updateIndex(ctx, store, chunkstore.ZeroID, u)
		if err != nil {
			b.Fatal(err)
		}
		mf := Manifest{ID: id, Kind: KindSnapshot, Volume: "bench", Time: time.Now().UTC(), Size: int64(n) * MinChunkSize,
			ChunkSize: MinChunkSize, Root: root}
		if err := putJSON(ctx, repo, "", manifestKey("bench", KindSnapshot, id), mf); err != nil {
			b.Fatal(err)
		}
	}
	all, half := snapshotID(time.Now(), 1), snapshotID(time.Now(), 2)
	manifest(all, 1)
	manifest(half, 2)
	// A first collection lists the chunks (the inventory is new) and
	// deletes nothing; the one measured takes them from the inventory,
	// as every run does but the first and those after a crash.
	first, err := CollectGarbage(ctx, env, GCOptions{Hold: time.Second})
	if err != nil || !first.Listing || first.Deleted != 0 {
		b.Fatalf("the first collection: %+v, %v", first, err)
	}
	if err := repo.Delete(ctx, manifestKey("bench", KindSnapshot, all)); err != nil {
		b.Fatal(err)
	}
	// One collection, whatever b.N: the next would find nothing to do.
	b.ResetTimer()
	{
		before := repo.counts()
		// The live heap (what the last GC cycle kept), not the heap
		// allocated: the listing's garbage is not memory a run holds.
		live := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
		runtime.GC()
		metrics.Read(live)
		base := live[0].Value.Uint64()
		var peak atomic.Uint64
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Go(func() {
			s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
			for {
				metrics.Read(s)
				if v := s[0].Value.Uint64(); v > peak.Load() {
					peak.Store(v)
				}
				select {
				case <-stop:
					return
				case <-time.After(5 * time.Millisecond):
				}
			}
		})
		rep, err := CollectGarbage(ctx, env, GCOptions{Hold: time.Second})
		close(stop)
		wg.Wait()
		if err != nil {
			b.Fatal(err)
		}
		if rep.Deleted < n/2-1 || rep.Listing {
			b.Fatalf("deleted %d chunks, want about %d: %+v", rep.Deleted, n/2, rep)
		}
		b.ReportMetric(rep.Elapsed.Seconds(), "s/gc")
		b.ReportMetric(first.Elapsed.Seconds(), "s/first-gc-with-listing")
		b.ReportMetric(float64(rep.Listed), "chunks")
		b.ReportMetric(float64(rep.Deleted), "deleted")
		k := repo.counts().since(before)
		b.ReportMetric(float64(k.lists), "LIST")
		b.ReportMetric(float64(k.gets), "GET")
		b.ReportMetric(float64(k.has+k.objects()), "HEAD+PUT")
		b.ReportMetric(float64(k.deletes), "DELETE-requests")
		heap := float64(peak.Load()) - float64(base)
		b.ReportMetric(max(heap, 0)/float64(rep.Listed), "peak-live-heap-B/chunk")
		fmt.Printf("BenchmarkGC: %+v\n", rep)
	}
}
