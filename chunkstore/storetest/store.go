package storetest

import (
	"bytes"
	"context"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"lukechampine.com/blake3"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// newStore returns a Store over b with the cache off, so every Get reaches
// the backend.
func newStore(t *testing.T, b chunkstore.Backend, opts chunkstore.Options) *chunkstore.Store {
	t.Helper()
	if opts.CacheBytes == 0 {
		opts.CacheBytes = -1
	}
	s, err := chunkstore.NewStore(b, opts)
	require.NoError(t, err)
	return s
}

// objectCount is the number of chunk objects in b.
func objectCount(t *testing.T, b chunkstore.Backend) int {
	return len(listAll(t, b, "chunks/"))
}

// Store runs the chunkstore.Store suite over the backends open returns.
func Store(t *testing.T, open Opener) {
	ctx := context.Background()

	t.Run("RoundTrip", func(t *testing.T) {
		b := open(t)
		s := newStore(t, b, chunkstore.Options{})
		for name, data := range map[string][]byte{
			"tiny":         {42},
			"random1M":     RandomBytes(1 << 20),
			"compressible": CompressibleBytes(1<<20, 1),
			"random16M":    RandomBytes(chunkstore.MaxChunkSize),
		} {
			id, err := s.Put(ctx, data)
			require.NoError(t, err, name)
			assert.Equal(t, chunkstore.ID(blake3.Sum256(data)), id, "%s: the ID is the BLAKE3-256 of the plaintext", name)
			got, err := s.Get(ctx, id)
			require.NoError(t, err, name)
			require.True(t, bytes.Equal(data, got), "%s: bytes read back differ", name)
			has, err := s.Has(ctx, id)
			require.NoError(t, err)
			assert.True(t, has, name)
			has, err = b.Has(ctx, chunkstore.Key(id))
			require.NoError(t, err)
			assert.True(t, has, "%s is stored under %s", name, chunkstore.Key(id))
		}
		assert.Equal(t, 4, objectCount(t, b))
	})

	t.Run("ZeroChunkNeverStored", func(t *testing.T) {
		b := open(t)
		s := newStore(t, b, chunkstore.Options{})
		for _, n := range []int{1, 4096, 1 << 20} {
			id, err := s.Put(ctx, make([]byte, n))
			require.NoError(t, err)
			assert.True(t, id.IsZero(), "%d zero bytes get the zero ID", n)
		}
		assert.Zero(t, objectCount(t, b), "no object for a zero chunk")
		has, err := s.Has(ctx, chunkstore.ZeroID)
		require.NoError(t, err)
		assert.True(t, has, "a hole needs no storing")
		_, err = s.Get(ctx, chunkstore.ZeroID)
		assert.ErrorIs(t, err, chunkstore.ErrNotFound)

		almost := make([]byte, 1<<20)
		almost[len(almost)-1] = 1
		id, err := s.Put(ctx, almost)
		require.NoError(t, err)
		assert.False(t, id.IsZero(), "one non-zero byte at the end is data")
		assert.Equal(t, 1, objectCount(t, b))
	})

	t.Run("Dedup", func(t *testing.T) {
		b := open(t)
		s := newStore(t, b, chunkstore.Options{})
		data := RandomBytes(1 << 20)
		id1, err := s.Put(ctx, data)
		require.NoError(t, err)
		id2, err := s.Put(ctx, bytes.Clone(data))
		require.NoError(t, err)
		assert.Equal(t, id1, id2)
		assert.Equal(t, 1, objectCount(t, b), "the same chunk is stored once")
		st := s.Stats()
		assert.EqualValues(t, 1, st.DedupHits)
		// A second store on the same backend dedups against what is there.
		s2 := newStore(t, b, chunkstore.Options{})
		_, err = s2.Put(ctx, data)
		require.NoError(t, err)
		assert.EqualValues(t, 1, s2.Stats().DedupHits)
		assert.Zero(t, s2.Stats().BytesStored)
	})

	t.Run("Compression", func(t *testing.T) {
		b := open(t)
		s := newStore(t, b, chunkstore.Options{})
		text := CompressibleBytes(1<<20, 2)
		noise := RandomBytes(1 << 20)
		tid, err := s.Put(ctx, text)
		require.NoError(t, err)
		nid, err := s.Put(ctx, noise)
		require.NoError(t, err)
		tobj, err := b.Get(ctx, chunkstore.Key(tid))
		require.NoError(t, err)
		nobj, err := b.Get(ctx, chunkstore.Key(nid))
		require.NoError(t, err)
		assert.Less(t, len(tobj), len(text)/3, "log text compresses at least 3:1")
		assert.Equal(t, byte(2), tobj[2], "a 1 MiB chunk is stored framed")
		frames := len(noise) >> chunkstore.FrameBits
		assert.Len(t, nobj, len(noise)+12+36*frames, "random data is kept raw behind its header and frame table")

		// Whole objects, as before repository format 4.
		whole := newStore(t, b, chunkstore.Options{FrameBits: -1})
		text2 := CompressibleBytes(1<<20, 3)
		tid2, err := whole.Put(ctx, text2)
		require.NoError(t, err)
		nid2, err := whole.Put(ctx, RandomBytes(1<<20))
		require.NoError(t, err)
		tobj, err = b.Get(ctx, chunkstore.Key(tid2))
		require.NoError(t, err)
		nobj, err = b.Get(ctx, chunkstore.Key(nid2))
		require.NoError(t, err)
		assert.Equal(t, byte(1), tobj[2])
		assert.Equal(t, byte(chunkstore.CompressionZstd), tobj[3])
		assert.Len(t, nobj, len(noise)+8, "random data is kept raw behind its 8-byte header")
		assert.Equal(t, byte(chunkstore.CompressionNone), nobj[3])
		for _, id := range []chunkstore.ID{tid, nid, tid2, nid2} {
			_, err := s.Get(ctx, id)
			require.NoError(t, err, "any store reads whole and framed objects")
		}

		raw := newStore(t, b, chunkstore.Options{Uncompressed: true})
		got, err := raw.Get(ctx, tid)
		require.NoError(t, err, "any store reads any codec")
		assert.True(t, bytes.Equal(text, got))
	})

	t.Run("Corruption", func(t *testing.T) {
		b := open(t)
		s := newStore(t, b, chunkstore.Options{})
		other, err := s.Put(ctx, RandomBytes(4096))
		require.NoError(t, err)
		for _, kind := range []struct {
			name string
			data []byte
		}{{"zstd", CompressibleBytes(1<<20, 3)}, {"raw", RandomBytes(1 << 20)}} {
			id, err := s.Put(ctx, kind.data)
			require.NoError(t, err)
			key := chunkstore.Key(id)
			good, err := b.Get(ctx, key)
			require.NoError(t, err)
			damage := map[string]func([]byte) []byte{
				"magic":       func(o []byte) []byte { o[0] ^= 0xff; return o },
				"version":     func(o []byte) []byte { o[2] = 99; return o },
				"compression": func(o []byte) []byte { o[3] ^= 1; return o },
				"length":      func(o []byte) []byte { o[4]++; return o },
				"first":       func(o []byte) []byte { o[8] ^= 0x01; return o },
				"middle":      func(o []byte) []byte { o[len(o)/2] ^= 0x10; return o },
				"last":        func(o []byte) []byte { o[len(o)-1] ^= 0x80; return o },
				"truncated":   func(o []byte) []byte { return o[:len(o)-1] },
				"short":       func(o []byte) []byte { return o[:5] },
				"empty":       func(o []byte) []byte { return o[:0] },
				"swapped": func([]byte) []byte {
					o, err := b.Get(ctx, chunkstore.Key(other))
					require.NoError(t, err)
					return o
				},
			}
			for what, mangle := range damage {
				require.NoError(t, b.Put(ctx, key, mangle(bytes.Clone(good))))
				got, err := s.Get(ctx, id)
				require.ErrorIs(t, err, chunkstore.ErrCorrupt, "%s chunk, damaged %s", kind.name, what)
				assert.Nil(t, got, "no bytes with a corruption error")
				assert.Contains(t, err.Error(), id.String(), "the error names the chunk")
				var ce *chunkstore.CorruptError
				require.ErrorAs(t, err, &ce)
				assert.Equal(t, id, ce.ID)
			}
			require.NoError(t, b.Put(ctx, key, good))
			got, err := s.Get(ctx, id)
			require.NoError(t, err, "repaired %s chunk", kind.name)
			assert.True(t, bytes.Equal(kind.data, got))
		}
	})

	t.Run("CorruptionNotCached", func(t *testing.T) {
		b := open(t)
		s, err := chunkstore.NewStore(b, chunkstore.Options{}) // cache on
		require.NoError(t, err)
		data := RandomBytes(4096)
		id, err := s.Put(ctx, data)
		require.NoError(t, err)
		good, err := b.Get(ctx, chunkstore.Key(id))
		require.NoError(t, err)
		bad := bytes.Clone(good)
		bad[100] ^= 1
		require.NoError(t, b.Put(ctx, chunkstore.Key(id), bad))
		_, err = s.Get(ctx, id)
		require.ErrorIs(t, err, chunkstore.ErrCorrupt)
		require.NoError(t, b.Put(ctx, chunkstore.Key(id), good))
		got, err := s.Get(ctx, id)
		require.NoError(t, err, "a failed verification is not remembered")
		assert.Equal(t, data, got)
	})

	t.Run("NotFound", func(t *testing.T) {
		s := newStore(t, open(t), chunkstore.Options{})
		id := chunkstore.ID(blake3.Sum256([]byte("never stored")))
		_, err := s.Get(ctx, id)
		assert.ErrorIs(t, err, chunkstore.ErrNotFound)
		assert.NotErrorIs(t, err, chunkstore.ErrCorrupt)
		assert.Contains(t, err.Error(), id.String())
		has, err := s.Has(ctx, id)
		require.NoError(t, err)
		assert.False(t, has)
	})

	t.Run("ConcurrentPutSameChunk", func(t *testing.T) {
		b := open(t)
		s := newStore(t, b, chunkstore.Options{})
		data := CompressibleBytes(1<<20, 4)
		var wg sync.WaitGroup
		ids := make([]chunkstore.ID, 16)
		errs := make([]error, 16)
		for i := range ids {
			wg.Go(func() { ids[i], errs[i] = s.Put(ctx, data) })
		}
		wg.Wait()
		for i := range ids {
			require.NoError(t, errs[i])
			assert.Equal(t, ids[0], ids[i])
		}
		got, err := s.Get(ctx, ids[0])
		require.NoError(t, err)
		assert.True(t, bytes.Equal(data, got))
		assert.Equal(t, 1, objectCount(t, b))
	})

	t.Run("ConcurrentGets", func(t *testing.T) {
		b := open(t)
		s, err := chunkstore.NewStore(b, chunkstore.Options{})
		require.NoError(t, err)
		var ids []chunkstore.ID
		var want [][]byte
		for i := range 8 {
			data := CompressibleBytes(256<<10, uint64(10+i))
			id, err := s.Put(ctx, data)
			require.NoError(t, err)
			ids, want = append(ids, id), append(want, data)
		}
		var wg sync.WaitGroup
		errs := make(chan error, 64)
		for g := range 64 {
			wg.Go(func() {
				i := g % len(ids)
				got, err := s.Get(ctx, ids[i])
				if err == nil && !bytes.Equal(got, want[i]) {
					err = assert.AnError
				}
				errs <- err
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			require.NoError(t, err)
		}
		assert.LessOrEqual(t, s.Stats().BackendGets, int64(64))
	})

	t.Run("CancelledContext", func(t *testing.T) {
		b := open(t)
		s := newStore(t, b, chunkstore.Options{})
		id, err := s.Put(ctx, RandomBytes(1000))
		require.NoError(t, err)
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		_, err = s.Put(cctx, RandomBytes(1000))
		assert.ErrorIs(t, err, context.Canceled)
		_, err = s.Get(cctx, id)
		assert.ErrorIs(t, err, context.Canceled)
		_, err = s.Has(cctx, id)
		assert.ErrorIs(t, err, context.Canceled)
		assert.Equal(t, 1, objectCount(t, b))
	})

	t.Run("KeyedIDs", func(t *testing.T) {
		b := open(t)
		var key [32]byte
		copy(key[:], RandomBytes(32))
		keyed := newStore(t, b, chunkstore.Options{Hasher: chunkstore.NewKeyedBLAKE3(key)})
		plain := newStore(t, b, chunkstore.Options{})
		data := RandomBytes(1 << 16)
		kid, err := keyed.Put(ctx, data)
		require.NoError(t, err)
		assert.NotEqual(t, chunkstore.ID(blake3.Sum256(data)), kid, "a keyed ID does not reveal the plain hash")
		got, err := keyed.Get(ctx, kid)
		require.NoError(t, err)
		assert.Equal(t, data, got)
		_, err = plain.Get(ctx, kid)
		assert.ErrorIs(t, err, chunkstore.ErrCorrupt, "without the key a chunk does not verify")
	})
}
