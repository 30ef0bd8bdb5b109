package volume

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// readBackFails fails the next Get of a checkpoint manifest once armed:
// the manifest is in the repository, but the seal that wrote it cannot
// read it back and fails.
type readBackFails struct {
	chunkstore.Backend
	armed atomic.Bool
}

func (f *readBackFails) Get(ctx context.Context, key string) ([]byte, error) {
	if strings.Contains(key, "/checkpoints/") && f.armed.CompareAndSwap(true, false) {
		return nil, errors.Join(chunkstore.ErrUnavailable, errors.New("connection reset"))
	}
	return f.Backend.Get(ctx, key)
}

// TestSweepKeepsPacksOfAnUnfinishedSeal: a seal writes its pack and its
// manifest, then fails to read the manifest back. The manifest is in the
// repository and a restart resumes from it, so a sweep run meanwhile (a
// snapshot deletion) must not delete its pack, though no manifest the
// server knows names it. A server that lost its state folder opens at
// that manifest and reads back every write.
func TestSweepKeepsPacksOfAnUnfinishedSeal(t *testing.T) {
	ctx := context.Background()
	repo := &readBackFails{Backend: chunkstore.NewMem()}
	store, err := chunkstore.NewStore(repo, chunkstore.Options{})
	require.NoError(t, err)
	env := &Env{Repo: repo, Store: store, StateDir: t.TempDir()}
	const size = 4 << 20
	v, err := Create(ctx, env, Config{Name: "v", Size: size, ChunkSize: MinChunkSize})
	require.NoError(t, err)
	defer func() { v.Close() }()
	want := make([]byte, size)
	write := func(seed uint64) {
		for i := range 40 {
			off := int64((seed*7919+uint64(i)*104729)%(size/4096)) * 4096
			p := randomBytes(4096)
			require.NoError(t, v.WriteAt(ctx, p, off, false))
			copy(want[off:], p)
		}
	}
	write(1)
	snap, err := v.Snapshot(ctx, "")
	require.NoError(t, err)
	require.NoError(t, v.SealAll(ctx))

	write(2)
	_, err = v.Checkpoint(ctx)
	require.NoError(t, err)
	repo.armed.Store(true)
	_, err = v.SealNext(ctx)
	require.ErrorIs(t, err, chunkstore.ErrUnavailable, "the read-back fails")

	require.NoError(t, v.DeleteSnapshot(ctx, snap.ID)) // sweeps
	require.NoError(t, v.Close())

	// The state folder is lost: the volume opens at the newest manifest,
	// the one whose read-back failed.
	env2 := &Env{Repo: repo, Store: store, StateDir: t.TempDir()}
	v, err = Open(ctx, env2, "v")
	require.NoError(t, err)
	got := make([]byte, size)
	require.NoError(t, v.ReadAt(ctx, got, 0), "the unfinished seal's pack is still there")
	assert.True(t, bytes.Equal(want, got), "every write reads back")
}

// newJournalVolume creates volume "v" of size bytes in 64 KiB chunks in a
// repository in memory; packs counts its journal packs there.
func newJournalVolume(t *testing.T, size int64) (*Env, *Volume, func() int) {
	mem := chunkstore.NewMem()
	store, err := chunkstore.NewStore(mem, chunkstore.Options{})
	require.NoError(t, err)
	// No points in time kept: what the merges leave is dead at once.
	env := &Env{Repo: mem, Store: store, StateDir: t.TempDir(), JournalRetention: -1}
	v, err := Create(context.Background(), env, Config{Name: "v", Size: size, ChunkSize: MinChunkSize})
	require.NoError(t, err)
	packs := func() int {
		n := 0
		require.NoError(t, mem.List(context.Background(), journalPrefix("v"), func(string) error { n++; return nil }))
		return n
	}
	return env, v, packs
}

