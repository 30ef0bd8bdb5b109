// Package chunkstore keeps nbdvault's content-addressed chunks in an object
// store. It has two layers:
//
//   - Backend: raw objects under slash-separated keys (a local directory, S3,
//     memory). Every backend runs the same conformance suite (storetest).
//   - Store: chunks over a Backend. A chunk's ID is the BLAKE3-256 hash of its
//     plaintext; objects carry a self-describing codec header (zstd or raw);
//     every read is verified against its ID; the all-zero chunk is never
//     stored.
//
// Wrappers (Retry, the Store's cache) compose by taking a Backend and
// returning one.
package chunkstore

import (
	"context"
	"strings"
)

// Backend stores whole objects under keys. Keys are slash-separated paths
// such as "chunks/ab/ab12…" or "volumes/db/volume": no leading or trailing
// slash, no empty segment, no segment that starts with "." (backends keep
// their temporary files there).
//
// Every method is safe for concurrent use, honours ctx's deadline and
// cancellation, and returns errors that match this package's sentinels
// (ErrNotFound, ErrUnavailable, ErrPermission, ErrNoSpace, ErrInvalidKey) or
// ctx.Err().
type Backend interface {
	// Put stores data under key, atomically: a reader sees the old object or
	// the new one, never a part. Putting the same data again is a no-op in
	// effect. Put does not keep data after it returns.
	Put(ctx context.Context, key string, data []byte) error
	// Get returns the whole object, or an error matching ErrNotFound. The
	// caller owns the returned slice.
	Get(ctx context.Context, key string) ([]byte, error)
	// GetRange returns n bytes of the object from offset off (one ranged
	// GET on S3), or an error matching ErrNotFound. An object that ends
	// before off+n is an error matching ErrCorrupt: callers take ranges
	// from what describes the object, so a short object is a damaged one.
	// The caller owns the returned slice.
	GetRange(ctx context.Context, key string, off, n int64) ([]byte, error)
	// Has reports whether key exists.
	Has(ctx context.Context, key string) (bool, error)
	// Delete removes key. Deleting a missing key is not an error.
	Delete(ctx context.Context, key string) error
	// DeleteMany removes keys, as Delete does each (one request per
	// 1,000 keys on S3). On error any of them may or may not be gone;
	// the error names the keys that failed, or the request.
	DeleteMany(ctx context.Context, keys []string) error
	// List calls fn for every key that starts with prefix, in no particular
	// order; callers that need one sort. An error from fn stops the listing
	// and is returned as is.
	List(ctx context.Context, prefix string, fn func(key string) error) error
	// ListSizes is List with each object's stored size in bytes, taken
	// from the listing itself (no request per object). It yields the
	// keys List would.
	ListSizes(ctx context.Context, prefix string, fn func(key string, size int64) error) error
	// Location is the backend's location as a user would type it, for
	// messages ("/srv/repo", "s3://bucket/prefix").
	Location() string
}

// deleteEach is DeleteMany for a backend without a batch delete: Delete
// of each key, stopping at the first failure.
func deleteEach(ctx context.Context, b Backend, keys []string) error {
	for _, k := range keys {
		if err := b.Delete(ctx, k); err != nil {
			return err
		}
	}
	return nil
}

// Unwrapper is implemented by wrappers so a chain can be walked to the
// backend underneath (for example to reach the raw objects in a test).
type Unwrapper interface {
	Unwrap() Backend
}

// CheckKey returns ErrInvalidKey, with the key, when key is not a valid
// backend key.
func CheckKey(key string) error {
	if key == "" || strings.HasPrefix(key, "/") || strings.HasSuffix(key, "/") {
		return &KeyError{Op: "check", Key: key, Err: ErrInvalidKey}
	}
	for seg := range strings.SplitSeq(key, "/") {
		if seg == "" || seg[0] == '.' || strings.ContainsRune(seg, 0) {
			return &KeyError{Op: "check", Key: key, Err: ErrInvalidKey}
		}
	}
	return nil
}
