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

func TestGrow(t *testing.T) {
	ctx := context.Background()
	cs := int64(MinChunkSize)
	old := 3*cs + 100 // the last chunk is partial
	g := newRig(t, chunkstore.NewMem(), old, cs, 1)
	tail := bytes.Repeat([]byte{0xAB}, 100)
	require.NoError(t, g.v.WriteAt(ctx, tail, old-100, false))
	// Not sealed: replaying its mark must give it its own size, not the
	// volume's.
	before, err := g.v.Snapshot(ctx, "before")
	require.NoError(t, err)

	assert.ErrorIs(t, g.v.WriteAt(ctx, []byte{1}, old, false), ErrOutOfRange)
	assert.ErrorIs(t, g.v.Grow(ctx, old-1), ErrShrink)
	assert.Error(t, g.v.Grow(ctx, MaxSize+1))
	require.NoError(t, g.v.Grow(ctx, old), "growing to the same size does nothing")

	grown := 5*cs + 7
	require.NoError(t, g.v.Grow(ctx, grown))
	assert.Equal(t, grown, g.v.Size())
	assert.Equal(t, grown, g.v.Config().Size)
	got := make([]byte, grown-old+100)
	require.NoError(t, g.v.ReadAt(ctx, got, old-100))
	assert.Equal(t, tail, got[:100], "the old end keeps its data")
	assert.True(t, allZeros(got[100:]), "what grew reads as zeros")

	require.NoError(t, g.v.WriteAt(ctx, []byte("past the old end"), grown-16, true))
	after, err := g.v.Snapshot(ctx, "")
	require.NoError(t, err)
	assert.Equal(t, old, before.Size)
	assert.Equal(t, grown, after.Size)
	assert.ErrorIs(t, g.v.ReadSnapshotAt(ctx, before.ID, make([]byte, 1), old), ErrOutOfRange,
		"a snapshot keeps the size it was taken at")

	check := func(what string) {
		t.Helper()
		assert.Equal(t, grown, g.v.Size(), what)
		sizes := map[string]int64{}
		for _, s := range g.v.Snapshots() {
			sizes[s.ID] = s.Size
		}
		assert.Equal(t, map[string]int64{before.ID: old, after.ID: grown}, sizes, what)
		p := make([]byte, 16)
		require.NoError(t, g.v.ReadSnapshotAt(ctx, after.ID, p, grown-16), what)
		assert.Equal(t, "past the old end", string(p), what)
	}
	check("before reopening")
	g.reopen() // the unsealed snapshot comes back from the log with its size
	check("after replaying the log")
	require.NoError(t, g.v.SealAll(ctx))
	require.NoError(t, g.v.Close())
	g.stateDir = t.TempDir() // the state folder is lost
	g.v, err = Open(ctx, g.env(), "vol")
	require.NoError(t, err)
	check("from the repository alone")
}

func TestDeleteVolume(t *testing.T) {
	ctx := context.Background()
	repo := chunkstore.NewMem()
	g := newRig(t, repo, 4*MinChunkSize, MinChunkSize, 1)
	require.NoError(t, g.v.WriteAt(ctx, bytes.Repeat([]byte("old data"), 1000), 0, true))
	_, err := g.v.Snapshot(ctx, "s")
	require.NoError(t, err)
	require.NoError(t, g.v.SealAll(ctx))
	require.NoError(t, g.v.WriteAt(ctx, []byte("in the log only"), 0, true))
	require.NoError(t, g.v.Close())

	require.NoError(t, Delete(ctx, g.env(), "vol"))
	_, err = Open(ctx, g.env(), "vol")
	assert.ErrorIs(t, err, ErrNoVolume)
	assert.ErrorIs(t, Delete(ctx, g.env(), "vol"), ErrNoVolume)
	assert.Empty(t, keysUnder(t, repo, "volumes/"), "nothing of the volume is left in the repository")
	_, err = os.Stat(g.env().stateDir("vol"))
	assert.ErrorIs(t, err, os.ErrNotExist, "its write log is gone")
	assert.Error(t, Delete(ctx, g.env(), "../x"), "a name that is not a volume name")

	// A new volume of the same name starts empty: nothing of the old
	// one's log or snapshots comes back.
	g.v, err = Create(ctx, g.env(), Config{Name: "vol", Size: 4 * MinChunkSize, ChunkSize: MinChunkSize})
	require.NoError(t, err)
	assert.Empty(t, g.v.Snapshots())
	p := make([]byte, 8000)
	require.NoError(t, g.v.ReadAt(ctx, p, 0))
	assert.True(t, allZeros(p))
	require.NoError(t, g.v.Close())
}

