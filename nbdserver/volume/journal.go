package volume

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"slices"
	"sync"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// Journal shipping (docs/architecture.md, "Step 1, as built"): a seal
// stores a layer's scattered writes as journal frames and a delta, and
// only the chunks it rewrote whole as chunks; deltas merge like an LSM
// tree, and a merge that reaches the bottom folds the chunks that are
// half changed.
const (
	frameTarget = 64 << 10 // plaintext of a journal frame, at most
	packTarget  = 32 << 20 // a pack is finished once it holds this much
	mergeFactor = 4        // the newest delta merges with the one below once it is this close in extents
	maxDepth    = 16       // deltas in a chain, at most
	// foldAllowance chunks may fold at any full merge, whatever the
	// credit: a small volume folds without waiting for one.
	foldAllowance = 16
	// maxFoldCredit bounds the credit, so a fold that comes after a long
	// time of sparse writes is not one burst.
	maxFoldCredit = 256 << 20
)

// journalPrefix is where volume name keeps its journal packs.
func journalPrefix(name string) string { return volumePrefix(name) + "journal/" }

// packWriter writes the packs of one seal, named after its mark: the
// random part makes a retried seal write new packs rather than change
// ones an earlier attempt's manifest may name.
type packWriter struct {
	v       *Volume
	ctx     context.Context
	seq     uint64
	b       *chunkstore.PackBuilder
	key     string
	written []string
}

func (w *packWriter) current() string {
	if w.b == nil {
		var r [4]byte
		_, _ = rand.Read(r[:])
		w.key = fmt.Sprintf("%s%016x-%s", journalPrefix(w.v.cfg.Name), w.seq, hex.EncodeToString(r[:]))
		w.b = w.v.store.NewPack(w.key)
	}
	return w.key
}

// add puts plain in the current pack as a frame, and finishes the pack
// once it is full.
func (w *packWriter) add(plain []byte) (string, chunkstore.FrameRef, error) {
	key := w.current()
	ref, err := w.b.Add(plain)
	if err != nil {
		return "", ref, err
	}
	if w.b.Len() >= packTarget {
		err = w.flush()
	}
	return key, ref, err
}

// flush writes the current pack, if it has frames.
func (w *packWriter) flush() error {
	if w.b == nil || w.b.Frames() == 0 {
		return nil
	}
	if err := w.v.store.PutPack(w.ctx, w.key, w.b.Finish()); err != nil {
		return fmt.Errorf("volume %q: write journal pack: %w", w.v.cfg.Name, err)
	}
	w.written = append(w.written, w.key)
	w.b = nil
	return nil
}

// deltaWriter writes a sorted stream of extents as a delta's pages and
// top.
type deltaWriter struct {
	w       *packWriter
	packs   []string
	packIdx map[string]uint32
	pages   []pageRef
	extents int64

	page     deltaPage
	frameIdx map[frameKey]uint32
	data     int64
}

type frameKey struct {
	pack uint32
	off  int64
}

func newDeltaWriter(w *packWriter) *deltaWriter {
	return &deltaWriter{w: w, packIdx: map[string]uint32{}, frameIdx: map[frameKey]uint32{}}
}

func (d *deltaWriter) pack(key string) uint32 {
	i, ok := d.packIdx[key]
	if !ok {
		i = uint32(len(d.packs))
		d.packs = append(d.packs, key)
		d.packIdx[key] = i
	}
	return i
}

