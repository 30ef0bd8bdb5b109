package volume

import (
	"context"
	"fmt"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// ChunkIDs returns the content IDs of the head's chunks first to
// first+n-1, as the chunk store names them (the zero ID for a chunk that
// reads as zeros; the last chunk counts as zero-padded to the chunk
// size). A client holding a copy of the volume compares them with its own
// chunks' to send only those that differ. Chunks that the write log
// changed since the last seal are read and hashed here; the others come
// from the index, with holes skipped a subtree at a time.
func (v *Volume) ChunkIDs(ctx context.Context, first uint64, n int) ([]chunkstore.ID, error) {
	cs := v.cfg.ChunkSize
	size := v.size.Load()
	total := uint64((size + cs - 1) / cs)
	if n < 0 || first > total || uint64(n) > total-first {
		return nil, fmt.Errorf("chunks %d+%d of volume %q (%d chunks): %w", first, n, v.cfg.Name, total, ErrOutOfRange)
	}
	v.gcMu.RLock() // before the view, as in ReadAt: its deltas' packs stay
	v.mu.RLock()
	vw := v.headView()
	dirty := make([]bool, n)
	for i := range dirty {
		off := int64(first+uint64(i)) * cs
		for _, l := range vw.layers {
			l.extents.visit(off, min(cs, size-off), func(extent) bool {
				dirty[i] = true
				return false
			})
			if dirty[i] {
				break
			}
		}
	}
	v.mu.RUnlock()
	// Chunks the journal changed since the index was built are read too.
	start := int64(first) * cs
	err := v.resolveDeltas(ctx, vw.deltas, start, min(int64(n)*cs, size-start), func(x xext) error {
		if x.kind != dxBase {
			for c := x.off / cs; c <= (x.end()-1)/cs; c++ {
				dirty[c-int64(first)] = true
			}
		}
		return nil
	})
	v.gcMu.RUnlock()
	if err != nil {
		return nil, err
	}

	out := make([]chunkstore.ID, n)
	var buf []byte
	for i := 0; i < n; {
		c := first + uint64(i)
		if dirty[i] {
			if buf == nil {
				buf = make([]byte, cs)
			}
			off := int64(c) * cs
			clear(buf)
			if err := v.ReadAt(ctx, buf[:min(cs, size-off)], off); err != nil {
				return nil, err
			}
			out[i] = v.store.Sum(buf)
			i++
			continue
		}
		id, next, err := lookupRun(ctx, v.store, vw.root, c)
		if err != nil {
			return nil, fmt.Errorf("volume %q: %w", v.cfg.Name, err)
		}
		out[i] = id
		i++
		if id.IsZero() { // the rest of the empty subtree, unless the log wrote there
			for i < n && first+uint64(i) < next && !dirty[i] {
				i++ // out[i] is already the zero ID
			}
		}
	}
	return out, nil
}
