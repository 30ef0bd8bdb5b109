package chunkstore

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/klauspost/compress/zstd"

	"github.com/nbdvault/nbdvault/internal/zeros"
)

// Options configure a Store. The zero value is the default.
type Options struct {
	// Hasher computes chunk IDs. Default: BLAKE3 (unkeyed).
	Hasher Hasher
	// Uncompressed stores new chunks raw instead of with zstd. Reads decode
	// whatever each object's header says.
	Uncompressed bool
	// CompressionLevel for zstd. Default: zstd.SpeedDefault.
	CompressionLevel zstd.EncoderLevel
	// CacheBytes bounds the cache of verified plaintexts. 0 means
	// DefaultCacheBytes; negative disables the cache.
	CacheBytes int64
	// FrameBits is log2 of the frame size chunks are stored with
	// (framed.go): 0 means FrameBits (64 KiB); -1 stores every chunk
	// whole, as version 1 objects (as nbdvault did before repository
	// format 4). Reads decode either.
	FrameBits int
	// Keys, if set, make this an encrypted repository's store: chunk IDs
	// by Keys.Hasher (Hasher is ignored), and every chunk and pack frame
	// sealed (crypt.go). Such a store reads sealed objects only.
	Keys *Keys
	// Written, if set, is told the ID and stored size (the encoded
	// object's length) of every chunk object a Put is about to write
	// (after Has found it absent and the chunk is encoded, before the
	// PUT), and again, with failed set, when the PUT failed: it may
	// still land. A garbage collector's inventory.
	Written func(id ID, size int64, failed bool)
}

// DefaultCacheBytes is the default size of a Store's read cache.
const DefaultCacheBytes = 256 << 20

// Store keeps content-addressed chunks in a Backend. All methods are safe
// for concurrent use.
type Store struct {
	backend Backend
	hasher  Hasher
	keys    *Keys // Options.Keys: nil for a plain repository
	codec   *codec
	cache   *lru
	flight  flight[[]byte]
	frames  flight[[][]byte]
	fbits   uint // frame size new chunks are stored with; 0: whole
	seq     seqReads
	stats   storeStats
	written func(ID, int64, bool) // Options.Written
	// readOnly: an Uncached store, which a collection neither tracks nor
	// records in its inventory, so it must not Put.
	readOnly bool
	// tracking is the garbage collection running, if any (track.go).
	tracking atomic.Pointer[Tracking]
}

type storeStats struct {
	puts, dedupHits, zeroPuts         atomic.Int64
	bytesIn, bytesStored              atomic.Int64
	gets, cacheHits, backendGets, bad atomic.Int64
	frameGets, packPuts               atomic.Int64
	reads, frameReads                 atomic.Int64
}

// Stats are a Store's counters since it was opened.
type Stats struct {
	Puts        int64 // Put calls
	ZeroPuts    int64 // Puts of an all-zero chunk (nothing stored)
	DedupHits   int64 // Puts of a chunk the backend already had
	BytesIn     int64 // plaintext bytes given to Put
	BytesStored int64 // object bytes written to the backend, chunks and packs
	Gets        int64 // Get calls
	CacheHits   int64 // Gets and GetFrames answered from the cache
	BackendGets int64 // objects and frames fetched from the backend
	Corrupt     int64 // objects, frames and frame refs that failed verification
	FrameGets   int64 // GetFrame calls
	PackPuts    int64 // packs written
	Reads       int64 // ReadAt calls
	FrameReads  int64 // ReadAts answered from a chunk's frames, not all of it
}

// NewStore returns a Store over b.
func NewStore(b Backend, opts Options) (*Store, error) {
	if opts.Hasher == nil {
		opts.Hasher = BLAKE3{}
	}
	if opts.Keys != nil {
		opts.Hasher = opts.Keys.Hasher()
	}
	if sb, ok := b.(*Sealed); ok && opts.Keys != sb.Keys() {
		return nil, errors.New("a store over an encrypted repository's backend needs its keys (Options.Keys)")
	}
	opts.CompressionLevel = cmp.Or(opts.CompressionLevel, zstd.SpeedDefault)
	switch {
	case opts.CacheBytes == 0:
		opts.CacheBytes = DefaultCacheBytes
	case opts.CacheBytes < 0:
		opts.CacheBytes = 0
	}
	compression := CompressionZstd
	if opts.Uncompressed {
		compression = CompressionNone
	}
	c, err := newCodec(compression, opts.CompressionLevel)
	if err != nil {
		return nil, err
	}
	var fbits uint
	switch {
	case opts.FrameBits == 0:
		fbits = FrameBits
	case opts.FrameBits < 0:
	case opts.FrameBits < minFrameBits || opts.FrameBits > maxFrameBits:
		return nil, fmt.Errorf("frame size 2^%d: want 2^%d to 2^%d", opts.FrameBits, minFrameBits, maxFrameBits)
	default:
		fbits = uint(opts.FrameBits)
	}
	if _, _, ok := treeKey(opts.Hasher); !ok {
		fbits = 0 // frames are verified through BLAKE3's tree
	}
	return &Store{backend: b, hasher: opts.Hasher, keys: opts.Keys, codec: c, cache: newLRU(opts.CacheBytes), fbits: fbits, written: opts.Written}, nil
}

