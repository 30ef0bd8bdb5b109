package volume

import (
	"container/list"
	"context"
	"encoding/binary"
	"fmt"
	"sort"
	"sync"

	"lukechampine.com/blake3"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// xext is an extent of a delta with its frame resolved: the form merges,
// folds and reads handle.
type xext struct {
	off, length int64
	kind        dkind
	pack        string
	ref         chunkstore.FrameRef
	in          uint32
}

func (x xext) end() int64 { return x.off + x.length }

// slice is the part of x in [from, to), which must lie inside it.
func (x xext) slice(from, to int64) xext {
	if x.kind == dxData {
		x.in += uint32(from - x.off)
	}
	x.off, x.length = from, to-from
	return x
}

// deltaCache keeps decoded tops and pages, by the hash of their frame,
// within a budget of bytes. Shared by the volumes of an Env.
type deltaCache struct {
	mu    sync.Mutex
	max   int64
	used  int64
	lru   *list.List // of *cached, most recent first
	items map[chunkstore.ID]*list.Element
}

type cached struct {
	sum  chunkstore.ID
	v    any
	cost int64
}

// deltaCacheBytes bounds the decoded delta cache.
const deltaCacheBytes = 32 << 20

func newDeltaCache(max int64) *deltaCache {
	return &deltaCache{max: max, lru: list.New(), items: map[chunkstore.ID]*list.Element{}}
}

func (c *deltaCache) get(sum chunkstore.ID) (any, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.items[sum]
	if !ok {
		return nil, false
	}
	c.lru.MoveToFront(e)
	return e.Value.(*cached).v, true
}

func (c *deltaCache) add(sum chunkstore.ID, v any, cost int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.items[sum]; ok || cost > c.max {
		return
	}
	c.items[sum] = c.lru.PushFront(&cached{sum: sum, v: v, cost: cost})
	c.used += cost
	for c.used > c.max {
		e := c.lru.Back()
		x := e.Value.(*cached)
		c.lru.Remove(e)
		delete(c.items, x.sum)
		c.used -= x.cost
	}
}

func (e *Env) deltas() *deltaCache {
	e.deltaOnce.Do(func() { e.deltaCache = newDeltaCache(deltaCacheBytes) })
	return e.deltaCache
}

// loadTop reads and decodes the top of delta d.
func (v *Volume) loadTop(ctx context.Context, d DeltaRef) (*deltaTop, error) {
	c := v.env.deltas()
	if t, ok := c.get(d.Top.Sum); ok {
		if t, ok := t.(*deltaTop); ok {
			return t, nil
		}
	}
	b, err := v.store.GetFrame(ctx, d.Pack, d.Top)
	if err != nil {
		return nil, fmt.Errorf("volume %q: delta top in %s: %w", v.cfg.Name, d.Pack, err)
	}
	t, err := decodeTop(b)
	if err != nil {
		return nil, fmt.Errorf("volume %q: delta top in %s at %d: %w", v.cfg.Name, d.Pack, d.Top.Off, err)
	}
	c.add(d.Top.Sum, &t, int64(len(b))+int64(len(t.pages))*96)
	return &t, nil
}

// loadPage reads and decodes page i of top t.
func (v *Volume) loadPage(ctx context.Context, t *deltaTop, i int) (*deltaPage, error) {
	pr := t.pages[i]
	c := v.env.deltas()
	key := pageKey(pr, len(t.packs))
	if p, ok := c.get(key); ok {
		if p, ok := p.(*deltaPage); ok {
			return p, nil
		}
	}
	pack := t.packs[pr.pack]
	b, err := v.store.GetFrame(ctx, pack, pr.ref)
	if err != nil {
		return nil, fmt.Errorf("volume %q: delta page in %s: %w", v.cfg.Name, pack, err)
	}
	p, err := decodePage(b, pr, len(t.packs))
	if err != nil {
		return nil, fmt.Errorf("volume %q: delta page in %s at %d: %w", v.cfg.Name, pack, pr.ref.Off, err)
	}
	c.add(key, &p, int64(len(p.ext))*40+int64(len(p.frames))*64)
	return &p, nil
}

// pageKey is what a decoded page is cached under: its hash and what its
// top says of it. A page's offsets are relative to its first byte, so two
// pages with the same bytes at other places decode to other extents, and
// are checked against other counts.
func pageKey(pr pageRef, npacks int) chunkstore.ID {
	b := make([]byte, 0, len(pr.ref.Sum)+5*binary.MaxVarintLen64)
	b = append(b, pr.ref.Sum[:]...)
	for _, n := range []int64{pr.first, pr.end, pr.extents, pr.dataBytes, int64(npacks)} {
		b = binary.AppendVarint(b, n)
	}
	return blake3.Sum256(b)
}

// wide resolves extent x of page p of top t.
func wide(t *deltaTop, p *deltaPage, x dext) xext {
	w := xext{off: x.off, length: x.length, kind: x.kind}
	if x.kind == dxData {
		f := p.frames[x.frame]
		w.pack, w.ref, w.in = t.packs[f.pack], f.ref, x.in
	}
	return w
}

// visitDelta calls fn for each extent of delta d inside [off, off+n),
// clipped to it, in order.
func (v *Volume) visitDelta(ctx context.Context, d DeltaRef, off, n int64, fn func(xext) error) error {
	t, err := v.loadTop(ctx, d)
	if err != nil {
		return err
	}
	end := off + n
	for i := sort.Search(len(t.pages), func(i int) bool { return t.pages[i].end > off }); i < len(t.pages) && t.pages[i].first < end; i++ {
		p, err := v.loadPage(ctx, t, i)
		if err != nil {
			return err
		}
		for j := sort.Search(len(p.ext), func(j int) bool { return p.ext[j].end() > off }); j < len(p.ext) && p.ext[j].off < end; j++ {
			x := wide(t, p, p.ext[j])
			if err := fn(x.slice(max(x.off, off), min(x.end(), end))); err != nil {
				return err
			}
		}
	}
	return nil
}

// deltaReader reads the deltas of volume name's manifests outside an
// open volume (verify, the space count): a Volume with only what the
// delta code uses, reading through the env's chunk cache.
func (e *Env) deltaReader(name string) *Volume {
	return &Volume{env: e, store: e.Store, cfg: Config{Name: name}}
}

// resolveDeltas splits [off, off+n) by what deltas (oldest first) say of
// it, newest first: fn gets data and zero extents as they are, and base
// extents, or ranges no delta covers, as kind dxBase (read the root).
func (v *Volume) resolveDeltas(ctx context.Context, deltas []DeltaRef, off, n int64, fn func(xext) error) error {
	var resolve func(i int, off, n int64) error
	resolve = func(i int, off, n int64) error {
		if n <= 0 {
			return nil
		}
		if i < 0 {
			return fn(xext{off: off, length: n, kind: dxBase})
		}
		at := off
		err := v.visitDelta(ctx, deltas[i], off, n, func(x xext) error {
			if err := resolve(i-1, at, x.off-at); err != nil {
				return err
			}
			at = x.end()
			return fn(x)
		})
		if err != nil {
			return err
		}
		return resolve(i-1, at, off+n-at)
	}
	return resolve(len(deltas)-1, off, n)
}

// deltaSource is a sorted stream of extents: a stored delta read page by
// page, or one held in memory.
type deltaSource struct {
	cur xext
	ok  bool
	// stored
	v    *Volume
	ctx  context.Context
	t    *deltaTop
	page int
	p    *deltaPage
	j    int
	// in memory
	mem []xext
}

func (v *Volume) storedSource(ctx context.Context, d DeltaRef) (*deltaSource, error) {
	t, err := v.loadTop(ctx, d)
	if err != nil {
		return nil, err
	}
	s := &deltaSource{v: v, ctx: ctx, t: t, page: -1}
	return s, s.next()
}

func memSource(x []xext) *deltaSource {
	s := &deltaSource{mem: x}
	_ = s.next()
	return s
}

// next moves to the next extent; ok is false past the last.
func (s *deltaSource) next() error {
	if s.t == nil {
		s.ok = len(s.mem) > 0
		if s.ok {
			s.cur, s.mem = s.mem[0], s.mem[1:]
		}
		return nil
	}
	for s.p == nil || s.j >= len(s.p.ext) {
		s.page++
		if s.page >= len(s.t.pages) {
			s.ok = false
			return nil
		}
		p, err := s.v.loadPage(s.ctx, s.t, s.page)
		if err != nil {
			s.ok = false
			return err
		}
		s.p, s.j = p, 0
	}
	s.cur, s.ok = wide(s.t, s.p, s.p.ext[s.j]), true
	s.j++
	return nil
}

// overlay merges srcs (oldest first) into one sorted stream where the
// newest extent over each byte wins, calling fn for each piece in order.
func overlay(srcs []*deltaSource, fn func(xext) error) error {
	pos := int64(-1)
	for {
		// best is the newest source whose extent covers pos.
		best, first := -1, int64(-1)
		for i := len(srcs) - 1; i >= 0; i-- {
			s := srcs[i]
			for s.ok && s.cur.end() <= pos {
				if err := s.next(); err != nil {
					return err
				}
			}
			if !s.ok {
				continue
			}
			if s.cur.off <= pos && best < 0 {
				best = i
			}
			if first < 0 || s.cur.off < first {
				first = s.cur.off
			}
		}
		if first < 0 {
			return nil
		}
		if best < 0 {
			pos = first // nothing covers pos: on to the nearest start
			continue
		}
		end := srcs[best].cur.end()
		for _, s := range srcs[best+1:] {
			if s.ok && s.cur.off < end {
				end = s.cur.off // a newer one starts after pos
			}
		}
		if err := fn(srcs[best].cur.slice(max(pos, srcs[best].cur.off), end)); err != nil {
			return err
		}
		pos = end
	}
}
