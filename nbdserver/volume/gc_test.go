package volume

import (
	"bytes"
	"context"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// heldDeletes holds DeleteMany until release is closed, once on is set.
type heldDeletes struct {
	chunkstore.Backend
	on      bool
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

func (b *heldDeletes) DeleteMany(ctx context.Context, keys []string) error {
	if b.on {
		b.once.Do(func() { close(b.entered) })
		<-b.release
	}
	return b.Backend.DeleteMany(ctx, keys)
}

// TestGCDedupRace: a seal stores a chunk that a collection has chosen to
// delete and is deleting at that moment (the chunk a deleted snapshot
// left, written again). The seal must not take the chunk as present:
// it waits for the delete and stores it again, and the head reads it.
// Without the store's tracking of Puts the seal finds the chunk present
// (dedup), the delete then removes it, and the read fails.
func TestGCDedupRace(t *testing.T) {
	ctx := context.Background()
	b := &heldDeletes{Backend: chunkstore.NewMem(), entered: make(chan struct{}), release: make(chan struct{})}
	g := newRig(t, b, 4*MinChunkSize, MinChunkSize, 1)
	g.retention = -1       // no points in time: they would keep the chunk
	g.frameBits = []int{0} // reopen makes a new store: an empty cache
	g.reopen()
	p := randomBytes(MinChunkSize)
	require.NoError(t, g.v.WriteAt(ctx, p, 0, false))
	s1, err := g.v.Snapshot(ctx, "")
	require.NoError(t, err)
	require.NoError(t, g.v.SealAll(ctx))
	require.NoError(t, g.v.WriteAt(ctx, randomBytes(MinChunkSize), 0, false))
	_, err = g.v.Snapshot(ctx, "")
	require.NoError(t, err)
	require.NoError(t, g.v.SealAll(ctx))
	require.NoError(t, g.v.DeleteSnapshot(ctx, s1.ID)) // p is referenced by nothing now

	b.on = true
	gcDone := make(chan GCReport, 1)
	go func() {
		rep, err := CollectGarbage(ctx, g.v.env, GCOptions{Hold: time.Millisecond})
		assert.NoError(t, err)
		gcDone <- rep
	}()
	<-b.entered // the collection is deleting p (and the old index pages)
	require.NoError(t, g.v.WriteAt(ctx, p, MinChunkSize, false))
	_, err = g.v.Checkpoint(ctx)
	require.NoError(t, err)
	sealed := make(chan error, 1)
	go func() { sealed <- g.v.SealAll(ctx) }()
	waited := true
	select {
	case err := <-sealed:
		require.NoError(t, err)
		waited = false
	case <-time.After(200 * time.Millisecond):
	}
	close(b.release)
	rep := <-gcDone
	assert.Positive(t, rep.Deleted)
	if waited {
		select {
		case err := <-sealed:
			require.NoError(t, err)
		case <-time.After(30 * time.Second):
			t.Fatal("the seal did not finish after the delete")
		}
	}
	assert.True(t, waited, "the seal waits while the collection deletes the chunk it stores")
	b.on = false
	g.reopen() // an empty cache: the chunk is read from the repository
	got := make([]byte, MinChunkSize)
	require.NoError(t, g.v.ReadAt(ctx, got, MinChunkSize), "the chunk written again is in the repository")
	assert.True(t, bytes.Equal(p, got))
}

// blocking holds the first matching request until release is closed.
type blocking struct {
	chunkstore.Backend
	match   func(op, key string) bool
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

func newBlocking(b chunkstore.Backend) *blocking {
	return &blocking{Backend: b, entered: make(chan struct{}), release: make(chan struct{})}
}

func (b *blocking) hold(op, key string) {
	if m := b.match; m != nil && m(op, key) {
		b.once.Do(func() { close(b.entered); <-b.release })
	}
}

func (b *blocking) Get(ctx context.Context, key string) ([]byte, error) {
	b.hold("get", key)
	return b.Backend.Get(ctx, key)
}

func (b *blocking) Put(ctx context.Context, key string, data []byte) error {
	b.hold("put", key)
	return b.Backend.Put(ctx, key, data)
}

// returnsWithin says whether f returns within d, and waits for it
// anyway.
func returnsWithin(d time.Duration, f func()) bool {
	done := make(chan struct{})
	go func() { f(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(d):
		<-done
		return false
	}
}

// TestGCHoldsManifestDeletes: no manifest is deleted while a collection
// marks (what it listed must still be there when it reads it): a
// snapshot delete waits until the marking is done.
func TestGCHoldsManifestDeletes(t *testing.T) {
	ctx := context.Background()
	b := newBlocking(chunkstore.NewMem())
	g := newRig(t, b, 4*MinChunkSize, MinChunkSize, 1)
	require.NoError(t, g.v.WriteAt(ctx, randomBytes(MinChunkSize), 0, false))
	s, err := g.v.Snapshot(ctx, "")
	require.NoError(t, err)
	require.NoError(t, g.v.SealAll(ctx))

	b.match = func(op, key string) bool { return op == "get" && strings.HasPrefix(key, "chunks/") } // an index page
	gcDone := make(chan error, 1)
	go func() {
		_, err := CollectGarbage(ctx, g.v.env, GCOptions{Hold: time.Millisecond})
		gcDone <- err
	}()
	<-b.entered // marking
	deleted := make(chan error, 1)
	assert.False(t, returnsWithin(200*time.Millisecond, func() {
		go func() { deleted <- g.v.DeleteSnapshot(ctx, s.ID) }()
		select {
		case err := <-deleted:
			deleted <- err
		case <-time.After(time.Second):
		}
	}), "a snapshot delete waits while a collection marks")
	close(b.release)
	require.NoError(t, <-gcDone)
	require.NoError(t, <-deleted)
}

// TestGCWaitsForSealsInFlight: a collection lists the manifests only
// once every seal that began before it has ended, so a seal that found
// its chunks present before the collection started has written the
// manifest that references them by then.
func TestGCWaitsForSealsInFlight(t *testing.T) {
	ctx := context.Background()
	b := newBlocking(chunkstore.NewMem())
	g := newRig(t, b, 4*MinChunkSize, MinChunkSize, 1)
	g.writeRandom(MinChunkSize)
	s, err := g.v.Snapshot(ctx, "")
	require.NoError(t, err)
	g.m.snaps[s.ID] = bytes.Clone(g.m.head)
	b.match = func(op, key string) bool { return op == "put" && strings.Contains(key, "/snapshots/") } // its manifest
	sealed := make(chan error, 1)
	go func() { sealed <- g.v.SealAll(ctx) }()
	<-b.entered // the seal has put its chunks, and not its manifest

	gcDone := make(chan GCReport, 1)
	go func() {
		rep, err := CollectGarbage(ctx, g.v.env, GCOptions{Hold: time.Millisecond})
		assert.NoError(t, err)
		gcDone <- rep
	}()
	ranAlongside := false
	select {
	case <-gcDone:
		ranAlongside = true
	case <-time.After(200 * time.Millisecond):
	}
	close(b.release)
	if ranAlongside {
		require.NoError(t, <-sealed)
		t.Fatal("the collection ran while a seal that began before it was in flight")
	}
	require.NoError(t, <-sealed)
	rep := <-gcDone
	assert.Zero(t, rep.Deleted, "every chunk is the sealed snapshot's")
	g.reopen()
	g.check("after the collection", true)
}

// A manifest whose check fails but whose root still reads is marked from
// it; a page that cannot be read stops the collection before it deletes
// anything.
func TestGCDamage(t *testing.T) {
	ctx := context.Background()
	mem := chunkstore.NewMem()
	g := newRig(t, mem, 4*MinChunkSize, MinChunkSize, 1)
	g.retention = -1
	g.reopen()
	p := randomBytes(MinChunkSize)
	require.NoError(t, g.v.WriteAt(ctx, p, 0, false))
	s, err := g.v.Snapshot(ctx, "")
	require.NoError(t, err)
	require.NoError(t, g.v.SealAll(ctx))
	require.NoError(t, g.v.WriteAt(ctx, randomBytes(MinChunkSize), 0, false)) // the head no longer holds p
	_, err = g.v.Checkpoint(ctx)
	require.NoError(t, err)
	require.NoError(t, g.v.SealAll(ctx))
	count := func() int {
		n := 0
		require.NoError(t, mem.List(ctx, "chunks/", func(string) error { n++; return nil }))
		return n
	}

	// s's manifest fails its check (one byte of its checksum line).
	key := manifestKey("vol", KindSnapshot, s.ID)
	obj, err := mem.Get(ctx, key)
	require.NoError(t, err)
	obj[len(obj)-2] ^= 1
	require.NoError(t, mem.Put(ctx, key, obj))
	rep, err := CollectGarbage(ctx, g.v.env, GCOptions{Hold: time.Millisecond})
	require.NoError(t, err)
	assert.Equal(t, []string{key}, rep.DamagedManifests)
	got, err := g.store.Get(ctx, g.store.Sum(p))
	require.NoError(t, err, "the damaged manifest's chunks are kept")
	assert.Equal(t, p, got)

	// An index page of s gone: nothing is deleted.
	mf, _, err := readManifestForGC(ctx, g.v.env, key)
	require.NoError(t, err)
	require.NoError(t, mem.Delete(ctx, chunkstore.Key(mf.Root)))
	before := count()
	_, err = CollectGarbage(ctx, g.v.env, GCOptions{Hold: time.Millisecond})
	require.ErrorIs(t, err, ErrGCDamage)
	assert.Equal(t, before, count(), "a collection that cannot read a page deletes nothing")
}

// TestMarkerMerge: the mark set is the sorted distinct union of what was
// added, whatever the order and repeats, over several merges.
func TestMarkerMerge(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{1, 100, 20000, 3 << 20} {
		m := newMarker(nil, true)
		want := map[chunkstore.ID]bool{}
		for range n {
			var id chunkstore.ID
			id[0], id[1], id[2] = byte(r.IntN(64)), byte(r.IntN(256)), byte(r.IntN(256)) // many repeats
			m.add(id)
			want[id] = true
		}
		got := m.done()
		if !slices.IsSortedFunc(got, chunkstore.ID.Compare) || len(slices.Compact(slices.Clone(got))) != len(got) {
			t.Fatalf("%d IDs added: the set is not sorted and distinct", n)
		}
		assert.Len(t, got, len(want), "%d IDs added: every ID", n)
		for _, id := range got {
			if !want[id] {
				t.Fatalf("%d IDs added: %s in the set was not added", n, id)
			}
		}
	}
}
