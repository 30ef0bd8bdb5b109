package volume

import (
	"context"
	"testing"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/chunkstore/storetest"
)

// BenchmarkSealIngest seals a layer of 256 MiB written whole, as an import
// makes, into a local repository: what the uploader spends per byte.
func BenchmarkSealIngest(b *testing.B) {
	ctx := context.Background()
	const size = 256 << 20
	text := storetest.CompressibleBytes(size, 1)
	for b.Loop() {
		b.StopTimer()
		repo, err := chunkstore.NewLocal(b.TempDir())
		if err != nil {
			b.Fatal(err)
		}
		store, err := chunkstore.NewStore(repo, chunkstore.Options{})
		if err != nil {
			b.Fatal(err)
		}
		env := &Env{Repo: repo, Store: store, StateDir: b.TempDir(), SealAhead: -1}
		v, err := Create(ctx, env, Config{Name: "v", Size: size})
		if err != nil {
			b.Fatal(err)
		}
		for off := 0; off < size; off += 1 << 20 {
			if err := v.WriteAt(ctx, text[off:off+1<<20], int64(off), false); err != nil {
				b.Fatal(err)
			}
		}
		if _, err := v.Snapshot(ctx, ""); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if err := v.SealAll(ctx); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		v.Close()
		b.StartTimer()
	}
	b.SetBytes(size)
}
