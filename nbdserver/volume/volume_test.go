package volume

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
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

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/nbdserver/retention"
)

// model is the reference a volume is checked against: the head's bytes and
// each snapshot's.
type model struct {
	head  []byte
	snaps map[string][]byte
}

type rig struct {
	t        *testing.T
	repo     chunkstore.Backend
	store    *chunkstore.Store
	stateDir string
	v        *Volume
	m        model
	r        *rand.Rand
	// now is the volumes' clock; retention their JournalRetention.
	now       time.Time
	retention time.Duration
	// cuts are the newest points in time made, with what they hold.
	cuts []cutModel
	// frameBits are the store's Options.FrameBits, one per reopen in
	// turn (none: the default).
	frameBits []int
	reopens   int
	// gcMu is held shared by a collection running beside the steps
	// (runModel), exclusively while the volume is reopened: the
	// collector and the volume share one Env, as in a server.
	gcMu sync.RWMutex
	// inv is the chunk inventory, reopened when the volume is: cleanly
	// (trusted) or after a crash (not), as a server's.
	inv     atomic.Pointer[Inventory]
	holders int
	// hold is the state folder's lease holders: each reopen is a new
	// one, as a server's start (forks must never be seen here).
	hold *Holders
}

// cutModel is a point in time and the bytes it holds.
type cutModel struct {
	id   string
	at   time.Time
	data []byte
}

// maxCutModels is how many points the model keeps: each is a copy of the
// volume.
const maxCutModels = 12

func newRig(t *testing.T, repo chunkstore.Backend, size, chunkSize int64, seed uint64) *rig {
	g := &rig{t: t, repo: repo, stateDir: t.TempDir(), now: time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC),
		m: model{head: make([]byte, size), snaps: map[string][]byte{}}, r: rand.New(rand.NewPCG(seed, 7))}
	g.openInventory()
	var err error
	g.store, err = chunkstore.NewStore(repo, chunkstore.Options{CacheBytes: 8 << 20, Written: g.written, Keys: keysOf(repo)})
	require.NoError(t, err)
	g.v, err = Create(context.Background(), g.env(), Config{Name: "vol", Size: size, ChunkSize: chunkSize})
	require.NoError(t, err)
	t.Cleanup(func() { g.v.Close() })
	return g
}

func (g *rig) env() *Env {
	return &Env{Repo: g.repo, Store: g.store, StateDir: g.stateDir, JournalRetention: g.retention, clock: func() time.Time { return g.now },
		Inventory: g.inv.Load(), Keys: keysOf(g.repo), Writer: fmt.Sprint("holder", g.holders), Holders: g.hold}
}

// openInventory opens the chunk inventory, as a server does at start
// with a new lease that replaced the last one's record.
func (g *rig) openInventory() {
	g.holders++
	if g.hold == nil {
		var err error
		g.hold, err = OpenHolders(g.stateDir)
		require.NoError(g.t, err)
	}
	require.NoError(g.t, g.hold.Add(fmt.Sprint("holder", g.holders)))
	inv, err := OpenInventory(g.stateDir, InventoryOptions{Holder: fmt.Sprint("holder", g.holders), Previous: fmt.Sprint("holder", g.holders-1)})
	require.NoError(g.t, err)
	g.inv.Store(inv)
}

// written records a chunk in the inventory of the moment
// (chunkstore.Options.Written).
func (g *rig) written(id chunkstore.ID, size int64, failed bool) {
	g.inv.Load().Written(id, size, failed)
}

// lastMark is the ID of the newest mark, which must not be sealed yet.
func (g *rig) lastMark() string { return g.v.layers[len(g.v.layers)-2].mark.ID }

// deleted notes that snapshot id was deleted: it is no longer a point in
// time, unless it was the base (a checkpoint then takes its place).
func (g *rig) deleted(id string) {
	if g.v.cutIDs[id] == nil {
		g.cuts = slices.DeleteFunc(g.cuts, func(c cutModel) bool { return c.id == id })
	}
}

// writeRandom writes n random bytes at a random offset, to the volume and
// the model.
func (g *rig) writeRandom(n int64) {
	p := randomBytes(int(n))
	off := g.r.Int64N(int64(len(g.m.head)) - n)
	require.NoError(g.t, g.v.WriteAt(context.Background(), p, off, false))
	copy(g.m.head[off:], p)
}

// checkpointNow closes the open layer, which must hold writes, notes the
// point in the model, and seals it.
func (g *rig) checkpointNow() {
	ctx := context.Background()
	made, err := g.v.Checkpoint(ctx)
	require.NoError(g.t, err)
	require.True(g.t, made)
	g.cut(g.lastMark())
	require.NoError(g.t, g.v.SealAll(ctx))
}

// tick moves the clock on by d.
func (g *rig) tick(d time.Duration) { g.now = g.now.Add(d) }

