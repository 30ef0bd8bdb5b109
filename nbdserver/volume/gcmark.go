package volume

import (
	"context"
	"fmt"
	"math/bits"
	"slices"
	"strings"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// A collection's marking (docs/architecture.md, "Space accounting"):
// the index trees of every manifest, walked level by level so that each
// page's owner is known before its entries are added, into one sorted
// set of (ID, owner). The set is what the sweep keeps; the owners are
// what the space accounting charges each stored byte to.

// owned is an object the manifests reference, a data chunk or an index
// page, and which of them do.
type owned struct {
	id chunkstore.ID
	// tag is the object's class in the top bits (ownerBits up): 0 for an
	// index page, else log2 of the data chunk's plaintext size less 15;
	// below, its owner: the one manifest that references it (its index
	// in the run's list), or shared within one volume, or across volumes.
	tag uint32
}

const (
	ownerBits = 28
	ownerMask = 1<<ownerBits - 1
	// sharedIn | v: more than one manifest of volume v, or its head,
	// references the object, and no other volume does.
	sharedIn = 1 << (ownerBits - 1)
	// sharedAcross: manifests of more than one volume reference it.
	sharedAcross = ownerMask
	// maxManifests bounds a run's manifests (and volumes).
	maxManifests = sharedIn - 1
)

func (o owned) owner() uint32 { return o.tag & ownerMask }
func (o owned) isPage() bool  { return o.tag>>ownerBits == 0 }

// plain is the object's plaintext size: a page's, or its volume's chunk
// size (a volume's last chunk, if cut short, counts whole).
func (o owned) plain() int64 {
	if c := o.tag >> ownerBits; c != 0 {
		return 1 << (15 + c)
	}
	return int64(pageLen)
}

// chunkClass is tag's class of a data chunk of cs bytes (a power of two
// from MinChunkSize to MaxChunkSize: 1 to 9).
func chunkClass(cs int64) uint32 { return uint32(bits.TrailingZeros64(uint64(cs))-15) << ownerBits }

func compareOwned(a, b owned) int { return a.id.Compare(b.id) }

// owners combines owners: manifestVol is each manifest's volume, and
// shares says which volumes were found to share an object with another.
type owners struct {
	manifestVol []uint32
	shares      []bool
}

// vol is the volume of owner o; ok is false for sharedAcross.
func (w *owners) vol(o uint32) (v uint32, ok bool) {
	switch {
	case o == sharedAcross:
		return 0, false
	case o&sharedIn != 0:
		return o &^ sharedIn, true
	}
	return w.manifestVol[o], true
}

// combine is the owner of an object both a and b reference.
func (w *owners) combine(a, b uint32) uint32 {
	if a == b {
		return a
	}
	va, oka := w.vol(a)
	vb, okb := w.vol(b)
	if oka && okb && va == vb {
		return sharedIn | va
	}
	// Every volume whose owner meets another volume's here is marked,
	// so each volume that shares is (each owner added meets the rest).
	if oka {
		w.shares[va] = true
	}
	if okb {
		w.shares[vb] = true
	}
	return sharedAcross
}

func (w *owners) combineOwned(a *owned, b owned) {
	a.tag = a.tag&^ownerMask | w.combine(a.owner(), b.owner())
}

// mergeSorted folds buf, in any order, into set, sorted and distinct by
// compare: entries that compare equal are combined (if combine is set)
// into the one kept. It returns the merged set and buf emptied for
// reuse; the first merge makes buf itself the set, with no copy.
func mergeSorted[T any](set, buf []T, compare func(a, b T) int, combine func(*T, T)) (merged, emptied []T) {
	slices.SortFunc(buf, compare)
	n := 0
	for i := range buf {
		if n > 0 && compare(buf[n-1], buf[i]) == 0 {
			if combine != nil {
				combine(&buf[n-1], buf[i])
			}
			continue
		}
		buf[n] = buf[i]
		n++
	}
	buf = buf[:n]
	if len(set) == 0 {
		return buf, nil
	}
	out := make([]T, 0, len(set)+len(buf))
	i, j := 0, 0
	for i < len(set) && j < len(buf) {
		switch c := compare(set[i], buf[j]); {
		case c < 0:
			out = append(out, set[i])
			i++
		case c > 0:
			out = append(out, buf[j])
			j++
		default:
			e := set[i]
			if combine != nil {
				combine(&e, buf[j])
			}
			out = append(out, e)
			i, j = i+1, j+1
		}
	}
	out = append(append(out, set[i:]...), buf[j:]...)
	return out, buf[:0]
}

// spaceManifest is a manifest a collection marks.
type spaceManifest struct {
	key     string
	m       Manifest
	vol     uint32 // its volume's index in the run's list
	damaged bool   // its checksum failed: its figures are not believed
	// head: the volume's newest manifest that checks (of a snapshot and
	// the checkpoint kept in its place, the snapshot). Its tree is also
	// the volume's live state, so what it references counts as shared.
	head bool
}

// pageNode is an index page the marking reached.
type pageNode struct {
	owner   uint32      // as owned's
	reached bool        // owner is set
	from    int         // a manifest that reaches it, to name in messages
	done    bool        // total is known
	total   int64       // chunk entries that are not holes, below it
	below   []*pageNode // an interior page's children, one per entry that is not a hole
}

// reach records that owner reaches the page.
func (p *pageNode) reach(w *owners, owner uint32) {
	if !p.reached {
		p.owner, p.reached = owner, true
		return
	}
	p.owner = w.combine(p.owner, owner)
}

// chunks is how many entries below p are not holes (an entry that
// appears twice counts twice: it is read at both offsets).
func (p *pageNode) chunks() int64 {
	if !p.done {
		for _, c := range p.below {
			p.total += c.chunks()
		}
		p.done = true
	}
	return p.total
}

// sortedSet collects values into a sorted set, distinct by compare
// (values that compare equal are combined, if combine is set): added
// values wait in a buffer that is merged in once it is as large as the
// set (or a million values), so the set is copied a logarithmic number
// of times.
type sortedSet[T any] struct {
	compare func(a, b T) int
	combine func(*T, T)
	set     []T // sorted, distinct
	buf     []T // added since the last merge
}

func (s *sortedSet[T]) add(v T) {
	s.buf = append(s.buf, v)
	if len(s.buf) >= max(len(s.set), 1<<20) {
		s.merge()
	}
}

func (s *sortedSet[T]) merge() {
	s.set, s.buf = mergeSorted(s.set, s.buf, s.compare, s.combine)
}

// ownerMarker collects the objects the trees of a collection's manifests
// reference, with their owners, into a sorted set.
type ownerMarker struct {
	sortedSet[owned]
	s     *chunkstore.Store
	w     *owners
	pages int // pages read
}

func newOwnerMarker(s *chunkstore.Store, w *owners) *ownerMarker {
	return &ownerMarker{sortedSet: sortedSet[owned]{compare: compareOwned, combine: w.combineOwned}, s: s, w: w}
}

// mark walks the trees of ms, one level of every tree at a time, so that
// when a page's entries are added every page above it has been read and
// its owner is final. class[vol] is the volume's data chunks' class. It
// returns the root pages by ID.
func (m *ownerMarker) mark(ctx context.Context, ms []spaceManifest, class []uint32) (map[chunkstore.ID]*pageNode, error) {
	if len(ms) > maxManifests {
		return nil, fmt.Errorf("garbage collection: %d manifests, more than the %d one run counts", len(ms), maxManifests)
	}
	level := map[chunkstore.ID]*pageNode{}
	for i, sm := range ms {
		if sm.m.Root.IsZero() {
			continue
		}
		n := level[sm.m.Root]
		if n == nil {
			n = &pageNode{from: i}
			level[sm.m.Root] = n
		}
		owner := uint32(i)
		if sm.head {
			owner = sharedIn | sm.vol
		}
		n.reach(m.w, owner)
	}
	roots := level
	for lv := indexLevels - 1; lv >= 0; lv-- {
		next := map[chunkstore.ID]*pageNode{}
		ids := make([]chunkstore.ID, 0, len(level))
		for id := range level {
			ids = append(ids, id)
		}
		slices.SortFunc(ids, chunkstore.ID.Compare)
		for _, id := range ids {
			n := level[id]
			page, err := m.s.Get(ctx, id)
			if err == nil && len(page) != pageLen {
				err = fmt.Errorf("%d bytes, want %d: %w", len(page), pageLen, chunkstore.ErrCorrupt)
			}
			if err != nil {
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				return nil, fmt.Errorf("%w: %s: index page %s: %w (verify and repair it, or delete what references it, then run gc again)", ErrGCDamage, ms[n.from].key, id, err)
			}
			m.pages++
			m.add(owned{id: id, tag: n.owner}) // class 0: a page
			leaf := lv == 0
			chunkTag := class[ms[n.from].vol] | n.owner
			for off := 0; off < pageLen; off += idLen {
				var child chunkstore.ID
				copy(child[:], page[off:off+idLen])
				if child.IsZero() {
					continue
				}
				if leaf {
					n.total++
					m.add(owned{id: child, tag: chunkTag})
					continue
				}
				c := next[child]
				if c == nil {
					c = &pageNode{from: n.from}
					next[child] = c
				}
				c.reach(m.w, n.owner)
				n.below = append(n.below, c)
			}
			n.done = leaf
		}
		level = next
	}
	m.merge()
	return roots, nil
}

// findOwned is the entry of id in the sorted set, if any.
func findOwned(set []owned, id chunkstore.ID) (owned, bool) {
	i, ok := slices.BinarySearchFunc(set, id, func(o owned, id chunkstore.ID) int { return o.id.Compare(id) })
	if !ok {
		return owned{}, false
	}
	return set[i], true
}

// logicalReferenced is the LREFER of manifest m, whose root page is
// root (nil for an empty index): the bytes it reads that are neither
// holes nor zeroed extents of its deltas.
func logicalReferenced(ctx context.Context, env *Env, m Manifest, root *pageNode) (int64, error) {
	cs := m.ChunkSize
	var n int64
	if root != nil {
		n = root.chunks() * cs
		if tail := m.Size % cs; tail != 0 {
			// The last chunk holds only tail bytes of the volume.
			id, err := lookupIndex(ctx, env.Store, m.Root, uint64(m.Size/cs))
			if err != nil {
				return 0, err
			}
			if !id.IsZero() {
				n -= cs - tail
			}
		}
	}
	if len(m.Deltas) == 0 {
		return n, nil
	}
	// Each extent a delta decides replaces what the root holds there.
	err := env.deltaReader(m.Volume).resolveDeltas(ctx, m.Deltas, 0, m.Size, func(x xext) error {
		if x.kind == dxBase {
			return nil
		}
		under, err := rootBytes(ctx, env.Store, m, x.off, x.end())
		n -= under
		if x.kind == dxData {
			n += x.length
		}
		return err
	})
	return n, err
}

// rootBytes is how many bytes of [off, end) m's root holds in chunks
// that are not holes.
func rootBytes(ctx context.Context, s chunkStore, m Manifest, off, end int64) (int64, error) {
	if m.Root.IsZero() {
		return 0, nil
	}
	cs := m.ChunkSize
	end = min(end, m.Size)
	var n int64
	for c := uint64(off / cs); int64(c)*cs < end; {
		id, next, err := lookupRun(ctx, s, m.Root, c)
		if err != nil {
			return 0, err
		}
		if !id.IsZero() {
			n += min(end, int64(c+1)*cs) - max(off, int64(c)*cs)
		}
		c = next
	}
	return n, nil
}

// volumeOfKey is the volume a key under volumes/ belongs to.
func volumeOfKey(k string) string {
	rest, _ := strings.CutPrefix(k, "volumes/")
	name, _, _ := strings.Cut(rest, "/")
	return name
}
