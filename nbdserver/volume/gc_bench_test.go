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

// benchRepository fills store with n small unique chunks and writes two
// snapshots of volume "bench" over them, one referencing every chunk,
// one every other: a repository of 100,000 chunks in a minute, without
// NBD writes (for BenchmarkGC and BenchmarkVerify). It returns the
// snapshots' keys.
func benchRepository(b *testing.B, store *chunkstore.Store, repo chunkstore.Backend, n int) (all, half string) {
	ctx := context.Background()
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
	manifest := func(seq uint64, every int) string {
		var u indexUpdate
		for i := 0; i < n; i += every {
			u.points = append(u.points, pointUpdate{c: uint64(i), id: ids[i]})
		}
		root, err := updateIndex(ctx, store, chunkstore.ZeroID, u)
		if err != nil {
			b.Fatal(err)
		}
		id := snapshotID(time.Now(), seq)
		mf := Manifest{ID: id, Kind: KindSnapshot, Volume: "bench", Time: time.Now().UTC(), Size: int64(n) * MinChunkSize,
			ChunkSize: MinChunkSize, Root: root}
		key := manifestKey("bench", KindSnapshot, id)
		if err := putJSON(ctx, repo, "", key, mf); err != nil {
			b.Fatal(err)
		}
		return key
	}
	return manifest(1, 1), manifest(2, 2)
}

// peakLiveHeap runs fn and returns the most live Go heap it held beyond
// what was live before: the heap each GC cycle kept, sampled every 5 ms,
// not the heap allocated (garbage is not memory a run holds).
func peakLiveHeap(fn func()) float64 {
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
	fn()
	close(stop)
	wg.Wait()
	return max(float64(peak.Load())-float64(base), 0)
}

// BenchmarkGC: a collection on MinIO over a repository of
// -bench-gc-chunks chunks (default 100,000), half of them referenced by
// nothing (benchRepository, and its first snapshot deleted after a first
// collection that lists the chunks into the inventory). Reports the wall
// time, S3 requests by kind, and the peak live Go heap during the run
// per chunk.
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
	all, half := benchRepository(b, store, repo, n)
	// A first collection lists the chunks (the inventory is new) and
	// deletes nothing; the one measured takes them from the inventory,
	// as every run does but the first and those after a crash.
	first, err := CollectGarbage(ctx, env, GCOptions{Hold: time.Second})
	if err != nil || !first.Listing || first.Deleted != 0 {
		b.Fatalf("the first collection: %+v, %v", first, err)
	}
	if err := repo.Delete(ctx, all); err != nil {
		b.Fatal(err)
	}
	// One collection, whatever b.N: the next would find nothing to do.
	b.ResetTimer()
	before := repo.counts()
	var rep GCReport
	heap := peakLiveHeap(func() { rep, err = CollectGarbage(ctx, env, GCOptions{Hold: time.Second}) })
	if err != nil {
		b.Fatal(err)
	}
	if rep.Deleted < n/2-1 || rep.Listing {
		b.Fatalf("deleted %d chunks, want about %d, without a listing: %+v", rep.Deleted, n/2, rep)
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
	b.ReportMetric(heap/float64(rep.Listed), "peak-live-heap-B/chunk")
	fmt.Printf("BenchmarkGC: %+v\n", rep)

	// Eight more volumes cloned from the one left (their snapshots have
	// its root), as VMs from one image: a dry run then finds every chunk
	// referenced, by nine volumes; its peak heap should not grow with
	// them.
	var mf Manifest
	if err := getJSON(ctx, repo, "", half, &mf); err != nil {
		b.Fatal(err)
	}
	for i := range 8 {
		mf.Volume = fmt.Sprint("clone", i)
		if err := putJSON(ctx, repo, "", manifestKey(mf.Volume, KindSnapshot, mf.ID), mf); err != nil {
			b.Fatal(err)
		}
	}
	var dry GCReport
	heap = peakLiveHeap(func() { dry, err = CollectGarbage(ctx, env, GCOptions{DryRun: true}) })
	if err != nil || dry.Unreferenced != 0 || dry.Space.Repository.Shared == 0 {
		b.Fatalf("the dry run with clones: %+v, %v", dry, err)
	}
	b.ReportMetric(heap/float64(dry.Listed), "peak-live-heap-B/chunk-referenced-by-9-volumes")
}
