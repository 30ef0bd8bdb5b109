package chunkstore

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// ErrPrecondition: a conditional write found the object not in the version
// it named.
var ErrPrecondition = errors.New("precondition failed")

// Versioned is a Backend that can replace an object only if it is still
// the version the caller read: a compare-and-swap for small control
// objects such as the repository lease. Every backend here implements it.
type Versioned interface {
	// GetVersion returns the object and an opaque tag of its version.
	GetVersion(ctx context.Context, key string) ([]byte, string, error)
	// PutIf stores data under key if its current version is match; an
	// empty match means the key must not exist. It returns the new
	// version; a mismatch is ErrPrecondition and changes nothing.
	PutIf(ctx context.Context, key string, data []byte, match string) (string, error)
}

// AsVersioned returns b's Versioned side, looking through wrappers.
func AsVersioned(b Backend) (Versioned, bool) {
	for {
		if v, ok := b.(Versioned); ok {
			return v, true
		}
		u, ok := b.(Unwrapper)
		if !ok {
			return nil, false
		}
		b = u.Unwrap()
	}
}

// Mem: versions are a counter.

func (m *Mem) GetVersion(ctx context.Context, key string) ([]byte, string, error) {
	data, err := m.Get(ctx, key)
	if err != nil {
		return nil, "", err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return data, m.versions[key], nil
}

func (m *Mem) PutIf(ctx context.Context, key string, data []byte, match string) (string, error) {
	if err := opCheck(ctx, key); err != nil {
		return "", err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	_, exists := m.objects[key]
	if cur := m.versions[key]; (match == "" && exists) || (match != "" && (!exists || cur != match)) {
		return "", &KeyError{Op: "put-if", Key: key, Err: ErrPrecondition}
	}
	if m.versions == nil {
		m.versions = map[string]string{}
	}
	m.seq++
	v := strconv.FormatUint(m.seq, 10)
	m.objects[key] = append([]byte(nil), data...)
	m.versions[key] = v
	return v, nil
}

// Local: an flock on one lock file serializes conditional writes between
// processes on this host; the version is the content's SHA-256 (the
// content of a lease changes with every renewal).

func contentVersion(data []byte) string {
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:16])
}

func (l *Local) GetVersion(ctx context.Context, key string) ([]byte, string, error) {
	data, err := l.Get(ctx, key)
	if err != nil {
		return nil, "", err
	}
	return data, contentVersion(data), nil
}

func (l *Local) PutIf(ctx context.Context, key string, data []byte, match string) (string, error) {
	if err := opCheck(ctx, key); err != nil {
		return "", err
	}
	lock, err := os.OpenFile(filepath.Join(l.root, ".versioned.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return "", &KeyError{Op: "put-if", Key: key, Err: translateOSError(err)}
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return "", &KeyError{Op: "put-if", Key: key, Err: fmt.Errorf("flock: %w", err)}
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN)
	cur, err := os.ReadFile(l.path(key))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if match != "" {
			return "", &KeyError{Op: "put-if", Key: key, Err: ErrPrecondition}
		}
	case err != nil:
		return "", &KeyError{Op: "put-if", Key: key, Err: translateOSError(err)}
	case match == "" || contentVersion(cur) != match:
		return "", &KeyError{Op: "put-if", Key: key, Err: ErrPrecondition}
	}
	if err := l.Put(ctx, key, data); err != nil {
		return "", err
	}
	return contentVersion(data), nil
}
