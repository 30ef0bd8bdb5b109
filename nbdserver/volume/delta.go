package volume

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// A delta is an extent map stored as frames in journal packs: pages of
// sorted, disjoint extents and a top that lists the packs the delta uses
// and its pages (docs/architecture.md, "Step 1, as built"). A manifest
// applies its deltas, oldest first, over its index root.
//
// Top frame plaintext:
//
//	"NVDT" 1
//	uvarint packs, then per pack: uvarint length, the key
//	uvarint pages, then per page: uvarint gap from the previous page's
//	    end, uvarint length of its range, uvarint extents, uvarint data
//	    bytes, uvarint pack, frame ref
//
// Page frame plaintext:
//
//	"NVDP" 1
//	uvarint frames, then per frame: uvarint pack, frame ref
//	uvarint extents, then per extent: uvarint gap from the previous
//	    extent's end (or the page's first byte), uvarint length, kind byte,
//	    and for data: uvarint frame, uvarint offset in its plaintext
//
// A frame ref is uvarint offset, uvarint stored length, uvarint plaintext
// length, 32 bytes of hash.

// DeltaRef names a stored delta: its top frame and the pack that holds it.
type DeltaRef struct {
	Pack string              `json:"pack"`
	Top  chunkstore.FrameRef `json:"top"`
}

// dkind is what an extent of a delta reads as.
type dkind uint8

const (
	dxData dkind = 1 // bytes of a journal frame
	dxZero dkind = 2 // zeros
	dxBase dkind = 3 // what the manifest's index root holds (masks older deltas)
)

// dext is an extent of a delta page.
type dext struct {
	off, length int64
	kind        dkind
	frame       uint32 // index into the page's frames (data)
	in          uint32 // where off's byte is in the frame's plaintext (data)
}

func (x dext) end() int64 { return x.off + x.length }

// frameLoc is a frame of some pack of the delta.
type frameLoc struct {
	pack uint32 // index into the top's packs
	ref  chunkstore.FrameRef
}

type deltaPage struct {
	frames []frameLoc
	ext    []dext
}

// pageRef is a page as the top lists it.
type pageRef struct {
	first, end int64 // the page's extents lie in [first, end)
	extents    int64
	dataBytes  int64
	pack       uint32
	ref        chunkstore.FrameRef
}

type deltaTop struct {
	packs []string
	pages []pageRef
}

func (t *deltaTop) extents() int64 {
	var n int64
	for _, p := range t.pages {
		n += p.extents
	}
	return n
}

// Limits of the delta format.
const (
	pageExtents  = 16384 // extents per page a writer puts at most
	maxTopPacks  = 1 << 20
	maxPageBytes = chunkstore.MaxFrameSize
)

var (
	topMagic  = []byte("NVDT\x01")
	pageMagic = []byte("NVDP\x01")
)

func appendRef(b []byte, r chunkstore.FrameRef) []byte {
	b = binary.AppendUvarint(b, uint64(r.Off))
	b = binary.AppendUvarint(b, uint64(r.Len))
	b = binary.AppendUvarint(b, uint64(r.Plain))
	return append(b, r.Sum[:]...)
}

func encodeTop(t deltaTop) []byte {
	b := slices.Clone(topMagic)
	b = binary.AppendUvarint(b, uint64(len(t.packs)))
	for _, p := range t.packs {
		b = binary.AppendUvarint(b, uint64(len(p)))
		b = append(b, p...)
	}
	b = binary.AppendUvarint(b, uint64(len(t.pages)))
	prev := int64(0)
	for _, p := range t.pages {
		b = binary.AppendUvarint(b, uint64(p.first-prev))
		b = binary.AppendUvarint(b, uint64(p.end-p.first))
		b = binary.AppendUvarint(b, uint64(p.extents))
		b = binary.AppendUvarint(b, uint64(p.dataBytes))
		b = binary.AppendUvarint(b, uint64(p.pack))
		b = appendRef(b, p.ref)
		prev = p.end
	}
	return b
}