func (d *deltaWriter) add(x xext) error {
	e := dext{off: x.off, length: x.length, kind: x.kind}
	if x.kind == dxData {
		k := frameKey{d.pack(x.pack), x.ref.Off}
		fi, ok := d.frameIdx[k]
		if !ok {
			fi = uint32(len(d.page.frames))
			d.page.frames = append(d.page.frames, frameLoc{pack: k.pack, ref: x.ref})
			d.frameIdx[k] = fi
		}
		e.frame, e.in = fi, x.in
		d.data += x.length
	}
	if n := len(d.page.ext); n > 0 {
		last := &d.page.ext[n-1]
		// Pieces a merge cut apart that still follow each other are one
		// extent again.
		if last.end() == e.off && last.kind == e.kind && (e.kind != dxData || last.frame == e.frame && int64(last.in)+last.length == int64(e.in)) {
			last.length += e.length
			return nil
		}
	}
	d.page.ext = append(d.page.ext, e)
	d.extents++
	if len(d.page.ext) >= pageExtents {
		return d.flushPage()
	}
	return nil
}

func (d *deltaWriter) flushPage() error {
	p := d.page
	if len(p.ext) == 0 {
		return nil
	}
	first, end := p.ext[0].off, p.ext[len(p.ext)-1].end()
	key, ref, err := d.w.add(encodePage(p, first))
	if err != nil {
		return err
	}
	d.pages = append(d.pages, pageRef{first: first, end: end, extents: int64(len(p.ext)), dataBytes: d.data, pack: d.pack(key), ref: ref})
	d.page, d.data = deltaPage{}, 0
	clear(d.frameIdx)
	return nil
}

// finish writes the last page and the top. An empty delta writes nothing
// and returns ok false.
func (d *deltaWriter) finish() (ref DeltaRef, ok bool, err error) {
	if err := d.flushPage(); err != nil {
		return DeltaRef{}, false, err
	}
	if len(d.pages) == 0 {
		return DeltaRef{}, false, nil
	}
	d.pack(d.w.current()) // the top's own pack, which add below fills
	key, top, err := d.w.add(encodeTop(deltaTop{packs: d.packs, pages: d.pages}))
	if err != nil {
		return DeltaRef{}, false, err
	}
	return DeltaRef{Pack: key, Top: top}, true, nil
}

// wholeChunks lists, in order, the chunks layer l rewrites whole with at
// least some data: a seal stores them as chunks.
func (l *layer) wholeChunks(cs int64) []uint64 {
	var out []uint64
	cur, cov, data := int64(-1), int64(0), false
	finish := func() {
		if cur >= 0 && data && cov == cs {
			out = append(out, uint64(cur))
		}
		cur = -1
	}
	l.extents.t.Ascend(func(x extent) bool {
		for o := x.off; o < x.end(); {
			c := o / cs
			if x.zero && o%cs == 0 && x.end()-o >= cs {
				finish() // whole chunks of zeros only: a zero extent says it
				o += (x.end() - o) / cs * cs
				continue
			}
			e := min(x.end(), (c+1)*cs)
			if c != cur {
				finish()
				cur, cov, data = c, 0, false
			}
			cov += e - o
			data = data || !x.zero
			o = e
		}
		return true
	})
	finish()
	return out
}

