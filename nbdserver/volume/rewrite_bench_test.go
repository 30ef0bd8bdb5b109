package volume

import (
	"context"
	crand "crypto/rand"
	"flag"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/chunkstore/storetest"
)

var (
	benchRewriteMiB    = flag.Int64("bench-rewrite-mib", 4096, "size in MiB of BenchmarkRewrite's volume (docs/benchmarks.md: 65536)")
	benchScatteredMiB  = flag.Int64("bench-scattered-mib", 256, "size in MiB of BenchmarkScatteredWrites' volume")
	benchScatteredTime = flag.Duration("bench-scattered-time", 20*time.Second, "how long BenchmarkScatteredWrites writes")
	benchScatteredIOPS = flag.Int("bench-scattered-iops", 1000, "BenchmarkScatteredWrites' rate of 4 KiB writes per second")
	benchCheckpoint    = flag.Duration("bench-checkpoint", 0, "BenchmarkScatteredWrites' checkpoint interval (0: the server's default)")
)

// BenchmarkRewrite is what a snapshot of a large volume costs after a
// change of 1% of it. Each run starts from a volume of -bench-rewrite-mib
// whose every chunk holds one 4 KiB block of its own (so every chunk
// exists and none is a dedup hit, while log and repository stay small),
// snapshotted and sealed. Then 1% of it is rewritten, snapshotted, and
// the seal is timed:
//
//   - chunks: whole 1 MiB chunks picked at random, a clustered change; the
//     seal must store those chunks, the index pages on the paths to them
//     and the manifest (min-objects/op);
//   - blocks4k: 4 KiB blocks picked at random, none twice, a scattered
//     change touching most chunks; the seal ships it as journal packs
//     (a couple, and one per 32 MiB) and the manifest.
//
// stored/written is the bytes the seal stored per byte the writes held.
func BenchmarkRewrite(b *testing.B) {
	for _, whole := range []bool{true, false} {
		b.Run(map[bool]string{true: "chunks", false: "blocks4k"}[whole], func(b *testing.B) {
			ctx := context.Background()
			size := *benchRewriteMiB << 20
			const cs, block = 1 << 20, 4096
			var k repoCounts
			var written, minimum int64
			var call time.Duration
			for b.Loop() {
				b.StopTimer()
				env, repo := benchEnv(b)
				v, err := Create(ctx, env, Config{Name: "v", Size: size, ChunkSize: cs})
				if err != nil {
					b.Fatal(err)
				}
				fill := storetest.CompressibleBytes(block, 1)
				for c := int64(0); c < size/cs; c++ {
					copy(fill, fmt.Sprintf("chunk %d\n", c)) // no two alike
					if err := v.WriteAt(ctx, fill, c*cs, false); err != nil {
						b.Fatal(err)
					}
				}
				if _, err := v.Snapshot(ctx, ""); err != nil {
					b.Fatal(err)
				}
				if err := v.SealAll(ctx); err != nil {
					b.Fatal(err)
				}
				rng := rand.New(rand.NewPCG(3, 4)) // the same choices in every run
				each := int64(block)
				if whole {
					each = cs
				}
				picked := sampleDistinct(rng, max(1, size/each/100), size/each)
				data := storetest.CompressibleBytes(int(each)*len(picked), 5)
				for i, k := range picked {
					if err := v.WriteAt(ctx, data[int64(i)*each:int64(i+1)*each], k*each, false); err != nil {
						b.Fatal(err)
					}
				}
				written = int64(len(picked)) * each
				minimum = 1 // the manifest
				if whole {
					minimum += int64(len(picked)) + pagesOnPaths(picked)
				}
				t0 := time.Now()
				if _, err := v.Snapshot(ctx, ""); err != nil {
					b.Fatal(err)
				}
				call = time.Since(t0)
				dropPageCache(b)
				before := repo.counts()
				b.StartTimer()
				if err := v.SealAll(ctx); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				k = repo.counts().since(before)
				v.Close()
				b.StartTimer()
			}
			k.report(b, written)
			b.ReportMetric(float64(minimum), "min-objects/op")
			b.ReportMetric(float64(written)/(1<<20), "written-MiB/op")
			b.ReportMetric(float64(call.Microseconds())/1e3, "snapshot-call-ms")
		})
	}
}

