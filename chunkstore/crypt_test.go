package chunkstore

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func testKeys(t testing.TB, seed byte) *Keys {
	t.Helper()
	k, err := NewKeys(bytes.Repeat([]byte{seed}, MasterKeySize), [KeysetSize]byte{seed, 1})
	require.NoError(t, err)
	return k
}

// marker is a plaintext the tests look for in every stored byte.
var marker = []byte("nbdvault-secret-marker-0123456789")

// markedChunk is n random bytes, which zstd leaves as they are, with
// marker every 4 KiB: a plain store's objects show it.
func markedChunk(n int) []byte {
	b := randomFrame(uint64(n), n)
	for off := 100; off+len(marker) < n; off += 4096 {
		copy(b[off:], marker)
	}
	return b
}

// holds reports the keys of b's objects under prefix whose bytes contain
// marker.
func holds(t *testing.T, b Backend, prefix string) []string {
	t.Helper()
	var found []string
	require.NoError(t, b.List(context.Background(), prefix, func(k string) error {
		obj, err := b.Get(context.Background(), k)
		require.NoError(t, err)
		if bytes.Contains(obj, marker) || bytes.Contains(obj, marker[:8]) {
			found = append(found, k)
		}
		return nil
	}))
	return found
}

// An encrypted store reads back what it stores, whole, by frames and by
// pack frames; stores equal plaintext once; and leaves nothing of the
// plaintext in the backend, not even in its IDs or frame tables.
func TestSealedStore(t *testing.T) {
	ctx := context.Background()
	mem := NewMem()
	keys := testKeys(t, 1)
	s := newPackStore(t, mem, Options{Keys: keys, FrameBits: minFrameBits})
	small := markedChunk(10_000)     // one whole object
	framed := markedChunk(256 << 10) // 16 frames of 16 KiB
	ids := map[string]ID{}
	for name, data := range map[string][]byte{"small": small, "framed": framed} {
		id, err := s.Put(ctx, data)
		require.NoError(t, err)
		assert.NotEqual(t, BLAKE3{}.Sum(data), id, "an encrypted repository's IDs are not the plain hash")
		assert.Equal(t, keys.Hasher().Sum(data), id)
		ids[name] = id
		again, err := s.Put(ctx, data)
		require.NoError(t, err)
		assert.Equal(t, id, again)
	}
	assert.EqualValues(t, 2, s.Stats().DedupHits, "equal plaintext is stored once")
	obj, err := mem.Get(ctx, Key(ids["framed"]))
	require.NoError(t, err)
	assert.EqualValues(t, framedSealedVersion, obj[2])

	fresh := newPackStore(t, mem, Options{Keys: keys, FrameBits: minFrameBits, CacheBytes: -1})
	got, err := fresh.Get(ctx, ids["small"])
	require.NoError(t, err)
	assert.Equal(t, small, got)
	got, err = fresh.Get(ctx, ids["framed"])
	require.NoError(t, err)
	assert.Equal(t, framed, got)
	part := make([]byte, 5000)
	require.NoError(t, fresh.ReadAt(ctx, ids["framed"], int64(len(framed)), part, 40_000))
	assert.Equal(t, framed[40_000:45_000], part)
	assert.EqualValues(t, 1, fresh.Stats().FrameReads, "a small read of a sealed framed chunk reads its frames")

	pb := s.NewPack("volumes/v/journal/0000000000000001-aa")
	var refs []FrameRef
	for i := range 3 {
		ref, err := pb.Add(markedChunk(3000 + i))
		require.NoError(t, err)
		refs = append(refs, ref)
	}
	pack := pb.Finish()
	require.NoError(t, s.PutPack(ctx, "volumes/v/journal/0000000000000001-aa", pack))
	for i, ref := range refs {
		got, err := fresh.GetFrame(ctx, "volumes/v/journal/0000000000000001-aa", ref)
		require.NoError(t, err)
		assert.Equal(t, markedChunk(3000+i), got)
	}
	_, err = decodePackFooter(pack, keys, "volumes/v/journal/0000000000000001-aa")
	require.NoError(t, err)
	_, err = DecodePackFooter(pack)
	require.ErrorIs(t, err, ErrCorrupt, "a sealed footer does not read without keys")

	assert.Empty(t, holds(t, mem, ""), "no object holds the plaintext")
	require.NotEmpty(t, holds(t, func() Backend {
		plain := NewMem()
		p := newPackStore(t, plain, Options{FrameBits: minFrameBits})
		_, err := p.Put(ctx, small)
		require.NoError(t, err)
		return plain
	}(), ""), "(the check finds the marker in a plain store's objects)")
}