// Uncached returns a store over the same backend, with the same IDs and
// codec, that caches nothing: for a pass over many chunks (a garbage
// collection's marking, verify) that must not evict what clients read.
// It only reads: a Put through it is refused, since a collection neither
// tracks nor records it.
func (s *Store) Uncached() *Store {
	return &Store{backend: s.backend, hasher: s.hasher, keys: s.keys, codec: s.codec, cache: newLRU(0), fbits: s.fbits, readOnly: true}
}

// Backend returns the backend the store writes to.
func (s *Store) Backend() Backend { return s.backend }

// Key returns the backend key of a chunk: "chunks/<first 2 hex digits>/<id>".
func Key(id ID) string {
	h := id.String()
	return "chunks/" + h[:2] + "/" + h
}

// Sum returns the ID data would be stored under, without storing it. An
// all-zero data has the zero ID.
func (s *Store) Sum(data []byte) ID {
	if zeros.Is(data) {
		return ZeroID
	}
	return s.hasher.Sum(data)
}

// IDOfHash returns the ID of a chunk whose BLAKE3-256 is h: h itself in
// a plain repository, its MAC in an encrypted one. Only for stores whose
// IDs are one of the two.
func (s *Store) IDOfHash(h ID) ID {
	if m, ok := s.hasher.(*MACBLAKE3); ok {
		return m.MAC(h)
	}
	return h
}

// Scheme names how the store makes IDs (its Hasher's scheme).
func (s *Store) Scheme() string { return s.hasher.Scheme() }

// Put stores data as a chunk and returns its ID. An all-zero chunk is not
// stored and gets the zero ID. A chunk the backend already has is not
// written again. Put does not keep data after it returns.
func (s *Store) Put(ctx context.Context, data []byte) (ID, error) {
	s.stats.puts.Add(1)
	s.stats.bytesIn.Add(int64(len(data)))
	if err := ctx.Err(); err != nil {
		return ZeroID, err
	}
	if len(data) > MaxChunkSize {
		return ZeroID, fmt.Errorf("put chunk: %d bytes exceeds the maximum chunk size %d", len(data), MaxChunkSize)
	}
	if s.readOnly {
		return ZeroID, errors.New("put chunk: a store made by Uncached only reads")
	}
	if zeros.Is(data) {
		s.stats.zeroPuts.Add(1)
		return ZeroID, nil
	}
	// A framed chunk's ID comes from its frames' CVs: one pass of hashing.
	var cvs []cv
	var id ID
	if n, ok := framable(int64(len(data)), s.fbits); ok && s.fbits != 0 {
		cvs, id = frameCVs(data, s.fbits, n, s.hasher)
	} else {
		id = s.hasher.Sum(data)
	}
	if t := s.tracking.Load(); t != nil {
		t.touch(id) // before Has: a collector does not delete it from now
	}
	key := Key(id)
	has, err := s.backend.Has(ctx, key)
	if err != nil {
		return ZeroID, fmt.Errorf("put chunk %s: %w", id, err)
	}
	if has {
		s.stats.dedupHits.Add(1)
		return id, nil
	}
	obj := s.encode(id, data, cvs)
	defer bufPool.Put(obj)
	size := int64(len(*obj))
	if s.written != nil {
		s.written(id, size, false)
	}
	if err := s.backend.Put(ctx, key, *obj); err != nil {
		if s.written != nil {
			s.written(id, size, true)
		}
		return ZeroID, fmt.Errorf("put chunk %s: %w", id, err)
	}
	s.stats.bytesStored.Add(size)
	return id, nil
}