// cut notes that a checkpoint or snapshot was just made: a point in time
// at the clock's time holds the head as it is.
func (g *rig) cut(id string) {
	if n := len(g.cuts); n > 0 && g.cuts[n-1].at.Equal(g.now) {
		g.cuts = g.cuts[:n-1]
	}
	g.cuts = append(g.cuts, cutModel{id: id, at: g.now, data: bytes.Clone(g.m.head)})
	if len(g.cuts) > maxCutModels {
		g.cuts = g.cuts[1:]
	}
}

// checkPoints reads the volume at a few times and compares with the
// model: every time from the oldest point kept (and the model knows) to
// now reads as the newest point made at or before it, and times outside
// the window are refused.
func (g *rig) checkPoints(what string) {
	ctx := context.Background()
	if g.v.env.journalRetention() == 0 {
		_, err := g.v.Find(ctx, g.now.Format(time.RFC3339Nano))
		require.ErrorIs(g.t, err, ErrNoPointInTime, "%s: no points in time kept", what)
		return
	}
	if len(g.cuts) == 0 {
		return
	}
	from := g.v.PointsInTime()
	require.False(g.t, from.IsZero(), "%s: points in time are kept", what)
	require.False(g.t, from.After(g.cuts[len(g.cuts)-1].at), "%s: the newest point made is kept", what)
	_, err := g.v.Find(ctx, g.now.Add(time.Second).Format(time.RFC3339Nano))
	require.ErrorIs(g.t, err, ErrNoPointInTime, "%s: a time in the future", what)
	_, err = g.v.Find(ctx, from.Add(-time.Millisecond).Format(time.RFC3339Nano))
	require.ErrorIs(g.t, err, ErrNoPointInTime, "%s: a time before the oldest point kept", what)
	lo := g.cuts[0].at
	if from.After(lo) {
		lo = from
	}
	// An observer: the reads here do not hold points past the window.
	defer func() {
		for _, c := range g.v.checkpoints {
			c.lastRead.Store(0)
		}
	}()
	r := rand.New(rand.NewPCG(uint64(g.now.UnixNano()), 3)) // not g.r: the ops stay as they were
	for range 3 {
		at := lo.Add(time.Duration(r.Int64N(int64(g.now.Sub(lo)) + 1)))
		i := len(g.cuts) - 1
		for i > 0 && g.cuts[i].at.After(at) {
			i--
		}
		want := g.cuts[i]
		si, err := g.v.Find(ctx, at.Format(time.RFC3339Nano))
		require.NoError(g.t, err, "%s: at %s", what, at)
		require.Equal(g.t, want.at, si.Time.UTC(), "%s: at %s, the newest point made at or before it", what, at)
		got := make([]byte, len(want.data))
		require.Equal(g.t, int64(len(want.data)), si.Size, "%s: size at %s", what, at)
		require.NoError(g.t, g.v.ReadSnapshotAt(ctx, si.ID, got, 0), "%s: read at %s (%s)", what, at, si.ID)
		require.True(g.t, bytes.Equal(want.data, got), "%s: at %s (%s, made %s) differs at %d", what, at, si.ID, want.at, firstDiff(want.data, got))
	}
}

func (g *rig) reopen() {
	g.gcMu.Lock()
	defer g.gcMu.Unlock()
	require.NoError(g.t, g.v.Close())
	if len(g.frameBits) > 0 {
		// A new store (an empty cache) that writes chunks framed or
		// whole, in turn: the volume reads both.
		var err error
		g.store, err = chunkstore.NewStore(g.repo, chunkstore.Options{CacheBytes: 8 << 20, FrameBits: g.frameBits[g.reopens%len(g.frameBits)], Keys: keysOf(g.repo),
			Written: g.written})
		require.NoError(g.t, err)
	}
	require.NoError(g.t, g.inv.Load().Close())
	g.openInventory()
	g.reopens++
	v, err := Open(context.Background(), g.env(), "vol")
	require.NoError(g.t, err)
	g.v = v
}