// TestJournalFoldsHalfChangedChunks: scattered writes stay journal until
// half of a chunk has changed; then a full merge folds the chunk into the
// index, the journal packs nothing names any more are deleted, and the
// volume reads back the same before and after a restart.
func TestJournalFoldsHalfChangedChunks(t *testing.T) {
	const size, cs = 2 << 20, MinChunkSize
	ctx := context.Background()
	env, v, packs := newJournalVolume(t, size)
	defer func() { v.Close() }()
	store := env.Store
	want := make([]byte, size)
	// Round r writes 4 KiB block r of every chunk: after 8 rounds every
	// chunk is half changed.
	maxPacks := 0
	for r := range 12 {
		for c := range int64(size / cs) {
			off := c*cs + int64(r)*4096
			p := randomBytes(4096)
			require.NoError(t, v.WriteAt(ctx, p, off, false))
			copy(want[off:], p)
		}
		_, err := v.Checkpoint(ctx)
		require.NoError(t, err)
		require.NoError(t, v.SealAll(ctx))
		maxPacks = max(maxPacks, packs())
		got := make([]byte, size)
		require.NoError(t, v.ReadAt(ctx, got, 0))
		require.True(t, bytes.Equal(want, got), "round %d", r)
	}
	v.mu.RLock()
	base := v.base
	v.mu.RUnlock()
	folded := 0
	for c := range uint64(size / cs) {
		id, err := lookupIndex(ctx, store, base.Root, c)
		require.NoError(t, err)
		if !id.IsZero() {
			folded++
		}
	}
	assert.Equal(t, size/cs, folded, "every chunk was folded into the index")
	var extents int64
	for _, d := range base.Deltas {
		top, err := v.loadTop(ctx, d)
		require.NoError(t, err)
		extents += top.extents()
	}
	assert.Less(t, extents, int64(4*size/cs), "what is left as journal is less than half of each chunk")
	assert.Less(t, packs(), maxPacks, "packs nothing names are deleted")

	require.NoError(t, v.Close())
	v, err := Open(ctx, env, "v")
	require.NoError(t, err)
	got := make([]byte, size)
	require.NoError(t, v.ReadAt(ctx, got, 0))
	require.True(t, bytes.Equal(want, got), "after a restart")
}

// TestVolumeModelJournal is the model test with the load journal shipping
// is for: small writes scattered over a volume of many chunks, sealed
// often, so chains grow deep, merge partly and fully, and fold; with
// snapshots kept and deleted, zeros, whole-chunk rewrites (which mask
// older deltas), restarts and crashes among them.
func TestVolumeModelJournal(t *testing.T) {
	runJournalModel(t, func(*testing.T) chunkstore.Backend { return chunkstore.NewMem() }, 4, 600)
}