// A sealed object moved to another name, a frame moved within its
// object, or a pack frame read at another offset or from another pack is
// damage, never wrong bytes; so is an object read with other keys, or a
// plain object in an encrypted repository and the other way round.
func TestSealedStoreRefusesSwaps(t *testing.T) {
	ctx := context.Background()
	mem := NewMem()
	keys := testKeys(t, 1)
	s := newPackStore(t, mem, Options{Keys: keys, FrameBits: minFrameBits, CacheBytes: -1})
	a, err := s.Put(ctx, markedChunk(10_000))
	require.NoError(t, err)
	b, err := s.Put(ctx, textFrame(9, 10_000))
	require.NoError(t, err)
	// Two random frames first: stored raw, so of one length.
	fa, err := s.Put(ctx, append(randomFrame(1, 32<<10), markedChunk(32<<10)...))
	require.NoError(t, err)

	corrupt := func(id ID, why string) {
		t.Helper()
		_, err := s.Get(ctx, id)
		require.ErrorIs(t, err, ErrCorrupt, why)
		assert.Contains(t, err.Error(), why)
	}
	objA, _ := mem.Get(ctx, Key(a))
	objB, _ := mem.Get(ctx, Key(b))
	require.NoError(t, mem.Put(ctx, Key(b), objA))
	corrupt(b, "does not open with this repository's key")
	require.NoError(t, mem.Put(ctx, Key(b), objB))
	_, err = s.Get(ctx, b)
	require.NoError(t, err, "the object put back reads")

	// Frames 0 and 1 of the framed chunk swapped: same lengths, in place.
	objF, _ := mem.Get(ctx, Key(fa))
	tab, err := keys.openTable(fa, objF)
	require.NoError(t, err)
	pt, err := parseTable(tab)
	require.NoError(t, err)
	swapped := bytes.Clone(objF[:pt.offs[0]])
	swapped = append(swapped, objF[pt.offs[1]:pt.offs[2]]...)
	swapped = append(swapped, objF[pt.offs[0]:pt.offs[1]]...)
	swapped = append(swapped, objF[pt.offs[2]:]...)
	require.Equal(t, pt.offs[1]-pt.offs[0], pt.offs[2]-pt.offs[1])
	require.NoError(t, mem.Put(ctx, Key(fa), swapped))
	corrupt(fa, "frame 0: it does not open")
	dst := make([]byte, 100)
	err = s.ReadAt(ctx, fa, 64<<10, dst, 10)
	require.ErrorIs(t, err, ErrCorrupt)
	require.NoError(t, mem.Put(ctx, Key(fa), objF))
	require.NoError(t, s.ReadAt(ctx, fa, 64<<10, dst, 10), "the object put back reads")

	// A plain store over the sealed objects, and the other way round.
	plain := newPackStore(t, mem, Options{FrameBits: minFrameBits, CacheBytes: -1})
	_, err = plain.Get(ctx, a)
	require.ErrorIs(t, err, ErrCorrupt)
	assert.Contains(t, err.Error(), "without its key")
	_, err = plain.Get(ctx, fa)
	require.ErrorIs(t, err, ErrCorrupt)
	assert.Contains(t, err.Error(), "without its key")
	pid, err := plain.Put(ctx, textFrame(11, 5000))
	require.NoError(t, err)
	require.NoError(t, mem.Put(ctx, Key(b), mustGet(t, mem, Key(pid))))
	corrupt(b, "not sealed")
	other := newPackStore(t, mem, Options{Keys: testKeys(t, 2), FrameBits: minFrameBits, CacheBytes: -1})
	_, err = other.Get(ctx, a)
	require.ErrorIs(t, err, ErrCorrupt, "another master key opens nothing")

	// Pack frames: read at another offset, or from a pack moved away.
	const key1, key2 = "volumes/v/journal/1-a", "volumes/v/journal/2-b"
	pb := s.NewPack(key1)
	r0, err := pb.Add(markedChunk(3000))
	require.NoError(t, err)
	r1, err := pb.Add(textFrame(2, 3000))
	require.NoError(t, err)
	pack := pb.Finish()
	require.NoError(t, s.PutPack(ctx, key1, pack))
	require.Error(t, s.PutPack(ctx, key2, pack), "a sealed footer is bound to its pack's key")
	require.NoError(t, mem.Put(ctx, key2, pack))
	_, err = s.GetFrame(ctx, key2, r0)
	require.ErrorIs(t, err, ErrCorrupt, "a frame read from a pack moved to another key")
	moved := r1
	moved.Off, moved.Len = r0.Off, r0.Len
	_, err = s.GetFrame(ctx, key1, moved)
	require.ErrorIs(t, err, ErrCorrupt, "a frame read where another frame is")
	_, err = plain.GetFrame(ctx, key1, r0)
	require.ErrorIs(t, err, ErrCorrupt)
	assert.Contains(t, err.Error(), "without its key")
}

