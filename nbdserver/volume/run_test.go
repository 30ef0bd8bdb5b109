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
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/integration/testenv"
)

// eventually polls cond until it holds or the deadline passes: Run works
// on its own timer, and there is no other signal to wait on.
func eventually(t *testing.T, d time.Duration, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func startRun(t *testing.T, v *Volume) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { v.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
}

func TestRunCheckpointsOnItsOwn(t *testing.T) {
	ctx := context.Background()
	mem := chunkstore.NewMem()
	store, err := chunkstore.NewStore(mem, chunkstore.Options{})
	require.NoError(t, err)
	env := &Env{Repo: mem, Store: store, StateDir: t.TempDir(), CheckpointInterval: 50 * time.Millisecond}
	v, err := Create(ctx, env, Config{Name: "v", Size: 4 << 20})
	require.NoError(t, err)
	defer v.Close()
	startRun(t, v)

	require.NoError(t, v.WriteAt(ctx, randomBytes(100_000), 12345, false))
	assert.Greater(t, v.Status().Lag, time.Duration(0), "a write the repository does not hold yet")
	eventually(t, 5*time.Second, func() bool { st := v.Status(); return st.Lag == 0 && st.PendingLayers == 0 },
		"the write is checkpointed and sealed")
	ms, _, err := listManifests(ctx, mem, "", "v", KindCheckpoint, DefaultChunkSize)
	require.NoError(t, err)
	require.Len(t, ms, 1)
	assert.True(t, !ms[0].Root.IsZero() || len(ms[0].Deltas) > 0, "the checkpoint holds the write")
	assert.Zero(t, v.LogSize(), "sealed log segments are freed")
	assert.Empty(t, v.Snapshots(), "checkpoints are not snapshots")

	// No writes, no checkpoints.
	time.Sleep(150 * time.Millisecond) // three intervals of nothing to do
	ms, _, _ = listManifests(ctx, mem, "", "v", KindCheckpoint, DefaultChunkSize)
	assert.Len(t, ms, 1)
}

func TestBackpressure(t *testing.T) {
	ctx := context.Background()
	mem := chunkstore.NewMem()
	store, err := chunkstore.NewStore(mem, chunkstore.Options{})
	require.NoError(t, err)
	env := &Env{Repo: mem, Store: store, StateDir: t.TempDir(), CheckpointInterval: time.Hour, LogLimit: 1 << 20}
	v, err := Create(ctx, env, Config{Name: "v", Size: 64 << 20})
	require.NoError(t, err)
	defer v.Close()

	// Without the uploader, a write past the limit waits (and honours
	// its context).
	require.NoError(t, v.WriteAt(ctx, randomBytes(1<<20), 0, false))
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	err = v.WriteAt(short, randomBytes(4096), 0, false)
	require.ErrorIs(t, err, context.DeadlineExceeded, "the write waited instead of failing or growing the log")

	// With it, 16 times the limit goes through and the log stays bounded.
	startRun(t, v)
	var maxLog atomic.Int64
	want := make([]byte, 16<<20)
	for i := range 64 {
		p := randomBytes(256 << 10)
		require.NoError(t, v.WriteAt(ctx, p, int64(i)<<18, false))
		copy(want[i<<18:], p)
		if n := v.LogSize(); n > maxLog.Load() {
			maxLog.Store(n)
		}
	}
	assert.LessOrEqual(t, maxLog.Load(), int64(2<<20), "the log stays near its limit")
	got := make([]byte, len(want))
	require.NoError(t, v.ReadAt(ctx, got, 0))
	assert.Equal(t, want, got)
}

// failingRepo fails every chunk Put while fail is set.
type failingRepo struct {
	chunkstore.Backend
	fail atomic.Bool
}

func (f *failingRepo) Put(ctx context.Context, key string, data []byte) error {
	if f.fail.Load() {
		return errors.Join(chunkstore.ErrUnavailable, errors.New("connection refused"))
	}
	return f.Backend.Put(ctx, key, data)
}

func TestRunReportsAndRecoversFromSealErrors(t *testing.T) {
	ctx := context.Background()
	repo := &failingRepo{Backend: chunkstore.NewMem()}
	store, err := chunkstore.NewStore(repo, chunkstore.Options{})
	require.NoError(t, err)
	env := &Env{Repo: repo, Store: store, StateDir: t.TempDir(), CheckpointInterval: 20 * time.Millisecond}
	v, err := Create(ctx, env, Config{Name: "v", Size: 4 << 20})
	require.NoError(t, err)
	defer v.Close()
	repo.fail.Store(true)
	startRun(t, v)
	data := randomBytes(300_000)
	require.NoError(t, v.WriteAt(ctx, data, 0, false))
	eventually(t, 5*time.Second, func() bool { return v.Status().SealError != nil }, "the seal failure is reported")
	assert.ErrorIs(t, v.Status().SealError, chunkstore.ErrUnavailable)
	got := make([]byte, len(data))
	require.NoError(t, v.ReadAt(ctx, got, 0))
	assert.Equal(t, data, got, "reads work from the log while the repository is down")

	repo.fail.Store(false)
	eventually(t, 10*time.Second, func() bool { st := v.Status(); return st.Lag == 0 && st.SealError == nil },
		"the upload catches up once the repository is back")
}

// TestStateDiskFull puts the state folder on a 4 MiB tmpfs and writes four
// times that: writes that find the disk full wait until the uploader has
// sealed the open layer (its mark fits thanks to the log's reserve) and
// freed its segments, then go on; nothing is lost, status says so while
// it lasts, and the same holds after a restart on a disk left full.
func TestStateDiskFull(t *testing.T) {
	dir := testenv.Tmpfs(t, "4m")
	ctx := context.Background()
	mem := chunkstore.NewMem()
	store, err := chunkstore.NewStore(mem, chunkstore.Options{})
	require.NoError(t, err)
	env := &Env{Repo: mem, Store: store, StateDir: dir, CheckpointInterval: time.Hour}
	v, err := Create(ctx, env, Config{Name: "v", Size: 64 << 20})
	require.NoError(t, err)

	// Without an uploader nothing can be freed: the write that finds the
	// disk full waits, and gives up with ENOSPC when its context ends.
	want := make([]byte, 64<<20)
	n := 0
	for ; n < 64; n++ {
		p := randomBytes(256 << 10)
		wctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		err := v.WriteAt(wctx, p, int64(n)<<18, false)
		cancel()
		if err != nil {
			require.ErrorIs(t, err, syscall.ENOSPC, "the write that does not fit says why")
			break
		}
		copy(want[n<<18:], p)
	}
	require.Less(t, n, 64, "the disk filled")
	// Fill what is left to the last byte, with smaller and smaller writes.
	for _, size := range []int{4096, 512, 1} {
		for k := 0; ; k++ {
			p := randomBytes(size)
			off := int64(n)<<18 + int64(k*size)
			wctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
			err := v.WriteAt(wctx, p, off, false)
			cancel()
			if err != nil {
				require.ErrorIs(t, err, syscall.ENOSPC)
				break
			}
			copy(want[off:], p)
			n += (k*size + size) >> 18
		}
	}
	assert.True(t, v.Status().DiskFull, "status says the disk is full")
	require.NoError(t, v.Flush(ctx), "what was written before is still durable")
	got := make([]byte, len(want))
	require.NoError(t, v.ReadAt(ctx, got, 0))
	require.True(t, bytes.Equal(want, got), "nothing written before the disk filled is lost")

	// A restart on the full disk, then the uploader: every write goes
	// through, waiting for room as it needs.
	require.NoError(t, v.Close())
	v, err = Open(ctx, env, "v")
	require.NoError(t, err)
	t.Cleanup(func() { v.Close() })
	startRun(t, v)
	for i := range 64 {
		p := randomBytes(256 << 10)
		require.NoError(t, v.WriteAt(ctx, p, int64(i)<<18, false), "write %d of 64 into a 4 MiB disk", i)
		copy(want[i<<18:], p)
	}
	require.NoError(t, v.Flush(ctx))
	assert.False(t, v.Status().DiskFull, "status says when the disk has room again")
	require.NoError(t, v.ReadAt(ctx, got, 0))
	require.True(t, bytes.Equal(want, got), "every write is there")
	require.NoError(t, v.Close())
	v, err = Open(ctx, env, "v")
	require.NoError(t, err)
	require.NoError(t, v.ReadAt(ctx, got, 0))
	require.True(t, bytes.Equal(want, got), "after a restart the volume holds every write")
}

// fillDisk fills the file system of dir to its last byte with a file.
func fillDisk(t *testing.T, dir string) {
	t.Helper()
	f, err := os.Create(filepath.Join(dir, "filler"))
	require.NoError(t, err)
	defer f.Close()
	for _, size := range []int{1 << 20, 4096, 1} {
		buf := make([]byte, size)
		for {
			if _, err := f.Write(buf); err != nil {
				require.ErrorIs(t, err, syscall.ENOSPC)
				break
			}
		}
	}
}

// A disk filled to its last byte by something else still lets a volume
// close its open layer (the mark fits in the log's reserve), seal it and
// free its segments.
func TestStateDiskFullMarkUsesReserve(t *testing.T) {
	dir := testenv.Tmpfs(t, "4m")
	ctx := context.Background()
	mem := chunkstore.NewMem()
	store, err := chunkstore.NewStore(mem, chunkstore.Options{})
	require.NoError(t, err)
	env := &Env{Repo: mem, Store: store, StateDir: dir, CheckpointInterval: time.Hour}
	v, err := Create(ctx, env, Config{Name: "v", Size: 16 << 20})
	require.NoError(t, err)
	t.Cleanup(func() { v.Close() })
	// One record that ends the segment at a page boundary: the mark will
	// need a page of its own.
	a := randomBytes(4096 - recordHeaderLen)
	require.NoError(t, v.WriteAt(ctx, a, 0, true))
	fillDisk(t, dir)

	_, err = v.Snapshot(ctx, "full")
	require.NoError(t, err, "the mark fits in the reserve")
	require.NoError(t, v.SealAll(ctx), "and the layer seals")
	b := randomBytes(256 << 10)
	err = v.WriteAt(ctx, b, 1<<20, true)
	require.ErrorIs(t, err, syscall.ENOSPC, "the disk is full of something else: nothing of the volume's to free, so no wait")
	require.NoError(t, os.Remove(filepath.Join(dir, "filler")))
	require.NoError(t, v.WriteAt(ctx, b, 1<<20, true), "room again: writes go on")
	got := make([]byte, len(a))
	require.NoError(t, v.ReadSnapshotAt(ctx, "full", got, 0))
	require.True(t, bytes.Equal(a, got))
}

// concurrentPacks counts the journal pack puts in flight at once, each
// held for a moment so that seals running together overlap.
type concurrentPacks struct {
	chunkstore.Backend
	now, most atomic.Int64
}

func (c *concurrentPacks) Put(ctx context.Context, key string, data []byte) error {
	if strings.Contains(key, "/journal/") {
		n := c.now.Add(1)
		defer c.now.Add(-1)
		for {
			m := c.most.Load()
			if n <= m || c.most.CompareAndSwap(m, n) {
				break
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return c.Backend.Put(ctx, key, data)
}

// TestUploadMemoryBoundsSeals: the seals of all volumes together hold at
// most UploadMemory: with room for one, volumes that all have a layer to
// seal take turns, and every write still reaches the repository.
func TestUploadMemoryBoundsSeals(t *testing.T) {
	for _, room := range []int64{SealMemory, 0} {
		t.Run(fmt.Sprint("room ", room), func(t *testing.T) {
			ctx := context.Background()
			repo := &concurrentPacks{Backend: chunkstore.NewMem()}
			store, err := chunkstore.NewStore(repo, chunkstore.Options{})
			require.NoError(t, err)
			env := &Env{Repo: repo, Store: store, StateDir: t.TempDir(), UploadMemory: room}
			var vols []*Volume
			for i := range 4 {
				v, err := Create(ctx, env, Config{Name: fmt.Sprint("v", i), Size: 4 * MinChunkSize, ChunkSize: MinChunkSize})
				require.NoError(t, err)
				defer v.Close()
				require.NoError(t, v.WriteAt(ctx, []byte("scattered"), 100, false))
				_, err = v.Checkpoint(ctx)
				require.NoError(t, err)
				vols = append(vols, v)
			}
			var wg sync.WaitGroup
			for _, v := range vols {
				wg.Go(func() { assert.NoError(t, v.SealAll(ctx)) })
			}
			wg.Wait()
			if room > 0 {
				assert.Equal(t, int64(1), repo.most.Load(), "one seal at a time")
			} else {
				assert.Greater(t, repo.most.Load(), int64(1), "without a bound, seals overlap (else this test shows nothing)")
			}
			for _, v := range vols {
				p := make([]byte, 9)
				require.NoError(t, v.ReadAt(ctx, p, 100))
				assert.Equal(t, "scattered", string(p))
				assert.Zero(t, v.Status().PendingLayers)
			}
		})
	}
}

// A large write is sealed while it goes on: once the open layer has taken
// SealAhead bytes, Run makes a checkpoint without waiting for the
// interval.
func TestRunSealsAhead(t *testing.T) {
	ctx := context.Background()
	mem := chunkstore.NewMem()
	store, err := chunkstore.NewStore(mem, chunkstore.Options{})
	require.NoError(t, err)
	env := &Env{Repo: mem, Store: store, StateDir: t.TempDir(), CheckpointInterval: time.Hour, SealAhead: 1 << 20}
	v, err := Create(ctx, env, Config{Name: "v", Size: 16 << 20})
	require.NoError(t, err)
	defer v.Close()
	startRun(t, v)

	data := randomBytes(8 << 20)
	for off := 0; off < len(data); off += 256 << 10 {
		require.NoError(t, v.WriteAt(ctx, data[off:off+256<<10], int64(off), false))
	}
	// All but the last MiB or so is sealed with no interval passing.
	eventually(t, 20*time.Second, func() bool { return v.LogSize() <= 2<<20 && v.Status().PendingLayers == 0 },
		"the writes are sealed as they come")
	ms, _, err := listManifests(ctx, mem, "", "v", KindCheckpoint, DefaultChunkSize)
	require.NoError(t, err)
	require.NotEmpty(t, ms)
	got := make([]byte, len(data))
	require.NoError(t, v.ReadAt(ctx, got, 0))
	require.True(t, bytes.Equal(data, got))

	// Without it, nothing is sealed before the interval.
	env2 := &Env{Repo: chunkstore.NewMem(), Store: store, StateDir: t.TempDir(), CheckpointInterval: time.Hour, SealAhead: -1}
	w, err := Create(ctx, env2, Config{Name: "w", Size: 16 << 20})
	require.NoError(t, err)
	defer w.Close()
	startRun(t, w)
	for off := 0; off < len(data); off += 256 << 10 {
		require.NoError(t, w.WriteAt(ctx, data[off:off+256<<10], int64(off), false))
	}
	time.Sleep(300 * time.Millisecond)
	assert.Greater(t, w.LogSize(), int64(len(data)), "no seal without the interval or SealAhead")
}
