package lease

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/integration/miniotest"
	"github.com/nbdvault/nbdvault/integration/seaweedtest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	miniotest.StopShared()
	seaweedtest.StopShared()
	os.Exit(code)
}

func backends(t *testing.T) map[string]func(t *testing.T) chunkstore.Backend {
	return map[string]func(t *testing.T) chunkstore.Backend{
		"mem": func(*testing.T) chunkstore.Backend { return chunkstore.NewMem() },
		"local": func(t *testing.T) chunkstore.Backend {
			b, err := chunkstore.NewLocal(filepath.Join(t.TempDir(), "repo"))
			require.NoError(t, err)
			return chunkstore.NewRetry(b, chunkstore.RetryPolicy{})
		},
		"minio": func(t *testing.T) chunkstore.Backend {
			return chunkstore.NewRetry(miniotest.StartShared(t).Backend(t), chunkstore.RetryPolicy{})
		},
		"seaweedfs": func(t *testing.T) chunkstore.Backend {
			return chunkstore.NewRetry(seaweedtest.StartShared(t).Backend(t), chunkstore.RetryPolicy{})
		},
	}
}

func TestLease(t *testing.T) {
	for name, open := range backends(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			b := open(t)
			first, err := Acquire(ctx, b, time.Minute)
			require.NoError(t, err)

			_, err = Acquire(ctx, b, time.Minute)
			require.ErrorIs(t, err, ErrHeld, "a second server is refused")
			var held *HeldError
			require.ErrorAs(t, err, &held)
			assert.Equal(t, first.Holder().ID, held.Holder.ID)
			host, _ := os.Hostname()
			assert.Contains(t, err.Error(), host, "the error names the holder's host")
			assert.Contains(t, err.Error(), "pid", "and its process")

			before := first.Holder().Expires
			require.NoError(t, first.Renew(ctx))
			assert.True(t, first.Holder().Expires.After(before), "a renewal extends the lease")

			require.NoError(t, first.Release(ctx))
			second, err := Acquire(ctx, b, time.Minute)
			require.NoError(t, err, "a released lease is free")
			require.NoError(t, second.Release(ctx))
		})
	}
}

func TestLeaseExpiryAndTakeover(t *testing.T) {
	for name, open := range backends(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			b := open(t)
			stale, err := Acquire(ctx, b, 100*time.Millisecond)
			require.NoError(t, err)
			time.Sleep(150 * time.Millisecond) // let it expire unrenewed
			fresh, err := Acquire(ctx, b, time.Minute)
			require.NoError(t, err, "an expired lease is taken over")
			assert.ErrorIs(t, stale.Renew(ctx), ErrLost, "its old holder learns at its next renewal")
			require.ErrorIs(t, stale.Release(ctx), ErrLost, "releasing a lost lease says so, and leaves the new holder's alone")
			_, err = Acquire(ctx, b, time.Minute)
			assert.ErrorIs(t, err, ErrHeld)
			require.NoError(t, fresh.Renew(ctx))
		})
	}
}

func TestLeaseRace(t *testing.T) {
	for name, open := range backends(t) {
		t.Run(name, func(t *testing.T) {
			b := open(t)
			var wg sync.WaitGroup
			var won atomic.Int32
			for range 8 {
				wg.Go(func() {
					if _, err := Acquire(context.Background(), b, time.Minute); err == nil {
						won.Add(1)
					} else {
						assert.ErrorIs(t, err, ErrHeld)
					}
				})
			}
			wg.Wait()
			assert.EqualValues(t, 1, won.Load(), "exactly one of eight racing servers gets the lease")
		})
	}
}

func TestKeep(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	b := chunkstore.NewMem()
	l, err := Acquire(ctx, b, 600*time.Millisecond)
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- l.Keep(ctx, nil) }()
	time.Sleep(2 * time.Second) // over three TTLs: Keep must have renewed
	_, err = Acquire(context.Background(), b, time.Minute)
	require.ErrorIs(t, err, ErrHeld, "a kept lease does not expire")
	cancel()
	require.NoError(t, <-done)
}