// pagesOnPaths counts the index pages on the paths from the root to the
// chunks (sorted): the pages a change of those chunks must rewrite.
func pagesOnPaths(chunks []int64) int64 {
	var n int64
	for level := 1; level <= indexLevels; level++ {
		var last int64 = -1
		for _, c := range chunks {
			if p := c >> (indexFanoutBits * level); p != last {
				n, last = n+1, p
			}
		}
	}
	return n
}

// sampleDistinct returns n distinct numbers from [0, total), sorted.
func sampleDistinct(rng *rand.Rand, n, total int64) []int64 {
	seen := make(map[int64]bool, n)
	out := make([]int64, 0, n)
	for int64(len(out)) < n {
		if k := rng.Int64N(total); !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}

// BenchmarkScatteredWrites is the repository's growth under the source
// hosts' typical load: a volume of -bench-scattered-mib filled with random
// data and sealed, then 4 KiB writes of new random bytes at random
// offsets at -bench-scattered-iops for -bench-scattered-time, with the
// uploader (Run) on the server's defaults; then, untimed, a last
// checkpoint sealed. growth/written is what the repository's directory
// grew by per byte written, that last seal included (issue 11's goal: ≤ 3);
// max-lag-s the largest lag of the repository behind the volume, sampled
// every 10 ms (goal: ≤ 2 checkpoint intervals).
func BenchmarkScatteredWrites(b *testing.B) {
	ctx := context.Background()
	size := *benchScatteredMiB << 20
	for b.Loop() {
		b.StopTimer()
		dir := b.TempDir()
		repo, err := chunkstore.NewLocal(dir)
		if err != nil {
			b.Fatal(err)
		}
		env := &Env{Repo: repo, Store: newBenchStore(b, repo), StateDir: b.TempDir(), CheckpointInterval: *benchCheckpoint}
		v, err := Create(ctx, env, Config{Name: "v", Size: size})
		if err != nil {
			b.Fatal(err)
		}
		buf := make([]byte, 1<<20)
		for off := int64(0); off < size; off += int64(len(buf)) {
			_, _ = crand.Read(buf)
			if err := v.WriteAt(ctx, buf, off, false); err != nil {
				b.Fatal(err)
			}
		}
		if _, err := v.Snapshot(ctx, ""); err != nil {
			b.Fatal(err)
		}
		if err := v.SealAll(ctx); err != nil {
			b.Fatal(err)
		}
		bytes0, objs0 := dirUsage(b, dir)
		runCtx, stop := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { v.Run(runCtx); close(done) }()

		b.StartTimer()
		rng := rand.New(rand.NewPCG(7, 8))
		blk := buf[:4096]
		var maxLag time.Duration
		var writes int64
		start := time.Now()
		tick := time.NewTicker(10 * time.Millisecond)
		for now := range tick.C {
			elapsed := now.Sub(start)
			if elapsed >= *benchScatteredTime {
				break
			}
			for due := int64(elapsed.Seconds() * float64(*benchScatteredIOPS)); writes < due; writes++ {
				_, _ = crand.Read(blk)
				if err := v.WriteAt(ctx, blk, rng.Int64N(size/4096)*4096, false); err != nil {
					b.Fatal(err)
				}
			}
			maxLag = max(maxLag, v.Status().Lag)
		}
		tick.Stop()
		b.StopTimer()
		stop()
		<-done
		// What is still in the log is part of the cost: ship it.
		if _, err := v.Checkpoint(ctx); err != nil {
			b.Fatal(err)
		}
		if err := v.SealAll(ctx); err != nil {
			b.Fatal(err)
		}
		bytes1, objs1 := dirUsage(b, dir)
		v.Close()
		written := writes * 4096
		b.ReportMetric(float64(written)/(1<<20), "written-MiB")
		b.ReportMetric(float64(bytes1-bytes0)/(1<<20), "growth-MiB")
		b.ReportMetric(float64(bytes1-bytes0)/float64(max(written, 1)), "growth/written")
		b.ReportMetric(float64(objs1-objs0), "objects-added")
		b.ReportMetric(maxLag.Seconds(), "max-lag-s")
		b.StartTimer()
	}
}

// dirUsage is the bytes and the number of regular files under dir.
func dirUsage(b *testing.B, dir string) (bytes, files int64) {
	err := filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		fi, err := d.Info()
		if err == nil {
			bytes, files = bytes+fi.Size(), files+1
		}
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	return bytes, files
}