// layerDelta turns layer l, but for the whole chunks (sorted), into a
// delta's extents: data in journal frames added to w, zeros, and, when
// mask is set, base extents over the whole chunks.
func (v *Volume) layerDelta(ctx context.Context, w *packWriter, l *layer, whole []uint64, mask bool) ([]xext, error) {
	cs := v.cfg.ChunkSize
	var (
		out     []xext
		buf     = make([]byte, 0, frameTarget)
		pending []int // indexes in out of the data extents in buf
		err     error
	)
	flush := func() error {
		if len(buf) == 0 {
			return nil
		}
		key, ref, err := w.add(buf)
		if err != nil {
			return err
		}
		for _, i := range pending {
			out[i].pack, out[i].ref = key, ref
		}
		buf, pending = buf[:0], pending[:0]
		return nil
	}
	emit := func(x extent) error {
		if x.zero {
			out = append(out, xext{off: x.off, length: x.length, kind: dxZero})
			return nil
		}
		for x.length > 0 {
			if len(buf) == frameTarget {
				if err := flush(); err != nil {
					return err
				}
			}
			n := min(x.length, int64(frameTarget-len(buf)))
			at := len(buf)
			buf = buf[:at+int(n)]
			if err := v.log.ReadAt(buf[at:], x.pos); err != nil {
				return fmt.Errorf("volume %q: read log: %w", v.cfg.Name, err)
			}
			pending = append(pending, len(out))
			out = append(out, xext{off: x.off, length: n, kind: dxData, in: uint32(at)})
			x = x.slice(x.off+n, x.end())
		}
		return nil
	}
	wi := 0 // the next whole chunk
	l.extents.t.Ascend(func(x extent) bool {
		for x.length > 0 && err == nil {
			for wi < len(whole) && int64(whole[wi]+1)*cs <= x.off {
				if mask {
					out = append(out, xext{off: int64(whole[wi]) * cs, length: cs, kind: dxBase})
				}
				wi++
			}
			if wi < len(whole) && int64(whole[wi])*cs < x.end() {
				ws, we := int64(whole[wi])*cs, int64(whole[wi]+1)*cs
				if x.off < ws {
					err = emit(x.slice(x.off, ws))
				}
				x = x.slice(min(we, x.end()), x.end())
				continue
			}
			err = emit(x)
			break
		}
		if err == nil {
			err = ctx.Err()
		}
		return err == nil
	})
	for ; err == nil && wi < len(whole); wi++ {
		if mask {
			out = append(out, xext{off: int64(whole[wi]) * cs, length: cs, kind: dxBase})
		}
	}
	if err == nil {
		err = flush()
	}
	return out, err
}

// folder takes a full merge's stream of extents and splits it, chunk by
// chunk: chunks that are at least half changed are rebuilt (fold), whole
// chunks of zeros become holes, the rest goes on as extents (residual).
type folder struct {
	cs       int64
	cur      int64
	ext      []xext
	cov      int64
	zeros    []chunkRange
	residual func(xext) error
	fold     func(c uint64, ext []xext) error
	budget   int64 // bytes of chunks it may still fold
}

func (f *folder) add(x xext) error {
	if x.kind == dxBase {
		return nil // nothing is below a full merge but the root
	}
	for o := x.off; o < x.end(); {
		c := o / f.cs
		if x.kind == dxZero && o%f.cs == 0 && x.end()-o >= f.cs {
			if err := f.finishChunk(); err != nil {
				return err
			}
			k := (x.end() - o) / f.cs
			if n := len(f.zeros); n > 0 && f.zeros[n-1].end == uint64(c) {
				f.zeros[n-1].end += uint64(k)
			} else {
				f.zeros = append(f.zeros, chunkRange{uint64(c), uint64(c + k)})
			}
			o += k * f.cs
			continue
		}
		e := min(x.end(), (c+1)*f.cs)
		if c != f.cur {
			if err := f.finishChunk(); err != nil {
				return err
			}
			f.cur = c
		}
		f.ext = append(f.ext, x.slice(o, e))
		f.cov += e - o
		o = e
	}
	return nil
}

func (f *folder) finishChunk() error {
	defer func() { f.cur, f.ext, f.cov = -1, f.ext[:0], 0 }()
	if f.cur < 0 || len(f.ext) == 0 {
		return nil
	}
	if 2*f.cov >= f.cs && f.budget >= f.cs {
		f.budget -= f.cs
		return f.fold(uint64(f.cur), slices.Clone(f.ext))
	}
	for _, x := range f.ext {
		if err := f.residual(x); err != nil {
			return err
		}
	}
	return nil
}

