package volume

import (
	"context"
	"fmt"
	"slices"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// The index maps chunk numbers to chunk IDs: a radix tree of fixed depth
// (indexLevels) whose pages hold indexFanout IDs each and are stored as
// chunks themselves. A zero ID is a hole at any level, so an untouched
// subtree costs nothing, and a page that did not change keeps its ID and
// is shared by every index that contains it.
const (
	indexFanoutBits = 12
	indexFanout     = 1 << indexFanoutBits // IDs per page
	indexLevels     = 3
	idLen           = len(chunkstore.ID{})
	pageLen         = indexFanout * idLen // 128 KiB
	// MaxChunks is how many chunks an index can address: 2^36, 64 TiB of
	// 1 MiB chunks with room to grow.
	MaxChunks = uint64(1) << (indexFanoutBits * indexLevels)
)

// chunkStore is what the index and the uploader need of a chunk store.
type chunkStore interface {
	Put(ctx context.Context, data []byte) (chunkstore.ID, error)
	Get(ctx context.Context, id chunkstore.ID) ([]byte, error)
}

// span is the number of chunks one entry of a page at level covers
// (level 0 is the leaves, whose entries are chunks).
func span(level int) uint64 { return uint64(1) << (indexFanoutBits * level) }

// lookupIndex returns the ID of chunk c in the index rooted at root.
func lookupIndex(ctx context.Context, s chunkStore, root chunkstore.ID, c uint64) (chunkstore.ID, error) {
	id, _, err := lookupRun(ctx, s, root, c)
	return id, err
}

// lookupRun is lookupIndex that also says, when chunk c is a hole, where
// the hole it lies in ends at least (the end of the empty subtree found).
func lookupRun(ctx context.Context, s chunkStore, root chunkstore.ID, c uint64) (chunkstore.ID, uint64, error) {
	if c >= MaxChunks {
		return chunkstore.ZeroID, 0, fmt.Errorf("chunk %d beyond the index's %d", c, MaxChunks)
	}
	id := root
	for level := indexLevels - 1; level >= 0; level-- {
		if id.IsZero() {
			covered := span(level + 1) // chunks under the empty entry
			return id, (c/covered + 1) * covered, nil
		}
		page, err := s.Get(ctx, id)
		if err != nil {
			return chunkstore.ZeroID, 0, fmt.Errorf("index page %s: %w", id, err)
		}
		if len(page) != pageLen {
			return chunkstore.ZeroID, 0, fmt.Errorf("index page %s: %d bytes, want %d: %w", id, len(page), pageLen, chunkstore.ErrCorrupt)
		}
		slot := (c / span(level)) % indexFanout
		copy(id[:], page[slot*uint64(idLen):])
	}
	return id, c + 1, nil
}

// chunkRange is [first, end) of chunk numbers.
type chunkRange struct{ first, end uint64 }

// pointUpdate sets chunk c to id.
type pointUpdate struct {
	c  uint64
	id chunkstore.ID
}

// indexUpdate is a batch of changes to an index: zeros (holes) and points.
// Zeros are sorted and disjoint; points are sorted, unique, and not inside
// any zero range.
type indexUpdate struct {
	zeros  []chunkRange
	points []pointUpdate
}

// updateIndex applies u to the index rooted at root, copy-on-write, and
// returns the new root. Only pages on the path of a change are read and
// written; a range of zeros that covers a whole subtree sets its entry to
// the zero ID without touching it.
func updateIndex(ctx context.Context, s chunkStore, root chunkstore.ID, u indexUpdate) (chunkstore.ID, error) {
	return updatePage(ctx, s, indexLevels-1, root, 0, u)
}

func updatePage(ctx context.Context, s chunkStore, level int, id chunkstore.ID, base uint64, u indexUpdate) (chunkstore.ID, error) {
	if len(u.zeros) == 0 && len(u.points) == 0 {
		return id, nil
	}
	pageSpan := span(level + 1)
	if len(u.points) == 0 && len(u.zeros) == 1 && u.zeros[0].first <= base && u.zeros[0].end >= base+pageSpan {
		return chunkstore.ZeroID, nil // all of it is a hole now
	}
	page := make([]byte, pageLen)
	if !id.IsZero() {
		old, err := s.Get(ctx, id)
		if err != nil {
			return chunkstore.ZeroID, fmt.Errorf("index page %s: %w", id, err)
		}
		if len(old) != pageLen {
			return chunkstore.ZeroID, fmt.Errorf("index page %s: %d bytes, want %d", id, len(old), pageLen)
		}
		copy(page, old)
	}
	childSpan := span(level)
	for _, slot := range touchedSlots(u, base, childSpan) {
		childBase := base + slot*childSpan
		sub := u.within(childBase, childBase+childSpan)
		entry := page[slot*uint64(idLen) : (slot+1)*uint64(idLen)]
		var child chunkstore.ID
		if level == 0 {
			// A leaf slot is one chunk: a point sets it, a zero clears it.
			if len(sub.points) > 0 {
				child = sub.points[0].id
			}
		} else {
			copy(child[:], entry)
			var err error
			if child, err = updatePage(ctx, s, level-1, child, childBase, sub); err != nil {
				return chunkstore.ZeroID, err
			}
		}
		copy(entry, child[:])
	}
	return s.Put(ctx, page)
}

// within returns the part of u inside [first, end), with zero ranges
// clipped.
func (u indexUpdate) within(first, end uint64) indexUpdate {
	var out indexUpdate
	lo, _ := slices.BinarySearchFunc(u.points, first, func(p pointUpdate, c uint64) int { return cmpUint(p.c, c) })
	hi, _ := slices.BinarySearchFunc(u.points, end, func(p pointUpdate, c uint64) int { return cmpUint(p.c, c) })
	out.points = u.points[lo:hi]
	i, _ := slices.BinarySearchFunc(u.zeros, first, func(r chunkRange, c uint64) int {
		if r.end <= c {
			return -1
		}
		return 1
	})
	for ; i < len(u.zeros) && u.zeros[i].first < end; i++ {
		r := u.zeros[i]
		out.zeros = append(out.zeros, chunkRange{max(r.first, first), min(r.end, end)})
	}
	return out
}

// touchedSlots lists, in order, the slots of a page starting at base whose
// children u changes.
func touchedSlots(u indexUpdate, base, childSpan uint64) []uint64 {
	var slots []uint64
	add := func(s uint64) {
		if n := len(slots); n == 0 || slots[n-1] < s {
			slots = append(slots, s)
		}
	}
	pageEnd := base + childSpan*indexFanout
	zi, pi := 0, 0
	for zi < len(u.zeros) || pi < len(u.points) {
		if pi < len(u.points) && (zi == len(u.zeros) || u.points[pi].c < u.zeros[zi].first) {
			if c := u.points[pi].c; c >= base && c < pageEnd {
				add((c - base) / childSpan)
			}
			pi++
			continue
		}
		r := u.zeros[zi]
		first, end := max(r.first, base), min(r.end, pageEnd)
		for s := (first - base) / childSpan; first < end && s <= (end-1-base)/childSpan; s++ {
			add(s)
		}
		zi++
	}
	return slots
}
