// Package storetest is the conformance suite every chunkstore.Backend runs,
// and the suite of chunkstore.Store run over each backend. A backend joins
// with a few lines:
//
//	func TestLocal(t *testing.T) {
//		storetest.Backend(t, func(t *testing.T) chunkstore.Backend { ... })
//	}
//
// open must return an empty backend each time it is called.
package storetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// Opener returns a new, empty backend for one subtest.
type Opener func(t *testing.T) chunkstore.Backend

// RandomBytes returns n bytes of crypto-random data.
func RandomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// CompressibleBytes returns n bytes that compress well but are not trivial:
// numbered text lines, as in a log file.
func CompressibleBytes(n int, seed uint64) []byte {
	r := mrand.New(mrand.NewPCG(seed, 0))
	var buf bytes.Buffer
	for i := 0; buf.Len() < n; i++ {
		fmt.Fprintf(&buf, "%08d level=info msg=\"request served\" bytes=%d latency_us=%d\n", i, r.IntN(1<<20), r.IntN(5000))
	}
	return buf.Bytes()[:n]
}

func listAll(t *testing.T, b chunkstore.Backend, prefix string) []string {
	t.Helper()
	var keys []string
	require.NoError(t, b.List(context.Background(), prefix, func(k string) error {
		keys = append(keys, k)
		return nil
	}))
	slices.Sort(keys)
	return keys
}