// foldChunk builds chunk c of root overlaid with ext and stores it.
func (v *Volume) foldChunk(ctx context.Context, root chunkstore.ID, c uint64, ext []xext, buf []byte) (chunkstore.ID, error) {
	cs := v.cfg.ChunkSize
	start := int64(c) * cs
	covered := int64(0)
	for _, x := range ext {
		covered += x.length
	}
	if covered < cs {
		if err := v.readIndex(ctx, root, buf, start); err != nil {
			return chunkstore.ZeroID, err
		}
	}
	for _, x := range ext {
		dst := buf[x.off-start : x.end()-start]
		switch x.kind {
		case dxZero:
			clear(dst)
		case dxData:
			data, err := v.store.GetFrame(ctx, x.pack, x.ref)
			if err != nil {
				return chunkstore.ZeroID, fmt.Errorf("volume %q: fold chunk %d: %w", v.cfg.Name, c, err)
			}
			copy(dst, data[x.in:])
		}
	}
	id, err := v.store.Put(ctx, buf)
	if err != nil {
		return chunkstore.ZeroID, fmt.Errorf("volume %q chunk %d: %w", v.cfg.Name, c, err)
	}
	return id, nil
}

// workers runs jobs on n goroutines; the first error cancels the rest.
type workers struct {
	ctx    context.Context
	cancel context.CancelFunc
	jobs   chan func(ctx context.Context, buf []byte) error
	wg     sync.WaitGroup
	once   sync.Once
	err    error
}

func startWorkers(ctx context.Context, n int, bufSize int64) *workers {
	w := &workers{jobs: make(chan func(context.Context, []byte) error)}
	w.ctx, w.cancel = context.WithCancel(ctx)
	for range n {
		w.wg.Go(func() {
			buf := make([]byte, bufSize)
			for job := range w.jobs {
				if err := job(w.ctx, buf); err != nil {
					w.once.Do(func() { w.err = err; w.cancel() })
				}
			}
		})
	}
	return w
}

func (w *workers) do(job func(ctx context.Context, buf []byte) error) error {
	select {
	case w.jobs <- job:
		return nil
	case <-w.ctx.Done():
		return w.ctx.Err() // finish returns the error that stopped them
	}
}

// finish waits for every job and returns the first error.
func (w *workers) finish() error {
	close(w.jobs)
	w.wg.Wait()
	w.cancel()
	return w.err
}

// mergeCount is how many of chain's newest deltas merge with a new delta
// of n extents: while the merged delta holds at least 1/mergeFactor of
// the extents of the next one below, it takes that one too; and the
// chain stays within maxDepth.
func (v *Volume) mergeCount(ctx context.Context, chain []DeltaRef, n int64) (int, error) {
	k := 0
	for i := len(chain) - 1; i >= 0; i-- {
		t, err := v.loadTop(ctx, chain[i])
		if err != nil {
			return 0, err
		}
		if e := t.extents(); n*mergeFactor >= e || len(chain)-k+1 > maxDepth {
			n += e
			k++
			continue
		}
		break
	}
	return k, nil
}

// sealResult is what shipLayer made: the new root and chain, and the packs
// it wrote.
type sealResult struct {
	root    chunkstore.ID
	deltas  []DeltaRef
	packs   []string
	merged  bool  // deltas were merged: packs may have died
	folded  int   // chunks folded
	shipped int64 // bytes of data shipped as journal
	// repacked is the bytes of journal copied out of sparse packs.
	repacked int64
}

