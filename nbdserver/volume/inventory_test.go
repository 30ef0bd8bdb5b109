package volume

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// crash drops the open written.N as a kill -9 would: the buffered
// records are lost and the file has no trailer.
func (inv *Inventory) crash() {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	if inv.cur != nil {
		inv.cur.f.Close()
		inv.cur = nil
	}
}

// listCounter counts the listings of chunks/, and can make Puts land
// late: the object is stored lateBy after the Put has failed (its answer
// lost, and the request applied by the store later).
type listCounter struct {
	chunkstore.Backend
	lists  atomic.Int64
	lateBy time.Duration
	late   sync.WaitGroup
}

func (b *listCounter) List(ctx context.Context, prefix string, fn func(string) error) error {
	if strings.HasPrefix(prefix, "chunks") {
		b.lists.Add(1)
	}
	return b.Backend.List(ctx, prefix, fn)
}

func (b *listCounter) ListSizes(ctx context.Context, prefix string, fn func(string, int64) error) error {
	if strings.HasPrefix(prefix, "chunks") {
		b.lists.Add(1)
	}
	return b.Backend.ListSizes(ctx, prefix, fn)
}

func (b *listCounter) Put(ctx context.Context, key string, data []byte) error {
	if b.lateBy == 0 {
		return b.Backend.Put(ctx, key, data)
	}
	data = bytes.Clone(data)
	b.late.Go(func() {
		time.Sleep(b.lateBy)
		_ = b.Backend.Put(context.Background(), key, data)
	})
	return errors.New("test: no answer")
}

// invRig is an Env with an inventory and no volume: chunks put are
// referenced by nothing, so a collection deletes every one it knows of.
type invRig struct {
	t     *testing.T
	repo  *listCounter
	dir   string
	inv   *Inventory
	env   *Env
	n     int // holders so far
	chunk int
}

func newInvRig(t *testing.T) *invRig {
	r := &invRig{t: t, repo: &listCounter{Backend: chunkstore.NewMem()}, dir: t.TempDir()}
	r.open(fmt.Sprint("holder", r.n))
	return r
}

// open opens the inventory as a server whose lease replaced previous's.
func (r *invRig) open(previous string) {
	r.n++
	inv, err := OpenInventory(r.dir, InventoryOptions{Holder: fmt.Sprint("holder", r.n), Previous: previous, Margin: 100 * time.Millisecond})
	require.NoError(r.t, err)
	store, err := chunkstore.NewStore(r.repo, chunkstore.Options{Written: inv.Written})
	require.NoError(r.t, err)
	r.inv, r.env = inv, &Env{Repo: r.repo, Store: store, StateDir: r.dir, Inventory: inv}
}

// restart stops cleanly and starts again, with nobody in between.
func (r *invRig) restart() {
	require.NoError(r.t, r.inv.Close())
	r.open(fmt.Sprint("holder", r.n))
}

func (r *invRig) put(n int) {
	for range n {
		r.chunk++
		_, _ = r.env.Store.Put(context.Background(), []byte(fmt.Sprint("chunk ", r.chunk)))
	}
}

// collect runs a collection and checks that it deleted want chunks and
// listed the repository or not.
func (r *invRig) collect(what string, listing bool, want int) {
	r.t.Helper()
	before := r.repo.lists.Load()
	rep, err := CollectGarbage(context.Background(), r.env, GCOptions{Hold: time.Millisecond})
	require.NoError(r.t, err, what)
	assert.Equal(r.t, listing, rep.Listing, "%s: listed", what)
	assert.Equal(r.t, listing, r.repo.lists.Load() > before, "%s: LIST requests", what)
	assert.Equal(r.t, want, rep.Deleted, "%s: deleted", what)
	left := 0
	require.NoError(r.t, r.repo.Backend.List(context.Background(), "chunks/", func(string) error { left++; return nil }))
	assert.Zero(r.t, left, "%s: every chunk is referenced by nothing, and collected", what)
}