// Backend runs the conformance suite for a chunkstore.Backend.
func Backend(t *testing.T, open Opener) {
	ctx := context.Background()

	t.Run("PutGetHasDelete", func(t *testing.T) {
		b := open(t)
		data := RandomBytes(1000)
		require.NoError(t, b.Put(ctx, "volumes/v/volume", data))
		got, err := b.Get(ctx, "volumes/v/volume")
		require.NoError(t, err)
		assert.Equal(t, data, got)
		has, err := b.Has(ctx, "volumes/v/volume")
		require.NoError(t, err)
		assert.True(t, has)

		require.NoError(t, b.Delete(ctx, "volumes/v/volume"))
		has, err = b.Has(ctx, "volumes/v/volume")
		require.NoError(t, err)
		assert.False(t, has)
		_, err = b.Get(ctx, "volumes/v/volume")
		assert.ErrorIs(t, err, chunkstore.ErrNotFound)
		assert.NoError(t, b.Delete(ctx, "volumes/v/volume"), "deleting a missing key is not an error")
	})

	t.Run("DeleteMany", func(t *testing.T) {
		b := open(t)
		// More than one S3 request's worth (1,000), present and missing
		// keys mixed, one key that stays.
		var keys []string
		for i := range 1100 {
			k := fmt.Sprintf("chunks/%02x/%06d", i%256, i)
			keys = append(keys, k)
			if i%3 != 0 {
				require.NoError(t, b.Put(ctx, k, []byte{byte(i)}))
			}
		}
		require.NoError(t, b.Put(ctx, "chunks/00/stays", []byte("x")))
		require.NoError(t, b.DeleteMany(ctx, keys))
		var left []string
		require.NoError(t, b.List(ctx, "chunks/", func(k string) error { left = append(left, k); return nil }))
		assert.Equal(t, []string{"chunks/00/stays"}, left)
		require.NoError(t, b.DeleteMany(ctx, nil))
		assert.ErrorIs(t, b.DeleteMany(ctx, []string{"/bad"}), chunkstore.ErrInvalidKey)
	})

	t.Run("NotFound", func(t *testing.T) {
		b := open(t)
		_, err := b.Get(ctx, "chunks/00/missing")
		assert.ErrorIs(t, err, chunkstore.ErrNotFound)
		assert.Contains(t, err.Error(), "chunks/00/missing", "the error names the key")
		has, err := b.Has(ctx, "chunks/00/missing")
		require.NoError(t, err)
		assert.False(t, has)
		// A prefix of a key is not a key.
		require.NoError(t, b.Put(ctx, "a/b/c", []byte("x")))
		has, err = b.Has(ctx, "a/b")
		require.NoError(t, err)
		assert.False(t, has)
	})

	t.Run("Overwrite", func(t *testing.T) {
		b := open(t)
		one, two := RandomBytes(100), RandomBytes(200)
		require.NoError(t, b.Put(ctx, "k", one))
		require.NoError(t, b.Put(ctx, "k", one), "re-put of the same data")
		got, err := b.Get(ctx, "k")
		require.NoError(t, err)
		assert.Equal(t, one, got)
		require.NoError(t, b.Put(ctx, "k", two), "a manifest may be replaced")
		got, err = b.Get(ctx, "k")
		require.NoError(t, err)
		assert.Equal(t, two, got)
		assert.Equal(t, []string{"k"}, listAll(t, b, ""))
	})

	t.Run("Sizes", func(t *testing.T) {
		b := open(t)
		for _, n := range []int{0, 1, 4095, 1 << 20, chunkstore.MaxChunkSize + 8} {
			key := fmt.Sprintf("sizes/%d", n)
			data := RandomBytes(n)
			require.NoError(t, b.Put(ctx, key, data))
			got, err := b.Get(ctx, key)
			require.NoError(t, err)
			require.Len(t, got, n)
			require.True(t, bytes.Equal(data, got), "%d bytes read back differ", n)
		}
	})

	t.Run("NoAliasing", func(t *testing.T) {
		b := open(t)
		data := []byte("original")
		require.NoError(t, b.Put(ctx, "k", data))
		copy(data, "mutated!")
		got, err := b.Get(ctx, "k")
		require.NoError(t, err)
		assert.Equal(t, "original", string(got), "Put must not keep the caller's slice")
		copy(got, "mutated!")
		again, err := b.Get(ctx, "k")
		require.NoError(t, err)
		assert.Equal(t, "original", string(again), "Get must return the caller's own copy")
	})

	t.Run("List", func(t *testing.T) {
		b := open(t)
		keys := []string{"chunks/aa/1", "chunks/ab/2", "chunks/b0/3", "volumes/v/volume",
			"volumes/v/snapshots/01", "volumes/v/snapshots/02", "volumes/vx/volume", "config"}
		for _, k := range keys {
			require.NoError(t, b.Put(ctx, k, []byte(k)))
		}
		assert.Equal(t, sorted(keys), listAll(t, b, ""))
		assert.Equal(t, []string{"chunks/aa/1", "chunks/ab/2", "chunks/b0/3"}, listAll(t, b, "chunks/"))
		assert.Equal(t, []string{"chunks/aa/1", "chunks/ab/2"}, listAll(t, b, "chunks/a"), "a prefix may end inside a segment")
		assert.Equal(t, []string{"volumes/v/snapshots/01", "volumes/v/snapshots/02", "volumes/v/volume"}, listAll(t, b, "volumes/v/"))
		assert.Empty(t, listAll(t, b, "nothing/"))
		assert.Empty(t, listAll(t, b, "chunks/zz"))

		stop := errors.New("stop")
		n := 0
		err := b.List(ctx, "", func(string) error { n++; return stop })
		assert.ErrorIs(t, err, stop, "fn's error is returned")
		assert.Equal(t, 1, n, "fn's error stops the listing")
	})

	t.Run("ListSizes", func(t *testing.T) {
		b := open(t)
		// Sizes all different, an empty object among them.
		objects := map[string][]byte{"chunks/aa/1": RandomBytes(1), "chunks/ab/2": RandomBytes(1000),
			"chunks/b0/3": RandomBytes(70 << 10), "volumes/v/volume": {}, "config": RandomBytes(17)}
		for k, v := range objects {
			require.NoError(t, b.Put(ctx, k, v))
		}
		sizes := func(prefix string) map[string]int64 {
			got := map[string]int64{}
			require.NoError(t, b.ListSizes(ctx, prefix, func(k string, size int64) error {
				_, dup := got[k]
				assert.False(t, dup, "key %s listed twice", k)
				got[k] = size
				return nil
			}))
			return got
		}
		want := map[string]int64{}
		for k, v := range objects {
			want[k] = int64(len(v))
		}
		assert.Equal(t, want, sizes(""))
		assert.Equal(t, map[string]int64{"chunks/aa/1": 1, "chunks/ab/2": 1000, "chunks/b0/3": 70 << 10}, sizes("chunks/"))
		assert.Equal(t, map[string]int64{"chunks/aa/1": 1, "chunks/ab/2": 1000}, sizes("chunks/a"), "a prefix may end inside a segment")
		assert.Empty(t, sizes("nothing/"))
		assert.Empty(t, sizes("chunks/zz"))

		// An object put again over a larger one has its new size.
		require.NoError(t, b.Put(ctx, "chunks/b0/3", RandomBytes(5)))
		assert.Equal(t, int64(5), sizes("chunks/b0/")["chunks/b0/3"])

		// The same keys as List.
		var listed []string
		for k := range sizes("") {
			listed = append(listed, k)
		}
		assert.Equal(t, listAll(t, b, ""), sorted(listed))

		stop := errors.New("stop")
		n := 0
		err := b.ListSizes(ctx, "", func(string, int64) error { n++; return stop })
		assert.ErrorIs(t, err, stop, "fn's error is returned")
		assert.Equal(t, 1, n, "fn's error stops the listing")

		cctx, cancel := context.WithCancel(ctx)
		cancel()
		assert.ErrorIs(t, b.ListSizes(cctx, "", func(string, int64) error { return nil }), context.Canceled)
	})

	t.Run("InvalidKeys", func(t *testing.T) {
		b := open(t)
		for _, k := range []string{"", "/abs", "trailing/", "a//b", "../up", "a/../b", "a/.hidden", "."} {
			assert.ErrorIs(t, b.Put(ctx, k, []byte("x")), chunkstore.ErrInvalidKey, "Put %q", k)
			_, err := b.Get(ctx, k)
			assert.ErrorIs(t, err, chunkstore.ErrInvalidKey, "Get %q", k)
		}
		assert.Empty(t, listAll(t, b, ""))
	})

	t.Run("ConcurrentPutSameKey", func(t *testing.T) {
		b := open(t)
		data := RandomBytes(256 << 10)
		var wg sync.WaitGroup
		errs := make([]error, 32)
		for i := range errs {
			wg.Go(func() { errs[i] = b.Put(ctx, "chunks/ab/same", data) })
		}
		wg.Wait()
		for _, err := range errs {
			require.NoError(t, err)
		}
		got, err := b.Get(ctx, "chunks/ab/same")
		require.NoError(t, err)
		assert.True(t, bytes.Equal(data, got))
		assert.Equal(t, []string{"chunks/ab/same"}, listAll(t, b, ""), "no temporary objects are left")
	})

	t.Run("ConcurrentDistinctKeys", func(t *testing.T) {
		b := open(t)
		var wg sync.WaitGroup
		const n = 64
		want := make([][]byte, n)
		errs := make([]error, n)
		for i := range n {
			want[i] = RandomBytes(1000 + i)
			wg.Go(func() { errs[i] = b.Put(ctx, fmt.Sprintf("chunks/%02x/k%d", i%4, i), want[i]) })
		}
		wg.Wait()
		for i := range n {
			require.NoError(t, errs[i])
			got, err := b.Get(ctx, fmt.Sprintf("chunks/%02x/k%d", i%4, i))
			require.NoError(t, err)
			require.Equal(t, want[i], got)
		}
		assert.Len(t, listAll(t, b, "chunks/"), n)
	})

	t.Run("ConditionalPut", func(t *testing.T) {
		b := open(t)
		v, ok := chunkstore.AsVersioned(b)
		require.True(t, ok, "every backend takes conditional writes (the lease needs them)")
		v1, err := v.PutIf(ctx, "locks/server", []byte("a"), "")
		require.NoError(t, err, "create if absent")
		_, err = v.PutIf(ctx, "locks/server", []byte("b"), "")
		require.ErrorIs(t, err, chunkstore.ErrPrecondition, "create if absent, but it exists")
		data, got, err := v.GetVersion(ctx, "locks/server")
		require.NoError(t, err)
		assert.Equal(t, "a", string(data))
		assert.Equal(t, v1, got)
		v2, err := v.PutIf(ctx, "locks/server", []byte("b"), v1)
		require.NoError(t, err, "replace the version read")
		assert.NotEqual(t, v1, v2)
		_, err = v.PutIf(ctx, "locks/server", []byte("c"), v1)
		require.ErrorIs(t, err, chunkstore.ErrPrecondition, "replace a version that is gone")
		data, _, err = v.GetVersion(ctx, "locks/server")
		require.NoError(t, err)
		assert.Equal(t, "b", string(data), "a failed conditional write changes nothing")
		_, err = v.PutIf(ctx, "locks/other", []byte("x"), v2)
		require.ErrorIs(t, err, chunkstore.ErrPrecondition, "replace a key that does not exist")

		// Many racing creators: exactly one wins.
		var wg sync.WaitGroup
		var wins atomic.Int32
		for i := range 8 {
			wg.Go(func() {
				if _, err := v.PutIf(ctx, "locks/race", []byte{byte(i)}, ""); err == nil {
					wins.Add(1)
				} else {
					assert.ErrorIs(t, err, chunkstore.ErrPrecondition)
				}
			})
		}
		wg.Wait()
		assert.EqualValues(t, 1, wins.Load())
	})

	t.Run("GetRange", func(t *testing.T) {
		b := open(t)
		data := RandomBytes(100_000)
		require.NoError(t, b.Put(ctx, "packs/00/p", data))
		for _, r := range [][2]int64{{0, 100_000}, {0, 1}, {99_999, 1}, {4096, 65536}, {100_000, 0}, {50, 0}} {
			got, err := b.GetRange(ctx, "packs/00/p", r[0], r[1])
			require.NoError(t, err, "%v", r)
			assert.Equal(t, data[r[0]:r[0]+r[1]], got, "%v", r)
		}
		for _, r := range [][2]int64{{99_999, 2}, {100_000, 1}, {200_000, 10}} {
			_, err := b.GetRange(ctx, "packs/00/p", r[0], r[1])
			assert.ErrorIs(t, err, chunkstore.ErrCorrupt, "a range past the end is a short (damaged) object: %v", r)
			assert.ErrorContains(t, err, "packs/00/p")
		}
		_, err := b.GetRange(ctx, "packs/00/missing", 0, 10)
		assert.ErrorIs(t, err, chunkstore.ErrNotFound)
		_, err = b.GetRange(ctx, "packs/00/p", -1, 10)
		assert.Error(t, err)
	})

	t.Run("CancelledContext", func(t *testing.T) {
		b := open(t)
		require.NoError(t, b.Put(ctx, "k", []byte("x")))
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		assert.ErrorIs(t, b.Put(cctx, "new", []byte("x")), context.Canceled)
		_, err := b.Get(cctx, "k")
		assert.ErrorIs(t, err, context.Canceled)
		_, err = b.GetRange(cctx, "k", 0, 1)
		assert.ErrorIs(t, err, context.Canceled)
		_, err = b.Has(cctx, "k")
		assert.ErrorIs(t, err, context.Canceled)
		assert.ErrorIs(t, b.Delete(cctx, "k"), context.Canceled)
		assert.ErrorIs(t, b.List(cctx, "", func(string) error { return nil }), context.Canceled)
		// Nothing happened.
		assert.Equal(t, []string{"k"}, listAll(t, b, ""))
	})
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}