// shipLayer stores layer l over base: its whole chunks as chunks, the
// rest as a journal delta, merged and folded as the chain asks.
func (v *Volume) shipLayer(ctx context.Context, base Manifest, l *layer) (res sealResult, err error) {
	cs := v.cfg.ChunkSize
	pw := &packWriter{v: v, ctx: ctx, seq: l.mark.seq}
	res = sealResult{root: base.Root, deltas: slices.Clone(base.Deltas)}
	defer func() { res.packs = pw.written }()

	whole := l.wholeChunks(cs)
	points, err := v.buildChunks(ctx, base.Root, l, whole)
	if err != nil {
		return res, err
	}
	ext, err := v.layerDelta(ctx, pw, l, whole, len(base.Deltas) > 0)
	if err != nil {
		return res, err
	}
	for _, x := range ext {
		if x.kind == dxData {
			res.shipped += x.length
		}
	}
	k := 0
	if len(ext) > 0 {
		if k, err = v.mergeCount(ctx, base.Deltas, int64(len(ext))); err != nil {
			return res, err
		}
	}
	var zeros []chunkRange
	switch {
	case len(ext) == 0:
	case k == 0:
		dw := newDeltaWriter(pw)
		for _, x := range ext {
			if err := dw.add(x); err != nil {
				return res, err
			}
		}
		ref, ok, err := dw.finish()
		if err != nil {
			return res, err
		}
		if ok {
			res.deltas = append(res.deltas, ref)
		}
	default:
		// The layer's frames go first, in a pack of their own, so the
		// merge and the fold can read them.
		if err := pw.flush(); err != nil {
			return res, err
		}
		below := res.deltas[:len(res.deltas)-k]
		srcs := make([]*deltaSource, 0, k+1)
		for _, d := range res.deltas[len(below):] {
			s, err := v.storedSource(ctx, d)
			if err != nil {
				return res, err
			}
			srcs = append(srcs, s)
		}
		srcs = append(srcs, memSource(ext))
		dw := newDeltaWriter(pw)
		// Packs whose journal is mostly dead have their live extents
		// copied into this seal's pack, so a delta's pack list (and the
		// packs kept) stays bounded.
		sparse, err := v.sparsePacks(ctx, res.deltas[len(below):], ext, pw.written)
		if err != nil {
			return res, err
		}
		cp := &copier{v: v, ctx: ctx, w: pw, sparse: sparse, next: dw.add}
		sink := cp.add
		var fp []pointUpdate
		var fpMu sync.Mutex
		var wk *workers
		var fo *folder
		if len(below) == 0 {
			// A full merge: fold what is half changed.
			wk = startWorkers(ctx, uploadWorkers, cs)
			// Folds are paid by journal shipped: at most twice its bytes
			// (a chunk folds once half of it changed), so no seal
			// rewrites the whole volume at once.
			budget := v.foldCredit + 2*res.shipped + foldAllowance*cs
			fo = &folder{cs: cs, cur: -1, budget: budget, residual: cp.add, fold: func(c uint64, ext []xext) error {
				return wk.do(func(ctx context.Context, buf []byte) error {
					id, err := v.foldChunk(ctx, base.Root, c, ext, buf)
					if err == nil {
						fpMu.Lock()
						fp = append(fp, pointUpdate{c: c, id: id})
						fpMu.Unlock()
					}
					return err
				})
			}}
			sink = fo.add
		}
		err = overlay(srcs, sink)
		if fo != nil {
			if err == nil {
				err = fo.finishChunk()
			}
			if werr := wk.finish(); werr != nil {
				err = werr // the job's error, not the cancellation it caused
			}
			zeros = fo.zeros
			res.folded = len(fp)
			points = append(points, fp...)
			slices.SortFunc(points, func(a, b pointUpdate) int { return cmpUint(a.c, b.c) })
		}
		if err == nil {
			err = cp.flush()
		}
		if err != nil {
			return res, err
		}
		res.repacked = cp.copied
		ref, ok, err := dw.finish()
		if err != nil {
			return res, err
		}
		res.deltas = slices.Clone(below)
		if ok {
			res.deltas = append(res.deltas, ref)
		}
		res.merged = true
	}
	if err := pw.flush(); err != nil {
		return res, err
	}
	if len(points) > 0 || len(zeros) > 0 {
		root, err := updateIndex(ctx, v.store, base.Root, indexUpdate{zeros: zeros, points: points})
		if err != nil {
			return res, fmt.Errorf("volume %q: update index: %w", v.cfg.Name, err)
		}
		res.root = root
	}
	return res, nil
}