// check reads the head (and, with snaps, every snapshot) back, whole and
// in random pieces, and compares them with the model.
func (g *rig) check(what string, snaps bool) {
	ctx := context.Background()
	got := make([]byte, len(g.m.head))
	require.NoError(g.t, g.v.ReadAt(ctx, got, 0))
	require.True(g.t, bytes.Equal(g.m.head, got), "%s: head differs at %d", what, firstDiff(g.m.head, got))
	for id, want := range g.m.snaps {
		if !snaps {
			break
		}
		got := make([]byte, len(want))
		require.NoError(g.t, g.v.ReadSnapshotAt(ctx, id, got, 0))
		require.True(g.t, bytes.Equal(want, got), "%s: snapshot %s differs at %d", what, id, firstDiff(want, got))
		require.ErrorIs(g.t, g.v.ReadSnapshotAt(ctx, id, got[:1], int64(len(want))), ErrOutOfRange, "%s: snapshot %s reads past its size", what, id)
	}
	off := g.r.Int64N(int64(len(got)))
	n := 1 + g.r.Int64N(int64(len(got))-off)
	part := make([]byte, n)
	require.NoError(g.t, g.v.ReadAt(ctx, part, off))
	require.True(g.t, bytes.Equal(g.m.head[off:off+n], part), "%s: head %d+%d", what, off, n)
	// Small reads, which a framed chunk answers from its frames.
	for range 4 {
		n := 1 + g.r.Int64N(min(20<<10, int64(len(got))))
		off := g.r.Int64N(int64(len(got)) - n + 1)
		small := make([]byte, n)
		require.NoError(g.t, g.v.ReadAt(ctx, small, off))
		require.True(g.t, bytes.Equal(g.m.head[off:off+n], small), "%s: head %d+%d", what, off, n)
	}
	// Extents: whatever is a hole reads as zeros.
	exts, err := g.v.Extents(ctx, "", 0, int64(len(got)))
	require.NoError(g.t, err)
	pos := int64(0)
	for _, e := range exts {
		if e.Zero {
			require.True(g.t, allZeros(g.m.head[pos:pos+e.Length]), "%s: a hole at %d+%d holds data", what, pos, e.Length)
		}
		pos += e.Length
	}
	require.Equal(g.t, int64(len(got)), pos, "extents cover the volume")
}

func allZeros(p []byte) bool { return bytes.Count(p, []byte{0}) == len(p) }

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// step does one random operation.
func (g *rig) step() string {
	ctx := context.Background()
	size := int64(len(g.m.head))
	cs := g.v.cfg.ChunkSize
	g.tick(time.Second)
	switch op := g.r.IntN(100); {
	case op < 45: // write: small, chunk-sized, or spanning chunks
		off := g.r.Int64N(size)
		n := 1 + g.r.Int64N(min(size-off, []int64{4096, cs, 3 * cs}[g.r.IntN(3)]))
		p := make([]byte, n)
		if g.r.IntN(4) == 0 && size >= cs {
			// A whole chunk of one of three contents: chunks, and index
			// pages, that a deleted snapshot left are put again (dedup).
			off = g.r.Int64N(size/cs) * cs
			p, n = poolChunk(g.r.IntN(3), cs), cs
		} else if g.r.IntN(4) == 0 {
			copy(p, bytes.Repeat([]byte("same data "), int(n/10)+1)) // dedupable
		} else {
			for i := range p {
				p[i] = byte(g.r.Uint32())
			}
		}
		require.NoError(g.t, g.v.WriteAt(ctx, p, off, g.r.IntN(5) == 0))
		copy(g.m.head[off:], p)
		return fmt.Sprintf("write %d+%d", off, n)
	case op < 55: // zero, sometimes huge
		off := g.r.Int64N(size)
		n := 1 + g.r.Int64N(size-off)
		require.NoError(g.t, g.v.Zero(ctx, off, n))
		clear(g.m.head[off : off+n])
		return fmt.Sprintf("zero %d+%d", off, n)
	case op < 62:
		require.NoError(g.t, g.v.Flush(ctx))
		return "flush"
	case op < 70:
		label := ""
		if g.r.IntN(2) == 0 {
			label = fmt.Sprintf("label-%d", g.r.Uint32())
		}
		s, err := g.v.Snapshot(ctx, label)
		require.NoError(g.t, err)
		g.m.snaps[s.ID] = bytes.Clone(g.m.head)
		g.cut(s.ID)
		if label != "" {
			g.m.snaps[label] = g.m.snaps[s.ID]
		}
		return "snapshot " + s.ID
	case op < 76:
		made, err := g.v.Checkpoint(ctx)
		require.NoError(g.t, err)
		if made {
			g.cut(g.lastMark())
		}
		return "checkpoint"
	case op < 88:
		_, err := g.v.SealNext(ctx)
		require.NoError(g.t, err)
		return "seal"
	case op < 90:
		g.reopen()
		return "reopen"
	case op < 91: // prune
		policy := retention.Policy{Last: 1 + g.r.IntN(3)}
		ds, err := g.v.Prune(ctx, policy, PruneOptions{})
		require.NoError(g.t, err)
		for _, d := range ds {
			if !d.Keep {
				g.deleted(d.ID)
				delete(g.m.snaps, d.ID)
				delete(g.m.snaps, d.Label)
			}
		}
		return "prune " + policy.String()
	case op < 93: // delete a sealed snapshot
		for _, s := range g.v.Snapshots() {
			if s.Sealed && s.Damaged == nil {
				require.NoError(g.t, g.v.DeleteSnapshot(ctx, s.ID))
				g.deleted(s.ID)
				delete(g.m.snaps, s.ID)
				delete(g.m.snaps, s.Label)
				return "delete snapshot " + s.ID
			}
		}
		return "no snapshot to delete"
	case op < 96: // grow by a few chunks and an odd number of bytes
		n := g.r.Int64N(3*cs) + 1
		require.NoError(g.t, g.v.Grow(ctx, size+n))
		g.m.head = append(g.m.head, make([]byte, n)...)
		return fmt.Sprintf("grow %d+%d", size, n)
	default:
		// A crash: the process dies without Close. Everything written is
		// in the page cache, so all of it comes back.
		g.gcMu.Lock()
		defer g.gcMu.Unlock()
		g.inv.Load().crash()
		g.openInventory()
		v, err := Open(ctx, g.env(), "vol")
		require.NoError(g.t, err)
		g.v.log.Close()
		g.v = v
		return "crash"
	}
}

