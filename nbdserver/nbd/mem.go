package nbd

import (
	"context"
	"sync"
)

// Mem is a sparse Backend in memory, for tests: pages of 64 KiB appear on
// first write, so a large export costs only what is written. TRIM and
// WRITE_ZEROES free whole pages and zero partial ones.
type Mem struct {
	mu    sync.RWMutex
	size  int64
	pages map[int64][]byte

	// Flushes counts Flush calls, for tests of FLUSH and FUA.
	Flushes int64
}

const memPage = 64 << 10

// NewMem returns a zero-filled export of size bytes.
func NewMem(size int64) *Mem { return &Mem{size: size, pages: make(map[int64][]byte)} }

func (m *Mem) Size() int64 { return m.size }

func (m *Mem) ReadAt(_ context.Context, p []byte, off int64) error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	for len(p) > 0 {
		idx, in := off/memPage, off%memPage
		n := min(int64(len(p)), memPage-in)
		if page, ok := m.pages[idx]; ok {
			copy(p[:n], page[in:])
		} else {
			clear(p[:n])
		}
		p, off = p[n:], off+n
	}
	return nil
}

func (m *Mem) WriteAt(_ context.Context, p []byte, off int64, fua bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for len(p) > 0 {
		idx, in := off/memPage, off%memPage
		n := min(int64(len(p)), memPage-in)
		page, ok := m.pages[idx]
		if !ok {
			page = make([]byte, memPage)
			m.pages[idx] = page
		}
		copy(page[in:], p[:n])
		p, off = p[n:], off+n
	}
	if fua {
		m.Flushes++
	}
	return nil
}

func (m *Mem) Flush(context.Context) error {
	m.mu.Lock()
	m.Flushes++
	m.mu.Unlock()
	return nil
}

func (m *Mem) Trim(ctx context.Context, off, n int64) error { return m.Zero(ctx, off, n, false) }

func (m *Mem) Zero(_ context.Context, off, n int64, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for n > 0 {
		idx, in := off/memPage, off%memPage
		k := min(n, memPage-in)
		if page, ok := m.pages[idx]; ok {
			if k == memPage {
				delete(m.pages, idx)
			} else {
				clear(page[in : in+k])
			}
		}
		off, n = off+k, n-k
	}
	return nil
}

// Extents reports unwritten pages as holes that read as zeros.
func (m *Mem) Extents(_ context.Context, off, n int64) ([]Extent, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	end := min(off+n, m.size)
	var out []Extent
	for off < end {
		idx, in := off/memPage, off%memPage
		k := min(end-off, memPage-in)
		var flags uint32
		if _, ok := m.pages[idx]; !ok {
			flags = StateHole | StateZero
		}
		if last := len(out) - 1; last >= 0 && out[last].Flags == flags {
			out[last].Length += k
		} else {
			out = append(out, Extent{Length: k, Flags: flags})
		}
		off += k
	}
	return out, nil
}
