package chunkstore

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"lukechampine.com/blake3"
)

// ReadAt fills dst with the bytes at off of chunk id, whose plaintext is
// size bytes. A read of less than an eighth of a framed chunk that is not
// in the cache fetches only the frames it needs (docs/architecture.md,
// "Step 3a"): the chunk's frame table once (one ranged GET, kept in the
// cache), then the missing frames (one ranged GET), each verified alone
// against the chunk ID. Anything else reads the whole chunk, as Get.
//
// Errors are Get's: a missing chunk matches ErrNotFound, damage (a chunk
// that is not size bytes included) is a *CorruptError, never wrong bytes.
func (s *Store) ReadAt(ctx context.Context, id ID, size int64, dst []byte, off int64) error {
	s.stats.reads.Add(1)
	if off < 0 || size < 0 || off > size-int64(len(dst)) {
		return fmt.Errorf("read chunk %s: [%d, %d) is outside its %d bytes", id, off, off+int64(len(dst)), size)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if data, ok := s.cache.get(id); ok && int64(len(data)) == size {
		s.stats.cacheHits.Add(1)
		copy(dst, data[off:])
		return nil
	}
	if int64(len(dst))*8 < size {
		done, err := s.readFrames(ctx, id, size, dst, off)
		if done || err != nil {
			return err
		}
	}
	data, err := s.Get(ctx, id)
	if err != nil {
		return err
	}
	if int64(len(data)) != size {
		s.stats.bad.Add(1)
		return &CorruptError{ID: id, Reason: fmt.Sprintf("%d bytes, want %d", len(data), size)}
	}
	copy(dst, data[off:])
	return nil
}

// maxReadAhead bounds what a read that follows the last one in a chunk
// fetches beyond what it needs (16 MiB chunks are 256 frames).
const maxReadAhead = 1 << 20

// seqReads remembers where the latest frame reads of a few chunks ended,
// so that a reader going through a chunk in order is told from one that
// jumps. (Frames are shared between chunks, by content and place: that a
// frame is cached says nothing of this chunk.)
type seqReads struct {
	mu   sync.Mutex
	at   int
	last [32]struct {
		id    ID
		frame int
	}
}

// saw records a read of chunk id that ended in frame f.
func (q *seqReads) saw(id ID, f int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for i := range q.last {
		if q.last[i].id == id {
			q.last[i].frame = f
			return
		}
	}
	q.last[q.at].id, q.last[q.at].frame = id, f
	q.at = (q.at + 1) % len(q.last)
}

// follows reports whether the latest read of chunk id ended in frame f-1.
func (q *seqReads) follows(id ID, f int) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, e := range q.last {
		if e.id == id {
			return e.frame == f-1
		}
	}
	return false
}

// notFramed is the cache's answer for a chunk whose object is not framed:
// read it whole.
var notFramed = []byte{0}

// readFrames is ReadAt by frames. It reports false, and no error, when
// the chunk is not stored framed.
func (s *Store) readFrames(ctx context.Context, id ID, size int64, dst []byte, off int64) (bool, error) {
	t, err := s.frameTable(ctx, id, size)
	if t == nil || err != nil {
		return false, err
	}
	first, last := int(off/t.size), int((off+int64(len(dst))-1)/t.size)
	frames := make([][]byte, last-first+1)
	lo, hi := -1, -1 // the missing frames
	for i := first; i <= last; i++ {
		if b, ok := s.cache.get(t.frameKey(i)); ok && int64(len(b)) == t.size {
			frames[i-first] = b
			continue
		}
		if lo < 0 {
			lo = i
		}
		hi = i
	}
	if lo >= 0 {
		// The last read of this chunk ended at the frame before: the
		// reader goes through it in order, so fetch more of it now,
		// with the same GET.
		if lo > 0 && s.seq.follows(id, lo) {
			hi = min(t.frames()-1, max(hi, lo+maxReadAhead/int(t.size)-1))
		}
		got, err := s.frames.do(ctx, framesFlight(id, lo, hi), func(ctx context.Context) ([][]byte, error) {
			return s.fetchFrames(ctx, id, t, lo, hi)
		})
		if err != nil {
			// The table may be what is wrong (only its CVs are proved by
			// the ID): read it again next time, so that a repaired
			// object reads.
			s.cache.remove(tableKey(id))
			return true, err
		}
		for i := lo; i <= min(hi, last); i++ {
			if frames[i-first] == nil {
				frames[i-first] = got[i-lo]
			}
		}
	}
	s.stats.frameReads.Add(1)
	s.seq.saw(id, last)
	for i, b := range frames {
		start := int64(first+i) * t.size
		from := max(off, start)
		copy(dst[from-off:], b[from-start:])
	}
	return true, nil
}