// checkPacks lets every checkpoint but the newest leave the retention
// window, sweeps the volume's journal packs and checks that every pack
// left in the repository is one a manifest names.
func (g *rig) checkPacks() {
	ctx := context.Background()
	v := g.v
	v.sealMu.Lock()
	defer v.sealMu.Unlock()
	g.tick(v.env.journalRetention() + pinFor + time.Second)
	for v.expireCheckpoints(ctx, v.base) {
	}
	v.sweepDue = true
	v.sweepPacks(ctx)
	named := map[string]bool{}
	for _, m := range append([]Manifest{v.base}, g.snapManifests()...) {
		for _, d := range m.Deltas {
			top, err := v.loadTop(ctx, d)
			require.NoError(g.t, err)
			for _, p := range top.packs {
				named[p] = true
			}
		}
	}
	var left []string
	require.NoError(g.t, g.repo.List(ctx, journalPrefix("vol"), func(k string) error {
		if !named[k] {
			left = append(left, k)
		}
		return nil
	}))
	require.Empty(g.t, left, "journal packs no manifest names")
	g.checkNamedPacksExist()
}

// checkNamedPacksExist reads every manifest of the volume in the
// repository (snapshots, and checkpoints kept as points in time) and
// checks that every journal pack their deltas name is there: what a
// sweep must never break.
func (g *rig) checkNamedPacksExist() {
	ctx := context.Background()
	have := map[string]bool{}
	require.NoError(g.t, g.repo.List(ctx, journalPrefix("vol"), func(k string) error { have[k] = true; return nil }))
	for _, kind := range []Kind{KindSnapshot, KindCheckpoint} {
		ms, bad, err := listManifests(ctx, g.repo, "", "vol", kind, g.v.cfg.ChunkSize)
		require.NoError(g.t, err)
		require.Empty(g.t, bad)
		for _, m := range ms {
			for _, d := range m.Deltas {
				require.True(g.t, have[d.Pack], "%s %s names delta pack %s, which is gone", kind, m.ID, d.Pack)
				top, err := g.v.loadTop(ctx, d)
				require.NoError(g.t, err)
				for _, p := range top.packs {
					require.True(g.t, have[p], "%s %s names pack %s, which is gone", kind, m.ID, p)
				}
			}
		}
	}
}

func (g *rig) snapManifests() []Manifest {
	var out []Manifest
	for _, s := range g.v.snaps {
		if s.sealed {
			out = append(out, s.Manifest)
		}
	}
	return out
}

func runModel(t *testing.T, repo func(t *testing.T) chunkstore.Backend, seeds int) {
	for seed := range uint64(seeds) {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			cs := int64(MinChunkSize)
			size := 16*cs + int64(seed)*777 // not a whole number of chunks
			g := newRig(t, repo(t), size, cs, seed)
			g.retention = []time.Duration{0, 20 * time.Second, -1}[seed%3]
			// Chunks of 64 KiB are one frame of the default size: frames
			// of 16 KiB, and whole objects, mixed in one volume.
			g.frameBits = [][]int{nil, {14}, {-1, 14}}[(seed/2)%3]
			g.reopen()
			stopGC := g.collectBeside()
			var ops []string
			for i := range 120 {
				ops = append(ops, g.step())
				if len(ops) > 8 {
					ops = ops[1:]
				}
				g.check(fmt.Sprintf("seed %d after %v", seed, ops), i%10 == 9)
				if i%10 == 9 {
					g.checkPoints(fmt.Sprintf("seed %d after %v", seed, ops))
					g.checkNamedPacksExist()
				}
			}
			runs, deleted := stopGC()
			require.NoError(t, g.v.SealAll(context.Background()))
			g.check("after sealing everything", true)
			g.checkSealed()
			for _, s := range g.v.Snapshots() {
				assert.True(t, s.Sealed, "snapshot %s sealed", s.ID)
			}
			g.checkPacks()
			g.checkGC(runs, deleted)
		})
	}
}

// poolChunk is one of a few fixed contents of a chunk.
func poolChunk(i int, cs int64) []byte {
	r := rand.New(rand.NewPCG(uint64(i), 99))
	p := make([]byte, cs)
	for j := range p {
		p[j] = byte(r.Uint32())
	}
	return p
}

