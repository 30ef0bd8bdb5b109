package chunkstore

import (
	"errors"
	"fmt"
	"math"
)

// Sentinel errors. Backends translate their own errors into these once, at
// the edge where a library's or the kernel's errors enter, so callers match
// them with errors.Is whatever the backend.
var (
	// ErrNotFound: the key or chunk does not exist.
	ErrNotFound = errors.New("not found")
	// ErrCorrupt: an object exists but its content does not match its ID or
	// cannot be decoded. Never retried; the data is wrong, not late.
	ErrCorrupt = errors.New("corrupt")
	// ErrUnavailable: the backend could not be reached or answered with a
	// server-side failure (timeout, refused connection, 5xx). Transient:
	// the same call may succeed later, so it is the only error retried.
	ErrUnavailable = errors.New("backend unavailable")
	// ErrPermission: the backend refused the credentials or the operation.
	ErrPermission = errors.New("permission denied")
	// ErrNoSpace: the backend is out of space (ENOSPC, EDQUOT).
	ErrNoSpace = errors.New("no space left")
	// ErrInvalidKey: a key that no backend accepts (empty, absolute, "..").
	ErrInvalidKey = errors.New("invalid key")
)

// CorruptError names the chunk that failed verification. It matches
// ErrCorrupt with errors.Is.
type CorruptError struct {
	ID     ID
	Reason string
}

func (e *CorruptError) Error() string {
	return fmt.Sprintf("chunk %s is corrupt: %s", e.ID, e.Reason)
}

// Is makes errors.Is(err, ErrCorrupt) true for a *CorruptError.
func (e *CorruptError) Is(target error) bool { return target == ErrCorrupt }

// shortObject is the error of a range past an object's end.
func shortObject(key string, size, off, n int64) error {
	return &KeyError{Op: "get", Key: key, Err: fmt.Errorf("%w: the object is %d bytes; %d+%d runs past its end", ErrCorrupt, size, off, n)}
}

// checkRange refuses a negative range.
func checkRange(key string, off, n int64) error {
	if off < 0 || n < 0 || n > math.MaxInt64-off || n > 1<<40 {
		return &KeyError{Op: "get", Key: key, Err: fmt.Errorf("%w: range %d+%d", ErrInvalidKey, off, n)}
	}
	return nil
}

// KeyError wraps a sentinel with the operation and key it happened to, so a
// message says what failed where without losing errors.Is.
type KeyError struct {
	Op  string // "put", "get", "has", "delete", "list"
	Key string
	Err error
}

func (e *KeyError) Error() string { return e.Op + " " + e.Key + ": " + e.Err.Error() }
func (e *KeyError) Unwrap() error { return e.Err }
