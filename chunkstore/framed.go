package chunkstore

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// A framed chunk object (codec version 2) stores a chunk as frames of F
// bytes, each compressed on its own, behind a table that lets one frame be
// fetched with one ranged GET and verified alone against the chunk ID
// (tree.go; docs/architecture.md, "Step 3a"):
//
//	offset    size    field
//	0         2       magic "NV"
//	2         1       format version 2
//	3         1       0
//	4         4       plaintext length P, little endian
//	8         1       log2 F (minFrameBits..maxFrameBits)
//	9         3       0
//	12        36 × N  per frame: stored length (uint32 LE; frameRaw set: the
//	                  plaintext as is, else one zstd frame), then its
//	                  BLAKE3 chaining value
//	12 + 36N  ...     the frames' stored bytes, back to back, to the end
//
// N = P / F ≥ 2. A chunk whose length is not such a multiple of F is a
// version 1 object (codec.go).
const (
	framedVersion = 2
	// framedSealedVersion is a framed chunk of an encrypted repository:
	// the same 12-byte header with this version, then the table (its
	// entries) as one sealed unit, then each frame's stored bytes as one
	// sealed unit (crypt.go). Reads open the table, then keep it in the
	// cache as a version 2 table with this version byte, whose frames
	// each take sealOverhead bytes more.
	framedSealedVersion = 4
	framedHeaderLen     = 12
	frameEntryLen       = 4 + 32
	frameRaw            = 1 << 31

	// FrameBits is log2 of the frame size new chunks are stored with:
	// 64 KiB, so a 4 KiB read that misses the cache fetches, decompresses
	// and hashes 64 KiB, not the whole chunk.
	FrameBits    = 16
	minFrameBits = 14 // what tree.go's subtreeCV hashes in one SIMD call
	maxFrameBits = 23 // N ≥ 2 frames in at most MaxChunkSize
)

// frameTable is a framed object's header and table, checked for shape
// (checkTable proves it against the chunk ID).
type frameTable struct {
	sealed bool     // framedSealedVersion: each frame is a sealed unit
	plain  int64    // P
	size   int64    // F
	stored []uint32 // per frame, with frameRaw
	cvs    []cv
	offs   []int64 // N+1: where each frame starts in the object, and the end
}

func (t *frameTable) frames() int { return len(t.stored) }

// tableLen is a framed object's header and table length for n frames.
func tableLen(n int) int { return framedHeaderLen + n*frameEntryLen }

// framable reports whether a plaintext of p bytes is stored framed with
// frames of 1<<fbits, and how many frames it has.
func framable(p int64, fbits uint) (int, bool) {
	f := int64(1) << fbits
	if p < 2*f || p%f != 0 || p > MaxChunkSize {
		return 0, false
	}
	return int(p / f), true
}

// framedHeader checks the 12-byte header at the start of b (of any framed
// version) and returns its frame count.
func framedHeader(b []byte) (int, error) {
	if len(b) < framedHeaderLen {
		return 0, fmt.Errorf("object of %d bytes is shorter than a framed header", len(b))
	}
	if b[0] != codecMagic0 || b[1] != codecMagic1 {
		return 0, fmt.Errorf("bad magic %q", b[:2])
	}
	if b[3] != 0 || b[9] != 0 || b[10] != 0 || b[11] != 0 {
		return 0, fmt.Errorf("reserved header bytes are not zero")
	}
	p := int64(binary.LittleEndian.Uint32(b[4:]))
	fbits := uint(b[8])
	if fbits < minFrameBits || fbits > maxFrameBits {
		return 0, fmt.Errorf("frame size 2^%d is outside 2^%d..2^%d", fbits, minFrameBits, maxFrameBits)
	}
	n, ok := framable(p, fbits)
	if !ok {
		return 0, fmt.Errorf("plaintext length %d is not 2 or more frames of %d (at most %d)", p, 1<<fbits, MaxChunkSize)
	}
	return n, nil
}