// TestInventory: a collection lists the repository's chunks only when
// its inventory may miss one, and then every chunk nothing references
// is deleted, whatever happened since the last run.
func TestInventory(t *testing.T) {
	r := newInvRig(t)
	r.put(3)
	r.collect("the first run", true, 3)
	r.put(2)
	r.collect("a run with the inventory", false, 2)
	r.collect("a run with nothing new", false, 0)
	r.collect("another run with nothing new", false, 0)
	des, err := os.ReadDir(filepath.Join(r.dir, invDirName))
	require.NoError(t, err)
	assert.Len(t, des, 2, "the inventory and the open record file, no more: %v", des)

	r.put(1)
	r.restart()
	r.put(1)
	r.collect("after a clean restart", false, 2)

	// Another server held the repository between two of this one's
	// starts, and put a chunk this folder never heard of.
	require.NoError(t, r.inv.Close())
	other, err := chunkstore.NewStore(r.repo, chunkstore.Options{})
	require.NoError(t, err)
	_, err = other.Put(t.Context(), []byte("the other server's"))
	require.NoError(t, err)
	r.open("another server")
	r.collect("after another server", true, 1)

	// A crash: the record of a chunk put just before is lost.
	r.put(1)
	r.inv.crash()
	r.open(fmt.Sprint("holder", r.n))
	r.collect("after a crash", true, 1)
	r.collect("after a crash, the second run", false, 0)

	// The inventory damaged on the state disk: the run says so, and the
	// next one lists.
	r.put(1)
	r.collect("before damage", false, 1)
	path := filepath.Join(r.dir, invDirName, invName)
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	data[len(data)-1] ^= 1
	require.NoError(t, os.WriteFile(path, data, 0o600))
	_, err = CollectGarbage(t.Context(), r.env, GCOptions{Hold: time.Millisecond})
	require.ErrorContains(t, err, "the next collection lists")
	r.put(1)
	r.collect("after damage", true, 1)
}

// TestInventoryLatePut: a PUT that failed lands after a collection
// deleted its chunk as unreferenced (and so dropped it from the
// inventory). It must be recorded again, or it is never collected.
func TestInventoryLatePut(t *testing.T) {
	r := newInvRig(t)
	r.collect("the first run", true, 0)
	r.repo.lateBy = 50 * time.Millisecond
	r.put(1) // fails; the object lands 50 ms later
	rep, err := CollectGarbage(t.Context(), r.env, GCOptions{Hold: time.Millisecond})
	require.NoError(t, err)
	assert.Equal(t, 1, rep.Deleted, "the chunk is deleted before it lands")
	r.repo.late.Wait()
	r.repo.lateBy = 0
	time.Sleep(200 * time.Millisecond) // the Margin after the failure
	r.collect("after the late PUT landed", false, 1)
}

// firstDeleteHeld holds the first DeleteMany until release is closed,
// and says which keys it holds.
type firstDeleteHeld struct {
	chunkstore.Backend
	once    sync.Once
	held    chan []string
	release chan struct{}
}

func (b *firstDeleteHeld) DeleteMany(ctx context.Context, keys []string) error {
	first := false
	b.once.Do(func() { first = true })
	if first {
		b.held <- keys
		<-b.release
	}
	return b.Backend.DeleteMany(ctx, keys)
}

// TestInventoryKeepsTouched: chunks a collection chose to delete but
// that a seal found present meanwhile (dedup) are kept, and stay in the
// inventory, so a later run deletes them once nothing uses them.
// Without recording the kept IDs again they are never collected.
func TestInventoryKeepsTouched(t *testing.T) {
	defer func(n int) { gcBatch = n }(gcBatch)
	gcBatch = 1 // one chunk per delete request
	mem := chunkstore.NewMem()
	b := &firstDeleteHeld{Backend: mem, held: make(chan []string), release: make(chan struct{})}
	inv, err := OpenInventory(t.TempDir(), InventoryOptions{Holder: "h", Margin: time.Millisecond})
	require.NoError(t, err)
	store, err := chunkstore.NewStore(b, chunkstore.Options{Written: inv.Written})
	require.NoError(t, err)
	env := &Env{Repo: b, Store: store, StateDir: t.TempDir(), Inventory: inv}
	contents := [][]byte{[]byte("one"), []byte("two"), []byte("three")}
	for _, c := range contents {
		_, err := store.Put(t.Context(), c)
		require.NoError(t, err)
	}
	done := make(chan GCReport, 1)
	go func() {
		rep, err := CollectGarbage(context.Background(), env, GCOptions{Hold: time.Millisecond})
		assert.NoError(t, err)
		done <- rep
	}()
	held := <-b.held
	for _, c := range contents { // all but the one being deleted, found present
		if chunkstore.Key(store.Sum(c)) != held[0] {
			_, err := store.Put(t.Context(), c)
			require.NoError(t, err)
		}
	}
	close(b.release)
	rep := <-done
	assert.Equal(t, 1, rep.Deleted, "the chunks put again are kept")

	rep, err = CollectGarbage(t.Context(), env, GCOptions{Hold: time.Millisecond})
	require.NoError(t, err)
	assert.False(t, rep.Listing)
	assert.Equal(t, 2, rep.Deleted, "the kept chunks are collected once nothing uses them")
	left := 0
	require.NoError(t, mem.List(t.Context(), "chunks/", func(string) error { left++; return nil }))
	assert.Zero(t, left, "no chunk is left")
}
