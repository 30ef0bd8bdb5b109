package volume

import (
	"context"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/integration/miniotest"
)

// TestVerify damages and deletes chunks and index pages, and Verify
// names each, with the snapshots and byte ranges they hold; what it
// does not read (without ReadData) it cannot find damaged, only missing.
func TestVerify(t *testing.T) {
	ctx := context.Background()
	mem := chunkstore.NewMem()
	g := newRig(t, mem, 8*MinChunkSize, MinChunkSize, 1)
	g.retention = -1
	g.reopen()
	require.NoError(t, g.v.WriteAt(ctx, randomBytes(8*MinChunkSize), 0, false))
	a, err := g.v.Snapshot(ctx, "a")
	require.NoError(t, err)
	require.NoError(t, g.v.WriteAt(ctx, randomBytes(4*MinChunkSize), 4*MinChunkSize, false))
	b, err := g.v.Snapshot(ctx, "b")
	require.NoError(t, err)
	require.NoError(t, g.v.SealAll(ctx))

	rep, err := Verify(ctx, g.v.env, VerifyOptions{ReadData: true})
	require.NoError(t, err)
	assert.Empty(t, rep.Problems)
	assert.Equal(t, 2, rep.Manifests)
	assert.Equal(t, 12, rep.Chunks, "8 chunks, then 4 rewritten")
	assert.Equal(t, 12, rep.Read)
	half1, err := Verify(ctx, g.v.env, VerifyOptions{ReadData: true, SubsetN: 1, SubsetM: 2})
	require.NoError(t, err)
	half2, err := Verify(ctx, g.v.env, VerifyOptions{ReadData: true, SubsetN: 2, SubsetM: 2})
	require.NoError(t, err)
	assert.Equal(t, 12, half1.Read+half2.Read, "the subsets of 2 read everything once")

	root := func(id string) chunkstore.ID {
		for _, s := range g.v.snaps {
			if s.ID == id {
				return s.Root
			}
		}
		t.Fatalf("no snapshot %s", id)
		return chunkstore.ID{}
	}
	chunkOf := func(snap string, c uint64) chunkstore.ID {
		id, err := lookupIndex(ctx, g.v.store, root(snap), c)
		require.NoError(t, err)
		return id
	}
	shared := chunkOf(a.ID, 1) // in a and b
	onlyA := chunkOf(a.ID, 6)  // rewritten in b
	require.NoError(t, mem.Delete(ctx, chunkstore.Key(shared)))
	obj, err := mem.Get(ctx, chunkstore.Key(onlyA))
	require.NoError(t, err)
	obj[len(obj)-1] ^= 1
	require.NoError(t, mem.Put(ctx, chunkstore.Key(onlyA), obj))

	rep, err = Verify(ctx, g.v.env, VerifyOptions{})
	require.NoError(t, err)
	require.Len(t, rep.Problems, 1, "without reading data, the damaged chunk is present: only the missing one")
	p := rep.Problems[0]
	assert.Equal(t, chunkstore.Key(shared), p.Object)
	assert.Equal(t, "missing", p.Kind)
	assert.ElementsMatch(t, []VerifyRef{
		{Volume: "vol", Snapshot: a.ID, Kind: KindSnapshot, Offset: MinChunkSize, Length: MinChunkSize},
		{Volume: "vol", Snapshot: b.ID, Kind: KindSnapshot, Offset: MinChunkSize, Length: MinChunkSize},
	}, p.Affects)

	rep, err = Verify(ctx, g.v.env, VerifyOptions{ReadData: true})
	require.NoError(t, err)
	require.Len(t, rep.Problems, 2)
	byObject := map[string]VerifyProblem{}
	for _, p := range rep.Problems {
		byObject[p.Object] = p
	}
	damaged := byObject[chunkstore.Key(onlyA)]
	assert.Equal(t, "damaged", damaged.Kind)
	assert.Equal(t, []VerifyRef{{Volume: "vol", Snapshot: a.ID, Kind: KindSnapshot, Offset: 6 * MinChunkSize, Length: MinChunkSize}}, damaged.Affects)

	// One snapshot only, by label: b does not reference onlyA.
	rep, err = Verify(ctx, g.v.env, VerifyOptions{Targets: []string{"vol@b"}, ReadData: true})
	require.NoError(t, err)
	assert.Equal(t, 1, rep.Manifests)
	require.Len(t, rep.Problems, 1)
	assert.Equal(t, chunkstore.Key(shared), rep.Problems[0].Object)
	_, err = Verify(ctx, g.v.env, VerifyOptions{Targets: []string{"vol@nope"}})
	require.ErrorIs(t, err, ErrNoSnapshot)

	// A damaged index page: everything below it is named, by range.
	require.NoError(t, mem.Delete(ctx, chunkstore.Key(root(b.ID))))
	rep, err = Verify(ctx, g.v.env, VerifyOptions{Targets: []string{"vol@" + b.ID}})
	require.NoError(t, err)
	require.NotEmpty(t, rep.Problems)
	assert.Equal(t, chunkstore.Key(root(b.ID)), rep.Problems[0].Object)
	assert.Equal(t, "missing", rep.Problems[0].Kind)
	assert.Equal(t, []VerifyRef{{Volume: "vol", Snapshot: b.ID, Kind: KindSnapshot, Offset: 0, Length: 8 * MinChunkSize}}, rep.Problems[0].Affects)
}

