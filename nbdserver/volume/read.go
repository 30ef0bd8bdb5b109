package volume

import (
	"context"
	"errors"
	"fmt"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// piece says where one run of a read comes from.
type piece struct {
	off, length int64
	src         pieceSource
	pos         Pos // for fromLog
}

type pieceSource uint8

const (
	fromBase pieceSource = iota // the view's index
	fromLog                     // log data at pos
	fromZero                    // a zero record
)

// view is what a read sees: an index root and the layers above it, newest
// last. Layers are read-only to readers: the open one only grows under
// v.mu, which plan holds.
type view struct {
	root   chunkstore.ID
	deltas []DeltaRef // over root, oldest first
	layers []*layer
	size   int64
}

// headView is the live head: the base and every layer.
func (v *Volume) headView() view {
	return view{root: v.base.Root, deltas: v.base.Deltas, layers: v.layers, size: v.size.Load()}
}

// snapshotView is what snapshot id holds: its own index once sealed, else
// the base and the layers up to its mark. id may also be a checkpoint's
// (a point in time): loaded is its manifest (loadCut), nil for others.
// Called with v.mu held.
func (v *Volume) snapshotView(id string, loaded *Manifest) (view, error) {
	for _, s := range v.snaps {
		if !s.is(id) {
			continue
		}
		if s.damage != nil {
			return view{}, fmt.Errorf("snapshot %s of volume %q: %w", s.ID, v.cfg.Name, s.damage)
		}
		if s.sealed {
			return view{root: s.Root, deltas: s.Deltas, size: s.Size}, nil
		}
		if vw, ok := v.markView(s.ID); ok {
			return vw, nil
		}
		return view{}, fmt.Errorf("snapshot %s of %q: its layer is gone", id, v.cfg.Name)
	}
	if c := v.cutIDs[id]; c != nil {
		// Still kept: its packs are (the sweep's barrier is behind gcMu).
		m := loaded
		if m == nil {
			m = c.m // sealed since loadCut looked: addCut kept it
		}
		if m == nil {
			return view{}, errReload
		}
		return view{root: m.Root, deltas: m.Deltas, size: m.Size}, nil
	}
	if vw, ok := v.markView(id); ok {
		return vw, nil
	}
	if _, ok := seqOfID(id); ok {
		return view{}, fmt.Errorf("checkpoint %s of volume %q: %w: it left the retention window", id, v.cfg.Name, ErrNoSnapshot)
	}
	return view{}, fmt.Errorf("snapshot %q of volume %q: %w", id, v.cfg.Name, ErrNoSnapshot)
}

// markView is the view at the mark id of a layer not sealed yet.
func (v *Volume) markView(id string) (view, bool) {
	for i, l := range v.layers {
		if l.mark != nil && l.mark.ID == id {
			return view{root: v.base.Root, deltas: v.base.Deltas, layers: v.layers[:i+1], size: l.mark.Size}, true
		}
	}
	return view{}, false
}

// plan resolves [off, off+n) in vw into pieces, newest layer first, in
// offset order. Called with v.mu held (shared).
func (vw view) plan(off, n int64) []piece {
	var out []piece
	var resolve func(off, n int64, top int)
	resolve = func(off, n int64, top int) {
		if n <= 0 {
			return
		}
		if top < 0 {
			out = append(out, piece{off: off, length: n, src: fromBase})
			return
		}
		at := off
		vw.layers[top].extents.visit(off, n, func(x extent) bool {
			resolve(at, x.off-at, top-1)
			p := piece{off: x.off, length: x.length, src: fromLog, pos: x.pos}
			if x.zero {
				p.src = fromZero
			}
			out = append(out, p)
			at = x.end()
			return true
		})
		resolve(at, off+n-at, top-1)
	}
	resolve(off, n, len(vw.layers)-1)
	return out
}

// ReadAt fills p with the head's bytes at off.
func (v *Volume) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := v.checkRange(off, int64(len(p))); err != nil {
		return err
	}
	// gcMu before the plan: a seal that frees segments between the plan
	// and the read would leave the plan pointing at deleted segments.
	v.gcMu.RLock()
	defer v.gcMu.RUnlock()
	v.mu.RLock()
	vw := v.headView()
	pieces := vw.plan(off, int64(len(p)))
	v.mu.RUnlock()
	return v.read(ctx, vw, pieces, p, off)
}

// ReadSnapshotAt fills p with snapshot id's bytes at off (id may be a
// label).
func (v *Volume) ReadSnapshotAt(ctx context.Context, id string, p []byte, off int64) error {
	_, err := reloadOnce(func() (struct{}, error) { return struct{}{}, v.readSnapshotAt(ctx, id, p, off) })
	return err
}

// errReload: a point's manifest was evicted from memory between loadCut
// and the plan; loading it again is the answer.
var errReload = errors.New("the point's manifest must be read again")

// reloadOnce runs f, and once more if it failed with errReload.
func reloadOnce[T any](f func() (T, error)) (T, error) {
	x, err := f()
	if errors.Is(err, errReload) {
		return f()
	}
	return x, err
}

func (v *Volume) readSnapshotAt(ctx context.Context, id string, p []byte, off int64) error {
	loaded, err := v.loadCut(ctx, id)
	if err != nil {
		return err
	}
	v.gcMu.RLock() // before the plan, as in ReadAt
	defer v.gcMu.RUnlock()
	v.mu.RLock()
	vw, err := v.snapshotView(id, loaded)
	if err == nil {
		err = v.checkRangeOf(id, vw.size, off, int64(len(p)))
	}
	var pieces []piece
	if err == nil {
		pieces = vw.plan(off, int64(len(p)))
	}
	v.mu.RUnlock()
	if err != nil {
		return err
	}
	return v.read(ctx, vw, pieces, p, off)
}