func encodePage(p deltaPage, first int64) []byte {
	b := slices.Clone(pageMagic)
	b = binary.AppendUvarint(b, uint64(len(p.frames)))
	for _, f := range p.frames {
		b = binary.AppendUvarint(b, uint64(f.pack))
		b = appendRef(b, f.ref)
	}
	b = binary.AppendUvarint(b, uint64(len(p.ext)))
	prev := first
	for _, x := range p.ext {
		b = binary.AppendUvarint(b, uint64(x.off-prev))
		b = binary.AppendUvarint(b, uint64(x.length))
		b = append(b, byte(x.kind))
		if x.kind == dxData {
			b = binary.AppendUvarint(b, uint64(x.frame))
			b = binary.AppendUvarint(b, uint64(x.in))
		}
		prev = x.end()
	}
	return b
}

// errDelta is what a delta that does not parse is; callers wrap it with
// the frame it came from.
var errDelta = errors.New("delta")

// reader decodes a delta frame; its first failure sticks.
type reader struct {
	b   []byte
	err error
}

func (r *reader) fail(why string, args ...any) {
	if r.err == nil {
		r.err = fmt.Errorf("%w: %w: %s", chunkstore.ErrCorrupt, errDelta, fmt.Sprintf(why, args...))
	}
}

func (r *reader) uvarint(max uint64, what string) uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.fail("%s: truncated", what)
		return 0
	}
	r.b = r.b[n:]
	if v > max {
		r.fail("%s %d is more than %d", what, v, max)
		return 0
	}
	return v
}

// count reads a count of items that take at least min bytes each.
func (r *reader) count(min int, what string) int {
	return int(r.uvarint(uint64(len(r.b)/min), what))
}

func (r *reader) bytes(n int, what string) []byte {
	if r.err != nil {
		return nil
	}
	if len(r.b) < n {
		r.fail("%s: truncated", what)
		return nil
	}
	out := r.b[:n]
	r.b = r.b[n:]
	return out
}

// minRef is the fewest bytes a FrameRef takes: three numbers of a byte
// each and the hash. The counts of entries that hold one are bounded by
// it, so it must not be more than the least an entry can be, or a small
// valid delta would be refused.
const minRef = 3 + 32

func (r *reader) ref() chunkstore.FrameRef {
	var f chunkstore.FrameRef
	f.Off = int64(r.uvarint(1<<62, "frame offset"))
	f.Len = uint32(r.uvarint(1<<32-1, "frame length"))
	f.Plain = uint32(r.uvarint(chunkstore.MaxFrameSize, "frame plaintext length"))
	copy(f.Sum[:], r.bytes(len(f.Sum), "frame hash"))
	if r.err == nil && (f.Len == 0 || f.Plain == 0) {
		r.fail("empty frame")
	}
	return f
}

func (r *reader) magic(m []byte) {
	if got := r.bytes(len(m), "magic"); r.err == nil && string(got) != string(m) {
		r.fail("magic %q, want %q", got, m)
	}
}

func (r *reader) done() error {
	if r.err == nil && len(r.b) != 0 {
		r.fail("%d bytes after the end", len(r.b))
	}
	return r.err
}