// A lease whose holder died on this machine is taken over at once, as a
// restart after a crash needs; one held by a live process, or by a process
// on another machine, is not.
func TestLeaseOfADeadProcess(t *testing.T) {
	ctx := context.Background()
	me := Holder{Machine: machineID(), Boot: bootID(), PIDNS: pidNamespace()}
	if me.Machine == "" || me.Boot == "" || me.PIDNS == "" {
		t.Fatalf("this machine lacks /etc/machine-id, a boot ID or /proc/self/ns/pid (%+v): the test needs them", me)
	}
	dead := exec.Command("true")
	require.NoError(t, dead.Run())
	host, _ := os.Hostname()
	for _, c := range []struct {
		name     string
		holder   Holder
		takeover bool
	}{
		{"dead here", Holder{Host: host, Machine: me.Machine, Boot: me.Boot, PIDNS: me.PIDNS, PID: dead.Process.Pid}, true},
		{"alive here", Holder{Host: host, Machine: me.Machine, Boot: me.Boot, PIDNS: me.PIDNS, PID: os.Getppid()}, false},
		{"dead on another machine", Holder{Host: host, Machine: "another-machine", Boot: me.Boot, PIDNS: me.PIDNS, PID: dead.Process.Pid}, false},
		{"dead before a reboot", Holder{Host: host, Machine: me.Machine, Boot: "another-boot", PIDNS: me.PIDNS, PID: dead.Process.Pid}, false},
		{"dead in another PID namespace", Holder{Host: host, Machine: me.Machine, Boot: me.Boot, PIDNS: "pid:[1]", PID: dead.Process.Pid}, false},
		{"no machine ID", Holder{Host: host, Boot: me.Boot, PIDNS: me.PIDNS, PID: dead.Process.Pid}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := chunkstore.NewMem()
			c.holder.ID, c.holder.Started, c.holder.Expires = "x", time.Now(), time.Now().Add(time.Hour)
			data, _ := json.Marshal(c.holder)
			require.NoError(t, b.Put(ctx, Key, data))
			l, err := Acquire(ctx, b, time.Minute)
			if c.takeover {
				require.NoError(t, err)
				assert.Equal(t, "x", l.Previous(), "the record replaced")
				// What the dead holder sent last may still land: no
				// write until Margin (20 s of the minute) has passed.
				err := l.Fence(b).Put(ctx, "chunks/00/x", []byte("x"))
				require.ErrorIs(t, err, ErrNotConfirmed)
				assert.Contains(t, err.Error(), "writes start at")
				require.NoError(t, l.Release(ctx))
			} else {
				require.ErrorIs(t, err, ErrHeld)
			}
		})
	}
}

// flaky is a repository that can stop answering, or answer a write
// without saying so (the answer lost on the way back).
type flaky struct {
	*chunkstore.Mem
	down     atomic.Bool
	loseNext atomic.Bool // the next PutIf lands, but its caller hears nothing
}

func (f *flaky) check() error {
	if f.down.Load() {
		return fmt.Errorf("test: %w", chunkstore.ErrUnavailable)
	}
	return nil
}

func (f *flaky) Put(ctx context.Context, key string, data []byte) error {
	if err := f.check(); err != nil {
		return err
	}
	return f.Mem.Put(ctx, key, data)
}

func (f *flaky) GetVersion(ctx context.Context, key string) ([]byte, string, error) {
	if err := f.check(); err != nil {
		return nil, "", err
	}
	return f.Mem.GetVersion(ctx, key)
}

func (f *flaky) PutIf(ctx context.Context, key string, data []byte, match string) (string, error) {
	if err := f.check(); err != nil {
		return "", err
	}
	ver, err := f.Mem.PutIf(ctx, key, data, match)
	if err == nil && f.loseNext.CompareAndSwap(true, false) {
		return "", fmt.Errorf("test: answer lost: %w", chunkstore.ErrUnavailable)
	}
	return ver, err
}

// An outage longer than the TTL does not end the lease: writes through
// the fence stop before it could have expired, and resume once a renewal
// gets through, with nobody having taken it over meanwhile.
func TestLeaseOutlivesAnOutage(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const ttl = 900 * time.Millisecond
	repo := &flaky{Mem: chunkstore.NewMem()}
	l, err := Acquire(ctx, repo, ttl)
	require.NoError(t, err)
	fenced := l.Fence(repo)
	require.NoError(t, fenced.Put(ctx, "a", []byte("1")))
	var failures atomic.Int32
	done := make(chan error, 1)
	go func() {
		done <- l.Keep(ctx, func(err error) {
			if err != nil {
				failures.Add(1)
			}
		})
	}()

	repo.down.Store(true)
	until, _ := l.Confirmed()
	assert.WithinDuration(t, time.Now().Add(ttl-ttl/3), until, ttl, "the window ends a third of the TTL before the lease would")
	time.Sleep(3 * ttl)
	_, ok := l.Confirmed()
	require.False(t, ok, "without renewals the window closes")
	repo.down.Store(false)
	err = fenced.Put(ctx, "b", []byte("2"))
	require.ErrorIs(t, err, ErrNotConfirmed, "no write while the lease is not confirmed")
	require.ErrorIs(t, err, chunkstore.ErrUnavailable, "and callers retry it like an outage")
	require.ErrorIs(t, fenced.Delete(ctx, "a"), ErrNotConfirmed)
	data, err := fenced.Get(ctx, "a")
	require.NoError(t, err, "reads pass")
	assert.Equal(t, "1", string(data))

	deadline := time.Now().Add(10 * ttl)
	for _, ok := l.Confirmed(); !ok; _, ok = l.Confirmed() {
		require.True(t, time.Now().Before(deadline), "the lease is renewed once the repository answers")
		time.Sleep(ttl / 20)
	}
	require.NoError(t, fenced.Put(ctx, "b", []byte("2")), "writes resume")
	assert.Positive(t, failures.Load(), "the failed renewals were reported")
	select {
	case err := <-done:
		t.Fatalf("Keep gave up: %v", err)
	default:
	}

	// A renewal whose answer is lost landed all the same: the next one
	// finds its own holder in the lease and goes on.
	repo.loseNext.Store(true)
	require.Error(t, l.Renew(ctx))
	require.NoError(t, l.Renew(ctx), "a lease that names this server is its own")
	cancel()
	require.NoError(t, <-done)
}