// frameTable returns chunk id's checked frame table, from the cache or
// with one ranged GET, or nil when the chunk is not stored framed.
func (s *Store) frameTable(ctx context.Context, id ID, size int64) (*frameTable, error) {
	fbits := s.fbits
	if fbits == 0 {
		fbits = FrameBits
	}
	n, ok := framable(size, fbits)
	if !ok {
		return nil, nil // not written framed by a store like this one
	}
	key := tableKey(id)
	b, ok := s.cache.get(key)
	if !ok {
		var err error
		b, err = s.flight.do(ctx, key, func(ctx context.Context) ([]byte, error) {
			b, err := s.fetchTable(ctx, id, n)
			if err == nil {
				s.cache.add(key, b)
			}
			return b, err
		})
		if err != nil {
			return nil, err
		}
	}
	if len(b) == len(notFramed) {
		return nil, nil
	}
	t, err := parseTable(b) // checked when fetched: this cannot fail
	if err != nil {
		return nil, &CorruptError{ID: id, Reason: err.Error()}
	}
	if t.plain != size {
		s.stats.bad.Add(1)
		return nil, &CorruptError{ID: id, Reason: fmt.Sprintf("%d bytes, want %d", t.plain, size)}
	}
	return t, nil
}

// fetchTable reads and checks the header and table of chunk id, assuming n
// frames (and reading again if its header says otherwise). An object that
// is not framed, or too short to be, is notFramed: Get reads it whole and
// tells a version 1 object from damage.
func (s *Store) fetchTable(ctx context.Context, id ID, n int) ([]byte, error) {
	version, length := byte(framedVersion), tableLen
	if s.keys != nil {
		version, length = framedSealedVersion, sealedTableLen
	}
	for range 2 {
		s.stats.backendGets.Add(1)
		b, err := s.backend.GetRange(ctx, Key(id), 0, int64(length(n)))
		switch {
		case errors.Is(err, ErrCorrupt):
			return notFramed, nil
		case err != nil:
			return nil, fmt.Errorf("get chunk %s: %w", id, err)
		case b[2] != version:
			return notFramed, nil
		}
		m, err := framedHeader(b)
		if err == nil && m != n {
			n = m // another frame size than this nbdvault writes
			continue
		}
		if err == nil && s.keys != nil {
			b, err = s.keys.openTable(id, b)
		}
		var t *frameTable
		if err == nil {
			t, err = parseTable(b)
		}
		if err != nil {
			s.stats.bad.Add(1)
			return nil, &CorruptError{ID: id, Reason: "frame table: " + err.Error()}
		}
		if err := checkTable(t, id, s.hasher); err != nil {
			s.stats.bad.Add(1)
			return nil, &CorruptError{ID: id, Reason: err.Error()}
		}
		return b, nil
	}
	s.stats.bad.Add(1)
	return nil, &CorruptError{ID: id, Reason: "its frame table's length changes between reads"}
}

// fetchFrames reads frames lo..hi of chunk id with one ranged GET, checks
// each against t, and caches them.
func (s *Store) fetchFrames(ctx context.Context, id ID, t *frameTable, lo, hi int) ([][]byte, error) {
	s.stats.backendGets.Add(1)
	start := t.offs[lo]
	obj, err := s.backend.GetRange(ctx, Key(id), start, t.offs[hi+1]-start)
	if errors.Is(err, ErrCorrupt) { // shorter than its table says
		s.stats.bad.Add(1)
		return nil, &CorruptError{ID: id, Reason: fmt.Sprintf("frames %d to %d: %v", lo, hi, err)}
	}
	if err != nil {
		return nil, fmt.Errorf("get chunk %s: %w", id, err)
	}
	out := make([][]byte, hi-lo+1)
	for i := lo; i <= hi; i++ {
		plain := make([]byte, t.size)
		stored, err := s.keys.openFrame(t, id, i, obj[t.offs[i]-start:t.offs[i+1]-start])
		if err == nil {
			err = s.codec.decodeFrame(t, i, stored, plain)
		}
		if err == nil {
			err = checkFrame(t, i, plain, s.hasher)
		}
		if err != nil {
			s.stats.bad.Add(1)
			return nil, &CorruptError{ID: id, Reason: err.Error()}
		}
		s.cache.add(t.frameKey(i), plain)
		out[i-lo] = plain
	}
	return out, nil
}

// tableKey is the cache and flight key of chunk id's frame table: id
// with a fixed random mask XORed in. The cache also holds journal frames
// under the Sum of what a client wrote, and a client must not be able to
// plant an entry under a table's key: that would take content whose
// BLAKE3 is a given value (a preimage). It allocates nothing, unlike a
// key derivation: a collection forgets 1,000 chunks a batch.
func tableKey(id ID) ID {
	for i := range id {
		id[i] ^= tableMask[i]
	}
	return id
}

// tableMask: 32 random bytes.
var tableMask = ID{0x5c, 0x1e, 0x93, 0xa7, 0x0b, 0xd4, 0x68, 0xf2, 0x31, 0x8e, 0xc5, 0x4a, 0x17, 0xb9, 0x62, 0xe0,
	0xad, 0x73, 0x0f, 0x96, 0x2b, 0xd8, 0x44, 0xce, 0x81, 0x3a, 0xf5, 0x6d, 0x12, 0xbb, 0x57, 0xe9}

// framesFlight is the flight key of one fetch of frames lo..hi of id
// (derived as tableKey is).
func framesFlight(id ID, lo, hi int) ID {
	b := binary.LittleEndian.AppendUint32(id[:], uint32(lo))
	b = binary.LittleEndian.AppendUint32(b, uint32(hi))
	var k ID
	blake3.DeriveKey(k[:], "nbdvault 2026-12-01 chunk frames fetch", b)
	return k
}