// collectBeside runs garbage collections one after another beside the
// steps, until the returned stop, which says how many ran and how many
// chunks they deleted.
func (g *rig) collectBeside() (stop func() (runs, deleted int)) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	var runs, deleted int
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			g.gcMu.RLock()
			env := g.v.env
			rep, err := CollectGarbage(ctx, env, GCOptions{Hold: time.Millisecond})
			g.gcMu.RUnlock()
			if err != nil && ctx.Err() == nil {
				g.t.Errorf("garbage collection beside the steps: %v", err)
				return
			}
			runs++
			deleted += rep.Deleted
			time.Sleep(time.Millisecond)
		}
	}()
	return func() (int, int) {
		cancel()
		<-done
		return runs, deleted
	}
}

// checkGC runs a last collection with the volume at rest: afterwards
// every chunk object in the repository is one a manifest references,
// and every snapshot and the head read as the model has them.
func (g *rig) checkGC(runs, deleted int) {
	ctx := context.Background()
	rep, err := CollectGarbage(ctx, g.v.env, GCOptions{Hold: time.Millisecond})
	require.NoError(g.t, err)
	deleted += rep.Deleted
	g.t.Logf("%d collections beside the steps, then one at rest: %d chunks deleted in all; %d referenced", runs+1, deleted, rep.Referenced)
	assert.Positive(g.t, deleted, "the collections deleted something (the model makes garbage)")
	g.check("after a last collection", true)
	rep, err = CollectGarbage(ctx, g.v.env, GCOptions{DryRun: true, List: true})
	require.NoError(g.t, err)
	assert.True(g.t, rep.Listing)
	assert.Zero(g.t, rep.Unreferenced, "after a collection at rest, every chunk in the repository is referenced")
	assert.Equal(g.t, rep.Listed, rep.Referenced, "every chunk referenced is in the repository")
	g.checkSpace(rep.Space, "from a listing")
	rep, err = CollectGarbage(ctx, g.v.env, GCOptions{DryRun: true})
	require.NoError(g.t, err)
	assert.False(g.t, rep.Listing, "the inventory is trusted after a run")
	assert.Equal(g.t, rep.Listed, rep.Referenced, "the inventory names exactly the chunks referenced")
	g.checkSpace(rep.Space, "from the inventory")
	g.reopen()
	g.check("after a last collection and a restart", true)
}

// checkSpace checks a collection's space count with the volume at rest
// and nothing unreferenced left: the repository's stored bytes are every
// object's under chunks/ and every journal pack's, and each snapshot's
// LREFER is at least its bytes that are not zero and at most its size.
func (g *rig) checkSpace(s *Space, what string) {
	ctx := context.Background()
	require.NotNil(g.t, s, what)
	var chunks, packs int64
	require.NoError(g.t, g.repo.ListSizes(ctx, "chunks/", func(_ string, n int64) error { chunks += n; return nil }))
	require.NoError(g.t, g.repo.ListSizes(ctx, journalPrefix("vol"), func(_ string, n int64) error { packs += n; return nil }))
	r := s.Repository
	assert.Equal(g.t, chunks, r.DataStored+r.PageStored, "%s: the chunks and pages stored are every object under chunks/", what)
	assert.Equal(g.t, packs, r.Journal, "%s: the journal is every pack", what)
	assert.Equal(g.t, chunks+packs, r.Stored, what)
	var used int64
	for k, m := range s.Manifests {
		used += m.Used
		if data, ok := g.m.snaps[strings.TrimPrefix(k, manifestPrefix("vol", KindSnapshot))]; ok {
			nonzero := int64(len(data) - bytes.Count(data, []byte{0}))
			assert.LessOrEqual(g.t, nonzero, m.LogicalReferenced, "%s: LREFER of %s holds its data", what, k)
			assert.LessOrEqual(g.t, m.LogicalReferenced, int64(len(data)), "%s: LREFER of %s is at most its size", what, k)
		}
	}
	assert.LessOrEqual(g.t, used, r.Stored-r.Journal-r.Shared, "%s: USED of each manifest is stored by it alone", what)
	assert.Zero(g.t, r.Shared, "%s: one volume shares nothing with others", what)
	assert.Equal(g.t, r, s.Volumes["vol"], "%s: one volume: its figures are the repository's", what)
}

func TestVolumeModelMem(t *testing.T) {
	runModel(t, func(*testing.T) chunkstore.Backend { return chunkstore.NewMem() }, 6)
}

// keysOf returns the keys of an encrypted repository's backend (nil for
// a plain one): its store seals with them too.
func keysOf(repo chunkstore.Backend) *chunkstore.Keys {
	if s, ok := repo.(*chunkstore.Sealed); ok {
		return s.Keys()
	}
	return nil
}