// decodeTop parses and checks a top frame.
func decodeTop(b []byte) (deltaTop, error) {
	r := &reader{b: b}
	r.magic(topMagic)
	var t deltaTop
	n := r.count(2, "pack count")
	if n > maxTopPacks {
		r.fail("%d packs", n)
	}
	t.packs = make([]string, 0, n)
	for i := 0; i < n && r.err == nil; i++ {
		k := string(r.bytes(int(r.uvarint(1024, "pack name length")), "pack name"))
		if r.err == nil {
			if err := chunkstore.CheckKey(k); err != nil {
				r.fail("pack name %q: %v", k, err)
			}
		}
		t.packs = append(t.packs, k)
	}
	n = r.count(5+minRef, "page count") // five numbers and a reference
	t.pages = make([]pageRef, 0, n)
	prev := int64(0)
	for i := 0; i < n && r.err == nil; i++ {
		var p pageRef
		p.first = prev + int64(r.uvarint(MaxSize, "page gap"))
		p.end = p.first + int64(r.uvarint(MaxSize, "page range"))
		p.extents = int64(r.uvarint(pageExtents*4, "page extents"))
		p.dataBytes = int64(r.uvarint(MaxSize, "page data bytes"))
		p.pack = uint32(r.uvarint(uint64(len(t.packs)), "page pack"))
		p.ref = r.ref()
		switch {
		case r.err != nil:
		case p.end > MaxSize:
			r.fail("page %d ends at %d, past the largest volume", i, p.end)
		case p.end <= p.first || p.extents == 0:
			r.fail("page %d is empty", i)
		case int(p.pack) >= len(t.packs):
			r.fail("page %d is in pack %d of %d", i, p.pack, len(t.packs))
		case p.dataBytes > p.end-p.first:
			r.fail("page %d has %d data bytes in a range of %d", i, p.dataBytes, p.end-p.first)
		}
		t.pages = append(t.pages, p)
		prev = p.end
	}
	return t, r.done()
}

// decodePage parses a page frame and checks it against what the top says
// of it (pr) and of the delta's packs (npacks).
func decodePage(b []byte, pr pageRef, npacks int) (deltaPage, error) {
	r := &reader{b: b}
	r.magic(pageMagic)
	var p deltaPage
	n := r.count(1+minRef, "frame count") // a pack and a reference
	p.frames = make([]frameLoc, 0, n)
	for i := 0; i < n && r.err == nil; i++ {
		var f frameLoc
		f.pack = uint32(r.uvarint(uint64(npacks), "frame pack"))
		f.ref = r.ref()
		if r.err == nil && int(f.pack) >= npacks {
			r.fail("frame %d is in pack %d of %d", i, f.pack, npacks)
		}
		p.frames = append(p.frames, f)
	}
	n = r.count(3, "extent count")
	if r.err == nil && int64(n) != pr.extents {
		r.fail("%d extents, the top says %d", n, pr.extents)
	}
	p.ext = make([]dext, 0, n)
	at, data := pr.first, int64(0)
	for i := 0; i < n && r.err == nil; i++ {
		var x dext
		x.off = at + int64(r.uvarint(uint64(pr.end-at), "extent gap"))
		x.length = int64(r.uvarint(uint64(pr.end-x.off), "extent length"))
		x.kind = dkind(r.uvarint(255, "extent kind"))
		if x.kind == dxData {
			x.frame = uint32(r.uvarint(uint64(len(p.frames)), "extent frame"))
			x.in = uint32(r.uvarint(chunkstore.MaxFrameSize, "extent offset in frame"))
		}
		switch {
		case r.err != nil:
		case x.length == 0:
			r.fail("extent %d is empty", i)
		case x.kind != dxData && x.kind != dxZero && x.kind != dxBase:
			r.fail("extent %d has kind %d", i, x.kind)
		case x.kind == dxData && int(x.frame) >= len(p.frames):
			r.fail("extent %d is in frame %d of %d", i, x.frame, len(p.frames))
		case x.kind == dxData && int64(x.in)+x.length > int64(p.frames[x.frame].ref.Plain):
			r.fail("extent %d: %d+%d past its frame's %d bytes", i, x.in, x.length, p.frames[x.frame].ref.Plain)
		}
		if x.kind == dxData {
			data += x.length
		}
		p.ext = append(p.ext, x)
		at = x.end()
	}
	if r.err == nil && data != pr.dataBytes {
		r.fail("%d data bytes, the top says %d", data, pr.dataBytes)
	}
	return p, r.done()
}