// Get returns the verified plaintext of chunk id. The returned slice is
// shared with the cache and other callers: it MUST NOT be modified.
//
// A missing chunk is an error matching ErrNotFound; one whose content does
// not decode or does not hash to id is a *CorruptError (ErrCorrupt), never
// wrong bytes. Concurrent Gets of one ID share one backend fetch. The zero
// ID is a hole, never stored: Get of it is an ErrNotFound.
func (s *Store) Get(ctx context.Context, id ID) ([]byte, error) {
	s.stats.gets.Add(1)
	if err := ctx.Err(); err != nil {
		// A done context fails the call even when the chunk is at hand.
		return nil, err
	}
	if id.IsZero() {
		return nil, fmt.Errorf("get chunk: the zero ID names a hole, which is never stored: %w", ErrNotFound)
	}
	if data, ok := s.cache.get(id); ok {
		s.stats.cacheHits.Add(1)
		return data, nil
	}
	return s.flight.do(ctx, id, func(ctx context.Context) ([]byte, error) {
		s.stats.backendGets.Add(1)
		obj, err := s.backend.Get(ctx, Key(id))
		if err != nil {
			return nil, fmt.Errorf("get chunk %s: %w", id, err)
		}
		data, err := s.open(id, obj)
		if err != nil {
			s.stats.bad.Add(1)
			return nil, err
		}
		s.cache.add(id, data)
		return data, nil
	})
}

// encode returns the object of chunk id, whose plaintext is data (and
// whose frames' CVs are cvs, if it is stored framed), in a buffer from
// bufPool: sealed if the store has keys.
func (s *Store) encode(id ID, data []byte, cvs []cv) *[]byte {
	if cvs != nil {
		obj := s.codec.encodeFramed(data, s.fbits, cvs)
		if s.keys == nil {
			return obj
		}
		defer bufPool.Put(obj)
		return s.keys.sealFramed(id, *obj)
	}
	obj := s.codec.encode(data)
	if s.keys == nil {
		return obj
	}
	defer bufPool.Put(obj)
	bp := bufPool.Get().(*[]byte)
	*bp = s.keys.sealObject((*bp)[:0], kindChunk, Key(id), 0, *obj)
	return bp
}

// open decodes obj and checks that it is chunk id.
func (s *Store) open(id ID, obj []byte) ([]byte, error) {
	if len(obj) > 2 && (obj[2] == framedVersion || obj[2] == framedSealedVersion) {
		data, err := s.codec.decodeFramed(obj, id, s.hasher, s.keys)
		if err != nil {
			return nil, &CorruptError{ID: id, Reason: err.Error()}
		}
		return data, nil
	}
	inner, err := s.keys.openChunk(id, obj)
	if err != nil {
		return nil, &CorruptError{ID: id, Reason: err.Error()}
	}
	data, err := s.codec.decode(inner)
	if err != nil {
		return nil, &CorruptError{ID: id, Reason: err.Error()}
	}
	if got := s.hasher.Sum(data); got != id {
		return nil, &CorruptError{ID: id, Reason: "content hashes to " + got.String()}
	}
	return data, nil
}

// openChunk returns the version 1 object inside obj, the whole object of
// chunk id: obj itself in a plain repository (k nil).
func (k *Keys) openChunk(id ID, obj []byte) ([]byte, error) {
	switch {
	case k == nil && isSealed(obj):
		return nil, errors.New(errNoKey)
	case k == nil:
		return obj, nil
	}
	return k.openObject(kindChunk, Key(id), 0, obj)
}

// Has reports whether chunk id is in the backend. The zero ID is always
// present: it is a hole.
func (s *Store) Has(ctx context.Context, id ID) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	if id.IsZero() {
		return true, nil
	}
	if _, ok := s.cache.get(id); ok {
		return true, nil
	}
	has, err := s.backend.Has(ctx, Key(id))
	if err != nil {
		return false, fmt.Errorf("has chunk %s: %w", id, err)
	}
	return has, nil
}

// Delete removes chunk id from the backend and the cache. Deleting a
// missing chunk is not an error. The caller MUST know that nothing refers
// to the chunk any more.
func (s *Store) Delete(ctx context.Context, id ID) error {
	if id.IsZero() {
		return nil
	}
	s.forget(id)
	if err := s.backend.Delete(ctx, Key(id)); err != nil {
		return fmt.Errorf("delete chunk %s: %w", id, err)
	}
	return nil
}

// forget drops what the cache holds of chunk id: its plaintext and its
// frame table.
func (s *Store) forget(id ID) {
	s.cache.remove(id)
	s.cache.remove(tableKey(id))
}

// Stats returns the store's counters.
func (s *Store) Stats() Stats {
	return Stats{
		Puts: s.stats.puts.Load(), ZeroPuts: s.stats.zeroPuts.Load(),
		DedupHits: s.stats.dedupHits.Load(), BytesIn: s.stats.bytesIn.Load(),
		BytesStored: s.stats.bytesStored.Load(), Gets: s.stats.gets.Load(),
		CacheHits: s.stats.cacheHits.Load(), BackendGets: s.stats.backendGets.Load(),
		Corrupt: s.stats.bad.Load(), FrameGets: s.stats.frameGets.Load(),
		PackPuts: s.stats.packPuts.Load(), Reads: s.stats.reads.Load(),
		FrameReads: s.stats.frameReads.Load(),
	}
}
