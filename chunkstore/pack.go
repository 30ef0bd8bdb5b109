package chunkstore

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"lukechampine.com/blake3"
)

// A pack is one object holding many frames, so that small plaintexts do not
// each cost an object, yet reading one of them is still one ranged GET
// however large the pack:
//
//	frames   back to back from offset 0; each is one plaintext encoded as a
//	         chunk object is (codec.go): the "NV" header, then zstd or raw
//	footer   magic "NVPK"
//	         format version (1 byte, 1)
//	         frame count (uvarint)
//	         per frame, in order: stored length (uvarint), plaintext length
//	         (uvarint), the Store's hash of the plaintext (32 bytes)
//	         BLAKE3-256 of the footer from its magic up to here (32 bytes)
//	trailer  the footer's length, magic to checksum (4 bytes, little endian)
//	         magic "NVPF"
//
// Offsets are not stored: frame i starts where frame i-1 ends, and the last
// one ends where the footer starts, so a footer cannot point outside its
// pack. A reader that knows the pack's size finds the footer from its last
// 8 bytes.
//
// Readers locate a frame by a FrameRef kept in their own index, and verify
// it on every read against its hash, as a chunk is against its ID; the
// footer is there so verify and repair tools can list a pack's frames
// without that index. Its checksum is unkeyed BLAKE3: it finds accidents,
// while the frames' hashes (keyed when the store's hasher is) prove content.
const (
	// MaxFrameSize bounds a frame's plaintext (1 MiB).
	MaxFrameSize = 1 << 20

	packMagic        = "NVPK"
	packTrailerMagic = "NVPF"
	packVersion      = 1
	packTrailerLen   = 8
	packSumLen       = 32

	// maxFrameStored bounds a frame's stored bytes: the codec keeps a frame
	// raw when zstd does not shrink it, so it is never longer than that.
	// A sealed frame takes sealedHeaderLen+sealOverhead bytes more.
	maxFrameStored = headerLen + MaxFrameSize + sealedHeaderLen + sealOverhead
	// minFrameEntry is the fewest footer bytes a frame takes (two one-byte
	// uvarints and its hash), so a count can be checked against the bytes
	// left before anything is allocated for it.
	minFrameEntry = 1 + 1 + len(ID{})
	// minFooterLen is a footer with no frames.
	minFooterLen = len(packMagic) + 1 + 1 + packSumLen
	// maxPackFrames keeps the footer's length well inside its 4 bytes.
	maxPackFrames = 1 << 24
)

// FrameRef locates one frame in a pack and proves its content.
type FrameRef struct {
	Off   int64  // where the frame's stored bytes start in the pack
	Len   uint32 // stored bytes (the codec object: header and payload)
	Plain uint32 // plaintext bytes
	Sum   ID     // the Store's hash of the plaintext (as a chunk ID)
}

// check returns why ref cannot locate any frame, or "". A ref comes from an
// index in the repository, so a bad one is damage, and its range is bounded
// before anything is fetched or allocated for it.
func (r FrameRef) check() string {
	switch {
	case r.Off < 0 || r.Off > math.MaxInt64-int64(r.Len):
		return fmt.Sprintf("offset %d is outside any object", r.Off)
	case r.Len < headerLen || r.Len > maxFrameStored:
		return fmt.Sprintf("stored length %d is outside %d..%d", r.Len, headerLen, maxFrameStored)
	case r.Plain == 0 || r.Plain > MaxFrameSize:
		return fmt.Sprintf("plaintext length %d is outside 1..%d", r.Plain, MaxFrameSize)
	}
	return ""
}

// PackBuilder builds a pack in memory. It is not safe for concurrent use.
type PackBuilder struct {
	s        *Store
	key      string // where the pack goes: sealed frames are bound to it
	buf      []byte
	frames   []FrameRef
	finished bool
}

// NewPack starts a pack built in memory, to be written at key.
func (s *Store) NewPack(key string) *PackBuilder { return &PackBuilder{s: s, key: key} }