func runJournalModel(t *testing.T, repo func(t *testing.T) chunkstore.Backend, seeds uint64, steps int) {
	for seed := range seeds {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			ctx := context.Background()
			cs := int64(MinChunkSize)
			size := 128*cs + int64(seed)*4097
			g := newRig(t, repo(t), size, cs, seed+100)
			// Points in time: kept for a minute of steps, or the default
			// (all of them).
			g.retention = []time.Duration{time.Minute, 0}[seed%2]
			g.reopen()
			if seed%2 == 1 { // repack often
				defer func(a int, b int64) { repackAbove, repackBelow = a, b }(repackAbove, repackBelow)
				repackAbove, repackBelow = 4, 256<<10
			}
			depth, partial := 0, 0
			for i := range steps {
				g.tick(time.Second)
				switch op := g.r.IntN(100); {
				case op < 70:
					off := g.r.Int64N(size - 4096)
					p := randomBytes(1 + g.r.IntN(8192))
					p = p[:min(int64(len(p)), size-off)]
					require.NoError(t, g.v.WriteAt(ctx, p, off, false))
					copy(g.m.head[off:], p)
				case op < 73: // a whole chunk, or a few
					c := g.r.Int64N(size/cs - 3)
					p := randomBytes(int(cs) * (1 + g.r.IntN(3)))
					require.NoError(t, g.v.WriteAt(ctx, p, c*cs, false))
					copy(g.m.head[c*cs:], p)
				case op < 76:
					off := g.r.Int64N(size)
					n := 1 + g.r.Int64N(min(size-off, 3*cs))
					require.NoError(t, g.v.Zero(ctx, off, n))
					clear(g.m.head[off : off+n])
				case op < 90:
					made, err := g.v.Checkpoint(ctx)
					require.NoError(t, err)
					if made {
						g.cut(g.lastMark())
					}
					before := len(g.v.base.Deltas)
					require.NoError(t, g.v.SealAll(ctx))
					after := len(g.v.base.Deltas)
					depth = max(depth, after)
					if made && after > 1 && after <= before {
						partial++
					}
				case op < 94:
					s, err := g.v.Snapshot(ctx, "")
					require.NoError(t, err)
					g.m.snaps[s.ID] = bytes.Clone(g.m.head)
					g.cut(s.ID)
				case op < 96:
					for _, s := range g.v.Snapshots() {
						if s.Sealed && g.r.IntN(2) == 0 {
							require.NoError(t, g.v.DeleteSnapshot(ctx, s.ID))
							g.deleted(s.ID)
							delete(g.m.snaps, s.ID)
							break
						}
					}
				case op < 98:
					g.reopen()
				default:
					v, err := Open(ctx, g.env(), "vol")
					require.NoError(t, err)
					g.v.log.Close()
					g.v = v
				}
				if i%50 == 49 {
					g.check(fmt.Sprintf("seed %d step %d", seed, i), true)
					g.checkPoints(fmt.Sprintf("seed %d step %d", seed, i))
					g.checkNamedPacksExist()
				}
			}
			require.NoError(t, g.v.SealAll(ctx))
			g.check("after sealing everything", true)
			g.checkPoints("after sealing everything")
			t.Logf("deepest chain %d deltas, %d seals merged part of the chain, %d bytes repacked, %d chunks folded",
				depth, partial, g.v.repacked.Load(), g.v.folded.Load())
			g.reopen()
			g.checkPoints("after a restart")
			g.checkPacks()
			assert.Greater(t, depth, 2, "chains grow")
			assert.Greater(t, partial, 0, "partial merges happen")
		})
	}
}

// TestJournalRepacksSparsePacks: scattered writes that never fold leave a
// little live journal in every pack. Once a merge reads more packs than
// repackAbove, the live extents of sparse ones are copied into its pack
// and the sparse packs are deleted: the packs kept (and a delta's list
// of them) stay bounded, and everything reads back, also after a restart.
func TestJournalRepacksSparsePacks(t *testing.T) {
	defer func(a int, b int64) { repackAbove, repackBelow = a, b }(repackAbove, repackBelow)
	repackAbove, repackBelow = 6, 1<<20
	const size, cs = 8 << 20, MinChunkSize
	ctx := context.Background()
	env, v, packs := newJournalVolume(t, size)
	defer func() { v.Close() }()
	want := make([]byte, size)
	most := 0
	for r := range 80 {
		for i := range 3 { // three 512-byte writes per checkpoint: no chunk gets near half
			off := int64((r*3+i)*7919%(size/cs))*cs + int64(r%100)*512
			p := randomBytes(512)
			require.NoError(t, v.WriteAt(ctx, p, off, false))
			copy(want[off:], p)
		}
		_, err := v.Checkpoint(ctx)
		require.NoError(t, err)
		require.NoError(t, v.SealAll(ctx))
		most = max(most, packs())
	}
	assert.Zero(t, v.folded.Load(), "no chunk was folded: the packs were freed by repacking")
	assert.Positive(t, v.repacked.Load(), "live journal was copied out of sparse packs")
	assert.LessOrEqual(t, most, 4*repackAbove, "packs stay bounded (80 checkpoints made 80 or more)")
	got := make([]byte, size)
	require.NoError(t, v.ReadAt(ctx, got, 0))
	require.True(t, bytes.Equal(want, got))
	require.NoError(t, v.Close())
	v, err := Open(ctx, env, "v")
	require.NoError(t, err)
	require.NoError(t, v.ReadAt(ctx, got, 0))
	require.True(t, bytes.Equal(want, got), "after a restart")
}