func mustGet(t *testing.T, b Backend, key string) []byte {
	t.Helper()
	obj, err := b.Get(context.Background(), key)
	require.NoError(t, err)
	return obj
}

// Sealed seals descriptive objects whole, bound to their keys, and leaves
// the objects a Store seals itself (and the config, keys and lease) as
// they are given.
func TestSealedBackend(t *testing.T) {
	ctx := context.Background()
	mem := NewMem()
	sb := NewSealed(mem, testKeys(t, 1))
	doc := append([]byte(`{"name": "`), marker...)
	for _, k := range []string{"volumes/db/volume", "volumes/db/snapshots/1", "verify/last"} {
		require.True(t, SealsWhole(k), k)
		require.NoError(t, sb.Put(ctx, k, doc))
		got, err := sb.Get(ctx, k)
		require.NoError(t, err)
		assert.Equal(t, doc, got)
	}
	assert.Empty(t, holds(t, mem, ""))
	for _, k := range []string{"config", "keys/ab", "locks/server", "chunks/ab/abcd", "volumes/db/journal/1-a"} {
		assert.False(t, SealsWhole(k), k)
	}
	require.NoError(t, mem.Put(ctx, "volumes/other/volume", mustGet(t, mem, "volumes/db/volume")))
	_, err := sb.Get(ctx, "volumes/other/volume")
	require.ErrorIs(t, err, ErrCorrupt, "a record copied to another volume's name")
	require.NoError(t, mem.Put(ctx, "volumes/db/volume", doc))
	_, err = sb.Get(ctx, "volumes/db/volume")
	require.ErrorIs(t, err, ErrCorrupt, "a plain object where a sealed one belongs")
	_, err = sb.GetRange(ctx, "volumes/db/snapshots/1", 0, 4)
	require.Error(t, err)

	// What a store seals itself must come sealed (review L6).
	require.ErrorContains(t, sb.Put(ctx, "chunks/ab/abcd", []byte("plain chunk")), "not sealed")
	plainPack := newPackStore(t, NewMem(), Options{}).NewPack("volumes/db/journal/1-a")
	_, err = plainPack.Add([]byte("plain frame"))
	require.NoError(t, err)
	require.ErrorContains(t, sb.Put(ctx, "volumes/db/journal/1-a", plainPack.Finish()), "not sealed")
	_, err = NewStore(sb, Options{})
	require.Error(t, err, "a store over a sealed backend without its keys")
}

// FuzzSealed feeds an encrypted store's readers any object: a chunk read
// whole or by frames, a pack frame, a pack footer. Each returns an error
// or exactly what was stored; nothing panics or allocates past its
// bounds.
func FuzzSealed(f *testing.F) {
	ctx := context.Background()
	keys := testKeys(f, 1)
	mem := NewMem()
	s, err := NewStore(mem, Options{Keys: keys, FrameBits: minFrameBits, CacheBytes: -1})
	if err != nil {
		f.Fatal(err)
	}
	small, framed := markedChunk(5000), append(randomFrame(3, 16<<10), markedChunk(16<<10)...)
	ids := []ID{}
	for _, data := range [][]byte{small, framed} {
		id, err := s.Put(ctx, data)
		if err != nil {
			f.Fatal(err)
		}
		ids = append(ids, id)
		obj, _ := mem.Get(ctx, Key(id))
		f.Add(obj)
	}
	const pk = "volumes/v/journal/1-a"
	pb := s.NewPack(pk)
	ref, err := pb.Add(small)
	if err != nil {
		f.Fatal(err)
	}
	pack := pb.Finish()
	f.Add(pack)
	f.Fuzz(func(t *testing.T, obj []byte) {
		for i, id := range ids {
			got, err := s.open(id, bytes.Clone(obj)) // opened in place
			if err == nil && !bytes.Equal(got, [][]byte{small, framed}[i]) {
				t.Fatalf("chunk %d: opened to other bytes", i)
			}
		}
		if tab, err := keys.openTable(ids[1], obj); err == nil {
			// Only the sealer's own table opens; it parses.
			if _, err := parseTable(tab); err != nil {
				t.Fatalf("an opened table that does not parse: %v", err)
			}
		}
		if len(obj) <= int(ref.Len) {
			if got, err := s.openFrame(pk, FrameRef{Off: ref.Off, Len: uint32(len(obj)), Plain: ref.Plain, Sum: ref.Sum}, bytes.Clone(obj)); err == nil && !bytes.Equal(got, small) {
				t.Fatal("a pack frame opened to other bytes")
			}
		}
		_, _ = decodePackFooter(obj, keys, pk)
	})
}
