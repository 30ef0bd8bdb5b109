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

var benchVerifyChunks = flag.Int("bench-verify-chunks", 100_000, "BenchmarkVerify: data chunks in the repository")

// BenchmarkVerify: a structure verify (no ReadData) on MinIO of a
// repository of -bench-verify-chunks small unique data chunks (default
// 100,000), made directly as BenchmarkGC makes its own (Put, index
// pages, manifests): two snapshots of a volume, one referencing every
// chunk, one every other. Reports the wall time, S3 requests by kind,
// and the peak live Go heap during the run per chunk. The goal:
// under a minute for 100,000 chunks.
func BenchmarkVerify(b *testing.B) {
	ctx := context.Background()
	m := miniotest.StartShared(b)
	repo := &countingRepo{Backend: chunkstore.NewRetry(m.Backend(b), chunkstore.DefaultRetryPolicy)}
	store, err := chunkstore.NewStore(repo, chunkstore.Options{})
	if err != nil {
		b.Fatal(err)
	}
	env := &Env{Repo: repo, Store: store, StateDir: b.TempDir()}
	n := *benchVerifyChunks
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
	for k, every := range []int{1, 2} {
		var u indexUpdate
		for i := 0; i < n; i += every {
			u.points = append(u.points, pointUpdate{c: uint64(i), id: ids[i]})
		}
		root, err := updateIndex(ctx, store, chunkstore.ZeroID, u)
		if err != nil {
			b.Fatal(err)
		}
		id := snapshotID(time.Now(), uint64(k+1))
		mf := Manifest{ID: id, Kind: KindSnapshot, Volume: "bench", Time: time.Now().UTC(), Size: int64(n) * MinChunkSize,
			ChunkSize: MinChunkSize, Root: root}
		if err := putJSON(ctx, repo, "", manifestKey("bench", KindSnapshot, id), mf); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for b.Loop() {
		before := repo.counts()
		// The live heap (what the last GC cycle kept), not the heap
		// allocated, as BenchmarkGC measures it.
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
		rep, err := Verify(ctx, env, VerifyOptions{})
		close(stop)
		wg.Wait()
		if err != nil {
			b.Fatal(err)
		}
		if len(rep.Problems) > 0 || rep.Chunks != n {
			b.Fatalf("verify found %d problems and %d chunks, want none and %d: %+v", len(rep.Problems), rep.Chunks, n, rep.Problems[:min(3, len(rep.Problems))])
		}
		b.ReportMetric(rep.Elapsed.Seconds(), "s/verify")
		b.ReportMetric(float64(rep.Chunks), "chunks")
		b.ReportMetric(float64(rep.Pages), "index-pages")
		k := repo.counts().since(before)
		b.ReportMetric(float64(k.lists), "LIST")
		b.ReportMetric(float64(k.gets), "GET")
		b.ReportMetric(float64(k.has), "HEAD")
		b.ReportMetric(float64(k.objects()), "PUT")
		b.ReportMetric(float64(k.deletes), "DELETE")
		heap := float64(peak.Load()) - float64(base)
		b.ReportMetric(max(heap, 0)/float64(rep.Chunks), "peak-live-heap-B/chunk")
		fmt.Printf("BenchmarkVerify: %d manifests, %d index pages, %d chunks, %s\n", rep.Manifests, rep.Pages, rep.Chunks, rep.Elapsed.Round(time.Millisecond))
	}
}