// checkSealed checks that every object of an encrypted repository is
// sealed as its kind should be (review M2: nothing else would notice a
// kind of object going out in plaintext).
func (g *rig) checkSealed() {
	sb, ok := g.repo.(*chunkstore.Sealed)
	if !ok {
		return
	}
	raw := sb.Unwrap()
	ctx := context.Background()
	n := 0
	require.NoError(g.t, raw.List(ctx, "", func(k string) error {
		obj, err := raw.Get(ctx, k)
		if errors.Is(err, chunkstore.ErrNotFound) {
			return nil
		}
		require.NoError(g.t, err)
		n++
		assert.True(g.t, chunkstore.SealedAsItShould(k, obj), "%s is not sealed as it should be: % x", k, obj[:min(len(obj), 8)])
		return nil
	}))
	assert.NotZero(g.t, n)
}

// encrypted returns repo as an encrypted repository's backend.
func encrypted(t *testing.T, repo chunkstore.Backend) chunkstore.Backend {
	master, keyset := chunkstore.NewMasterKey()
	keys, err := chunkstore.NewKeys(master, keyset)
	require.NoError(t, err)
	return chunkstore.NewSealed(repo, keys)
}

// TestVolumeModelEncrypted runs the model test on an encrypted
// repository: every object sealed, chunk IDs by MAC.
func TestVolumeModelEncrypted(t *testing.T) {
	runModel(t, func(t *testing.T) chunkstore.Backend { return encrypted(t, chunkstore.NewMem()) }, 3)
}

func TestVolumeModelLocal(t *testing.T) {
	runModel(t, func(t *testing.T) chunkstore.Backend {
		b, err := chunkstore.NewLocal(filepath.Join(t.TempDir(), "repo"))
		require.NoError(t, err)
		return b
	}, 3)
}

// TestVolumeLostStateOpensAtLastSeal deletes the state folder: the volume
// opens at its newest sealed manifest.
func TestVolumeLostStateOpensAtLastSeal(t *testing.T) {
	ctx := context.Background()
	g := newRig(t, chunkstore.NewMem(), 8*MinChunkSize, MinChunkSize, 1)
	data := bytes.Repeat([]byte{7}, 3*MinChunkSize)
	require.NoError(t, g.v.WriteAt(ctx, data, 1000, false))
	_, err := g.v.Checkpoint(ctx)
	require.NoError(t, err)
	require.NoError(t, g.v.SealAll(ctx))
	require.NoError(t, g.v.WriteAt(ctx, []byte("lost"), 0, true)) // never sealed
	require.NoError(t, g.v.Close())
	require.NoError(t, os.RemoveAll(g.stateDir))

	v, err := Open(ctx, g.env(), "vol")
	require.NoError(t, err)
	g.v = v
	got := make([]byte, 8*MinChunkSize)
	require.NoError(t, v.ReadAt(ctx, got, 0))
	want := make([]byte, 8*MinChunkSize)
	copy(want[1000:], data)
	assert.True(t, bytes.Equal(want, got), "the head is the last checkpoint")
	require.NoError(t, v.WriteAt(ctx, []byte("new"), 0, true))
	require.NoError(t, v.Close())
	v, err = Open(ctx, g.env(), "vol")
	require.NoError(t, err)
	g.v = v
	require.NoError(t, v.ReadAt(ctx, got[:3], 0))
	assert.Equal(t, "new", string(got[:3]), "writes after the restart replay: the log continues past the manifest's sequence")
}

func TestVolumeDedupAndZeroChunks(t *testing.T) {
	ctx := context.Background()
	mem := chunkstore.NewMem()
	g := newRig(t, mem, 64*MinChunkSize, MinChunkSize, 1)
	same := randomBytes(8 * MinChunkSize)
	require.NoError(t, g.v.WriteAt(ctx, same, 0, false))
	require.NoError(t, g.v.WriteAt(ctx, same, 32*MinChunkSize, false))
	require.NoError(t, g.v.WriteAt(ctx, make([]byte, 8*MinChunkSize), 16*MinChunkSize, false))
	_, err := g.v.Snapshot(ctx, "one")
	require.NoError(t, err)
	require.NoError(t, g.v.SealAll(ctx))
	// 8 distinct data chunks; the second copy and the zeros cost nothing;
	// plus three index pages.
	assert.Equal(t, 8+3, objects(t, mem))
	exts, err := g.v.Extents(ctx, "one", 0, 64*MinChunkSize)
	require.NoError(t, err)
	assert.Equal(t, []Extent{
		{8 * MinChunkSize, false}, {24 * MinChunkSize, true}, {8 * MinChunkSize, false}, {24 * MinChunkSize, true},
	}, exts)
}

