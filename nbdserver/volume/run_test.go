package volume

import (
	"bytes"
	"context"
	"errors"
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
	ms, err := listManifests(ctx, mem, "v", KindCheckpoint)
	require.NoError(t, err)
	require.Len(t, ms, 1)
	assert.False(t, ms[0].Root.IsZero())
	assert.Zero(t, v.LogSize(), "sealed log segments are freed")
	assert.Empty(t, v.Snapshots(), "checkpoints are not snapshots")

	// No writes, no checkpoints.
	time.Sleep(150 * time.Millisecond) // three intervals of nothing to do
	ms, _ = listManifests(ctx, mem, "v", KindCheckpoint)
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

// TestStateDiskFull puts the state folder on a 4 MiB tmpfs: a write that
// does not fit fails with ENOSPC (which NBD reports as ENOSPC), nothing
// written before is lost, and once the uploader frees the log, writes
// succeed again.
func TestStateDiskFull(t *testing.T) {
	dir := testenv.Tmpfs(t, "4m")
	ctx := context.Background()
	mem := chunkstore.NewMem()
	store, err := chunkstore.NewStore(mem, chunkstore.Options{})
	require.NoError(t, err)
	env := &Env{Repo: mem, Store: store, StateDir: dir, CheckpointInterval: time.Hour}
	v, err := Create(ctx, env, Config{Name: "v", Size: 64 << 20})
	require.NoError(t, err)
	t.Cleanup(func() { v.Close() })

	want := make([]byte, 64<<20)
	var full error
	n := 0
	for ; n < 64; n++ {
		p := randomBytes(256 << 10)
		if full = v.WriteAt(ctx, p, int64(n)<<18, false); full != nil {
			break
		}
		copy(want[n<<18:], p)
	}
	require.ErrorIs(t, full, syscall.ENOSPC, "the write that does not fit says why")
	require.NoError(t, v.Flush(ctx), "what was written before is still durable")
	got := make([]byte, len(want))
	require.NoError(t, v.ReadAt(ctx, got, 0))
	require.True(t, bytes.Equal(want, got), "nothing written before the disk filled is lost")

	// The uploader frees the log; writes go on.
	_, err = v.Checkpoint(ctx)
	require.NoError(t, err)
	require.NoError(t, v.SealAll(ctx))
	p := randomBytes(256 << 10)
	require.NoError(t, v.WriteAt(ctx, p, int64(n)<<18, true))
	copy(want[n<<18:], p)
	require.NoError(t, v.Close())
	v, err = Open(ctx, env, "v")
	require.NoError(t, err)
	require.NoError(t, v.ReadAt(ctx, got, 0))
	require.True(t, bytes.Equal(want, got), "after a restart the volume holds every write that succeeded")
}