// TestDroppedPacksFreedAcrossRestarts: a pack the head stopped naming
// waits for the checkpoints older than that to leave the window. The
// volume keeps when it stopped naming each in its state folder, so a
// server restarted more often than the window still frees them; without
// it every restart would start their wait again, and none would ever go.
func TestDroppedPacksFreedAcrossRestarts(t *testing.T) {
	defer func(a int, b int64) { repackAbove, repackBelow = a, b }(repackAbove, repackBelow)
	repackAbove, repackBelow = 4, 1<<20 // repack, and so drop packs, often
	ctx := context.Background()
	const size = 64 * MinChunkSize
	g := newRig(t, chunkstore.NewMem(), size, MinChunkSize, 5)
	g.retention = 30 * time.Second
	g.reopen()
	unnamed := func() int {
		named := map[string]bool{}
		manifests := append([]Manifest{g.v.base}, g.snapManifests()...)
		for _, c := range g.v.checkpoints {
			m, err := g.v.loadCut(ctx, c.id)
			require.NoError(t, err)
			manifests = append(manifests, *m)
		}
		for _, m := range manifests {
			for _, d := range m.Deltas {
				top, err := g.v.loadTop(ctx, d)
				require.NoError(t, err)
				for _, p := range top.packs {
					named[p] = true
				}
			}
		}
		n := 0
		require.NoError(t, g.repo.List(ctx, journalPrefix("vol"), func(k string) error {
			if !named[k] {
				n++
			}
			return nil
		}))
		return n
	}
	most := 0
	for i := range 60 {
		g.tick(5 * time.Second)
		for range 4 {
			off := g.r.Int64N(size - 512)
			p := randomBytes(512)
			require.NoError(t, g.v.WriteAt(ctx, p, off, false))
			copy(g.m.head[off:], p)
		}
		_, err := g.v.Checkpoint(ctx)
		require.NoError(t, err)
		require.NoError(t, g.v.SealAll(ctx))
		if i%3 == 2 {
			g.reopen() // every 15 s, half the window
		}
		if i > 20 {
			most = max(most, unnamed())
		}
	}
	g.check("after restarts", false)
	t.Logf("at most %d packs no kept manifest names", most)
	// A pack waits for the checkpoints older than its drop: one window
	// (six seals) and one more interval.
	assert.LessOrEqual(t, most, 16, "dropped packs are freed although the server restarts more often than the window")

	// A damaged file is ignored: the packs then wait one window more.
	file := g.v.droppedFile()
	data, err := os.ReadFile(file)
	require.NoError(t, err)
	data[len(data)/3] ^= 1
	require.NoError(t, os.WriteFile(file, data, 0o600))
	g.reopen()
	assert.Empty(t, g.v.dropped)
	g.check("after a damaged list of dropped packs", false)
}

// TestDroppedPoints: a pack named again (the volume resumed from an older
// manifest) loses its drop point, which could be lower than where the new
// history drops it; and a save of the drop points that fails removes the
// file, which could otherwise say a pack was dropped earlier than it now
// is.
func TestDroppedPoints(t *testing.T) {
	ctx := context.Background()
	_, v, _ := newJournalVolume(t, 4*MinChunkSize)
	defer v.Close()
	require.NoError(t, v.WriteAt(ctx, randomBytes(3000), 100, false))
	_, err := v.Checkpoint(ctx)
	require.NoError(t, err)
	require.NoError(t, v.SealAll(ctx))
	require.Len(t, v.base.Deltas, 1)
	named := v.base.Deltas[0].Pack

	v.sealMu.Lock()
	v.dropped[named] = 1 // as if an older history had dropped it
	v.sweepDue = true
	v.sweepPacks(ctx)
	_, kept := v.dropped[named]
	v.sealMu.Unlock()
	assert.False(t, kept, "a pack the base names has no drop point")

	file := v.droppedFile()
	require.NoError(t, os.WriteFile(file, []byte("an older list"), 0o600))
	require.NoError(t, os.Mkdir(file+".tmp", 0o700)) // the next save cannot write its temporary file
	v.sealMu.Lock()
	v.saveDropped()
	v.sealMu.Unlock()
	assert.NoFileExists(t, file, "a failed save leaves no older list behind")
}
