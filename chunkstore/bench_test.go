package chunkstore_test

import (
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/klauspost/compress/zstd"
	"lukechampine.com/blake3"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/chunkstore/storetest"
)

// Benchmarks run on 1 MiB chunks of two kinds of data:
//   - random: incompressible, stored raw;
//   - binary: a real executable (Go's compiler, or $NBDVAULT_BENCH_DATA),
//     cut into 1 MiB chunks; zstd shrinks it to about a third.
//
// Every benchmark runs its loop on all cores (b.RunParallel), so MB/s is
// the machine's throughput, not one core's. `make bench` runs them all.

const benchChunk = 1 << 20

type benchData struct {
	name   string
	chunks [][]byte
}

func benchInputs(b *testing.B) []benchData {
	b.Helper()
	path := os.Getenv("NBDVAULT_BENCH_DATA")
	if path == "" {
		out, err := exec.Command("go", "env", "GOROOT").Output()
		if err != nil {
			b.Fatal(err)
		}
		path = filepath.Join(strings.TrimSpace(string(out)), "pkg", "tool", "linux_amd64", "compile")
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		b.Fatalf("benchmark data: %v (set NBDVAULT_BENCH_DATA to a file of a few MiB)", err)
	}
	var bin [][]byte
	for off := 0; off+benchChunk <= len(raw); off += benchChunk {
		bin = append(bin, raw[off:off+benchChunk])
	}
	var rnd [][]byte
	for range 16 {
		rnd = append(rnd, storetest.RandomBytes(benchChunk))
	}
	return []benchData{{"random", rnd}, {"binary", bin}}
}

// eachChunk runs fn on the chunks in turn, on every core, counting 1 MiB
// per call. fn gets a per-goroutine scratch buffer.
func eachChunk(b *testing.B, chunks [][]byte, fn func(chunk, scratch []byte) []byte) {
	b.SetBytes(benchChunk)
	var next atomic.Int64
	b.RunParallel(func(pb *testing.PB) {
		scratch := make([]byte, 0, 2*benchChunk)
		for pb.Next() {
			scratch = fn(chunks[int(next.Add(1))%len(chunks)], scratch[:0])
		}
	})
}

func BenchmarkBLAKE3(b *testing.B) {
	for _, in := range benchInputs(b) {
		b.Run(in.name, func(b *testing.B) {
			eachChunk(b, in.chunks, func(c, scratch []byte) []byte {
				_ = blake3.Sum256(c)
				return scratch
			})
		})
	}
}

func newBenchEncoder(b *testing.B) *zstd.Encoder {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedDefault), zstd.WithEncoderCRC(false))
	if err != nil {
		b.Fatal(err)
	}
	return enc
}

func BenchmarkZstdCompress(b *testing.B) {
	enc := newBenchEncoder(b)
	for _, in := range benchInputs(b) {
		b.Run(in.name, func(b *testing.B) {
			eachChunk(b, in.chunks, func(c, scratch []byte) []byte { return enc.EncodeAll(c, scratch) })
		})
	}
}

func BenchmarkZstdDecompress(b *testing.B) {
	enc := newBenchEncoder(b)
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(0))
	if err != nil {
		b.Fatal(err)
	}
	for _, in := range benchInputs(b) {
		var frames [][]byte
		for _, c := range in.chunks {
			frames = append(frames, enc.EncodeAll(c, nil))
		}
		b.Run(in.name, func(b *testing.B) {
			eachChunk(b, frames, func(f, scratch []byte) []byte {
				out, err := dec.DecodeAll(f, scratch)
				if err != nil {
					b.Error(err)
				}
				return out
			})
		})
	}
}

// BenchmarkHashCompress is the CPU work of a Put with no I/O: the ceiling
// Put is measured against.
func BenchmarkHashCompress(b *testing.B) {
	enc := newBenchEncoder(b)
	for _, in := range benchInputs(b) {
		b.Run(in.name, func(b *testing.B) {
			eachChunk(b, in.chunks, func(c, scratch []byte) []byte {
				_ = blake3.Sum256(c)
				return enc.EncodeAll(c, scratch)
			})
		})
	}
}

type benchBackend struct {
	name string
	open func(b *testing.B) chunkstore.Backend
}

func benchBackends() []benchBackend {
	return []benchBackend{
		{"mem", func(b *testing.B) chunkstore.Backend { return chunkstore.NewMem() }},
		{"local", func(b *testing.B) chunkstore.Backend {
			l, err := chunkstore.NewLocal(b.TempDir())
			if err != nil {
				b.Fatal(err)
			}
			return l
		}},
		{"minio", func(b *testing.B) chunkstore.Backend { return shared(b).Backend(b) }},
	}
}

// benchParallelism: goroutines per core for Put and Get, so that one
// waiting on fsync or the network does not leave a core idle (the uploader
// runs several workers per core too).
const benchParallelism = 8

