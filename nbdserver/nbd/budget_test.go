package nbd

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// blocked asserts that ch stays open: nothing is left that could close it
// but what the test does next.
func blocked(t *testing.T, ch <-chan error, what string) {
	t.Helper()
	select {
	case err := <-ch:
		t.Fatalf("%s went ahead (%v)", what, err)
	case <-time.After(50 * time.Millisecond):
	}
}

func acquireAsync(b *budget, ctx context.Context, n int64) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- b.acquire(ctx, n) }()
	return ch
}

func TestBudget(t *testing.T) {
	ctx := context.Background()
	b := newBudget(100)
	require.NoError(t, b.acquire(ctx, 150)) // alone, a request above the limit still runs
	got := acquireAsync(b, ctx, 10)
	blocked(t, got, "an acquire past the limit")
	b.release(150)
	require.NoError(t, <-got)
	require.NoError(t, b.acquire(ctx, 90))
	b.release(100)
	assert.Zero(t, b.inUse())
}

func TestBudgetZeroNeverWaits(t *testing.T) {
	ctx := context.Background()
	b := newBudget(100)
	require.NoError(t, b.acquire(ctx, 150)) // over the limit
	require.NoError(t, b.acquire(ctx, 0))   // a FLUSH must not wait for buffers it does not use
	b.release(0)
	b.release(150)
	assert.Zero(t, b.inUse())
}

// A large request that waits is not overtaken by small ones that would
// fit: it would starve.
func TestBudgetFirstComeFirstServed(t *testing.T) {
	ctx := context.Background()
	b := newBudget(100)
	require.NoError(t, b.acquire(ctx, 60))
	big := acquireAsync(b, ctx, 80)
	blocked(t, big, "the large acquire")
	small := acquireAsync(b, ctx, 10)
	blocked(t, small, "a small acquire behind a waiting large one")
	b.release(60)
	require.NoError(t, <-big)
	require.NoError(t, <-small)
	assert.EqualValues(t, 90, b.inUse())
}

// A wait that is given up holds nothing, and lets in who was behind it.
func TestBudgetCancelledWaitHoldsNothing(t *testing.T) {
	b := newBudget(100)
	require.NoError(t, b.acquire(context.Background(), 60))
	ctx, cancel := context.WithCancel(context.Background())
	big := acquireAsync(b, ctx, 80)
	blocked(t, big, "the large acquire")
	small := acquireAsync(b, context.Background(), 30)
	blocked(t, small, "a small acquire behind a waiting large one")
	cancel()
	require.ErrorIs(t, <-big, context.Canceled)
	require.NoError(t, <-small, "the head of the line left: the next fits")
	assert.EqualValues(t, 90, b.inUse())
}

// The budget is the server's: a request on one connection waits for
// memory another connection holds.
func TestServerMemoryIsShared(t *testing.T) {
	g := newGated(8 << 20)
	srv := &Server{Exports: NewExportMap(&Export{Name: "disk", Backend: g}), MaxMemory: 4 << 20}
	sock := startServer(t, srv)
	release := g.gate(0)
	a := dialWire(t, sock)
	a.attach("disk", false)
	a.request(CmdRead, 0, 1, 0, 3<<20, nil)
	require.EqualValues(t, 0, <-g.entered)

	b := dialWire(t, sock)
	b.attach("disk", false)
	b.request(CmdRead, 0, 2, 4<<20, 2<<20, nil)
	select {
	case off := <-g.entered:
		t.Fatalf("a read at %d started with 3 of 4 MiB taken by another connection", off)
	case <-time.After(100 * time.Millisecond):
	}
	b.request(CmdFlush, 0, 3, 0, 0, nil) // queued behind the read: the reader waits
	close(release)
	c, errno, _ := a.simple(3 << 20)
	require.EqualValues(t, 1, c)
	require.Zero(t, errno)
	// The READ and the FLUSH now run together: replies in either order.
	h := b.read(SimpleReplyLen)
	if binary.BigEndian.Uint64(h[8:]) == 2 {
		b.read(2 << 20)
		h = b.read(SimpleReplyLen)
		require.EqualValues(t, 3, binary.BigEndian.Uint64(h[8:]))
	} else {
		require.EqualValues(t, 3, binary.BigEndian.Uint64(h[8:]))
		c, errno, _ = b.simple(2 << 20)
		require.EqualValues(t, 2, c)
		require.Zero(t, errno)
	}
	require.Eventually(t, func() bool { return srv.MemoryInUse() == 0 }, 10*time.Second, 10*time.Millisecond)
}