// parseTable reads the header and table at the start of b (at least the
// table; b may hold more of the object). It checks the shape only: stored
// lengths within what a frame may take, and the version. A table of
// version framedSealedVersion is one openTable returned, never an
// object's bytes as read.
func parseTable(b []byte) (*frameTable, error) {
	n, err := framedHeader(b)
	if err != nil {
		return nil, err
	}
	if b[2] != framedVersion && b[2] != framedSealedVersion {
		return nil, fmt.Errorf("format version %d, not %d (framed)", b[2], framedVersion)
	}
	if len(b) < tableLen(n) {
		return nil, fmt.Errorf("a table of %d frames needs %d bytes, %d given", n, tableLen(n), len(b))
	}
	p := int64(binary.LittleEndian.Uint32(b[4:]))
	fbits := uint(b[8])
	t := &frameTable{sealed: b[2] == framedSealedVersion, plain: p, size: 1 << fbits, stored: make([]uint32, n), cvs: make([]cv, n), offs: make([]int64, n+1)}
	off := int64(tableLen(n))
	var unit int64 // what sealing adds to each frame, and to the table
	if t.sealed {
		unit = sealOverhead
		off += unit
	}
	for i := range n {
		e := b[framedHeaderLen+i*frameEntryLen:]
		s := binary.LittleEndian.Uint32(e)
		switch l := s &^ frameRaw; {
		case s&frameRaw != 0 && int64(l) != t.size:
			return nil, fmt.Errorf("frame %d: raw, yet %d bytes stored for %d", i, l, t.size)
		case s&frameRaw == 0 && (l == 0 || int64(l) >= t.size):
			return nil, fmt.Errorf("frame %d: compressed to %d bytes, outside 1..%d", i, l, t.size-1)
		}
		t.stored[i], t.cvs[i] = s, cvFromBytes(e[4:])
		t.offs[i] = off
		off += int64(s&^frameRaw) + unit
	}
	t.offs[n] = off
	return t, nil
}

// frameKey is the cache key of frame i's verified plaintext: its CV. Equal
// CVs are equal bytes at an equal place in a chunk, so chunks that share a
// frame share its entry; a CV is never a root, so it meets no chunk ID.
func (t *frameTable) frameKey(i int) ID { return ID(t.cvs[i].bytes()) }

// encodeFramed returns the framed object of plain, whose frames' CVs are
// cvs, in a buffer from bufPool.
func (c *codec) encodeFramed(plain []byte, fbits uint, cvs []cv) *[]byte {
	n := len(cvs)
	f := 1 << fbits
	bp := bufPool.Get().(*[]byte)
	if need := tableLen(n) + len(plain); cap(*bp) < need {
		*bp = make([]byte, 0, need)
	}
	out := (*bp)[:tableLen(n)]
	clear(out)
	out[0], out[1], out[2] = codecMagic0, codecMagic1, framedVersion
	binary.LittleEndian.PutUint32(out[4:], uint32(len(plain)))
	out[8] = byte(fbits)
	for i := range n {
		frame := plain[i*f : (i+1)*f]
		start := len(out)
		stored := uint32(0)
		if c.compress == CompressionZstd {
			out = c.enc.EncodeAll(frame, out)
			stored = uint32(len(out) - start)
		}
		if stored == 0 || int(stored) >= f { // not shrunk: keep it raw
			out = append(out[:start], frame...)
			stored = uint32(f) | frameRaw
		}
		e := out[framedHeaderLen+i*frameEntryLen:]
		binary.LittleEndian.PutUint32(e, stored)
		b := cvs[i].bytes()
		copy(e[4:], b[:])
	}
	*bp = out
	return bp
}

// decodeFrame decodes frame i, whose stored bytes are obj, into dst
// (len(dst) == t.size). It does not verify it.
func (c *codec) decodeFrame(t *frameTable, i int, obj, dst []byte) error {
	s := t.stored[i]
	if int64(len(obj)) != int64(s&^frameRaw) {
		return fmt.Errorf("frame %d: %d bytes stored, the table says %d", i, len(obj), s&^frameRaw)
	}
	if s&frameRaw != 0 {
		copy(dst, obj)
		return nil
	}
	out, err := c.dec.DecodeAll(obj, dst[:0])
	switch {
	case err != nil:
		return fmt.Errorf("frame %d: zstd: %w", i, err)
	case len(out) != len(dst):
		return fmt.Errorf("frame %d: decompressed to %d bytes, want %d", i, len(out), len(dst))
	case &out[0] != &dst[0]:
		// DecodeAll grew the buffer: it held more than the frame size.
		return fmt.Errorf("frame %d: decompressed past %d bytes", i, len(dst))
	}
	return nil
}

// checkTable proves t's CVs against id (the root they must fold into).
func checkTable(t *frameTable, id ID, h Hasher) error {
	key, flags, ok := treeKey(h)
	if !ok {
		return fmt.Errorf("a framed object, and the store's hasher (%s) is not BLAKE3", h.Scheme())
	}
	if got := finishRoot(h, treeRoot(t.cvs, key, flags)); got != id {
		return fmt.Errorf("its frame table folds into %s", got)
	}
	return nil
}

// checkFrame proves the plaintext of frame i against t's CV for it.
func checkFrame(t *frameTable, i int, plain []byte, h Hasher) error {
	key, flags, _ := treeKey(h)
	if frameCV(plain, i, key, flags) != t.cvs[i] {
		return fmt.Errorf("frame %d does not hash to its chaining value", i)
	}
	return nil
}