// TestVerifyDeltas damages the recent data a manifest holds as journal:
// a data frame, a delta page, a delta top, a whole journal pack. Without
// ReadData verify reads tops and pages, so it finds those, and a missing
// pack, but not a damaged data frame; with ReadData it finds that too.
// Each is named with the byte ranges each snapshot reads from it: a
// newer delta that overwrote part of them masks that part. On memory,
// a local folder and MinIO.
func TestVerifyDeltas(t *testing.T) {
	t.Run("memory", func(t *testing.T) { testVerifyDeltas(t, chunkstore.NewMem()) })
	t.Run("local", func(t *testing.T) {
		b, err := chunkstore.NewLocal(t.TempDir())
		require.NoError(t, err)
		testVerifyDeltas(t, b)
	})
	t.Run("minio", func(t *testing.T) {
		m := miniotest.StartShared(t)
		testVerifyDeltas(t, chunkstore.NewRetry(m.Backend(t), chunkstore.DefaultRetryPolicy))
	})
}

func testVerifyDeltas(t *testing.T, mem chunkstore.Backend) {
	ctx := context.Background()
	const cs = MinChunkSize
	const size = 8 * cs
	g := newRig(t, mem, size, cs, 1)
	g.retention = -1
	g.reopen()
	require.NoError(t, g.v.WriteAt(ctx, randomBytes(size), 0, false))
	_, err := g.v.Snapshot(ctx, "a")
	require.NoError(t, err)
	// Ten scattered 4 KiB writes: one delta, one page, one data frame.
	const step, blk = 48 << 10, 4 << 10
	for i := range int64(10) {
		require.NoError(t, g.v.WriteAt(ctx, randomBytes(blk), blk+i*step, false))
	}
	b, err := g.v.Snapshot(ctx, "b")
	require.NoError(t, err)
	// One write over the first: c's own small delta, newer than b's.
	require.NoError(t, g.v.WriteAt(ctx, randomBytes(blk), blk, false))
	c, err := g.v.Snapshot(ctx, "c")
	require.NoError(t, err)
	require.NoError(t, g.v.SealAll(ctx))

	manifest := func(id string) Manifest {
		for _, s := range g.v.snaps {
			if s.ID == id {
				return s.Manifest
			}
		}
		t.Fatalf("no snapshot %s", id)
		return Manifest{}
	}
	require.Len(t, manifest(b.ID).Deltas, 1)
	require.Len(t, manifest(c.ID).Deltas, 2, "c's delta is too small to merge with b's")
	d := manifest(b.ID).Deltas[0]
	top, err := g.v.loadTop(ctx, d)
	require.NoError(t, err)
	require.Len(t, top.pages, 1)
	page, err := g.v.loadPage(ctx, top, 0)
	require.NoError(t, err)
	require.Len(t, page.frames, 1)
	require.Len(t, page.ext, 10)
	pageAt := frameAt{pack: top.packs[top.pages[0].pack], ref: top.pages[0].ref}
	dataAt := frameAt{pack: top.packs[page.frames[0].pack], ref: page.frames[0].ref}

	rep, err := Verify(ctx, g.v.env, VerifyOptions{ReadData: true})
	require.NoError(t, err)
	require.Empty(t, rep.Problems)
	assert.Equal(t, 2, rep.Deltas, "b's and c's")
	assert.Equal(t, 2, rep.DeltaPages)
	assert.Equal(t, 2, rep.Frames)
	assert.Equal(t, 2, rep.FramesRead)

	// damage flips the last byte of the frame at f, and returns the undo.
	damage := func(f frameAt) func() {
		obj, err := mem.Get(ctx, f.pack)
		require.NoError(t, err)
		good := slices.Clone(obj)
		obj[f.ref.Off+int64(f.ref.Len)-1] ^= 1
		require.NoError(t, mem.Put(ctx, f.pack, obj))
		return func() { require.NoError(t, mem.Put(ctx, f.pack, good)) }
	}
	ref := func(snap string, off, end int64) VerifyRef {
		return VerifyRef{Volume: "vol", Snapshot: snap, Kind: KindSnapshot, Offset: off, Length: end - off}
	}
	only := func(rep VerifyReport, object, kind string) VerifyProblem {
		t.Helper()
		require.Len(t, rep.Problems, 1, "%+v", rep.Problems)
		p := rep.Problems[0]
		assert.Equal(t, object, p.Object)
		assert.Equal(t, kind, p.Kind)
		return p
	}

	// A data frame: found only by reading it. b reads all ten extents
	// from it, c all but the first.
	undo := damage(dataAt)
	rep, err = Verify(ctx, g.v.env, VerifyOptions{})
	require.NoError(t, err)
	assert.Empty(t, rep.Problems, "without ReadData a data frame is not read")
	rep, err = Verify(ctx, g.v.env, VerifyOptions{ReadData: true})
	require.NoError(t, err)
	p := only(rep, dataAt.object(), "damaged")
	assert.Contains(t, p.Reason, "journal frame")
	var want []VerifyRef
	for i := range int64(10) {
		want = append(want, ref(b.ID, blk+i*step, 2*blk+i*step))
		if i > 0 {
			want = append(want, ref(c.ID, blk+i*step, 2*blk+i*step))
		}
	}
	assert.ElementsMatch(t, want, p.Affects)
	undo()

	// A page: found by the structure check; what it covers.
	undo = damage(pageAt)
	rep, err = Verify(ctx, g.v.env, VerifyOptions{})
	require.NoError(t, err)
	p = only(rep, pageAt.object(), "damaged")
	assert.Contains(t, p.Reason, "delta page")
	assert.ElementsMatch(t, []VerifyRef{ref(b.ID, blk, 9*step+2*blk), ref(c.ID, 2*blk, 9*step+2*blk)}, p.Affects)
	undo()

	// The top: the whole volume, but what c's delta covers for c.
	topAt := frameAt{pack: d.Pack, ref: d.Top}
	undo = damage(topAt)
	rep, err = Verify(ctx, g.v.env, VerifyOptions{})
	require.NoError(t, err)
	p = only(rep, topAt.object(), "damaged")
	assert.Contains(t, p.Reason, "delta top")
	assert.ElementsMatch(t, []VerifyRef{ref(b.ID, 0, size), ref(c.ID, 0, blk), ref(c.ID, 2*blk, size)}, p.Affects)
	undo()

	// The whole pack, gone: the same, named by the pack.
	undo = func() func() {
		obj, err := mem.Get(ctx, d.Pack)
		require.NoError(t, err)
		require.NoError(t, mem.Delete(ctx, d.Pack))
		return func() { require.NoError(t, mem.Put(ctx, d.Pack, obj)) }
	}()
	rep, err = Verify(ctx, g.v.env, VerifyOptions{ReadData: true})
	require.NoError(t, err)
	p = only(rep, d.Pack, "missing")
	assert.ElementsMatch(t, []VerifyRef{ref(b.ID, 0, size), ref(c.ID, 0, blk), ref(c.ID, 2*blk, size)}, p.Affects)
	undo()

	rep, err = Verify(ctx, g.v.env, VerifyOptions{ReadData: true})
	require.NoError(t, err)
	require.Empty(t, rep.Problems, "all is well again")
}

