package chunkstore

import (
	"context"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// slowDeletes holds DeleteMany until release is closed.
type slowDeletes struct {
	Backend
	entered chan struct{}
	release chan struct{}
}

func (b *slowDeletes) DeleteMany(ctx context.Context, keys []string) error {
	close(b.entered)
	<-b.release
	return b.Backend.DeleteMany(ctx, keys)
}

// A collector deletes only chunks not put since it started; a Put of a
// chunk being deleted waits for the delete and its hold, then writes the
// chunk again: it is there at the end. Without the wait, the Put finds
// the chunk still present (dedup), and the delete then removes it.
func TestTrackingDeleteRace(t *testing.T) {
	ctx := context.Background()
	mem := NewMem()
	b := &slowDeletes{Backend: mem, entered: make(chan struct{}), release: make(chan struct{})}
	s, err := NewStore(b, Options{CacheBytes: -1})
	require.NoError(t, err)
	old, fresh, raced := randomChunk(1000), randomChunk(1001), randomChunk(1002)
	oldID, err := s.Put(ctx, old)
	require.NoError(t, err)
	racedID, err := s.Put(ctx, raced)
	require.NoError(t, err)

	const hold = 200 * time.Millisecond
	tr, err := s.Track(hold)
	require.NoError(t, err)
	_, err = s.Track(hold)
	require.ErrorIs(t, err, ErrTracking, "one at a time")
	freshID, err := s.Put(ctx, fresh)
	require.NoError(t, err)
	assert.True(t, tr.Touched(freshID))
	assert.False(t, tr.Touched(oldID))

	deleted := make(chan []ID, 1)
	go func() {
		ids, err := tr.Delete(ctx, []ID{oldID, freshID, racedID, ZeroID})
		assert.NoError(t, err)
		deleted <- ids
	}()
	<-b.entered // the batch is chosen and on its way
	put := make(chan time.Time, 1)
	go func() {
		_, err := s.Put(ctx, raced)
		assert.NoError(t, err)
		put <- time.Now()
	}()
	select {
	case <-put:
		t.Fatal("a Put of a chunk being deleted returned before the delete")
	case <-time.After(100 * time.Millisecond):
	}
	released := time.Now()
	close(b.release)
	ids := <-deleted
	assert.ElementsMatch(t, []ID{oldID, racedID}, ids, "not the chunk put since the start, nor the zero ID")
	done := <-put
	assert.GreaterOrEqual(t, done.Sub(released), hold-10*time.Millisecond, "the Put waits out the hold")

	for id, want := range map[ID]bool{oldID: false, freshID: true, racedID: true} {
		has, err := mem.Has(ctx, Key(id))
		require.NoError(t, err)
		assert.Equal(t, want, has, "chunk %s", id)
	}
	got, err := s.Get(ctx, racedID)
	require.NoError(t, err)
	assert.Equal(t, raced, got)
	tr.Stop()
	_, err = s.Track(hold)
	require.NoError(t, err, "stopped: another may start")
}

// randomChunk is 64 KiB of pseudo-random bytes from seed.
func randomChunk(seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	p := make([]byte, 64<<10)
	for i := range p {
		p[i] = byte(r.Uint32())
	}
	return p
}

// A deleted chunk's ID stays held for the hold after its batch, and Stop
// waits that out: a Put in that time waits too, even one that comes
// after Stop was called.
func TestTrackingHold(t *testing.T) {
	ctx := context.Background()
	s, err := NewStore(NewMem(), Options{CacheBytes: -1})
	require.NoError(t, err)
	c := randomChunk(2000)
	id, err := s.Put(ctx, c)
	require.NoError(t, err)
	const hold = 300 * time.Millisecond
	tr, err := s.Track(hold)
	require.NoError(t, err)
	deleted := time.Now()
	_, err = tr.Delete(ctx, []ID{id})
	require.NoError(t, err)
	tr.Stop()
	assert.GreaterOrEqual(t, time.Since(deleted), hold-10*time.Millisecond, "Stop waits out the hold")

	tr, err = s.Track(hold)
	require.NoError(t, err)
	_, err = s.Put(ctx, c) // back, as a seal would put it
	require.NoError(t, err)
	tr.Stop()
	tr, err = s.Track(hold)
	require.NoError(t, err)
	tr.touched = map[ID]struct{}{} // chosen as garbage by a run that did not see that Put
	deleted = time.Now()
	_, err = tr.Delete(ctx, []ID{id})
	require.NoError(t, err)
	_, err = s.Put(ctx, c)
	require.NoError(t, err)
	assert.GreaterOrEqual(t, time.Since(deleted), hold-10*time.Millisecond, "a Put of a chunk just deleted waits out the hold")
	tr.Stop()
}

// TestUncachedRefusesPut: a collection neither tracks nor records Puts
// through the uncached store its marking reads with, so the store
// refuses them: a chunk put that way could be deleted while in use.
func TestUncachedRefusesPut(t *testing.T) {
	mem := NewMem()
	s, err := NewStore(mem, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Uncached().Put(t.Context(), []byte("chunk")); err == nil {
		t.Fatal("a Put through an uncached store succeeded")
	}
	n := 0
	_ = mem.List(t.Context(), "chunks/", func(string) error { n++; return nil })
	if n != 0 {
		t.Fatalf("%d chunks stored", n)
	}
}
