package nbd

import (
	"context"
	"slices"
	"strings"
	"sync"
)

// Export is one named block device a server offers.
type Export struct {
	Name        string
	Description string // shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION
	Backend     Backend
	ReadOnly    bool
	// Size constraints advertised with NBD_INFO_BLOCK_SIZE; zero means the
	// default (1, 4096, DefaultMaxPayload). MinBlock and PreferredBlock
	// are powers of two.
	MinBlock, PreferredBlock, MaxPayload uint32
	// Contexts are meta contexts beyond base:allocation, by name
	// ("namespace:leaf"), for BLOCK_STATUS.
	Contexts map[string]ContextFunc
}

// ContextFunc reports a meta context over a range, like Extenter.Extents.
type ContextFunc func(ctx context.Context, off, n int64) ([]Extent, error)

func (e *Export) minBlock() uint32 { return cmp0(e.MinBlock, 1) }
func (e *Export) preferredBlock() uint32 {
	return max(cmp0(e.PreferredBlock, 4096), e.minBlock())
}
func (e *Export) maxPayload() uint32 { return cmp0(e.MaxPayload, DefaultMaxPayload) }

func cmp0(v, def uint32) uint32 {
	if v == 0 {
		return def
	}
	return v
}

// contextNames lists the meta contexts of the export, base:allocation
// first.
func (e *Export) contextNames() []string {
	names := []string{ContextBaseAllocation}
	for n := range e.Contexts {
		if n != ContextBaseAllocation {
			names = append(names, n)
		}
	}
	slices.Sort(names[1:])
	return names
}

// matchContexts returns the contexts a query selects: "ns:" is a wildcard
// for a namespace only when wildcard is set (LIST), an exact name selects
// itself, anything else nothing.
func (e *Export) matchContexts(query string, wildcard bool) []string {
	var out []string
	for _, name := range e.contextNames() {
		ns, _, _ := strings.Cut(name, ":")
		if name == query || (wildcard && query == ns+":") {
			out = append(out, name)
		}
	}
	return out
}

// Exports is where a server looks exports up. Implementations are safe for
// concurrent use; the set may change while the server runs.
type Exports interface {
	// Lookup returns the export called name ("" is the default export).
	Lookup(name string) (*Export, bool)
	// List returns the exports NBD_OPT_LIST shows.
	List() []*Export
}

// ExportMap is an Exports held in memory.
type ExportMap struct {
	mu      sync.RWMutex
	exports map[string]*Export
}

// NewExportMap returns an ExportMap holding exports.
func NewExportMap(exports ...*Export) *ExportMap {
	m := &ExportMap{exports: make(map[string]*Export)}
	for _, e := range exports {
		m.Add(e)
	}
	return m
}

// Add adds e, replacing any export of the same name. Connections already
// attached to the old one keep it.
func (m *ExportMap) Add(e *Export) {
	m.mu.Lock()
	m.exports[e.Name] = e
	m.mu.Unlock()
}

// Remove removes the export called name.
func (m *ExportMap) Remove(name string) {
	m.mu.Lock()
	delete(m.exports, name)
	m.mu.Unlock()
}

func (m *ExportMap) Lookup(name string) (*Export, bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	e, ok := m.exports[name]
	return e, ok
}

func (m *ExportMap) List() []*Export {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]*Export, 0, len(m.exports))
	for _, e := range m.exports {
		out = append(out, e)
	}
	slices.SortFunc(out, func(a, b *Export) int { return strings.Compare(a.Name, b.Name) })
	return out
}
