package nbd

import (
	"container/list"
	"context"
	"sync"
)

// budget is a counting semaphore of bytes with first-come, first-served
// waiters, so a large request is not starved by a stream of small ones.
// One holder may always take it, however large its request, so a request
// above the limit runs alone instead of waiting for ever.
//
// Every connection has one (its share) and the server has one (shared by
// all connections); a request takes its connection's, then the server's.
// Only a connection's reader waits in acquire, and it holds nothing of
// the server's budget while it waits: whoever holds budget is a request
// running or a reply being written, and neither waits for budget.
type budget struct {
	mu          sync.Mutex
	used, limit int64
	waiters     list.List // of *budgetWaiter, oldest first
}

type budgetWaiter struct {
	n     int64
	ready chan struct{} // closed once granted
}

func newBudget(limit int64) *budget { return &budget{limit: limit} }

// acquire takes n bytes, waiting until they fit. It returns ctx's error,
// holding nothing, if ctx ends first. Zero bytes never wait.
func (b *budget) acquire(ctx context.Context, n int64) error {
	if n == 0 {
		return nil
	}
	b.mu.Lock()
	if b.waiters.Len() == 0 && b.fits(n) {
		b.used += n
		b.mu.Unlock()
		return nil
	}
	w := &budgetWaiter{n: n, ready: make(chan struct{})}
	e := b.waiters.PushBack(w)
	b.mu.Unlock()

	select {
	case <-w.ready:
		return nil
	case <-ctx.Done():
	}
	b.mu.Lock()
	select {
	case <-w.ready: // granted meanwhile: hand it on
		b.used -= n
	default:
		b.waiters.Remove(e)
	}
	b.grantLocked() // the next in line may fit now
	b.mu.Unlock()
	return ctx.Err()
}

// release returns n bytes and wakes the waiters they let in.
func (b *budget) release(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.used -= n
	b.grantLocked()
	b.mu.Unlock()
}

func (b *budget) fits(n int64) bool { return b.used == 0 || b.used+n <= b.limit }

// grantLocked lets in waiters from the front while they fit.
func (b *budget) grantLocked() {
	for e := b.waiters.Front(); e != nil; e = b.waiters.Front() {
		w := e.Value.(*budgetWaiter)
		if !b.fits(w.n) {
			return
		}
		b.used += w.n
		close(w.ready)
		b.waiters.Remove(e)
	}
}

// inUse is what is taken now.
func (b *budget) inUse() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}
