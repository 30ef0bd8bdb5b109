package volume

import (
	"context"
	"flag"
	"fmt"
	"testing"
	"time"

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
	benchRepository(b, store, repo, n)
	b.ResetTimer()
	for b.Loop() {
		before := repo.counts()
		var rep VerifyReport
		heap := peakLiveHeap(func() { rep, err = Verify(ctx, env, VerifyOptions{}) })
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
		b.ReportMetric(heap/float64(rep.Chunks), "peak-live-heap-B/chunk")
		fmt.Printf("BenchmarkVerify: %d manifests, %d index pages, %d chunks, %s\n", rep.Manifests, rep.Pages, rep.Chunks, rep.Elapsed.Round(time.Millisecond))
	}
}
