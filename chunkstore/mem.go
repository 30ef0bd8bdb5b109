package chunkstore

import (
	"bytes"
	"context"
	"slices"
	"strconv"
	"strings"
	"sync"
)

// Mem is a Backend in memory, for unit tests. It copies data in and out, so
// callers can no more alias its objects than they could a real store's.
type Mem struct {
	mu       sync.RWMutex
	objects  map[string][]byte
	versions map[string]string // for PutIf; empty for plain Puts
	seq      uint64
}

// NewMem returns an empty in-memory backend.
func NewMem() *Mem { return &Mem{objects: make(map[string][]byte)} }

func (m *Mem) Location() string { return "mem:" }

func (m *Mem) Put(ctx context.Context, key string, data []byte) error {
	if err := opCheck(ctx, key); err != nil {
		return err
	}
	m.mu.Lock()
	m.objects[key] = slices.Clone(data)
	m.seq++
	if m.versions == nil {
		m.versions = map[string]string{}
	}
	m.versions[key] = strconv.FormatUint(m.seq, 10)
	m.mu.Unlock()
	return nil
}

func (m *Mem) GetRange(ctx context.Context, key string, off, n int64) ([]byte, error) {
	if err := checkRange(key, off, n); err != nil {
		return nil, err
	}
	data, err := m.Get(ctx, key)
	if err != nil {
		return nil, err
	}
	if off+n > int64(len(data)) {
		return nil, shortObject(key, int64(len(data)), off, n)
	}
	return bytes.Clone(data[off : off+n]), nil // not a view of the whole copy, which a cache would keep
}

func (m *Mem) Get(ctx context.Context, key string) ([]byte, error) {
	if err := opCheck(ctx, key); err != nil {
		return nil, err
	}
	m.mu.RLock()
	data, ok := m.objects[key]
	m.mu.RUnlock()
	if !ok {
		return nil, &KeyError{Op: "get", Key: key, Err: ErrNotFound}
	}
	if data == nil {
		data = []byte{}
	}
	return slices.Clone(data), nil
}

func (m *Mem) Has(ctx context.Context, key string) (bool, error) {
	if err := opCheck(ctx, key); err != nil {
		return false, err
	}
	m.mu.RLock()
	_, ok := m.objects[key]
	m.mu.RUnlock()
	return ok, nil
}

func (m *Mem) Delete(ctx context.Context, key string) error {
	if err := opCheck(ctx, key); err != nil {
		return err
	}
	m.mu.Lock()
	delete(m.objects, key)
	delete(m.versions, key)
	m.mu.Unlock()
	return nil
}

func (m *Mem) DeleteMany(ctx context.Context, keys []string) error {
	return deleteEach(ctx, m, keys)
}

func (m *Mem) List(ctx context.Context, prefix string, fn func(key string) error) error {
	return m.ListSizes(ctx, prefix, func(key string, _ int64) error { return fn(key) })
}

func (m *Mem) ListSizes(ctx context.Context, prefix string, fn func(key string, size int64) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	type entry struct {
		key  string
		size int64
	}
	m.mu.RLock()
	var entries []entry
	for k, v := range m.objects {
		if strings.HasPrefix(k, prefix) {
			entries = append(entries, entry{k, int64(len(v))})
		}
	}
	m.mu.RUnlock()
	slices.SortFunc(entries, func(a, b entry) int { return strings.Compare(a.key, b.key) })
	for _, e := range entries {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := fn(e.key, e.size); err != nil {
			return err
		}
	}
	return nil
}

// opCheck is the common entry check of a backend call: a done context or a
// bad key fail before any work.
func opCheck(ctx context.Context, key string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return CheckKey(key)
}
