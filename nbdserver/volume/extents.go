package volume

import "github.com/google/btree"

// extent is a run of a layer: [off, off+length) of the volume holds the
// log data at pos, or zeros.
type extent struct {
	off, length int64
	zero        bool
	pos         Pos // where the data for off starts; unused when zero
}

func (e extent) end() int64 { return e.off + e.length }

// slice returns the part of e in [from, to), which must overlap it.
func (e extent) slice(from, to int64) extent {
	from, to = max(from, e.off), min(to, e.end())
	out := e
	if !e.zero {
		out.pos.Off += from - e.off
	}
	out.off, out.length = from, to-from
	return out
}

// extentMap holds non-overlapping extents ordered by offset. Inserting
// replaces whatever the new extent covers, so the map always says what the
// newest record says. Not safe for concurrent use; its layer locks it.
type extentMap struct {
	t *btree.BTreeG[extent]
	// bytes of data (not zero) the map points at, for accounting.
	dataBytes int64
}

func newExtentMap() *extentMap {
	return &extentMap{t: btree.NewG(32, func(a, b extent) bool { return a.off < b.off })}
}

// insert records e, cutting or dropping what it overlaps. Its cost is
// O(log n) plus the extents it replaces, whatever e's length.
func (m *extentMap) insert(e extent) {
	if e.length <= 0 {
		return
	}
	var over []extent
	// The extent that starts before e may reach into it.
	m.t.DescendLessOrEqual(extent{off: e.off}, func(x extent) bool {
		if x.end() > e.off {
			over = append(over, x)
		}
		return false
	})
	m.t.AscendRange(extent{off: e.off}, extent{off: e.end()}, func(x extent) bool {
		if len(over) == 0 || over[len(over)-1].off != x.off {
			over = append(over, x)
		}
		return true
	})
	for _, x := range over {
		m.remove(x)
		if x.off < e.off {
			m.add(x.slice(x.off, e.off))
		}
		if x.end() > e.end() {
			m.add(x.slice(e.end(), x.end()))
		}
	}
	m.add(e)
}

func (m *extentMap) add(e extent) {
	m.t.ReplaceOrInsert(e)
	if !e.zero {
		m.dataBytes += e.length
	}
}

func (m *extentMap) remove(e extent) {
	m.t.Delete(e)
	if !e.zero {
		m.dataBytes -= e.length
	}
}

// visit calls fn for each extent piece inside [off, off+n), in order,
// clipped to the range. Gaps (ranges this map says nothing about) are not
// visited.
func (m *extentMap) visit(off, n int64, fn func(extent) bool) {
	end := off + n
	goOn := true
	m.t.DescendLessOrEqual(extent{off: off}, func(x extent) bool {
		if x.end() > off {
			goOn = fn(x.slice(off, end))
		}
		return false
	})
	if !goOn {
		return
	}
	m.t.AscendRange(extent{off: off + 1}, extent{off: end}, func(x extent) bool {
		return fn(x.slice(off, end))
	})
}

// len is the number of extents.
func (m *extentMap) len() int { return m.t.Len() }
