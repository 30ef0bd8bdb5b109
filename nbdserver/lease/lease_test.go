package lease

import (
	"context"
	"encoding/json"
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
)

func TestMain(m *testing.M) {
	code := m.Run()
	miniotest.StopShared()
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
			require.NoError(t, stale.Release(ctx), "releasing a lost lease leaves the new holder's alone")
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
	go func() { done <- l.Keep(ctx) }()
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
				require.NoError(t, l.Release(ctx))
			} else {
				require.ErrorIs(t, err, ErrHeld)
			}
		})
	}
}