// A delete cut short leaves the name unusable until it is run again.
func TestDeleteVolumeCutShort(t *testing.T) {
	ctx := context.Background()
	repo := chunkstore.NewMem()
	g := newRig(t, repo, 4*MinChunkSize, MinChunkSize, 1)
	_, err := g.v.Snapshot(ctx, "")
	require.NoError(t, err)
	require.NoError(t, g.v.SealAll(ctx))
	require.NoError(t, g.v.Close())
	env := g.env()

	// Cut after the record went: the snapshot manifests are left.
	require.NoError(t, repo.Delete(ctx, volumeKey("vol")))
	require.NoError(t, os.RemoveAll(env.stateDir("vol")))
	_, err = Create(ctx, env, Config{Name: "vol", Size: MinChunkSize})
	require.ErrorIs(t, err, ErrExists)
	assert.Contains(t, err.Error(), "delete the volume again")
	require.NoError(t, Delete(ctx, env, "vol"))

	// A write log with no volume in the repository.
	require.NoError(t, os.MkdirAll(env.stateDir("vol")+"/log", 0o700))
	_, err = Create(ctx, env, Config{Name: "vol", Size: MinChunkSize})
	require.ErrorIs(t, err, ErrExists)
	assert.Contains(t, err.Error(), env.stateDir("vol"))
	require.NoError(t, Delete(ctx, env, "vol"))

	v, err := Create(ctx, env, Config{Name: "vol", Size: MinChunkSize})
	require.NoError(t, err)
	require.NoError(t, v.Close())
}

func keysUnder(t *testing.T, b chunkstore.Backend, prefix string) []string {
	t.Helper()
	var keys []string
	require.NoError(t, b.List(context.Background(), prefix, func(k string) error {
		keys = append(keys, k)
		return nil
	}))
	return keys
}