// A client that does not read its replies is cut off after ReplyTimeout,
// and the memory its replies held goes to the others; while it holds it,
// the replies of other connections' requests that run still go out.
func TestGreedyClientIsCutOff(t *testing.T) {
	m := NewMem(64 << 20)
	var log lockedBuffer
	srv := &Server{Exports: NewExportMap(&Export{Name: "disk", Backend: m}),
		MaxMemory: 32 << 20, ReplyTimeout: 2 * time.Second, Logger: slog.New(slog.NewTextHandler(&log, nil))}
	sock := startServer(t, srv)
	// Four connections take all of it (8 MiB each, a connection's
	// share), far past what the socket buffers take. Two have a second
	// read waiting for memory, two wait for their next request.
	var greedy []*wire
	for i := range 4 {
		w := dialWire(t, sock)
		w.attach("disk", false)
		for j := range 1 + i%2 {
			w.request(CmdRead, 0, uint64(j), uint64(i)<<23, 8<<20, nil)
		}
		greedy = append(greedy, w)
	}
	require.Eventually(t, func() bool { return srv.MemoryInUse() == 32<<20 }, 10*time.Second, time.Millisecond)

	good := dialWire(t, sock)
	good.attach("disk", false)
	good.request(CmdFlush, 0, 1, 0, 0, nil) // no payload: never waits for memory
	c, errno, _ := good.simple(0)
	require.EqualValues(t, 1, c)
	require.Zero(t, errno)
	start := time.Now()
	good.request(CmdRead, 0, 2, 0, 8<<20, nil)
	c, errno, _ = good.simple(8 << 20)
	require.EqualValues(t, 2, c)
	require.Zero(t, errno)
	t.Logf("the well-behaved read waited %v", time.Since(start))

	// Their replies cannot have been written: only the cut frees it all.
	require.Eventually(t, func() bool { return srv.MemoryInUse() == 0 }, 10*time.Second, 10*time.Millisecond)
	for _, w := range greedy {
		_, err := io.Copy(io.Discard, w.c) // what was sent before the cut, then the end
		var ne net.Error
		require.False(t, errors.As(err, &ne) && ne.Timeout(), "a greedy connection was not cut off: %v", err)
	}
	assert.Equal(t, 4, strings.Count(log.String(), "client did not read its replies for 2s"), "the log says why, once per connection:\n%s", log.String())
}

// Shutdown answers a request that waits for memory with ESHUTDOWN, a
// WRITE's payload read and dropped.
func TestShutdownEndsWaitForMemory(t *testing.T) {
	g := newGated(8 << 20)
	srv := &Server{Exports: NewExportMap(&Export{Name: "disk", Backend: g}), MaxMemory: 1 << 20,
		Logger: slog.New(slog.DiscardHandler)}
	sock := startServer(t, srv)
	release := g.gate(0)
	w := dialWire(t, sock)
	w.attach("disk", false)
	w.request(CmdRead, 0, 1, 0, 1<<20, nil)
	require.EqualValues(t, 0, <-g.entered)
	w.request(CmdWrite, 0, 2, 1<<20, 4096, make([]byte, 4096))
	time.Sleep(50 * time.Millisecond) // let the reader reach the wait; no harm if it has not

	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- srv.Shutdown(ctx)
	}()
	c, errno, _ := w.simple(0)
	assert.EqualValues(t, 2, c)
	assert.Equal(t, ESHUTDOWN, errno)
	close(release)
	c, errno, _ = w.simple(1 << 20)
	assert.EqualValues(t, 1, c)
	assert.Zero(t, errno)
	require.NoError(t, <-done)
	w.closed()
}
