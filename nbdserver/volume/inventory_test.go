package volume

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"lukechampine.com/blake3"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/chunkstore/storetest"
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
	assert.Len(t, des, 3, "the inventory, the open record file and the space count, no more: %v", des)

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

// inventorySizes reads the inventory's records, checking their order.
func inventorySizes(t *testing.T, dir string) map[chunkstore.ID]int64 {
	t.Helper()
	in, err := openRecords(filepath.Join(dir, invDirName, invName), invMagic)
	require.NoError(t, err)
	defer in.close()
	got := map[chunkstore.ID]int64{}
	var last chunkstore.ID
	for {
		rec, ok, err := in.next()
		require.NoError(t, err)
		if !ok {
			return got
		}
		require.Positive(t, rec.id.Compare(last), "the records are sorted, their IDs distinct")
		last = rec.id
		got[rec.id] = int64(rec.size)
	}
}

// repoSizes is what ListSizes says of the chunks.
func repoSizes(t *testing.T, repo chunkstore.Backend) map[chunkstore.ID]int64 {
	t.Helper()
	got := map[chunkstore.ID]int64{}
	require.NoError(t, repo.ListSizes(t.Context(), "chunks/", func(k string, size int64) error {
		id, ok := chunkOfKey(k)
		require.True(t, ok, k)
		got[id] = size
		return nil
	}))
	return got
}

// TestInventorySizes: the inventory holds each chunk object's stored
// size, whether folded from what Store.Put recorded or rebuilt from a
// listing, and a collection passes them on.
func TestInventorySizes(t *testing.T) {
	r := newInvRig(t)
	r.put(3)
	_, err := CollectGarbage(t.Context(), r.env, GCOptions{Hold: time.Millisecond, DryRun: true})
	require.NoError(t, err)
	want := repoSizes(t, r.repo)
	require.Len(t, want, 3)
	assert.Equal(t, want, inventorySizes(t, r.dir), "the first run: rebuilt from a listing")

	// Chunks of other sizes, folded from written.N.
	for _, n := range []int{10, 5000, 200 << 10} {
		_, err := r.env.Store.Put(t.Context(), storetest.RandomBytes(n))
		require.NoError(t, err)
	}
	_, err = CollectGarbage(t.Context(), r.env, GCOptions{Hold: time.Millisecond, DryRun: true})
	require.NoError(t, err)
	want = repoSizes(t, r.repo)
	require.Len(t, want, 6)
	assert.Equal(t, want, inventorySizes(t, r.dir), "folded from written.N")

	// A listing asked for gives the same.
	rep, err := CollectGarbage(t.Context(), r.env, GCOptions{Hold: time.Millisecond, DryRun: true, List: true})
	require.NoError(t, err)
	assert.True(t, rep.Listing)
	assert.Equal(t, want, inventorySizes(t, r.dir), "rebuilt from a listing")

	// rewrite passes each ID with its size.
	seen := map[chunkstore.ID]int64{}
	require.NoError(t, r.inv.rewrite(func(id chunkstore.ID, size int64) (bool, error) {
		seen[id] = size
		return false, nil
	}, true, func() error { return nil }))
	assert.Equal(t, want, seen)
}

// TestInventoryWriteKeepsLargerSize: an ID recorded more than once, in
// the records folded or in the inventory they are merged into, keeps
// its largest size.
func TestInventoryWriteKeepsLargerSize(t *testing.T) {
	inv, err := OpenInventory(t.TempDir(), InventoryOptions{Holder: "h"})
	require.NoError(t, err)
	defer inv.Close()
	id := func(b byte) chunkstore.ID { var id chunkstore.ID; id[0] = b; return id }
	require.NoError(t, inv.write([]chunkRec{{id(3), 30}, {id(1), 10}, {id(3), 31}, {id(2), 20}, {id(1), 9}}, false))
	require.NoError(t, inv.write([]chunkRec{{id(2), 25}, {id(3), 5}, {id(4), 40}, {id(4), 41}}, true))
	seen := map[chunkstore.ID]int64{}
	require.NoError(t, inv.rewrite(func(id chunkstore.ID, size int64) (bool, error) {
		seen[id] = size
		return false, nil
	}, true, func() error { return nil }))
	assert.Equal(t, map[chunkstore.ID]int64{id(1): 10, id(2): 25, id(3): 31, id(4): 41}, seen)
}

// writeOldFormat writes recs as a closed file of the format before
// sizes: magic NBDVINV1 or NBDVWRT1, 32-byte IDs, the same trailer.
func writeOldFormat(t *testing.T, path, magic string, recs []chunkRec) {
	t.Helper()
	body := []byte(magic)
	h := blake3.New(32, nil)
	for _, r := range recs {
		body = append(body, r.id[:]...)
		h.Write(r.id[:])
	}
	body = append(body, endMagic...)
	body = binary.LittleEndian.AppendUint64(body, uint64(len(recs)))
	body = h.Sum(body)
	require.NoError(t, os.WriteFile(path, body, 0o600))
}

// TestInventoryOldFormat: the files of the format before sizes (magics
// NBDVINV1 and NBDVWRT1) are not trusted: the next collection lists the
// chunks and rebuilds the inventory in the new format, and an old
// written.N goes as a damaged one does. The magic alone decides: a file
// of the new format but for an old magic is not trusted either.
func TestInventoryOldFormat(t *testing.T) {
	for _, file := range []string{invName, writtenPrefix} {
		for _, genuine := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/genuine=%v", file, genuine), func(t *testing.T) {
				r := newInvRig(t)
				r.collect("the first run", true, 0)
				r.put(2)
				require.NoError(t, r.inv.Close()) // clean: trusted by the next start, as it is
				seqs, err := r.inv.segments()
				require.NoError(t, err)
				require.Len(t, seqs, 1)
				path, magic := filepath.Join(r.dir, invDirName, invName), "NBDVINV1"
				if file == writtenPrefix {
					path, magic = r.inv.writtenPath(seqs[0]), "NBDVWRT1"
				}
				written, err := readRecords(r.inv.writtenPath(seqs[0]))
				require.NoError(t, err)
				require.Len(t, written, 2)
				if genuine {
					recs := written // an old inventory would have had them folded
					if file == invName {
						slices.SortFunc(recs, compareRecs)
					}
					writeOldFormat(t, path, magic, recs)
				} else {
					data, err := os.ReadFile(path)
					require.NoError(t, err)
					copy(data, magic)
					require.NoError(t, os.WriteFile(path, data, 0o600))
				}

				r.open(fmt.Sprint("holder", r.n))
				assert.False(t, r.inv.Trusted(), "a start does not trust a file of the old format")
				r.collect("with a file of the old format", true, 2)
				des, err := os.ReadDir(filepath.Join(r.dir, invDirName))
				require.NoError(t, err)
				assert.Len(t, des, 3, "the inventory, the open record file and the space count, no more: %v", des)
				assert.NoFileExists(t, r.inv.writtenPath(seqs[0]), "the old written.N is removed")
				data, err := os.ReadFile(filepath.Join(r.dir, invDirName, invName))
				require.NoError(t, err)
				assert.Equal(t, invMagic, data[:headerLen], "the inventory is written in the new format")

				r.put(1)
				r.collect("the next run", false, 1)
			})
		}
	}
}