// TestVerifyRange: runs that read the ranges [0, w), [w, 2w), … of the
// ID space, wrapping, read every chunk and journal frame once in all, and
// a damaged chunk is found by exactly the one run whose range holds it.
func TestVerifyRange(t *testing.T) {
	ctx := context.Background()
	mem := chunkstore.NewMem()
	g := newRig(t, mem, 32*MinChunkSize, MinChunkSize, 1)
	g.retention = -1
	g.reopen()
	require.NoError(t, g.v.WriteAt(ctx, randomBytes(32*MinChunkSize), 0, false))
	_, err := g.v.Snapshot(ctx, "")
	require.NoError(t, err)
	for i := range int64(100) { // a few journal frames too
		require.NoError(t, g.v.WriteAt(ctx, randomBytes(4096), i*5*4096, false))
	}
	_, err = g.v.Snapshot(ctx, "")
	require.NoError(t, err)
	require.NoError(t, g.v.SealAll(ctx))
	all, err := Verify(ctx, g.v.env, VerifyOptions{ReadData: true})
	require.NoError(t, err)
	require.Empty(t, all.Problems)
	require.Equal(t, 32, all.Chunks)
	require.Greater(t, all.Frames, 5)

	// Three runs of a third each (rounded up: the last wraps a little).
	width := (^uint64(0))/3 + 1
	runs := func() (found []int) {
		read, frames := 0, 0
		for i := range uint64(3) {
			rep, err := Verify(ctx, g.v.env, VerifyOptions{ReadData: true, From: i * width, Width: width})
			require.NoError(t, err)
			read += rep.Read
			frames += rep.FramesRead
			if len(rep.Problems) > 0 {
				found = append(found, int(i))
			}
		}
		assert.Equal(t, all.Chunks, read, "every chunk read once")
		assert.Equal(t, all.Frames, frames, "every frame read once")
		return found
	}
	assert.Empty(t, runs())
	id, err := lookupIndex(ctx, g.v.store, g.v.snaps[0].Root, 7)
	require.NoError(t, err)
	obj, err := mem.Get(ctx, chunkstore.Key(id))
	require.NoError(t, err)
	obj[len(obj)-1] ^= 1
	require.NoError(t, mem.Put(ctx, chunkstore.Key(id), obj))
	assert.Len(t, runs(), 1, "one run of the three finds it")
}