// Add encodes plain as the next frame (compressed as the store compresses
// chunks, raw when zstd does not shrink it) and returns where it is. plain
// is not kept. Empty or > MaxFrameSize plaintext is an error.
//
// Sum is the hasher's sum even for an all-zero plaintext, never the zero
// ID: frames are cached by Sum, and zero runs of different lengths must
// not share an entry.
func (b *PackBuilder) Add(plain []byte) (FrameRef, error) {
	switch {
	case b.finished:
		return FrameRef{}, errors.New("add frame: the pack is finished")
	case len(plain) == 0:
		return FrameRef{}, errors.New("add frame: empty plaintext")
	case len(plain) > MaxFrameSize:
		return FrameRef{}, fmt.Errorf("add frame: %d bytes exceeds the maximum frame size %d", len(plain), MaxFrameSize)
	case len(b.frames) >= maxPackFrames:
		return FrameRef{}, fmt.Errorf("add frame: the pack already holds %d frames, the most one may", len(b.frames))
	}
	obj := b.s.codec.encode(plain)
	off := len(b.buf)
	if k := b.s.keys; k != nil {
		b.buf = k.sealObject(b.buf, kindPackFrame, b.key, uint64(off), *obj)
	} else {
		b.buf = append(b.buf, *obj...)
	}
	bufPool.Put(obj)
	ref := FrameRef{
		Off:   int64(off),
		Len:   uint32(len(b.buf) - off),
		Plain: uint32(len(plain)),
		Sum:   b.s.hasher.Sum(plain),
	}
	b.frames = append(b.frames, ref)
	return ref, nil
}

// Len returns the pack's bytes so far, frames only.
func (b *PackBuilder) Len() int64 { return int64(len(b.buf)) }

// Frames returns how many frames the pack holds so far.
func (b *PackBuilder) Frames() int { return len(b.frames) }

// Finish appends the footer and returns the whole object, which the caller
// owns. The builder is done: Add fails after it, and a second Finish
// panics.
func (b *PackBuilder) Finish() []byte {
	if b.finished {
		panic("chunkstore: Finish of a finished pack")
	}
	b.finished = true
	var out []byte
	if k := b.s.keys; k != nil {
		out = k.sealFooter(b.buf, b.key, appendPackFooter(nil, b.frames))
	} else {
		out = appendPackFooter(b.buf, b.frames)
	}
	b.buf, b.frames = nil, nil
	return out
}

// A sealed pack's footer is the plain footer from its magic to its
// checksum as one sealed unit (kindFooter, at the footer's offset) behind
// the magic packSealedMagic, then the trailer as in a plain pack.
const packSealedMagic = "NVPS"

// sealFooter appends to pack the sealed form of footer, a plain footer
// and trailer made for it by appendPackFooter.
func (k *Keys) sealFooter(pack []byte, key string, footer []byte) []byte {
	start := len(pack)
	out := append(pack, packSealedMagic...)
	out = k.seal(out, kindFooter, key, uint64(start), 0, footer[:len(footer)-packTrailerLen])
	out = binary.LittleEndian.AppendUint32(out, uint32(len(out)-start))
	return append(out, packTrailerMagic...)
}

// appendPackFooter appends the footer and trailer of frames to pack.
func appendPackFooter(pack []byte, frames []FrameRef) []byte {
	start := len(pack)
	out := append(pack, packMagic...)
	out = append(out, packVersion)
	out = binary.AppendUvarint(out, uint64(len(frames)))
	for _, f := range frames {
		out = binary.AppendUvarint(out, uint64(f.Len))
		out = binary.AppendUvarint(out, uint64(f.Plain))
		out = append(out, f.Sum[:]...)
	}
	sum := blake3.Sum256(out[start:])
	out = append(out, sum[:]...)
	out = binary.LittleEndian.AppendUint32(out, uint32(len(out)-start))
	return append(out, packTrailerMagic...)
}

// DecodePackFooter returns the frames a whole pack object lists in its
// footer, checked: the footer's own checksum, frames in order, contiguous
// from offset 0 up to the footer, each Len >= the codec header and Plain <=
// MaxFrameSize. Anything else is an error matching ErrCorrupt. The frames'
// content is not read: GetFrame verifies that. Used by verify and repair
// tools.
func DecodePackFooter(pack []byte) ([]FrameRef, error) { return decodePackFooter(pack, nil, "") }

