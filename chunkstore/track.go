package chunkstore

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Tracking is a garbage collection's view of a Store while it runs
// (docs/architecture.md, "Exact mark and sweep, online"): it records
// every chunk Put from its start, new or found present, and makes its
// deletes and those Puts exclusive: a chunk put since the start is never
// deleted, and a Put of a chunk being deleted waits until the delete is
// over, then finds it absent and writes it again.
type Tracking struct {
	s    *Store
	hold time.Duration

	mu       sync.Mutex
	cond     *sync.Cond
	touched  map[ID]struct{}
	deleting map[ID]struct{}
}

// ErrTracking: a Store has one Tracking at a time.
var ErrTracking = errors.New("a garbage collection is running already")

// Track starts recording the chunks put, until Stop. hold is how long
// IDs stay deleting after their batch ends: a delete cut short or
// retried may be applied by the store that much later, and a Put of the
// same chunk must not land before it (the lease's Margin).
func (s *Store) Track(hold time.Duration) (*Tracking, error) {
	t := &Tracking{s: s, hold: hold, touched: map[ID]struct{}{}, deleting: map[ID]struct{}{}}
	t.cond = sync.NewCond(&t.mu)
	if !s.tracking.CompareAndSwap(nil, t) {
		return nil, ErrTracking
	}
	return t, nil
}

// Stop ends the tracking once the last delete's hold is over (until
// then Puts must still see it). Deletes must have returned.
func (t *Tracking) Stop() {
	t.mu.Lock()
	for len(t.deleting) > 0 {
		t.cond.Wait()
	}
	t.mu.Unlock()
	t.s.tracking.CompareAndSwap(t, nil)
}

// Touched says whether chunk id was put since the tracking started.
func (t *Tracking) Touched(id ID) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ok := t.touched[id]
	return ok
}

// Len is the number of chunks put since the tracking started.
func (t *Tracking) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.touched)
}

// touch records id, before a Put looks for it, and waits while it is
// being deleted.
func (t *Tracking) touch(id ID) {
	t.mu.Lock()
	t.touched[id] = struct{}{}
	for {
		if _, ok := t.deleting[id]; !ok {
			break
		}
		t.cond.Wait()
	}
	t.mu.Unlock()
}

// Delete deletes the chunks ids (at most 1,000: one request on S3) that
// were not put since the tracking started, and returns those it asked
// the backend to delete. The caller MUST know that nothing references
// them. On error, any of them may or may not be gone.
func (t *Tracking) Delete(ctx context.Context, ids []ID) ([]ID, error) {
	t.mu.Lock()
	batch := make([]ID, 0, len(ids))
	for _, id := range ids {
		if _, ok := t.touched[id]; ok || id.IsZero() {
			continue
		}
		t.deleting[id] = struct{}{}
		batch = append(batch, id)
	}
	t.mu.Unlock()
	if len(batch) == 0 {
		return nil, nil
	}
	keys := make([]string, len(batch))
	for i, id := range batch {
		keys[i] = Key(id)
	}
	err := t.s.backend.DeleteMany(ctx, keys)
	for _, id := range batch {
		t.s.forget(id) // after the delete: a read that started before may have added it
	}
	go func() {
		// Puts of these chunks wait out the hold: a delete request the
		// store applies late must not remove a chunk put again.
		time.Sleep(t.hold)
		t.mu.Lock()
		for _, id := range batch {
			delete(t.deleting, id)
		}
		t.cond.Broadcast()
		t.mu.Unlock()
	}()
	if err != nil {
		return batch, fmt.Errorf("delete %d chunks: %w", len(batch), err)
	}
	return batch, nil
}
