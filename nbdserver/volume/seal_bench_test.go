package volume

import (
	"bytes"
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/chunkstore/storetest"
)

// The volume's benchmarks: what a snapshot costs and how fast a sealed one
// reads, in this process on a local repository in b.TempDir(). They run
// only under -bench. Sizes are small by default; make bench (bench/run.sh)
// passes the sizes docs/benchmarks.md quotes, after -args:
//
//	go test ./nbdserver/volume -run '^$' -bench 'SealIngest|SnapshotRead|Rewrite|Scattered' -benchtime 1x \
//	    -args -bench-mib 1024 -bench-rewrite-mib 65536 -bench-drop-caches
var (
	benchMiB        = flag.Int64("bench-mib", 256, "size in MiB of the volume BenchmarkSealIngest and BenchmarkSnapshotRead write")
	benchDropCaches = flag.Bool("bench-drop-caches", false, "before each timed seal and cold read: sync, drop the page cache and wait 10 s (root; see bench/run.sh for why the wait)")
)

// benchEnv is a fresh local repository and state directory, the
// repository behind a counter.
func benchEnv(b *testing.B) (*Env, *countingRepo) {
	b.Helper()
	local, err := chunkstore.NewLocal(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	repo := &countingRepo{Backend: local}
	return &Env{Repo: repo, Store: newBenchStore(b, repo), StateDir: b.TempDir(), SealAhead: -1, LogLimit: 1 << 62}, repo
}

// newBenchStore is a chunk store with the server's defaults (256 MiB
// cache) over repo: a new one starts cold, as after a restart.
func newBenchStore(b *testing.B, repo chunkstore.Backend) *chunkstore.Store {
	store, err := chunkstore.NewStore(repo, chunkstore.Options{})
	if err != nil {
		b.Fatal(err)
	}
	return store
}

// dropPageCache writes back and drops the page cache and waits 10 s, if
// -bench-drop-caches: a VM with free page reporting hands freed memory to
// the host about 2 s after it is freed, and a phase that starts sooner
// races it.
func dropPageCache(b *testing.B) {
	b.Helper()
	if !*benchDropCaches {
		return
	}
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		b.Fatalf("-bench-drop-caches: %v (needs root)", err)
	}
	time.Sleep(10 * time.Second)
}