// decodePackFooter is DecodePackFooter of the pack at key, sealed if keys
// is not nil.
func decodePackFooter(pack []byte, keys *Keys, key string) ([]FrameRef, error) {
	corrupt := func(format string, args ...any) ([]FrameRef, error) {
		return nil, fmt.Errorf("pack footer: %w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
	}
	if len(pack) < packTrailerLen+minFooterLen {
		return corrupt("a pack of %d bytes is shorter than an empty footer", len(pack))
	}
	end := len(pack) - packTrailerLen
	trailer := pack[end:]
	if string(trailer[4:]) != packTrailerMagic {
		return corrupt("bad trailer magic %q: not a pack, or cut short", trailer[4:])
	}
	n := binary.LittleEndian.Uint32(trailer)
	if int(n) < minFooterLen || uint64(n) > uint64(end) {
		return corrupt("footer length %d does not fit in a pack of %d bytes", n, len(pack))
	}
	start := end - int(n)
	footer := pack[start:end]
	switch {
	case keys == nil && string(footer[:len(packSealedMagic)]) == packSealedMagic:
		return corrupt("%s", errNoKey)
	case keys != nil && string(footer[:len(packSealedMagic)]) != packSealedMagic:
		return corrupt("not sealed, in an encrypted repository: written by someone without its key")
	case keys != nil:
		var err error
		if footer, err = keys.open(kindFooter, key, uint64(start), 0, footer[len(packSealedMagic):]); err != nil {
			return corrupt("%s", err.Error())
		}
		if len(footer) < minFooterLen {
			return corrupt("a sealed footer of %d bytes", len(footer))
		}
	}
	body, sum := footer[:len(footer)-packSumLen], footer[len(footer)-packSumLen:]
	if blake3.Sum256(body) != [packSumLen]byte(sum) {
		return corrupt("checksum mismatch: the footer was damaged, or the pack cut short or extended")
	}
	if string(body[:len(packMagic)]) != packMagic {
		return corrupt("bad magic %q", body[:len(packMagic)])
	}
	if v := body[len(packMagic)]; v != packVersion {
		return corrupt("unknown format version %d (this nbdvault reads %d)", v, packVersion)
	}
	p := body[len(packMagic)+1:]
	count, k := binary.Uvarint(p)
	if k <= 0 {
		return corrupt("malformed frame count")
	}
	p = p[k:]
	if count > uint64(len(p)/minFrameEntry) || count > maxPackFrames {
		return corrupt("%d frames cannot be listed in %d bytes", count, len(p))
	}
	frames := make([]FrameRef, 0, count)
	var off int64
	for i := range count {
		stored, k := binary.Uvarint(p)
		if k <= 0 {
			return corrupt("frame %d: malformed stored length", i)
		}
		p = p[k:]
		plain, k := binary.Uvarint(p)
		if k <= 0 {
			return corrupt("frame %d: malformed plaintext length", i)
		}
		p = p[k:]
		if len(p) < len(ID{}) {
			return corrupt("frame %d: hash cut short", i)
		}
		f := FrameRef{Off: off, Len: uint32(min(stored, math.MaxUint32)), Plain: uint32(min(plain, math.MaxUint32)), Sum: ID(p[:len(ID{})])}
		p = p[len(ID{}):]
		if why := f.check(); why != "" {
			return corrupt("frame %d: %s", i, why)
		}
		if off += int64(f.Len); off > int64(start) {
			return corrupt("frame %d ends at %d, past the footer at %d", i, off, start)
		}
		frames = append(frames, f)
	}
	if len(p) != 0 {
		return corrupt("%d bytes after the last frame", len(p))
	}
	if off != int64(start) {
		return corrupt("the frames end at %d, the footer starts at %d", off, start)
	}
	return frames, nil
}

// PutPack writes a finished pack at key (one Put), counting its bytes in
// Stats.BytesStored. Bytes that are not a finished pack (DecodePackFooter
// fails) are refused with an error matching ErrCorrupt, and not written.
func (s *Store) PutPack(ctx context.Context, key string, pack []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if _, err := decodePackFooter(pack, s.keys, key); err != nil {
		return fmt.Errorf("put pack %s: %w", key, err)
	}
	if err := s.backend.Put(ctx, key, pack); err != nil {
		return fmt.Errorf("put pack %s: %w", key, err)
	}
	s.stats.packPuts.Add(1)
	s.stats.bytesStored.Add(int64(len(pack)))
	return nil
}

// GetFrame returns the verified plaintext of the frame at ref in the pack at
// key, fetched with one GetRange of [ref.Off, ref.Off+ref.Len). The returned
// slice is shared with the cache and other callers: it MUST NOT be
// modified.
//
// Frames share the store's cache with chunks, keyed by ref.Sum: equal sums
// mean equal plaintext, wherever it was read from. So a ref whose Sum is
// cached is answered without reading its pack, and only a length that
// disagrees with ref.Plain is noticed then. Concurrent GetFrames of one ref
// share one fetch.
//
// A missing pack is an error matching ErrNotFound. A ref that cannot locate
// a frame, a range past the pack's end, a frame that does not decode, whose
// length is not ref.Plain, or that does not hash to ref.Sum is a
// *CorruptError (ErrCorrupt) naming the pack key and offset, never wrong
// bytes.
func (s *Store) GetFrame(ctx context.Context, key string, ref FrameRef) ([]byte, error) {
	s.stats.frameGets.Add(1)
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if why := ref.check(); why != "" {
		s.stats.bad.Add(1)
		return nil, frameCorrupt(key, ref, why)
	}
	if data, ok := s.cache.get(ref.Sum); ok {
		if len(data) != int(ref.Plain) {
			s.stats.bad.Add(1)
			return nil, frameCorrupt(key, ref, fmt.Sprintf("the ref says %d plaintext bytes, its hash names %d", ref.Plain, len(data)))
		}
		s.stats.cacheHits.Add(1)
		return data, nil
	}
	data, err := s.flight.do(ctx, frameFlight(key, ref), func(ctx context.Context) ([]byte, error) {
		s.stats.backendGets.Add(1)
		obj, err := s.backend.GetRange(ctx, key, ref.Off, int64(ref.Len))
		if errors.Is(err, ErrCorrupt) { // the pack is shorter than the ref says
			s.stats.bad.Add(1)
			return nil, frameCorrupt(key, ref, err.Error())
		}
		if err != nil {
			return nil, err
		}
		data, err := s.openFrame(key, ref, obj)
		if err != nil {
			s.stats.bad.Add(1)
			return nil, err
		}
		s.cache.add(ref.Sum, data)
		return data, nil
	})
	if err != nil {
		var ce *CorruptError
		if errors.As(err, &ce) {
			return nil, err
		}
		return nil, fmt.Errorf("get frame %s at %d: %w", key, ref.Off, err)
	}
	return data, nil
}

// openFrame decodes obj and checks that it is the frame ref names.
func (s *Store) openFrame(key string, ref FrameRef, obj []byte) ([]byte, error) {
	switch {
	case s.keys == nil && isSealed(obj):
		return nil, frameCorrupt(key, ref, errNoKey)
	case s.keys != nil:
		var err error
		if obj, err = s.keys.openObject(kindPackFrame, key, uint64(ref.Off), obj); err != nil {
			return nil, frameCorrupt(key, ref, err.Error())
		}
	}
	// Compare the header's length first, so a frame's decoding allocates
	// at most what its ref allows.
	if len(obj) >= headerLen {
		if n := binary.LittleEndian.Uint32(obj[4:]); n != ref.Plain {
			return nil, frameCorrupt(key, ref, fmt.Sprintf("its header says %d plaintext bytes, the ref %d", n, ref.Plain))
		}
	}
	data, err := s.codec.decode(obj)
	if err != nil {
		return nil, frameCorrupt(key, ref, err.Error())
	}
	if len(data) != int(ref.Plain) {
		return nil, frameCorrupt(key, ref, fmt.Sprintf("decoded %d bytes, the ref says %d", len(data), ref.Plain))
	}
	if got := s.hasher.Sum(data); got != ref.Sum {
		return nil, frameCorrupt(key, ref, "content hashes to "+got.String())
	}
	return data, nil
}

func frameCorrupt(key string, ref FrameRef, why string) error {
	return &CorruptError{ID: ref.Sum, Reason: fmt.Sprintf("frame at %d+%d of pack %s: %s", ref.Off, ref.Len, key, why)}
}

// frameFlight is the ID concurrent GetFrames share a fetch under: the
// location and the content. Keyed by Sum alone, a reader could be handed
// the failure of another place holding the same content (a pack deleted
// after its frames were copied elsewhere), or of a chunk object that Get
// is fetching under that ID.
func frameFlight(key string, ref FrameRef) ID {
	h := blake3.New(len(ID{}), nil)
	_, _ = h.Write([]byte("nbdvault-frame\n" + key + "\n"))
	var loc [16]byte
	binary.LittleEndian.PutUint64(loc[0:], uint64(ref.Off))
	binary.LittleEndian.PutUint32(loc[8:], ref.Len)
	binary.LittleEndian.PutUint32(loc[12:], ref.Plain)
	_, _ = h.Write(loc[:])
	_, _ = h.Write(ref.Sum[:])
	var id ID
	h.Sum(id[:0])
	return id
}

// DeletePack removes the pack at key. Deleting a missing pack is not an
// error. Its frames stay in the cache, which is harmless: the cache is keyed
// by content hash. The caller MUST know that no ref points into the pack
// any more.
func (s *Store) DeletePack(ctx context.Context, key string) error {
	if err := s.backend.Delete(ctx, key); err != nil {
		return fmt.Errorf("delete pack %s: %w", key, err)
	}
	return nil
}
