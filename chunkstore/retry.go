package chunkstore

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"
)

// RetryPolicy says how often and how patiently Retry tries again.
type RetryPolicy struct {
	Attempts int           // tries in all, the first included; default 8
	Initial  time.Duration // first backoff; default 100ms
	Max      time.Duration // backoff cap; default 5s
}

// DefaultRetryPolicy rides out a restart of an object store: 8 tries over
// about 15 seconds.
var DefaultRetryPolicy = RetryPolicy{Attempts: 8, Initial: 100 * time.Millisecond, Max: 5 * time.Second}

// Retry wraps a Backend and retries calls that fail with ErrUnavailable,
// with exponential backoff and jitter. Nothing else is retried: a missing
// key, a refused credential or a full disk will not change by waiting. It
// never sleeps past its context's deadline: when the next try could not
// start in time, it returns the last error at once.
//
// Every Backend call is safe to repeat: Put is idempotent, the rest do not
// change state or converge. List and ListSizes are retried only before they
// have passed a key to fn, so fn never sees a key twice.
type Retry struct {
	next   Backend
	policy RetryPolicy
}

// NewRetry wraps b. Zero fields of p take DefaultRetryPolicy's values.
func NewRetry(b Backend, p RetryPolicy) *Retry {
	if p.Attempts <= 0 {
		p.Attempts = DefaultRetryPolicy.Attempts
	}
	if p.Initial <= 0 {
		p.Initial = DefaultRetryPolicy.Initial
	}
	if p.Max <= 0 {
		p.Max = DefaultRetryPolicy.Max
	}
	return &Retry{next: b, policy: p}
}

func (r *Retry) Unwrap() Backend  { return r.next }
func (r *Retry) Location() string { return r.next.Location() }

func (r *Retry) do(ctx context.Context, op func() error) error {
	return r.doIf(ctx, op, func() bool { return true })
}

// doIf runs op until it succeeds, fails for good, or canRetry says no.
func (r *Retry) doIf(ctx context.Context, op func() error, canRetry func() bool) error {
	backoff := r.policy.Initial
	start := time.Now()
	var lastUnavailable error
	for attempt := 1; ; attempt++ {
		err := op()
		if err != nil && lastUnavailable != nil && ctx.Err() != nil {
			// The deadline cut a try short: say why the earlier ones failed.
			return fmt.Errorf("%w (earlier tries: %w)", err, lastUnavailable)
		}
		if err == nil || !errors.Is(err, ErrUnavailable) || !canRetry() {
			return err
		}
		lastUnavailable = err
		if attempt == r.policy.Attempts {
			return fmt.Errorf("%w (gave up after %d tries in %s)", err, attempt, time.Since(start).Round(time.Millisecond))
		}
		// Full jitter in [backoff/2, backoff): many clients that failed
		// together do not come back together.
		wait := backoff/2 + rand.N(backoff/2+1)
		if deadline, ok := ctx.Deadline(); ok && time.Until(deadline) < wait {
			return fmt.Errorf("%w (no time left for another try before the deadline)", err)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%w (while waiting to retry: %w)", err, ctx.Err())
		case <-t.C:
		}
		backoff = min(2*backoff, r.policy.Max)
	}
}

func (r *Retry) Put(ctx context.Context, key string, data []byte) error {
	return r.do(ctx, func() error { return r.next.Put(ctx, key, data) })
}

func (r *Retry) Get(ctx context.Context, key string) (data []byte, err error) {
	err = r.do(ctx, func() error {
		data, err = r.next.Get(ctx, key)
		return err
	})
	return data, err
}

func (r *Retry) GetRange(ctx context.Context, key string, off, n int64) (data []byte, err error) {
	err = r.do(ctx, func() error {
		data, err = r.next.GetRange(ctx, key, off, n)
		return err
	})
	return data, err
}

func (r *Retry) Has(ctx context.Context, key string) (has bool, err error) {
	err = r.do(ctx, func() error {
		has, err = r.next.Has(ctx, key)
		return err
	})
	return has, err
}

func (r *Retry) Delete(ctx context.Context, key string) error {
	return r.do(ctx, func() error { return r.next.Delete(ctx, key) })
}

// DeleteMany is retried whole: deleting a key twice is not an error.
func (r *Retry) DeleteMany(ctx context.Context, keys []string) error {
	return r.do(ctx, func() error { return r.next.DeleteMany(ctx, keys) })
}

func (r *Retry) List(ctx context.Context, prefix string, fn func(key string) error) error {
	delivered := false
	return r.doIf(ctx, func() error {
		return r.next.List(ctx, prefix, func(key string) error {
			delivered = true
			return fn(key)
		})
	}, func() bool { return !delivered })
}

// ListSizes is retried as List is: only before it has passed a key to fn.
func (r *Retry) ListSizes(ctx context.Context, prefix string, fn func(key string, size int64) error) error {
	delivered := false
	return r.doIf(ctx, func() error {
		return r.next.ListSizes(ctx, prefix, func(key string, size int64) error {
			delivered = true
			return fn(key, size)
		})
	}, func() bool { return !delivered })
}

// GetVersion and PutIf pass through to a Versioned backend, retried like
// the rest. A PutIf whose answer was lost and is retried finds its own
// write and reports ErrPrecondition: callers treat that as having lost
// the race, the safe side.
func (r *Retry) GetVersion(ctx context.Context, key string) (data []byte, version string, err error) {
	v, ok := AsVersioned(r.next)
	if !ok {
		return nil, "", fmt.Errorf("%s: conditional writes: %w", r.next.Location(), errors.ErrUnsupported)
	}
	err = r.do(ctx, func() error {
		data, version, err = v.GetVersion(ctx, key)
		return err
	})
	return data, version, err
}

func (r *Retry) PutIf(ctx context.Context, key string, data []byte, match string) (version string, err error) {
	v, ok := AsVersioned(r.next)
	if !ok {
		return "", fmt.Errorf("%s: conditional writes: %w", r.next.Location(), errors.ErrUnsupported)
	}
	err = r.do(ctx, func() error {
		version, err = v.PutIf(ctx, key, data, match)
		return err
	})
	return version, err
}
