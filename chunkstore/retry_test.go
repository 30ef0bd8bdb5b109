package chunkstore_test

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// faulty fails the first `failures` calls with err, then passes calls on.
type faulty struct {
	chunkstore.Backend
	failures atomic.Int32
	calls    atomic.Int32
	err      error
}

func (f *faulty) fail() error {
	f.calls.Add(1)
	if f.failures.Add(-1) >= 0 {
		return f.err
	}
	return nil
}

func (f *faulty) Put(ctx context.Context, k string, d []byte) error {
	if err := f.fail(); err != nil {
		return err
	}
	return f.Backend.Put(ctx, k, d)
}

func (f *faulty) Get(ctx context.Context, k string) ([]byte, error) {
	if err := f.fail(); err != nil {
		return nil, err
	}
	return f.Backend.Get(ctx, k)
}

func (f *faulty) List(ctx context.Context, p string, fn func(string) error) error {
	f.calls.Add(1)
	return f.Backend.List(ctx, p, func(k string) error {
		if f.failures.Add(-1) >= 0 {
			return f.err
		}
		return fn(k)
	})
}

func (f *faulty) ListSizes(ctx context.Context, p string, fn func(string, int64) error) error {
	f.calls.Add(1)
	return f.Backend.ListSizes(ctx, p, func(k string, size int64) error {
		if f.failures.Add(-1) >= 0 {
			return f.err
		}
		return fn(k, size)
	})
}

var errDown = fmt.Errorf("%w: connection refused", chunkstore.ErrUnavailable)

func fast(attempts int) chunkstore.RetryPolicy {
	return chunkstore.RetryPolicy{Attempts: attempts, Initial: time.Millisecond, Max: 4 * time.Millisecond}
}

func TestRetryTransient(t *testing.T) {
	f := &faulty{Backend: chunkstore.NewMem(), err: errDown}
	f.failures.Store(3)
	r := chunkstore.NewRetry(f, fast(5))
	require.NoError(t, r.Put(t.Context(), "k", []byte("v")))
	assert.EqualValues(t, 4, f.calls.Load(), "three failures, then success")
	assert.Same(t, f, r.Unwrap())

	f.failures.Store(10)
	f.calls.Store(0)
	_, err := r.Get(t.Context(), "k")
	require.ErrorIs(t, err, chunkstore.ErrUnavailable)
	assert.ErrorContains(t, err, "gave up after 5 tries")
	assert.EqualValues(t, 5, f.calls.Load())
}

func TestRetryPermanentNotRetried(t *testing.T) {
	for _, perm := range []error{chunkstore.ErrNotFound, chunkstore.ErrPermission, chunkstore.ErrNoSpace, errors.New("bad request")} {
		f := &faulty{Backend: chunkstore.NewMem(), err: perm}
		f.failures.Store(1)
		r := chunkstore.NewRetry(f, fast(5))
		assert.ErrorIs(t, r.Put(t.Context(), "k", nil), perm)
		assert.EqualValues(t, 1, f.calls.Load(), "%v is not retried", perm)
	}
}

func TestRetryHonoursDeadline(t *testing.T) {
	f := &faulty{Backend: chunkstore.NewMem(), err: errDown}
	f.failures.Store(1 << 30)
	r := chunkstore.NewRetry(f, chunkstore.RetryPolicy{Attempts: 100, Initial: 100 * time.Millisecond, Max: time.Second})
	ctx, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := r.Put(ctx, "k", nil)
	assert.ErrorIs(t, err, chunkstore.ErrUnavailable, "the error says why, not only that time ran out")
	assert.Less(t, time.Since(start), 600*time.Millisecond)

	ctx, cancel = context.WithCancel(t.Context())
	go func() { time.Sleep(50 * time.Millisecond); cancel() }()
	err = r.Put(ctx, "k", nil)
	assert.ErrorIs(t, err, context.Canceled)
	assert.ErrorIs(t, err, chunkstore.ErrUnavailable)
}

func TestRetryListNeverRepeatsKeys(t *testing.T) {
	mem := chunkstore.NewMem()
	for _, k := range []string{"a", "b", "c"} {
		require.NoError(t, mem.Put(t.Context(), k, nil))
	}
	// Fails on the first key: nothing delivered yet, so it is retried.
	f := &faulty{Backend: mem, err: errDown}
	f.failures.Store(1)
	var seen []string
	err := chunkstore.NewRetry(f, fast(5)).List(t.Context(), "", func(k string) error { seen = append(seen, k); return nil })
	require.NoError(t, err)
	assert.ElementsMatch(t, []string{"a", "b", "c"}, seen)

	// Fails after a key was delivered: not retried, the error is returned.
	f = &faulty{Backend: mem, err: errDown}
	seen = nil
	err = chunkstore.NewRetry(f, fast(5)).List(t.Context(), "", func(k string) error {
		seen = append(seen, k)
		f.failures.Store(1)
		return nil
	})
	require.ErrorIs(t, err, chunkstore.ErrUnavailable)
	assert.Len(t, seen, 1)
	assert.EqualValues(t, 1, f.calls.Load())
}

// TestRetryListSizesNeverRepeatsKeys: ListSizes is retried as List is.
func TestRetryListSizesNeverRepeatsKeys(t *testing.T) {
	mem := chunkstore.NewMem()
	for _, k := range []string{"a", "bb", "ccc"} {
		require.NoError(t, mem.Put(t.Context(), k, []byte(k)))
	}
	f := &faulty{Backend: mem, err: errDown}
	f.failures.Store(1)
	seen := map[string]int64{}
	err := chunkstore.NewRetry(f, fast(5)).ListSizes(t.Context(), "", func(k string, size int64) error {
		seen[k] = size
		return nil
	})
	require.NoError(t, err)
	assert.Equal(t, map[string]int64{"a": 1, "bb": 2, "ccc": 3}, seen)

	f = &faulty{Backend: mem, err: errDown}
	n := 0
	err = chunkstore.NewRetry(f, fast(5)).ListSizes(t.Context(), "", func(string, int64) error {
		n++
		f.failures.Store(1)
		return nil
	})
	require.ErrorIs(t, err, chunkstore.ErrUnavailable)
	assert.Equal(t, 1, n)
	assert.EqualValues(t, 1, f.calls.Load())
}