// A writer held back by a full log gives up when the volume closes (it
// would otherwise wait for a seal that never comes), and a closed volume
// refuses what would change it.
func TestCloseReleasesWaitingWriters(t *testing.T) {
	ctx := context.Background()
	repo := chunkstore.NewMem()
	store, err := chunkstore.NewStore(repo, chunkstore.Options{})
	require.NoError(t, err)
	env := &Env{Repo: repo, Store: store, StateDir: t.TempDir(), LogLimit: 1 << 20}
	v, err := Create(ctx, env, Config{Name: "v", Size: 16 << 20, ChunkSize: MinChunkSize})
	require.NoError(t, err)
	s, err := v.Snapshot(ctx, "s")
	require.NoError(t, err)
	require.NoError(t, v.SealAll(ctx))
	p := bytes.Repeat([]byte{1}, 1<<20)
	require.NoError(t, v.WriteAt(ctx, p, 0, false)) // the log is full; no uploader runs
	done := make(chan error, 1)
	go func() { done <- v.WriteAt(ctx, p, 1<<20, false) }()
	select {
	case err := <-done:
		t.Fatalf("the write did not wait for room: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	require.NoError(t, v.Close())
	select {
	case err := <-done:
		require.ErrorIs(t, err, ErrVolumeClosed)
	case <-time.After(10 * time.Second):
		t.Fatal("a writer waiting for room outlived Close")
	}
	assert.ErrorIs(t, v.Grow(ctx, 32<<20), ErrVolumeClosed)
	assert.ErrorIs(t, v.DeleteSnapshot(ctx, s.ID), ErrVolumeClosed)
	assert.ErrorIs(t, v.Flush(ctx), ErrVolumeClosed)
	_, err = v.Snapshot(ctx, "")
	assert.ErrorIs(t, err, ErrVolumeClosed)
}

// Checkpoints are points in time for --journal-retention: those older
// than the window leave, but for the newest of them (the window's first
// times need it), and with no retention only the newest stays, as a
// restart needs it.
func TestCheckpointsLeaveWithTheRetentionWindow(t *testing.T) {
	for _, ret := range []time.Duration{25 * time.Second, -1} {
		t.Run(fmt.Sprint("retention ", ret), func(t *testing.T) {
			ctx := context.Background()
			g := newRig(t, chunkstore.NewMem(), 4*MinChunkSize, MinChunkSize, 1)
			g.retention = ret
			g.reopen()
			kept := func() int { return len(keysUnder(t, g.repo, "volumes/vol/checkpoints/")) }
			for i := range 6 {
				g.tick(10 * time.Second)
				p := bytes.Repeat([]byte{byte(i + 1)}, 1000)
				require.NoError(t, g.v.WriteAt(ctx, p, int64(i)*5000, false))
				copy(g.m.head[i*5000:], p)
				made, err := g.v.Checkpoint(ctx)
				require.NoError(t, err)
				require.True(t, made)
				g.cut(g.lastMark())
				require.NoError(t, g.v.SealAll(ctx))
				if ret > 0 {
					// Three in the window, and the one before it.
					assert.Equal(t, min(i+1, 4), kept(), "after checkpoint %d", i)
				} else {
					assert.Equal(t, 1, kept(), "after checkpoint %d", i)
				}
				g.checkPoints(fmt.Sprint("after checkpoint ", i))
			}
			g.tick(time.Hour)
			s, err := g.v.Snapshot(ctx, "")
			require.NoError(t, err)
			g.m.snaps[s.ID] = bytes.Clone(g.m.head)
			g.cut(s.ID)
			require.NoError(t, g.v.SealAll(ctx))
			if ret > 0 {
				assert.Equal(t, 1, kept(), "the newest checkpoint is what the window's first times read")
			} else {
				assert.Equal(t, 0, kept(), "a sealed snapshot is the base")
			}
			g.checkPoints("after the snapshot")
			g.reopen()
			g.check("after reopening", true)
			g.checkPoints("after reopening")
			require.NoError(t, g.v.Close())
			g.stateDir = t.TempDir() // and from the repository alone
			g.v, err = Open(ctx, g.env(), "vol")
			require.NoError(t, err)
			g.check("from the repository alone", true)
			g.checkPoints("from the repository alone")
		})
	}
}

// A label is taken once, however many ask for it at the same moment.
func TestLabelTakenOnce(t *testing.T) {
	g := newRig(t, chunkstore.NewMem(), 4*MinChunkSize, MinChunkSize, 1)
	errs := make(chan error, 8)
	for range 8 {
		go func() {
			_, err := g.v.Snapshot(context.Background(), "same")
			errs <- err
		}()
	}
	ok := 0
	for range 8 {
		if err := <-errs; err == nil {
			ok++
		} else {
			assert.ErrorIs(t, err, ErrLabelTaken)
		}
	}
	assert.Equal(t, 1, ok)
}

// ChunkIDs are the IDs the store gives each chunk's content, whether the
// chunk is sealed, in the log, a hole, or the partial last one.
func TestChunkIDs(t *testing.T) {
	ctx := context.Background()
	cs := int64(MinChunkSize)
	g := newRig(t, chunkstore.NewMem(), 10*cs+100, cs, 1)
	write := func(off int64, p []byte) {
		require.NoError(t, g.v.WriteAt(ctx, p, off, false))
		copy(g.m.head[off:], p)
	}
	check := func(what string) {
		t.Helper()
		ids, err := g.v.ChunkIDs(ctx, 0, 11)
		require.NoError(t, err)
		for c := range 11 {
			chunk := make([]byte, cs) // the last one zero-padded
			copy(chunk, g.m.head[int64(c)*cs:])
			assert.Equal(t, g.store.Sum(chunk), ids[c], "%s: chunk %d", what, c)
		}
		part, err := g.v.ChunkIDs(ctx, 3, 2)
		require.NoError(t, err)
		assert.Equal(t, ids[3:5], part, what)
	}
	write(0, bytes.Repeat([]byte("sealed "), 20000))
	write(10*cs, []byte("the partial last chunk"))
	_, err := g.v.Snapshot(ctx, "")
	require.NoError(t, err)
	require.NoError(t, g.v.SealAll(ctx))
	check("all sealed")
	write(cs+5, []byte("in the log"))         // over a sealed chunk
	write(6*cs, []byte("in a hole"))          // a chunk the index has as a hole
	require.NoError(t, g.v.Zero(ctx, 0, 100)) // part of a chunk zeroed
	clear(g.m.head[:100])
	check("log over the index")
	_, err = g.v.ChunkIDs(ctx, 10, 2)
	assert.ErrorIs(t, err, ErrOutOfRange)
}

// deletesFail fails every Delete of a checkpoint manifest while on is set
// (only is set), or of the one whose key ends so.
type deletesFail struct {
	chunkstore.Backend
	on   atomic.Bool
	only atomic.Pointer[string]
}

func (f *deletesFail) Delete(ctx context.Context, key string) error {
	if only := f.only.Load(); (f.on.Load() && strings.Contains(key, "/checkpoints/")) || (only != nil && strings.HasSuffix(key, *only)) {
		return errors.New("access denied")
	}
	return f.Backend.Delete(ctx, key)
}

func (f *deletesFail) DeleteMany(ctx context.Context, keys []string) error {
	for _, k := range keys {
		if err := f.Delete(ctx, k); err != nil {
			return err
		}
	}
	return nil
}

// TestCheckpointExpiry: a point being read stays past the window until
// reads of it stop; a delete that fails stops expiry there (no gap in the
// window) and says so in Status until it works; one pass deletes at most
// maxExpirePerPass; a volume not written expires on its own.
func TestCheckpointExpiry(t *testing.T) {
	defer func(n int) { maxExpirePerPass = n }(maxExpirePerPass)
	maxExpirePerPass = 4
	ctx := context.Background()
	repo := &deletesFail{Backend: chunkstore.NewMem()}
	g := newRig(t, repo, 4*MinChunkSize, MinChunkSize, 1)
	g.retention = time.Minute
	g.reopen()
	kept := func() int { return len(keysUnder(t, g.repo, "volumes/vol/checkpoints/")) }
	write := func() {
		g.tick(10 * time.Second)
		g.writeRandom(100)
		g.checkpointNow()
	}
	for range 10 {
		write()
	}
	require.Equal(t, 8, kept(), "six in the window, the one before it, and the base")

	// A read of the oldest pins it.
	oldest := g.v.checkpoints[0].id
	p := make([]byte, 4096)
	require.NoError(t, g.v.ReadSnapshotAt(ctx, oldest, p, 0))
	for range 3 {
		write()
	}
	assert.Equal(t, 11, kept(), "a point being read and those after it stay")
	require.NoError(t, g.v.ReadSnapshotAt(ctx, oldest, p, 0), "and read on")
	g.tick(pinFor)
	for n := kept(); ; n = kept() {
		write()
		assert.GreaterOrEqual(t, kept(), n+1-4, "at most four go in a pass")
		if kept() >= n {
			break
		}
	}
	g.checkPoints("after catching up")
	require.ErrorIs(t, g.v.ReadSnapshotAt(ctx, oldest, p, 0), ErrNoSnapshot, "once reads stop, the point leaves")

	// Deletes fail: the window stays whole, Status says why.
	repo.on.Store(true)
	g.tick(time.Minute)
	n := kept()
	write()
	write()
	assert.Equal(t, n+2, kept(), "nothing deleted")
	require.Error(t, g.v.Status().ExpiryError)
	assert.Contains(t, g.v.Status().ExpiryError.Error(), "access denied")
	g.checkPoints("while deletes fail")
	repo.on.Store(false)

	// Not written any more: expiry runs on its own and catches up.
	g.tick(time.Hour)
	for kept() > 1 {
		n := kept()
		g.v.expireIdle(ctx)
		require.Equal(t, max(1, n-4), kept(), "four a pass, down to the base")
	}
	assert.NoError(t, g.v.Status().ExpiryError)
	g.checkPoints("after expiry")
}

// TestKeepPoint: a point in time kept as a snapshot stays after the
// window, reads what the point held, before and after a restart, and is
// deleted like any snapshot; a time that is already a snapshot, or a label
// taken, is refused.
func TestKeepPoint(t *testing.T) {
	ctx := context.Background()
	g := newRig(t, chunkstore.NewMem(), 4*MinChunkSize, MinChunkSize, 1)
	g.retention = time.Minute
	g.reopen()
	var at time.Time
	var want []byte
	for i := range 6 {
		g.tick(10 * time.Second)
		g.writeRandom(3000)
		g.checkpointNow()
		if i == 2 {
			at, want = g.now.Add(5*time.Second), bytes.Clone(g.m.head)
		}
	}
	s, err := g.v.KeepPoint(ctx, at.Format(time.RFC3339), "before-upgrade")
	require.NoError(t, err)
	assert.Equal(t, "before-upgrade", s.Label)
	_, err = g.v.KeepPoint(ctx, at.Format(time.RFC3339), "again")
	assert.ErrorIs(t, err, ErrExists, "the point is a snapshot already")
	_, err = g.v.KeepPoint(ctx, g.now.Format(time.RFC3339), "before-upgrade")
	assert.ErrorIs(t, err, ErrLabelTaken)
	g.m.snaps[s.ID] = want
	g.m.snaps["before-upgrade"] = want

	g.tick(time.Hour)
	for g.v.expireCheckpoints(ctx, g.v.base) {
	}
	g.checkPacks()
	g.check("the kept point after the window", true)
	g.reopen()
	g.check("after a restart", true)
	require.NoError(t, g.v.DeleteSnapshot(ctx, "before-upgrade"))
	delete(g.m.snaps, s.ID)
	delete(g.m.snaps, "before-upgrade")
	g.checkPacks()
	g.check("after deleting it", true)
}

// TestDeleteSnapshotKeepsTheWindowWhole: deleting a snapshot never makes a
// time read another point's bytes. One inside the window is replaced by a
// checkpoint; one older than the window is not (a restart would otherwise
// take the window's start back over deleted points); a damaged one inside
// the window is refused until the window passes it.
func TestDeleteSnapshotKeepsTheWindowWhole(t *testing.T) {
	ctx := context.Background()
	g := newRig(t, chunkstore.NewMem(), 4*MinChunkSize, MinChunkSize, 1)
	g.retention = time.Minute
	g.reopen()
	write := func() {
		g.tick(10 * time.Second)
		g.writeRandom(2000)
	}
	checkpoint := func() {
		write()
		g.checkpointNow()
	}
	snapshot := func() SnapshotInfo {
		write()
		s, err := g.v.Snapshot(ctx, "")
		require.NoError(t, err)
		g.m.snaps[s.ID] = bytes.Clone(g.m.head)
		g.cut(s.ID)
		require.NoError(t, g.v.SealAll(ctx))
		return s
	}
	old := snapshot()
	for range 12 { // two minutes: the window passes old
		checkpoint()
	}
	inside := snapshot()
	checkpoint()
	damaged := snapshot()
	checkpoint()
	from := g.v.PointsInTime()
	require.True(t, old.Time.Before(from), "old is older than the window")

	// Inside the window: its times still read it.
	require.NoError(t, g.v.DeleteSnapshot(ctx, inside.ID))
	delete(g.m.snaps, inside.ID)
	g.checkPoints("after deleting a snapshot inside the window")
	si, err := g.v.Find(ctx, inside.Time.Format(time.RFC3339Nano))
	require.NoError(t, err)
	assert.Equal(t, inside.ID, si.ID, "the deleted snapshot's time reads its point")

	// Older than the window: gone, and the window does not move back.
	require.NoError(t, g.v.DeleteSnapshot(ctx, old.ID))
	delete(g.m.snaps, old.ID)
	g.reopen()
	assert.Equal(t, from, g.v.PointsInTime(), "a restart keeps the window's start")
	_, err = g.v.Find(ctx, old.Time.Add(time.Second).Format(time.RFC3339Nano))
	assert.ErrorIs(t, err, ErrNoPointInTime, "times before the window stay refused")

	// Damaged inside the window: refused, then allowed once it is out.
	require.NoError(t, g.v.Close())
	env := g.env()
	editObject(t, env, manifestKey("vol", KindSnapshot, damaged.ID), func(b []byte) []byte { return bytes.Replace(b, []byte(`"size"`), []byte(`"sise"`), 1) })
	g.v, err = Open(ctx, env, "vol")
	require.NoError(t, err)
	err = g.v.DeleteSnapshot(ctx, damaged.ID)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "inside the point-in-time window")
	_, err = g.v.Find(ctx, damaged.Time.Add(time.Millisecond).Format(time.RFC3339Nano))
	assert.ErrorIs(t, err, chunkstore.ErrCorrupt, "its times are an error, not the point before it")
	for range 8 {
		checkpoint()
	}
	require.NoError(t, g.v.DeleteSnapshot(ctx, damaged.ID), "out of the window, it goes")
	delete(g.m.snaps, damaged.ID)
	g.check("after the deletes", true)
	g.checkNamedPacksExist()
}

// TestReadOfAPointSealedMeanwhile: a read of a point still in the write
// log that is sealed between finding it and planning reads the sealed
// point, not an error.
func TestReadOfAPointSealedMeanwhile(t *testing.T) {
	ctx := context.Background()
	g := newRig(t, chunkstore.NewMem(), 4*MinChunkSize, MinChunkSize, 1)
	want := randomBytes(4096)
	require.NoError(t, g.v.WriteAt(ctx, want, 0, false))
	_, err := g.v.Checkpoint(ctx)
	require.NoError(t, err)
	id := g.lastMark()
	loaded, err := g.v.loadCut(ctx, id)
	require.NoError(t, err)
	require.Nil(t, loaded, "in the log: nothing to load")
	require.NoError(t, g.v.SealAll(ctx)) // the seal lands here
	g.v.mu.RLock()
	vw, err := g.v.snapshotView(id, loaded)
	g.v.mu.RUnlock()
	require.NoError(t, err)
	got := make([]byte, 4096)
	require.NoError(t, g.v.read(ctx, vw, vw.plan(0, 4096), got, 0))
	assert.Equal(t, want, got)
}

// TestExpiryLeavesNoGap: when one old checkpoint cannot be deleted,
// expiry stops there: the ones after it stay, so every time after it still
// reads the newest point at or before it, not the one that failed.
func TestExpiryLeavesNoGap(t *testing.T) {
	ctx := context.Background()
	repo := &deletesFail{Backend: chunkstore.NewMem()}
	g := newRig(t, repo, 4*MinChunkSize, MinChunkSize, 1)
	g.retention = time.Hour
	g.reopen()
	checkpoint := func() {
		g.tick(10 * time.Second)
		g.writeRandom(3000)
		g.checkpointNow()
	}
	for range 8 {
		checkpoint()
	}
	var ids []string
	for _, c := range g.v.checkpoints {
		ids = append(ids, c.id)
	}
	stuck := ids[2]
	repo.only.Store(&stuck)
	g.tick(70 * time.Minute) // the first checkpoints leave the window
	for range 4 {
		checkpoint()
	}
	for _, id := range ids[2:] {
		_, err := repo.Get(ctx, manifestKey("vol", KindCheckpoint, id))
		assert.NoError(t, err, "checkpoint %s, from the stuck one on, is kept", id)
	}
	assert.Equal(t, stuck, g.v.checkpoints[0].id, "expiry stopped at the one it could not delete")
	c4, _ := cutOf(ids[4])
	si, err := g.v.Find(ctx, c4.time.Format(time.RFC3339Nano))
	require.NoError(t, err)
	assert.Equal(t, ids[4], si.ID, "a time after the stuck checkpoint reads its own point")
	require.Error(t, g.v.Status().ExpiryError)
	g.checkPoints("with a checkpoint that cannot be deleted")
}

// TestMarkTimesKeepTheirOrder: a clock that steps back gives new points
// the last one's time plus a millisecond, and times are refused until the
// clock passes the newest point again (they could read a point from after
// them).
func TestMarkTimesKeepTheirOrder(t *testing.T) {
	ctx := context.Background()
	g := newRig(t, chunkstore.NewMem(), 4*MinChunkSize, MinChunkSize, 1)
	first, err := g.v.Snapshot(ctx, "")
	require.NoError(t, err)
	g.tick(-time.Hour)
	second, err := g.v.Snapshot(ctx, "")
	require.NoError(t, err)
	assert.Equal(t, first.Time.Add(time.Millisecond), second.Time, "the second point keeps its place after the first")
	_, err = g.v.Find(ctx, g.now.Format(time.RFC3339Nano))
	require.ErrorIs(t, err, ErrNoPointInTime)
	assert.Contains(t, err.Error(), "is behind its newest point in time")
	g.tick(time.Hour + time.Second)
	si, err := g.v.Find(ctx, g.now.Format(time.RFC3339Nano))
	require.NoError(t, err, "once the clock has passed it")
	assert.Equal(t, second.ID, si.ID)
}

// A snapshot is found by its ID or its label; an empty name is neither,
// even for a snapshot without a label.
func TestEmptyNameIsNoSnapshot(t *testing.T) {
	ctx := context.Background()
	v, err := Create(ctx, testEnv(t), Config{Name: "v", Size: 1 << 20})
	require.NoError(t, err)
	defer v.Close()
	s, err := v.Snapshot(ctx, "")
	require.NoError(t, err)
	require.Empty(t, s.Label)
	got := make([]byte, 512)
	require.NoError(t, v.ReadSnapshotAt(ctx, s.ID, got, 0))
	require.ErrorIs(t, v.ReadSnapshotAt(ctx, "", got, 0), ErrNoSnapshot)
	_, err = v.Find(ctx, "")
	require.Error(t, err)
	require.ErrorIs(t, v.DeleteSnapshot(ctx, ""), ErrNoSnapshot)
}
