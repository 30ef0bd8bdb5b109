package chunkstore

import (
	"context"
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func idOf(b byte) ID { return ID{b} }

func TestLRUBoundedBySize(t *testing.T) {
	c := newLRU(300)
	c.add(idOf(1), make([]byte, 100))
	c.add(idOf(2), make([]byte, 100))
	c.add(idOf(3), make([]byte, 100))
	_, ok := c.get(idOf(1)) // 1 is now the most recently used
	require.True(t, ok)
	c.add(idOf(4), make([]byte, 100)) // evicts 2, the least recently used
	_, ok = c.get(idOf(2))
	assert.False(t, ok)
	for _, id := range []ID{idOf(1), idOf(3), idOf(4)} {
		_, ok := c.get(id)
		assert.True(t, ok)
	}
	assert.EqualValues(t, 300, c.cur)
	c.add(idOf(5), make([]byte, 301)) // larger than the cache: not kept
	_, ok = c.get(idOf(5))
	assert.False(t, ok)
	c.remove(idOf(3))
	assert.EqualValues(t, 200, c.cur)
	assert.Len(t, c.items, 2)

	off := newLRU(0)
	off.add(idOf(1), []byte{1})
	_, ok = off.get(idOf(1))
	assert.False(t, ok, "a zero-size cache keeps nothing")
}

// waitWaiters spins until n callers have joined the fetch of id.
func waitWaiters(f *flight[[]byte], id ID, n int) {
	for {
		f.mu.Lock()
		c := f.calls[id]
		joined := c != nil && c.waiters == n
		f.mu.Unlock()
		if joined {
			return
		}
		runtime.Gosched()
	}
}

func TestFlightSharesOneFetch(t *testing.T) {
	var f flight[[]byte]
	var fetches atomic.Int32
	release := make(chan struct{})
	fetch := func(ctx context.Context) ([]byte, error) {
		fetches.Add(1)
		<-release
		return []byte("data"), nil
	}
	const n = 16
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			got, err := f.do(context.Background(), idOf(1), fetch)
			assert.NoError(t, err)
			assert.Equal(t, "data", string(got))
		})
	}
	waitWaiters(&f, idOf(1), n)
	close(release)
	wg.Wait()
	assert.EqualValues(t, 1, fetches.Load(), "16 concurrent gets, one fetch")
	assert.Empty(t, f.calls, "a finished fetch is forgotten")
}

func TestFlightCallerCancellation(t *testing.T) {
	var f flight[[]byte]
	fetchCtx := make(chan context.Context, 1)
	release := make(chan struct{})
	fetch := func(ctx context.Context) ([]byte, error) {
		fetchCtx <- ctx
		select {
		case <-release:
			return []byte("data"), nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	impatient, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { _, err := f.do(impatient, idOf(1), fetch); errc <- err }()
	fctx := <-fetchCtx
	patient := make(chan []byte, 1)
	go func() { got, _ := f.do(context.Background(), idOf(1), fetch); patient <- got }()
	waitWaiters(&f, idOf(1), 2)

	cancel()
	require.ErrorIs(t, <-errc, context.Canceled, "the cancelled caller returns at once")
	assert.NoError(t, fctx.Err(), "the fetch goes on for the caller still waiting")
	close(release)
	assert.Equal(t, "data", string(<-patient))

	// When every caller has given up, the fetch is cancelled.
	blocked := func(ctx context.Context) ([]byte, error) {
		fetchCtx <- ctx
		<-ctx.Done()
		return nil, ctx.Err()
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() { _, err := f.do(ctx, idOf(2), blocked); errc <- err }()
	fctx = <-fetchCtx
	cancel()
	require.ErrorIs(t, <-errc, context.Canceled)
	select {
	case <-fctx.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("fetch not cancelled after its only caller left")
	}
}

func TestFlightKeepsDeadline(t *testing.T) {
	var f flight[[]byte]
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	want, _ := ctx.Deadline()
	_, err := f.do(ctx, idOf(1), func(fctx context.Context) ([]byte, error) {
		got, ok := fctx.Deadline()
		if !ok || !got.Equal(want) {
			return nil, errors.New("deadline lost")
		}
		return nil, nil
	})
	assert.NoError(t, err)
}
