package chunkstore

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"sync"
)

// lru is a cache of verified plaintexts bounded by their total size. Values
// are shared with every caller and never modified.
type lru struct {
	mu       sync.Mutex
	max, cur int64
	order    *list.List // front = most recently used; values are *lruEntry
	items    map[ID]*list.Element
}

type lruEntry struct {
	id   ID
	data []byte
}

func newLRU(maxBytes int64) *lru {
	return &lru{max: maxBytes, order: list.New(), items: make(map[ID]*list.Element)}
}

func (c *lru) get(id ID) ([]byte, bool) {
	if c.max <= 0 {
		return nil, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.items[id]
	if !ok {
		return nil, false
	}
	c.order.MoveToFront(e)
	return e.Value.(*lruEntry).data, true
}

func (c *lru) add(id ID, data []byte) {
	size := int64(len(data))
	if size > c.max {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.items[id]; ok {
		c.order.MoveToFront(e)
		return
	}
	c.items[id] = c.order.PushFront(&lruEntry{id: id, data: data})
	c.cur += size
	for c.cur > c.max {
		c.removeElement(c.order.Back())
	}
}

func (c *lru) remove(id ID) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.items[id]; ok {
		c.removeElement(e)
	}
}

func (c *lru) removeElement(e *list.Element) {
	ent := c.order.Remove(e).(*lruEntry)
	delete(c.items, ent.id)
	c.cur -= int64(len(ent.data))
}

// flight makes concurrent fetches of one ID share one backend call. The
// fetch runs on its own context, detached from any single caller, and is
// cancelled only when every caller waiting on it has given up; each caller
// still returns as soon as its own context is done.
type flight[T any] struct {
	mu    sync.Mutex
	calls map[ID]*call[T]
}

type call[T any] struct {
	done    chan struct{}
	data    T
	err     error
	waiters int
	cancel  context.CancelFunc
}

func (f *flight[T]) do(ctx context.Context, id ID, fetch func(context.Context) (T, error)) (T, error) {
	f.mu.Lock()
	if f.calls == nil {
		f.calls = make(map[ID]*call[T])
	}
	c, ok := f.calls[id]
	if !ok {
		// The fetch keeps the first caller's deadline, so a backend that
		// is down fails it in time with its own error, not just the
		// caller's context error.
		base := context.WithoutCancel(ctx)
		var fctx context.Context
		var cancel context.CancelFunc
		if d, ok := ctx.Deadline(); ok {
			fctx, cancel = context.WithDeadline(base, d)
		} else {
			fctx, cancel = context.WithCancel(base)
		}
		c = &call[T]{done: make(chan struct{}), cancel: cancel}
		f.calls[id] = c
		go func() {
			c.data, c.err = fetch(fctx)
			cancel()
			f.mu.Lock()
			if f.calls[id] == c {
				delete(f.calls, id)
			}
			f.mu.Unlock()
			close(c.done)
		}()
	}
	c.waiters++
	f.mu.Unlock()

	select {
	case <-c.done:
		return c.data, c.err
	case <-ctx.Done():
		select {
		case <-c.done: // both ready: the fetch's own error says more
			return c.data, c.err
		default:
		}
		f.mu.Lock()
		c.waiters--
		if c.waiters == 0 {
			c.cancel()
			// A later caller must not join a fetch that is being cancelled.
			if f.calls[id] == c {
				delete(f.calls, id)
			}
		}
		f.mu.Unlock()
		var none T
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			// The store did not answer in time: to the caller that is an
			// unavailable store, like a fetch that failed on its own.
			return none, fmt.Errorf("waiting for chunk %s: %w: %w", id, ErrUnavailable, ctx.Err())
		}
		return none, fmt.Errorf("waiting for chunk %s: %w", id, ctx.Err())
	}
}