// decodeFramed returns the verified plaintext of the whole framed object
// obj of chunk id: every frame against its CV, the CVs against id. An
// encrypted repository's store (keys set) reads sealed objects only, a
// plain one plain objects only.
func (c *codec) decodeFramed(obj []byte, id ID, h Hasher, keys *Keys) ([]byte, error) {
	table := obj
	switch {
	case len(obj) > 2 && obj[2] == framedSealedVersion && keys == nil:
		return nil, errors.New(errNoKey)
	case len(obj) > 2 && obj[2] == framedSealedVersion:
		var err error
		if table, err = keys.openTable(id, obj); err != nil {
			return nil, err
		}
	case keys != nil:
		return nil, fmt.Errorf("not sealed (format version %d), in an encrypted repository: written by someone without its key", obj[2])
	}
	t, err := parseTable(table)
	if err != nil {
		return nil, err
	}
	if t.offs[t.frames()] != int64(len(obj)) {
		return nil, fmt.Errorf("the frames end at %d, the object at %d", t.offs[t.frames()], len(obj))
	}
	if err := checkTable(t, id, h); err != nil {
		return nil, err
	}
	plain := make([]byte, t.plain)
	for i := range t.frames() {
		dst := plain[int64(i)*t.size : int64(i+1)*t.size]
		stored, err := keys.openFrame(t, id, i, obj[t.offs[i]:t.offs[i+1]])
		if err != nil {
			return nil, err
		}
		if err := c.decodeFrame(t, i, stored, dst); err != nil {
			return nil, err
		}
		if err := checkFrame(t, i, dst, h); err != nil {
			return nil, err
		}
	}
	return plain, nil
}

// openTable opens the sealed table of the framedSealedVersion object
// that b starts with (b holds at least sealedTableLen bytes of it) and
// returns it as parseTable reads it: the header, then the entries.
func (k *Keys) openTable(id ID, b []byte) ([]byte, error) {
	n, err := framedHeader(b)
	if err != nil {
		return nil, err
	}
	end := sealedTableLen(n)
	if len(b) < end {
		return nil, fmt.Errorf("a sealed table of %d frames needs %d bytes, %d given", n, end, len(b))
	}
	entries, err := k.open(kindTable, Key(id), uint64(b[8]), uint64(n), b[framedHeaderLen:end])
	if err != nil {
		return nil, fmt.Errorf("frame table: %w", err)
	}
	if len(entries) != n*frameEntryLen {
		return nil, fmt.Errorf("frame table: %d bytes of entries for %d frames", len(entries), n)
	}
	out := make([]byte, 0, tableLen(n))
	out = append(out, b[:framedHeaderLen]...)
	return append(out, entries...), nil
}

// sealedTableLen is a sealed framed object's header and table length.
func sealedTableLen(n int) int { return tableLen(n) + sealOverhead }

// openFrame returns the stored bytes of frame i of chunk id from span,
// its bytes in the object: span itself when the table is not sealed,
// else opened in place (the caller owns span).
func (k *Keys) openFrame(t *frameTable, id ID, i int, span []byte) ([]byte, error) {
	if !t.sealed {
		return span, nil
	}
	if k == nil {
		return nil, errors.New(errNoKey)
	}
	b, err := k.openInPlace(kindFrame, Key(id), uint64(i), uint64(t.frames()), span)
	if err != nil {
		return nil, fmt.Errorf("frame %d: %w", i, err)
	}
	return b, nil
}

// sealFramed returns the framedSealedVersion object of obj, a version 2
// object of chunk id, in a buffer from bufPool.
func (k *Keys) sealFramed(id ID, obj []byte) *[]byte {
	t, err := parseTable(obj)
	if err != nil {
		panic("chunkstore: sealFramed of a bad table: " + err.Error()) // encodeFramed made it
	}
	n := t.frames()
	bp := bufPool.Get().(*[]byte)
	if need := len(obj) + (n+1)*sealOverhead; cap(*bp) < need {
		*bp = make([]byte, 0, need)
	}
	out := append((*bp)[:0], obj[:framedHeaderLen]...)
	out[2] = framedSealedVersion
	key := Key(id)
	out = k.seal(out, kindTable, key, uint64(obj[8]), uint64(n), obj[framedHeaderLen:tableLen(n)])
	for i := range n {
		out = k.seal(out, kindFrame, key, uint64(i), uint64(n), obj[t.offs[i]:t.offs[i+1]])
	}
	*bp = out
	return bp
}

// frameCVs returns the CVs of plain's frames of 1<<fbits (n of them) and
// the root they fold into: plain's ID under h.
func frameCVs(plain []byte, fbits uint, n int, h Hasher) ([]cv, ID) {
	key, flags, _ := treeKey(h)
	f := 1 << fbits
	cvs := make([]cv, n)
	for i := range cvs {
		cvs[i] = frameCV(plain[i*f:(i+1)*f], i, key, flags)
	}
	return cvs, finishRoot(h, treeRoot(cvs, key, flags))
}