func TestVolumeErrors(t *testing.T) {
	ctx := context.Background()
	g := newRig(t, chunkstore.NewMem(), 4*MinChunkSize, MinChunkSize, 1)
	assert.ErrorIs(t, g.v.WriteAt(ctx, []byte{1}, 4*MinChunkSize, false), ErrOutOfRange)
	assert.ErrorIs(t, g.v.ReadAt(ctx, make([]byte, 2), 4*MinChunkSize-1), ErrOutOfRange)
	assert.ErrorIs(t, g.v.ReadSnapshotAt(ctx, "nope", make([]byte, 1), 0), ErrNoSnapshot)
	_, err := g.v.Snapshot(ctx, "x")
	require.NoError(t, err)
	_, err = g.v.Snapshot(ctx, "x")
	assert.ErrorIs(t, err, ErrLabelTaken)
	_, err = Create(ctx, g.env(), Config{Name: "vol", Size: 1 << 20})
	assert.ErrorIs(t, err, ErrExists)
	_, err = Open(ctx, g.env(), "other")
	assert.ErrorIs(t, err, ErrNoVolume)
	for _, bad := range []Config{
		{Name: "a/b", Size: 1 << 20},
		{Name: "v", Size: 1 << 20, ChunkSize: 3 << 20},
		{Name: "v", Size: 1 << 20, ChunkSize: 32 << 10},
		{Name: "v", Size: 65 << 40},
		{Name: "v", Size: 0},
	} {
		_, err := Create(ctx, g.env(), bad)
		assert.Error(t, err, "%+v", bad)
	}
	v, err := Create(ctx, &Env{Repo: g.repo, Store: g.store, StateDir: t.TempDir()}, Config{Name: "big", Size: MaxSize})
	require.NoError(t, err, "a 64 TiB volume is created at once")
	exts, err := v.Extents(ctx, "", 0, MaxSize)
	require.NoError(t, err)
	assert.Equal(t, []Extent{{MaxSize, true}}, exts)
	require.NoError(t, v.Zero(ctx, 0, MaxSize))
	v.Close()
}

// repoBytes sums the sizes of the chunk objects in a local repository.
func repoBytes(t *testing.T, root string) (n int64, objects int) {
	t.Helper()
	err := filepath.WalkDir(filepath.Join(root, "chunks"), func(_ string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		fi, err := d.Info()
		if err == nil {
			n += fi.Size()
			objects++
		}
		return err
	})
	require.NoError(t, err)
	return n, objects
}

// TestDedupAndCompressionInTheRepository writes the same 64 MiB at two
// offsets (stored once) and 64 MiB of log text (stored compressed), and
// measures what the local repository holds.
func TestDedupAndCompressionInTheRepository(t *testing.T) {
	ctx := context.Background()
	root := filepath.Join(t.TempDir(), "repo")
	repo, err := chunkstore.NewLocal(root)
	require.NoError(t, err)
	store, err := chunkstore.NewStore(repo, chunkstore.Options{})
	require.NoError(t, err)
	env := &Env{Repo: repo, Store: store, StateDir: t.TempDir()}
	v, err := Create(ctx, env, Config{Name: "v", Size: 512 << 20})
	require.NoError(t, err)
	defer v.Close()

	data := randomBytes(64 << 20)
	require.NoError(t, v.WriteAt(ctx, data, 0, false))
	require.NoError(t, v.WriteAt(ctx, data, 256<<20, false))
	_, err = v.Checkpoint(ctx)
	require.NoError(t, err)
	require.NoError(t, v.SealAll(ctx))
	stored, objects := repoBytes(t, root)
	assert.Equal(t, 64+3, objects, "64 chunks stored once, plus a leaf, an inner page and a root")
	assert.Less(t, stored, int64(65<<20), "the second copy costs nothing: %d bytes stored for 128 MiB written", stored)

	var text bytes.Buffer
	for i := 0; text.Len() < 64<<20; i++ {
		fmt.Fprintf(&text, "%09d level=info msg=\"backup streamed\" volume=db bytes=%d\n", i, i*4096%1000003)
	}
	require.NoError(t, v.WriteAt(ctx, text.Bytes()[:64<<20], 128<<20, false))
	_, err = v.Checkpoint(ctx)
	require.NoError(t, err)
	require.NoError(t, v.SealAll(ctx))
	after, _ := repoBytes(t, root)
	assert.Less(t, after-stored, int64(16<<20), "64 MiB of log text takes under a quarter of its size: %d bytes", after-stored)
	t.Logf("random 2 x 64 MiB: %d bytes stored; log text 64 MiB: %d bytes stored", stored, after-stored)

	got := make([]byte, 64<<20)
	require.NoError(t, v.ReadAt(ctx, got, 256<<20))
	assert.True(t, bytes.Equal(data, got))
}