// Repacking: once the deltas a merge reads name more than repackAbove
// packs, the live extents of those holding less than repackBelow bytes of
// them are copied into the merge's pack, and the sparse packs die (the
// sweep deletes them). Scattered writes that never fold would otherwise
// keep one pack per checkpoint alive for ever, and grow the top's list of
// packs past what a frame holds. Variables, so tests can make them small.
var (
	repackAbove = 256
	repackBelow = int64(packTarget / 4)
)

// sparsePacks counts the live journal bytes each pack holds in deltas
// (oldest first) and ext (newer), and returns the packs to copy out of:
// none while they are at most repackAbove. Packs of this seal (fresh) are
// never copied.
func (v *Volume) sparsePacks(ctx context.Context, deltas []DeltaRef, ext []xext, fresh []string) (map[string]bool, error) {
	names := map[string]bool{}
	for _, d := range deltas {
		t, err := v.loadTop(ctx, d)
		if err != nil {
			return nil, err
		}
		for _, p := range t.packs {
			names[p] = true
		}
	}
	if len(names) <= repackAbove {
		return nil, nil
	}
	srcs := make([]*deltaSource, 0, len(deltas)+1)
	for _, d := range deltas {
		s, err := v.storedSource(ctx, d)
		if err != nil {
			return nil, err
		}
		srcs = append(srcs, s)
	}
	srcs = append(srcs, memSource(ext))
	live := map[string]int64{}
	if err := overlay(srcs, func(x xext) error {
		if x.kind == dxData {
			live[x.pack] += x.length
		}
		return nil
	}); err != nil {
		return nil, err
	}
	sparse := map[string]bool{}
	for p, n := range live {
		if n < repackBelow && !slices.Contains(fresh, p) {
			sparse[p] = true
		}
	}
	return sparse, nil
}

// copier passes a sorted stream of extents on to next, copying the data
// of those in sparse packs into new frames of w first. The stream's order
// is kept: extents wait in the queue until the frame their copy is in has
// its place.
type copier struct {
	v       *Volume
	ctx     context.Context
	w       *packWriter
	sparse  map[string]bool
	next    func(xext) error
	buf     []byte
	queue   []xext
	pending []int // indexes in queue of the copies in buf
	copied  int64
}

// copierQueue bounds the extents a copier holds back.
const copierQueue = 4096

func (c *copier) add(x xext) error {
	if x.kind != dxData || !c.sparse[x.pack] {
		if len(c.queue) == 0 {
			return c.next(x)
		}
		c.queue = append(c.queue, x)
		if len(c.queue) >= copierQueue {
			return c.flush()
		}
		return nil
	}
	data, err := c.v.store.GetFrame(c.ctx, x.pack, x.ref)
	if err != nil {
		return fmt.Errorf("volume %q: repack journal: %w", c.v.cfg.Name, err)
	}
	src := data[x.in : int64(x.in)+x.length]
	for off := x.off; len(src) > 0; {
		if len(c.buf) == frameTarget {
			if err := c.flush(); err != nil {
				return err
			}
		}
		if c.buf == nil {
			c.buf = make([]byte, 0, frameTarget)
		}
		n := min(len(src), frameTarget-len(c.buf))
		c.pending = append(c.pending, len(c.queue))
		c.queue = append(c.queue, xext{off: off, length: int64(n), kind: dxData, in: uint32(len(c.buf))})
		c.buf = append(c.buf, src[:n]...)
		c.copied += int64(n)
		src, off = src[n:], off+int64(n)
	}
	return nil
}

// flush writes the frame being filled and passes the queue on.
func (c *copier) flush() error {
	if len(c.buf) > 0 {
		key, ref, err := c.w.add(c.buf)
		if err != nil {
			return err
		}
		for _, i := range c.pending {
			c.queue[i].pack, c.queue[i].ref = key, ref
		}
		c.buf, c.pending = c.buf[:0], c.pending[:0]
	}
	for _, x := range c.queue {
		if err := c.next(x); err != nil {
			return err
		}
	}
	c.queue = c.queue[:0]
	return nil
}