// read carries out a plan. It is called with gcMu held shared since
// before the plan was made, so the log segments the plan names are not
// deleted by a seal meanwhile.
func (v *Volume) read(ctx context.Context, vw view, pieces []piece, p []byte, off int64) error {
	for _, pc := range pieces {
		dst := p[pc.off-off : pc.off-off+pc.length]
		switch pc.src {
		case fromZero:
			clear(dst)
		case fromLog:
			if err := v.log.ReadAt(dst, pc.pos); err != nil {
				return fmt.Errorf("volume %q: read log: %w", v.cfg.Name, err)
			}
		case fromBase:
			if err := v.readBase(ctx, vw, dst, pc.off); err != nil {
				return err
			}
		}
	}
	return nil
}

// readBase fills dst with the bytes at off of vw's deltas over its root.
func (v *Volume) readBase(ctx context.Context, vw view, dst []byte, off int64) error {
	if len(vw.deltas) == 0 {
		return v.readIndex(ctx, vw.root, dst, off)
	}
	return v.resolveDeltas(ctx, vw.deltas, off, int64(len(dst)), func(x xext) error {
		d := dst[x.off-off : x.end()-off]
		switch x.kind {
		case dxZero:
			clear(d)
		case dxBase:
			return v.readIndex(ctx, vw.root, d, x.off)
		case dxData:
			data, err := v.store.GetFrame(ctx, x.pack, x.ref)
			if err != nil {
				return fmt.Errorf("volume %q: read journal: %w", v.cfg.Name, err)
			}
			copy(d, data[x.in:int64(x.in)+x.length])
		}
		return nil
	})
}

// readIndex fills dst with the bytes at off of the index rooted at root.
func (v *Volume) readIndex(ctx context.Context, root chunkstore.ID, dst []byte, off int64) error {
	cs := v.cfg.ChunkSize
	if root.IsZero() {
		clear(dst)
		return nil
	}
	for len(dst) > 0 {
		c, in := off/cs, off%cs
		n := min(int64(len(dst)), cs-in)
		id, err := lookupIndex(ctx, v.store, root, uint64(c))
		if err != nil {
			return fmt.Errorf("volume %q: %w", v.cfg.Name, err)
		}
		if id.IsZero() {
			clear(dst[:n])
		} else if err := v.store.ReadAt(ctx, id, cs, dst[:n], in); err != nil {
			// A small read fetches only the frames it needs.
			return fmt.Errorf("volume %q chunk %d: %w", v.cfg.Name, c, err)
		}
		dst, off = dst[n:], off+n
	}
	return nil
}

// Extent is a run of the volume with one allocation state.
type Extent struct {
	Length int64
	// Zero is true for a range known to read as zeros and not stored
	// (a hole).
	Zero bool
}

// Extents describes [off, off+n) of the head (or of snapshot id, if not
// empty) as runs of data and holes.
func (v *Volume) Extents(ctx context.Context, snapshotID string, off, n int64) ([]Extent, error) {
	return reloadOnce(func() ([]Extent, error) { return v.extents(ctx, snapshotID, off, n) })
}

func (v *Volume) extents(ctx context.Context, snapshotID string, off, n int64) ([]Extent, error) {
	loaded, err := v.loadCut(ctx, snapshotID)
	if err != nil {
		return nil, err
	}
	v.gcMu.RLock() // before the plan, as in ReadAt
	defer v.gcMu.RUnlock()
	v.mu.RLock()
	vw := v.headView()
	if snapshotID != "" {
		vw, err = v.snapshotView(snapshotID, loaded)
	}
	if err == nil {
		err = v.checkRangeOf(snapshotID, vw.size, off, n)
	}
	var pieces []piece
	if err == nil {
		pieces = vw.plan(off, n)
	}
	v.mu.RUnlock()
	if err != nil {
		return nil, err
	}
	var out []Extent
	add := func(length int64, zero bool) {
		if k := len(out) - 1; k >= 0 && out[k].Zero == zero {
			out[k].Length += length
			return
		}
		out = append(out, Extent{Length: length, Zero: zero})
	}
	cs := v.cfg.ChunkSize
	for _, pc := range pieces {
		switch pc.src {
		case fromZero:
			add(pc.length, true)
		case fromLog:
			add(pc.length, false)
		case fromBase:
			err := v.resolveDeltas(ctx, vw.deltas, pc.off, pc.length, func(x xext) error {
				if x.kind != dxBase {
					add(x.length, x.kind == dxZero)
					return nil
				}
				for o, end := x.off, x.end(); o < end; {
					c := o / cs
					id, next, err := lookupRun(ctx, v.store, vw.root, uint64(c))
					if err != nil {
						return fmt.Errorf("volume %q: %w", v.cfg.Name, err)
					}
					// A hole may cover a whole empty subtree: skip it at once.
					k := min(end, int64(next)*cs) - o
					add(k, id.IsZero())
					o += k
				}
				return nil
			})
			if err != nil {
				return nil, err
			}
		}
	}
	return out, nil
}

// Snapshots lists the volume's snapshots, oldest first.
func (v *Volume) Snapshots() []SnapshotInfo {
	v.mu.RLock()
	defer v.mu.RUnlock()
	out := make([]SnapshotInfo, 0, len(v.snaps))
	for _, s := range v.snaps {
		out = append(out, SnapshotInfo{ID: s.ID, Kind: KindSnapshot, Label: s.Label, Time: s.Time, Size: s.Size, Sealed: s.sealed, Protected: s.Protected, By: s.By, Damaged: s.damage})
	}
	return out
}