// The lease ends only on evidence: another server that took it over
// while this one could not reach the repository.
func TestLeaseLostOnlyOnEvidence(t *testing.T) {
	ctx := context.Background()
	const ttl = 600 * time.Millisecond
	repo := &flaky{Mem: chunkstore.NewMem()}
	a, err := Acquire(ctx, repo, ttl)
	require.NoError(t, err)
	repo.down.Store(true) // a is cut off; b reaches the repository
	time.Sleep(ttl + 100*time.Millisecond)
	require.Error(t, a.Renew(ctx))
	b, err := Acquire(ctx, repo.Mem, time.Minute)
	require.NoError(t, err, "an expired lease is taken over")
	_, ok := a.Confirmed()
	require.False(t, ok, "a stopped writing before b could take over")
	repo.down.Store(false)

	err = a.Renew(ctx)
	require.ErrorIs(t, err, ErrLost)
	assert.Contains(t, err.Error(), fmt.Sprintf("pid %d", os.Getpid()))
	_, ok = a.Confirmed()
	require.False(t, ok)
	require.ErrorIs(t, a.Fence(repo).Put(ctx, "x", nil), ErrNotConfirmed, "a never writes again")
	require.NoError(t, b.Renew(ctx))
}

// A server killed with SIGKILL and not yet reaped is a zombie: its lease
// is taken over at once, like that of a process that is gone.
func TestLeaseOfAZombie(t *testing.T) {
	ctx := context.Background()
	cmd := exec.Command("sleep", "60")
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	require.NoError(t, cmd.Process.Kill())
	deadline := time.Now().Add(10 * time.Second)
	for !zombie(cmd.Process.Pid) {
		require.True(t, time.Now().Before(deadline), "the killed child never became a zombie")
		time.Sleep(10 * time.Millisecond)
	}
	host, _ := os.Hostname()
	h := Holder{ID: "x", Host: host, Machine: machineID(), Boot: bootID(), PIDNS: pidNamespace(), PID: cmd.Process.Pid,
		Started: time.Now(), Expires: time.Now().Add(time.Hour)}
	b := chunkstore.NewMem()
	data, _ := json.Marshal(h)
	require.NoError(t, b.Put(ctx, Key, data))
	l, err := Acquire(ctx, b, time.Minute)
	require.NoError(t, err, "the lease of a zombie is free")
	require.NoError(t, l.Release(ctx))
}

// careless is a store that ignores the conditions of conditional writes.
type careless struct{ *chunkstore.Mem }

func (c careless) PutIf(ctx context.Context, key string, data []byte, _ string) (string, error) {
	if err := c.Mem.Put(ctx, key, data); err != nil {
		return "", err
	}
	_, ver, err := c.Mem.GetVersion(ctx, key)
	return ver, err
}

// A store that ignores If-Match or If-None-Match cannot hold a lease:
// the server refuses it at start instead of sharing the repository.
func TestLeaseRefusesAStoreWithoutConditions(t *testing.T) {
	_, err := Acquire(context.Background(), careless{chunkstore.NewMem()}, time.Minute)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "ignores conditional writes")
}

// A lease created where one was removed by hand, in a repository that has
// had a server, opens its window only a TTL later: the server whose lease
// was removed may still be writing until its own window ends.
func TestLeaseRemovedByHandDelaysWrites(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const ttl = 900 * time.Millisecond
	repo := chunkstore.NewMem()
	require.NoError(t, repo.Put(ctx, ConfigKey, []byte("{}")))
	start := time.Now()
	l, err := Acquire(ctx, repo, ttl)
	require.NoError(t, err)
	_, ok := l.Confirmed()
	require.False(t, ok, "no writes right after taking a lease that was removed")
	require.ErrorIs(t, l.Fence(repo).Put(ctx, "x", nil), ErrNotConfirmed)
	go func() { _ = l.Keep(ctx, nil) }()
	deadline := time.Now().Add(5 * ttl)
	for _, ok := l.Confirmed(); !ok; _, ok = l.Confirmed() {
		require.True(t, time.Now().Before(deadline), "the window opens after a TTL")
		time.Sleep(ttl / 20)
	}
	assert.GreaterOrEqual(t, time.Since(start), ttl)
	require.NoError(t, l.Fence(repo).Put(ctx, "x", nil))

	// A fresh repository (no config) needs no delay.
	fresh, err := Acquire(ctx, chunkstore.NewMem(), ttl)
	require.NoError(t, err)
	_, ok = fresh.Confirmed()
	assert.True(t, ok)
}