// BenchmarkPut stores new chunks: hash, dedup check, compress, write. Each
// chunk gets a unique 8-byte stamp so none is a dedup hit.
//
// Each runs plain and encrypted (every object sealed with
// XChaCha20-Poly1305, IDs MACed): issue 14's goal is encrypted at most 15%
// slower on compressible data.
func BenchmarkPut(b *testing.B) {
	inputs := benchInputs(b)
	for _, be := range benchBackends() {
		for _, in := range inputs {
			for _, mode := range benchModes(b) {
				b.Run(be.name+"/"+in.name+"/"+mode.name, func(b *testing.B) {
					backend := be.open(b)
					// Measure the steady state: in a repository past its first
					// few hundred chunks, every shard directory exists.
					for shard := range 256 {
						if err := backend.Put(b.Context(), fmt.Sprintf("chunks/%02x/warm-up", shard), nil); err != nil {
							b.Fatal(err)
						}
					}
					s, err := chunkstore.NewStore(backend, chunkstore.Options{CacheBytes: -1, Keys: mode.keys})
					if err != nil {
						b.Fatal(err)
					}
					b.SetBytes(benchChunk)
					b.SetParallelism(benchParallelism)
					b.ResetTimer()
					var next atomic.Int64
					b.RunParallel(func(pb *testing.PB) {
						buf := make([]byte, benchChunk)
						for pb.Next() {
							n := next.Add(1)
							copy(buf, in.chunks[int(n)%len(in.chunks)])
							binary.LittleEndian.PutUint64(buf, uint64(n))
							if _, err := s.Put(b.Context(), buf); err != nil {
								b.Error(err)
								return
							}
						}
					})
					st := s.Stats()
					b.ReportMetric(float64(st.BytesStored)/float64(st.BytesIn), "stored/in")
				})
			}
		}
	}
}

// benchMode is a plain or an encrypted store.
type benchMode struct {
	name string
	keys *chunkstore.Keys
}

func benchModes(b *testing.B) []benchMode {
	keys, err := chunkstore.NewKeys(make([]byte, chunkstore.MasterKeySize), [chunkstore.KeysetSize]byte{1})
	if err != nil {
		b.Fatal(err)
	}
	return []benchMode{{"plain", nil}, {"encrypted", keys}}
}

// BenchmarkGet reads stored chunks with the cache off: fetch, decode,
// verify. The objects are in the page cache (local) or MinIO's.
func BenchmarkGet(b *testing.B) {
	inputs := benchInputs(b)
	for _, be := range benchBackends() {
		for _, in := range inputs {
			for _, mode := range benchModes(b) {
				b.Run(be.name+"/"+in.name+"/"+mode.name, func(b *testing.B) {
					s, ids := storeAll(b, be.open(b), chunkstore.Options{CacheBytes: -1, Keys: mode.keys}, in.chunks)
					b.SetBytes(benchChunk)
					b.SetParallelism(benchParallelism)
					b.ResetTimer()
					var next atomic.Int64
					b.RunParallel(func(pb *testing.PB) {
						for pb.Next() {
							if _, err := s.Get(b.Context(), ids[int(next.Add(1))%len(ids)]); err != nil {
								b.Error(err)
								return
							}
						}
					})
				})
			}
		}
	}
}

// BenchmarkColdRead4K is a 4 KiB read at a random place in a stored chunk
// with the cache off, one at a time: what a read that misses the cache
// costs in time, whole (FrameBits -1 and Get, as before framed chunks:
// one GET of the whole object, decode and verify 1 MiB) or framed (a ranged GET of the frame table,
// then one of the 64 KiB frame, decode and verify that).
func BenchmarkColdRead4K(b *testing.B) {
	inputs := benchInputs(b)
	for _, be := range benchBackends() {
		for _, in := range inputs {
			for _, kind := range []struct {
				name string
				bits int
			}{{"whole", -1}, {"framed", 0}} {
				b.Run(be.name+"/"+in.name+"/"+kind.name, func(b *testing.B) {
					s, ids := storeAll(b, be.open(b), chunkstore.Options{CacheBytes: -1, FrameBits: kind.bits}, in.chunks)
					buf := make([]byte, 4096)
					i := 0
					for b.Loop() {
						i++
						off := int64(i*7919*4096) % (benchChunk - 4096)
						if kind.bits < 0 { // as reads were before framed chunks
							data, err := s.Get(b.Context(), ids[i%len(ids)])
							if err != nil {
								b.Fatal(err)
							}
							copy(buf, data[off:])
							continue
						}
						if err := s.ReadAt(b.Context(), ids[i%len(ids)], benchChunk, buf, off); err != nil {
							b.Fatal(err)
						}
					}
					b.ReportMetric(float64(s.Stats().BackendGets)/float64(b.N), "GETs/op")
				})
			}
		}
	}
}

// storeAll opens a store over backend and puts chunks in it, untimed.
func storeAll(b *testing.B, backend chunkstore.Backend, opts chunkstore.Options, chunks [][]byte) (*chunkstore.Store, []chunkstore.ID) {
	b.Helper()
	s, err := chunkstore.NewStore(backend, opts)
	if err != nil {
		b.Fatal(err)
	}
	ids := make([]chunkstore.ID, len(chunks))
	for i, c := range chunks {
		if ids[i], err = s.Put(b.Context(), c); err != nil {
			b.Fatal(err)
		}
	}
	return s, ids
}