func TestDeleteSnapshot(t *testing.T) {
	ctx := context.Background()
	g := newRig(t, chunkstore.NewMem(), 8*MinChunkSize, MinChunkSize, 1)
	first := randomBytes(MinChunkSize)
	require.NoError(t, g.v.WriteAt(ctx, first, 0, false))
	old, err := g.v.Snapshot(ctx, "old")
	require.NoError(t, err)
	second := randomBytes(MinChunkSize)
	require.NoError(t, g.v.WriteAt(ctx, second, 0, false))
	newest, err := g.v.Snapshot(ctx, "newest")
	require.NoError(t, err)

	assert.ErrorIs(t, g.v.DeleteSnapshot(ctx, "newest"), ErrNotSealed, "an unsealed snapshot is refused")
	require.NoError(t, g.v.SealAll(ctx))
	assert.ErrorIs(t, g.v.DeleteSnapshot(ctx, "nope"), ErrNoSnapshot)

	require.NoError(t, g.v.DeleteSnapshot(ctx, old.ID))
	assert.ErrorIs(t, g.v.ReadSnapshotAt(ctx, "old", make([]byte, 1), 0), ErrNoSnapshot)
	_, err = g.v.Snapshot(ctx, "old")
	require.NoError(t, err, "a deleted snapshot's label is free again")
	require.NoError(t, g.v.SealAll(ctx))

	// Deleting the newest sealed snapshot must not lose the head on restart.
	require.NoError(t, g.v.DeleteSnapshot(ctx, "old"))
	require.NoError(t, g.v.DeleteSnapshot(ctx, newest.ID))
	assert.Empty(t, g.v.Snapshots())
	g.reopen()
	got := make([]byte, MinChunkSize)
	require.NoError(t, g.v.ReadAt(ctx, got, 0))
	assert.Equal(t, second, got, "the head survives deleting every snapshot and a restart")
	assert.Empty(t, g.v.Snapshots(), "deleted snapshots stay deleted after a restart")
	ms, _, err := listManifests(ctx, g.repo, "", "vol", KindSnapshot, g.v.Config().ChunkSize)
	require.NoError(t, err)
	assert.Empty(t, ms)
}

// A seal does not read old chunks that the layer rewrites whole.
func TestSealSkipsChunksRewrittenWhole(t *testing.T) {
	ctx := context.Background()
	mem := chunkstore.NewMem()
	store, err := chunkstore.NewStore(mem, chunkstore.Options{CacheBytes: -1})
	require.NoError(t, err)
	env := &Env{Repo: mem, Store: store, StateDir: t.TempDir()}
	v, err := Create(ctx, env, Config{Name: "v", Size: 16 * MinChunkSize, ChunkSize: MinChunkSize})
	require.NoError(t, err)
	defer v.Close()
	for round := range 2 {
		require.NoError(t, v.WriteAt(ctx, randomBytes(8*MinChunkSize), 0, false))
		require.NoError(t, v.WriteAt(ctx, randomBytes(100), 8*MinChunkSize+10, false)) // one partial chunk
		before := store.Stats().BackendGets
		_, err = v.Checkpoint(ctx)
		require.NoError(t, err)
		require.NoError(t, v.SealAll(ctx))
		gets := store.Stats().BackendGets - before
		if round == 1 {
			// The partial chunk's old content and the index pages on its
			// path (3 lookups) and the update's path (3 pages); none of
			// the 8 whole chunks.
			assert.LessOrEqual(t, gets, int64(3+1+3), "gets in the second seal")
		}
	}
}

// A protected snapshot is not deleted until unprotected, and stays
// protected across a restart; its data reads the same throughout.
func TestProtectSnapshot(t *testing.T) {
	ctx := context.Background()
	g := newRig(t, chunkstore.NewMem(), 4*MinChunkSize, MinChunkSize, 1)
	data := randomBytes(MinChunkSize)
	require.NoError(t, g.v.WriteAt(ctx, data, 0, false))
	s, err := g.v.Snapshot(ctx, "keep")
	require.NoError(t, err)
	_, err = g.v.Protect(ctx, "keep", true)
	require.ErrorIs(t, err, ErrNotSealed)
	require.NoError(t, g.v.SealAll(ctx))
	_, err = g.v.Protect(ctx, "nope", true)
	require.ErrorIs(t, err, ErrNoSnapshot)

	si, err := g.v.Protect(ctx, "keep", true)
	require.NoError(t, err)
	assert.True(t, si.Protected)
	err = g.v.DeleteSnapshot(ctx, s.ID)
	require.ErrorIs(t, err, ErrProtected)
	assert.ErrorContains(t, err, "nbdvault snapshot unprotect vol@"+s.ID)

	g.reopen()
	require.Len(t, g.v.Snapshots(), 1)
	assert.True(t, g.v.Snapshots()[0].Protected, "protected after a restart")
	require.ErrorIs(t, g.v.DeleteSnapshot(ctx, "keep"), ErrProtected)
	got := make([]byte, MinChunkSize)
	require.NoError(t, g.v.ReadSnapshotAt(ctx, "keep", got, 0))
	assert.Equal(t, data, got)

	_, err = g.v.Protect(ctx, s.ID, false)
	require.NoError(t, err)
	g.reopen()
	assert.False(t, g.v.Snapshots()[0].Protected, "unprotected after a restart")
	require.NoError(t, g.v.DeleteSnapshot(ctx, "keep"))
	assert.Empty(t, g.v.Snapshots())
}