// writeWhole writes data over v from offset 0 in 1 MiB writes.
func writeWhole(b *testing.B, v *Volume, data []byte) {
	b.Helper()
	for off := 0; off < len(data); off += 1 << 20 {
		if err := v.WriteAt(context.Background(), data[off:min(off+1<<20, len(data))], int64(off), false); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSealIngest seals a layer written whole, as an import makes
// (-bench-mib of compressible data, 1 MiB writes), into a local
// repository: what the uploader spends per byte, and what it stores.
func BenchmarkSealIngest(b *testing.B) {
	ctx := context.Background()
	size := *benchMiB << 20
	text := storetest.CompressibleBytes(int(size), 1)
	var k repoCounts
	for b.Loop() {
		b.StopTimer()
		env, repo := benchEnv(b)
		v, err := Create(ctx, env, Config{Name: "v", Size: size})
		if err != nil {
			b.Fatal(err)
		}
		writeWhole(b, v, text)
		if _, err := v.Snapshot(ctx, ""); err != nil {
			b.Fatal(err)
		}
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
	b.SetBytes(size)
	k.report(b, size)
}

// BenchmarkSnapshotRead reads a sealed snapshot of -bench-mib of
// compressible data from start to end, 256 KiB requests, 16 in flight
// (as nbdcopy reads), and checks every byte. cold: each read through a
// volume opened again over a new chunk store (an empty cache, as after a
// restart; the page cache dropped with -bench-drop-caches). warm: the same
// volume read again at once; the 256 MiB chunk cache holds a quarter of
// 1 GiB, so most chunks are fetched again from files in the page cache.
func BenchmarkSnapshotRead(b *testing.B) {
	ctx := context.Background()
	size := *benchMiB << 20
	text := storetest.CompressibleBytes(int(size), 2)
	env, _ := benchEnv(b)
	v, err := Create(ctx, env, Config{Name: "v", Size: size})
	if err != nil {
		b.Fatal(err)
	}
	writeWhole(b, v, text)
	snap, err := v.Snapshot(ctx, "")
	if err == nil {
		err = v.SealAll(ctx)
	}
	if err != nil {
		b.Fatal(err)
	}
	v.Close()
	open := func() (*Volume, *chunkstore.Store) {
		store := newBenchStore(b, env.Repo)
		v, err := Open(ctx, &Env{Repo: env.Repo, Store: store, StateDir: env.StateDir}, "v")
		if err != nil {
			b.Fatal(err)
		}
		return v, store
	}
	for _, cold := range []bool{true, false} {
		b.Run(map[bool]string{true: "cold", false: "warm"}[cold], func(b *testing.B) {
			v, store := open()
			defer func() { v.Close() }()
			if !cold {
				readAll(b, v, snap.ID, text)
			}
			var fetched, hits int64
			for b.Loop() {
				if cold {
					b.StopTimer()
					v.Close()
					v, store = open()
					dropPageCache(b)
					b.StartTimer()
				}
				s0 := store.Stats()
				readAll(b, v, snap.ID, text)
				s1 := store.Stats()
				fetched, hits = s1.BackendGets-s0.BackendGets, s1.CacheHits-s0.CacheHits
			}
			b.SetBytes(size)
			b.ReportMetric(float64(fetched), "fetched/op")
			b.ReportMetric(float64(hits), "cache-hits/op")
		})
	}
}

// readAll reads snapshot id of v in 256 KiB requests, 16 at a time, and
// fails unless it equals want.
func readAll(b *testing.B, v *Volume, id string, want []byte) {
	const req, inFlight = 256 << 10, 16
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, inFlight)
	for range inFlight {
		wg.Go(func() {
			buf := make([]byte, req)
			for {
				off := next.Add(req) - req
				if off >= int64(len(want)) {
					return
				}
				p := buf[:min(req, int64(len(want))-off)]
				if err := v.ReadSnapshotAt(context.Background(), id, p, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(p, want[off:off+int64(len(p))]) {
					errs <- fmt.Errorf("snapshot %s differs from what was written at %d", id, off)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
}

// countingRepo counts what a volume writes to its repository, by kind,
// and its reads. The kind of a chunk object is told by the plaintext
// length in its header (docs/architecture.md: the length as u32 LE at
// byte 4): an index page is pageLen.
type countingRepo struct {
	chunkstore.Backend
	mu sync.Mutex
	k  repoCounts
}

// repoCounts are a countingRepo's counters, or the difference of two.
type repoCounts struct {
	chunks, pages, journal, manifests, other int64 // objects written
	bytes                                    int64 // their size
	gets, has                                int64
	deletes, lists                           int64 // requests: one per 1,000 keys
}

func (c *countingRepo) Unwrap() chunkstore.Backend { return c.Backend }

func (c *countingRepo) Put(ctx context.Context, key string, data []byte) error {
	if err := c.Backend.Put(ctx, key, data); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.k.bytes += int64(len(data))
	switch {
	case strings.Contains(key, "/snapshots/") || strings.Contains(key, "/checkpoints/"):
		c.k.manifests++
	case strings.Contains(key, "/journal/"):
		c.k.journal++
	case !strings.HasPrefix(key, "chunks/"):
		c.k.other++
	case len(data) >= 8 && binary.LittleEndian.Uint32(data[4:8]) == uint32(pageLen):
		c.k.pages++
	default:
		c.k.chunks++
	}
	return nil
}

func (c *countingRepo) add(n *int64) { c.mu.Lock(); *n++; c.mu.Unlock() }

func (c *countingRepo) Get(ctx context.Context, key string) ([]byte, error) {
	c.add(&c.k.gets)
	return c.Backend.Get(ctx, key)
}

func (c *countingRepo) GetRange(ctx context.Context, key string, off, n int64) ([]byte, error) {
	c.add(&c.k.gets)
	return c.Backend.GetRange(ctx, key, off, n)
}

func (c *countingRepo) Has(ctx context.Context, key string) (bool, error) {
	c.add(&c.k.has)
	return c.Backend.Has(ctx, key)
}

func (c *countingRepo) Delete(ctx context.Context, key string) error {
	c.add(&c.k.deletes)
	return c.Backend.Delete(ctx, key)
}

func (c *countingRepo) DeleteMany(ctx context.Context, keys []string) error {
	c.mu.Lock()
	c.k.deletes += int64(len(keys)+999) / 1000
	c.mu.Unlock()
	return c.Backend.DeleteMany(ctx, keys)
}

func (c *countingRepo) List(ctx context.Context, prefix string, fn func(string) error) error {
	n := int64(0)
	err := c.Backend.List(ctx, prefix, func(k string) error { n++; return fn(k) })
	c.mu.Lock()
	c.k.lists += max(1, (n+999)/1000)
	c.mu.Unlock()
	return err
}

func (c *countingRepo) ListSizes(ctx context.Context, prefix string, fn func(string, int64) error) error {
	n := int64(0)
	err := c.Backend.ListSizes(ctx, prefix, func(k string, size int64) error { n++; return fn(k, size) })
	c.mu.Lock()
	c.k.lists += max(1, (n+999)/1000)
	c.mu.Unlock()
	return err
}

func (c *countingRepo) counts() repoCounts { c.mu.Lock(); defer c.mu.Unlock(); return c.k }

func (k repoCounts) since(e repoCounts) repoCounts {
	return repoCounts{k.chunks - e.chunks, k.pages - e.pages, k.journal - e.journal, k.manifests - e.manifests,
		k.other - e.other, k.bytes - e.bytes, k.gets - e.gets, k.has - e.has, k.deletes - e.deletes, k.lists - e.lists}
}

func (k repoCounts) objects() int64 { return k.chunks + k.pages + k.journal + k.manifests + k.other }

// report gives one seal's counts as metrics; written is what the layer's
// writes held.
func (k repoCounts) report(b *testing.B, written int64) {
	b.ReportMetric(float64(k.objects()), "objects/op")
	b.ReportMetric(float64(k.chunks), "chunks/op")
	b.ReportMetric(float64(k.pages), "pages/op")
	b.ReportMetric(float64(k.journal), "journal-packs/op")
	b.ReportMetric(float64(k.bytes)/(1<<20), "stored-MiB/op")
	b.ReportMetric(float64(k.bytes)/float64(written), "stored/written")
	b.ReportMetric(float64(k.gets), "gets/op")
}
