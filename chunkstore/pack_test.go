package chunkstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"lukechampine.com/blake3"
)

// These tests are in the package (not chunkstore_test, which storetest
// joins) to watch the store's flight.

func randomFrame(seed uint64, n int) []byte {
	p := make([]byte, n)
	_, _ = rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)}).Read(p)
	return p
}

// textFrame compresses well but is not trivial: numbered log lines.
func textFrame(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 0))
	var buf bytes.Buffer
	for i := 0; buf.Len() < n; i++ {
		fmt.Fprintf(&buf, "%08d level=info msg=\"request served\" bytes=%d\n", i, r.IntN(1<<20))
	}
	return buf.Bytes()[:n]
}

// packBackends are the backends the pack tests run over.
var packBackends = map[string]func(t *testing.T) Backend{
	"mem": func(*testing.T) Backend { return NewMem() },
	"local": func(t *testing.T) Backend {
		b, err := NewLocal(t.TempDir() + "/repo")
		require.NoError(t, err)
		return b
	},
}

func newPackStore(t *testing.T, b Backend, opts Options) *Store {
	t.Helper()
	s, err := NewStore(b, opts)
	require.NoError(t, err)
	return s
}

// ranges counts the GetRange calls that reach a backend and, when hold is
// set, holds each until hold is closed.
type ranges struct {
	Backend
	n     atomic.Int32
	bytes atomic.Int64 // asked for
	hold  chan struct{}
}

func (r *ranges) GetRange(ctx context.Context, key string, off, n int64) ([]byte, error) {
	r.n.Add(1)
	r.bytes.Add(n)
	if r.hold != nil {
		<-r.hold
	}
	return r.Backend.GetRange(ctx, key, off, n)
}

// mixedPack builds a pack of frames of mixed sizes and kinds, and returns
// it with the frames' plaintexts and refs.
func mixedPack(t *testing.T, s *Store) (pack []byte, plains [][]byte, refs []FrameRef) {
	t.Helper()
	plains = [][]byte{
		{42},
		randomFrame(1, MaxFrameSize),
		textFrame(2, MaxFrameSize),
		make([]byte, MaxFrameSize),
		make([]byte, 4096), // zeros of another length: another Sum
		randomFrame(3, 4096),
		textFrame(4, 64<<10),
		{0},
	}
	r := rand.New(rand.NewPCG(5, 0))
	for i := range 40 {
		n := 1 + r.IntN(256<<10)
		if i%2 == 0 {
			plains = append(plains, randomFrame(uint64(100+i), n))
		} else {
			plains = append(plains, textFrame(uint64(100+i), n))
		}
	}
	b := s.NewPack("pack")
	var end int64
	for i, p := range plains {
		ref, err := b.Add(p)
		require.NoError(t, err, i)
		assert.Equal(t, end, ref.Off, "frame %d follows the one before it", i)
		assert.EqualValues(t, len(p), ref.Plain)
		assert.Equal(t, ID(blake3.Sum256(p)), ref.Sum, "frame %d: Sum is the store's hash", i)
		assert.LessOrEqual(t, ref.Len, uint32(headerLen+len(p)), "frame %d is never longer than raw", i)
		end += int64(ref.Len)
		refs = append(refs, ref)
		assert.Equal(t, end, b.Len())
		assert.Equal(t, i+1, b.Frames())
	}
	return b.Finish(), plains, refs
}

func TestPackRoundTrip(t *testing.T) {
	ctx := context.Background()
	for name, open := range packBackends {
		t.Run(name, func(t *testing.T) {
			b := open(t)
			s := newPackStore(t, b, Options{})
			pack, plains, refs := mixedPack(t, s)
			listed, err := DecodePackFooter(pack)
			require.NoError(t, err)
			assert.Equal(t, refs, listed, "the footer lists what Add returned")

			const key = "packs/01/000001"
			require.NoError(t, s.PutPack(ctx, key, pack))
			st := s.Stats()
			assert.EqualValues(t, 1, st.PackPuts)
			assert.EqualValues(t, len(pack), st.BytesStored)
			stored, err := b.Get(ctx, key)
			require.NoError(t, err)
			assert.True(t, bytes.Equal(pack, stored))

			assert.Less(t, refs[2].Len, refs[2].Plain/3, "log text is compressed")
			assert.Equal(t, byte(CompressionZstd), pack[refs[2].Off+3])
			assert.Equal(t, refs[1].Plain+headerLen, refs[1].Len, "random data is kept raw")
			assert.Equal(t, byte(CompressionNone), pack[refs[1].Off+3])

			// Without a cache every read is a ranged GET of one frame.
			cold := newPackStore(t, &ranges{Backend: b}, Options{CacheBytes: -1})
			for _, i := range rand.Perm(len(refs)) {
				got, err := cold.GetFrame(ctx, key, refs[i])
				require.NoError(t, err, i)
				require.True(t, bytes.Equal(plains[i], got), "frame %d reads back", i)
			}
			cst := cold.Stats()
			assert.EqualValues(t, len(refs), cst.FrameGets)
			assert.EqualValues(t, len(refs), cst.BackendGets)
			assert.Zero(t, cst.CacheHits)
			assert.Zero(t, cst.Corrupt)

			// Concurrently, through the cache, in random orders.
			var wg sync.WaitGroup
			for range 8 {
				wg.Go(func() {
					for _, i := range rand.Perm(len(refs)) {
						got, err := s.GetFrame(ctx, key, refs[i])
						if !assert.NoError(t, err, i) || !assert.True(t, bytes.Equal(plains[i], got), "frame %d reads back", i) {
							return
						}
					}
				})
			}
			wg.Wait()
			assert.Zero(t, s.Stats().Corrupt)

			// A store with compression off reads the same frames.
			raw := newPackStore(t, b, Options{Uncompressed: true, CacheBytes: -1})
			got, err := raw.GetFrame(ctx, key, refs[2])
			require.NoError(t, err)
			assert.True(t, bytes.Equal(plains[2], got))
		})
	}
}

func TestFrameCache(t *testing.T) {
	ctx := context.Background()
	rb := &ranges{Backend: NewMem()}
	s := newPackStore(t, rb, Options{})
	pb := s.NewPack("pack")
	plain := textFrame(1, 64<<10)
	ref, err := pb.Add(plain)
	require.NoError(t, err)
	require.NoError(t, s.PutPack(ctx, "packs/a", pb.Finish()))

	for range 3 {
		got, err := s.GetFrame(ctx, "packs/a", ref)
		require.NoError(t, err)
		assert.True(t, bytes.Equal(plain, got))
	}
	assert.EqualValues(t, 1, rb.n.Load(), "only the first read reaches the backend")
	st := s.Stats()
	assert.EqualValues(t, 3, st.FrameGets)
	assert.EqualValues(t, 1, st.BackendGets)
	assert.EqualValues(t, 2, st.CacheHits)

	// The cache is keyed by content: a chunk of the same plaintext is the
	// same entry, and the frame outlives its pack.
	got, err := s.Get(ctx, ref.Sum)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(plain, got))
	require.NoError(t, s.DeletePack(ctx, "packs/a"))
	require.NoError(t, s.DeletePack(ctx, "packs/a"), "deleting a missing pack is not an error")
	_, err = s.GetFrame(ctx, "packs/a", ref)
	assert.NoError(t, err, "a cached frame is served after its pack is gone")
	assert.EqualValues(t, 1, rb.n.Load())

	// A ref whose Sum is cached but whose length is wrong is still refused.
	bad := ref
	bad.Plain--
	_, err = s.GetFrame(ctx, "packs/a", bad)
	assert.ErrorIs(t, err, ErrCorrupt)
}

func TestFrameFlight(t *testing.T) {
	ctx := context.Background()
	rb := &ranges{Backend: NewMem(), hold: make(chan struct{})}
	s := newPackStore(t, rb, Options{})
	pb := s.NewPack("pack")
	plain := randomFrame(1, 64<<10)
	ref, err := pb.Add(plain)
	require.NoError(t, err)
	require.NoError(t, s.PutPack(ctx, "packs/a", pb.Finish()))

	const n = 16
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			got, err := s.GetFrame(ctx, "packs/a", ref)
			assert.NoError(t, err)
			assert.True(t, bytes.Equal(plain, got))
		})
	}
	waitWaiters(&s.flight, frameFlight("packs/a", ref), n)
	close(rb.hold)
	wg.Wait()
	assert.EqualValues(t, 1, rb.n.Load(), "16 concurrent gets of one frame, one ranged GET")

	// The flight is per place: the same content elsewhere, or a chunk of it,
	// is fetched on its own, so one's failure is not handed to the other.
	other := ref
	other.Off++
	assert.NotEqual(t, frameFlight("packs/a", ref), frameFlight("packs/b", ref))
	assert.NotEqual(t, frameFlight("packs/a", ref), frameFlight("packs/a", other))
	assert.NotEqual(t, ref.Sum, frameFlight("packs/a", ref))
}

// damagedPack returns a copy of pack with one byte flipped.
func damagedPack(pack []byte, at int64) []byte {
	out := bytes.Clone(pack)
	out[at] ^= 0x5a
	return out
}

func TestFrameCorrupt(t *testing.T) {
	ctx := context.Background()
	for name, open := range packBackends {
		t.Run(name, func(t *testing.T) {
			b := open(t)
			s := newPackStore(t, b, Options{CacheBytes: -1})
			pb := s.NewPack("pack")
			var refs []FrameRef
			for _, p := range [][]byte{textFrame(1, 200<<10), randomFrame(2, 100<<10), {7}} {
				ref, err := pb.Add(p)
				require.NoError(t, err)
				refs = append(refs, ref)
			}
			pack := pb.Finish()
			const key = "packs/x/1"
			bad := int64(0)
			for i, ref := range refs {
				// Every header byte, then bytes spread over the payload.
				var at []int64
				for j := range int64(headerLen) {
					at = append(at, ref.Off+j)
				}
				for j := int64(headerLen); j < int64(ref.Len); j += max(1, int64(ref.Len)/50) {
					at = append(at, ref.Off+j)
				}
				at = append(at, ref.Off+int64(ref.Len)-1)
				for _, a := range at {
					require.NoError(t, b.Put(ctx, key, damagedPack(pack, a)))
					got, err := s.GetFrame(ctx, key, ref)
					require.ErrorIs(t, err, ErrCorrupt, "frame %d, byte %d flipped", i, a-ref.Off)
					assert.Nil(t, got, "a corrupt frame returns no data")
					var ce *CorruptError
					require.ErrorAs(t, err, &ce)
					assert.Equal(t, ref.Sum, ce.ID)
					assert.Contains(t, err.Error(), key)
					assert.Contains(t, err.Error(), fmt.Sprintf("at %d+%d", ref.Off, ref.Len))
					bad++
				}
			}
			assert.Equal(t, bad, s.Stats().Corrupt)

			// A damaged frame is not cached: mended, it reads back.
			cached := newPackStore(t, b, Options{})
			require.NoError(t, b.Put(ctx, key, damagedPack(pack, refs[1].Off+100)))
			_, err := cached.GetFrame(ctx, key, refs[1])
			require.ErrorIs(t, err, ErrCorrupt)
			require.NoError(t, b.Put(ctx, key, pack))
			_, err = cached.GetFrame(ctx, key, refs[1])
			require.NoError(t, err)

			// Damage outside a frame does not touch it.
			require.NoError(t, b.Put(ctx, key, damagedPack(pack, refs[1].Off-1)))
			_, err = s.GetFrame(ctx, key, refs[1])
			assert.NoError(t, err)
		})
	}
}

func TestFrameWrongRef(t *testing.T) {
	ctx := context.Background()
	rb := &ranges{Backend: NewMem()}
	s := newPackStore(t, rb, Options{CacheBytes: -1})
	pb := s.NewPack("pack")
	var refs []FrameRef
	for _, p := range [][]byte{textFrame(1, 8<<10), randomFrame(2, 8<<10), textFrame(3, 8<<10), randomFrame(4, 8<<10)} {
		ref, err := pb.Add(p)
		require.NoError(t, err)
		refs = append(refs, ref)
	}
	pack := pb.Finish()
	const key = "packs/a"
	require.NoError(t, s.PutPack(ctx, key, pack))

	wrong := map[string]func(r FrameRef) FrameRef{
		"off+1":       func(r FrameRef) FrameRef { r.Off++; return r },
		"off-1":       func(r FrameRef) FrameRef { r.Off--; return r },
		"len+1":       func(r FrameRef) FrameRef { r.Len++; return r },
		"len-1":       func(r FrameRef) FrameRef { r.Len--; return r },
		"plain+1":     func(r FrameRef) FrameRef { r.Plain++; return r },
		"plain-1":     func(r FrameRef) FrameRef { r.Plain--; return r },
		"sum":         func(r FrameRef) FrameRef { r.Sum[31] ^= 1; return r },
		"zero sum":    func(r FrameRef) FrameRef { r.Sum = ZeroID; return r },
		"next frame":  func(r FrameRef) FrameRef { r.Off += int64(r.Len); return r },
		"past end":    func(r FrameRef) FrameRef { r.Off = int64(len(pack)) - int64(r.Len) + 1; return r },
		"beyond end":  func(r FrameRef) FrameRef { r.Off = 1 << 40; return r },
		"into footer": func(r FrameRef) FrameRef { r.Off = int64(len(pack)) - int64(r.Len); return r },
	}
	for i, ref := range refs[1:3] {
		for what, mangle := range wrong {
			got, err := s.GetFrame(ctx, key, mangle(ref))
			require.ErrorIs(t, err, ErrCorrupt, "frame %d, %s", i+1, what)
			assert.Nil(t, got)
			var ce *CorruptError
			assert.ErrorAs(t, err, &ce, "%s", what)
			assert.Contains(t, err.Error(), key)
		}
	}

	// A ref that cannot locate any frame fails before the backend is asked.
	before := rb.n.Load()
	impossible := map[string]func(r FrameRef) FrameRef{
		"negative off":    func(r FrameRef) FrameRef { r.Off = -1; return r },
		"off overflows":   func(r FrameRef) FrameRef { r.Off = math.MaxInt64 - 3; return r },
		"len short":       func(r FrameRef) FrameRef { r.Len = headerLen - 1; return r },
		"len long":        func(r FrameRef) FrameRef { r.Len = maxFrameStored + 1; return r },
		"len huge":        func(r FrameRef) FrameRef { r.Len = math.MaxUint32; return r },
		"plain zero":      func(r FrameRef) FrameRef { r.Plain = 0; return r },
		"plain too large": func(r FrameRef) FrameRef { r.Plain = MaxFrameSize + 1; return r },
	}
	for what, mangle := range impossible {
		got, err := s.GetFrame(ctx, key, mangle(refs[0]))
		require.ErrorIs(t, err, ErrCorrupt, what)
		assert.Nil(t, got)
	}
	assert.Equal(t, before, rb.n.Load(), "impossible refs are never fetched")
	assert.EqualValues(t, 2*len(wrong)+len(impossible), s.Stats().Corrupt)

	// A store with another key for its hasher finds every frame corrupt.
	keyed := newPackStore(t, rb, Options{Hasher: NewKeyedBLAKE3([32]byte{1}), CacheBytes: -1})
	_, err := keyed.GetFrame(ctx, key, refs[0])
	assert.ErrorIs(t, err, ErrCorrupt)
}

func TestFrameKeyedHasher(t *testing.T) {
	ctx := context.Background()
	b := NewMem()
	h := NewKeyedBLAKE3([32]byte{7})
	s := newPackStore(t, b, Options{Hasher: h})
	pb := s.NewPack("pack")
	plain := textFrame(1, 4096)
	ref, err := pb.Add(plain)
	require.NoError(t, err)
	assert.Equal(t, h.Sum(plain), ref.Sum, "Sum is the store's hash, keyed when it is")
	require.NoError(t, s.PutPack(ctx, "packs/k", pb.Finish()))
	again := newPackStore(t, b, Options{Hasher: NewKeyedBLAKE3([32]byte{7})})
	got, err := again.GetFrame(ctx, "packs/k", ref)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(plain, got))
}

func TestFrameMissingPack(t *testing.T) {
	ctx := context.Background()
	for name, open := range packBackends {
		t.Run(name, func(t *testing.T) {
			b := open(t)
			s := newPackStore(t, b, Options{CacheBytes: -1})
			pb := s.NewPack("pack")
			ref, err := pb.Add(textFrame(1, 4096))
			require.NoError(t, err)
			_, err = s.GetFrame(ctx, "packs/none", ref)
			require.ErrorIs(t, err, ErrNotFound)
			assert.NotErrorIs(t, err, ErrCorrupt)
			assert.Contains(t, err.Error(), "packs/none")

			require.NoError(t, s.PutPack(ctx, "packs/one", pb.Finish()))
			_, err = s.GetFrame(ctx, "packs/one", ref)
			require.NoError(t, err)
			require.NoError(t, s.DeletePack(ctx, "packs/one"))
			_, err = s.GetFrame(ctx, "packs/one", ref)
			assert.ErrorIs(t, err, ErrNotFound, "a deleted pack is gone")
			require.NoError(t, s.DeletePack(ctx, "packs/one"), "deleting a missing pack is not an error")
			assert.Zero(t, s.Stats().Corrupt)
		})
	}
}

func TestFrameCancelled(t *testing.T) {
	s := newPackStore(t, NewMem(), Options{})
	pb := s.NewPack("pack")
	ref, err := pb.Add([]byte("x"))
	require.NoError(t, err)
	require.NoError(t, s.PutPack(context.Background(), "packs/a", pb.Finish()))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = s.GetFrame(ctx, "packs/a", ref)
	assert.ErrorIs(t, err, context.Canceled)
	assert.ErrorIs(t, s.PutPack(ctx, "packs/b", nil), context.Canceled)
}

// footerPack builds a pack of frames (raw bytes) and a footer body given
// as is, with a correct checksum and trailer: for footers Finish would
// never write.
func footerPack(frames, body []byte) []byte {
	out := append(bytes.Clone(frames), body...)
	sum := blake3.Sum256(body)
	out = append(out, sum[:]...)
	out = binary.LittleEndian.AppendUint32(out, uint32(len(body)+len(sum)))
	return append(out, packTrailerMagic...)
}

func footerBody(count uint64, entries ...[]byte) []byte {
	body := append([]byte(packMagic), packVersion)
	body = binary.AppendUvarint(body, count)
	for _, e := range entries {
		body = append(body, e...)
	}
	return body
}

func footerEntry(stored, plain uint64) []byte {
	e := binary.AppendUvarint(nil, stored)
	e = binary.AppendUvarint(e, plain)
	return append(e, make([]byte, 32)...)
}

func TestPackFooter(t *testing.T) {
	s := newPackStore(t, NewMem(), Options{})

	empty := s.NewPack("pack").Finish()
	frames, err := DecodePackFooter(empty)
	require.NoError(t, err)
	assert.Empty(t, frames, "a pack may hold no frames")

	pb := s.NewPack("pack")
	var refs []FrameRef
	for _, p := range [][]byte{textFrame(1, 3000), randomFrame(2, 500), {1}} {
		ref, err := pb.Add(p)
		require.NoError(t, err)
		refs = append(refs, ref)
	}
	pack := pb.Finish()
	frames, err = DecodePackFooter(pack)
	require.NoError(t, err)
	assert.Equal(t, refs, frames)
	footerStart := refs[2].Off + int64(refs[2].Len)

	for n := range len(pack) {
		_, err := DecodePackFooter(pack[:n])
		require.ErrorIs(t, err, ErrCorrupt, "cut to %d bytes", n)
	}
	for at := footerStart; at < int64(len(pack)); at++ {
		_, err := DecodePackFooter(damagedPack(pack, at))
		require.ErrorIs(t, err, ErrCorrupt, "footer byte %d flipped", at-footerStart)
	}
	_, err = DecodePackFooter(append(bytes.Clone(pack), 0))
	assert.ErrorIs(t, err, ErrCorrupt, "a byte appended")
	_, err = DecodePackFooter(append([]byte{0}, pack...))
	assert.ErrorIs(t, err, ErrCorrupt, "a byte prepended")
	_, err = DecodePackFooter(append(bytes.Clone(pack[:footerStart]), empty...))
	assert.ErrorIs(t, err, ErrCorrupt, "frames the footer does not list")

	// Footers with a good checksum that Finish would never write.
	ten := make([]byte, 10)
	for what, bad := range map[string][]byte{
		"magic":           footerPack(nil, append([]byte("NVPX\x01"), 0)),
		"version":         footerPack(nil, append([]byte(packMagic+"\x02"), 0)),
		"no count":        footerPack(nil, []byte(packMagic+"\x01")),
		"count overflows": footerPack(nil, append([]byte(packMagic+"\x01"), bytes.Repeat([]byte{0xff}, 11)...)),
		"count too large": footerPack(ten, footerBody(2, footerEntry(10, 5))),
		"count huge":      footerPack(ten, footerBody(1<<62, footerEntry(10, 5))),
		"entry short":     footerPack(ten, footerBody(1, footerEntry(10, 5)[:20])),
		"len short":       footerPack(ten[:7], footerBody(1, footerEntry(7, 5))),
		"len too long":    footerPack(nil, footerBody(1, footerEntry(maxFrameStored+1, 5))),
		"len 2^32+10":     footerPack(ten, footerBody(1, footerEntry(1<<32+10, 5))),
		"plain zero":      footerPack(ten, footerBody(1, footerEntry(10, 0))),
		"plain too large": footerPack(ten, footerBody(1, footerEntry(10, MaxFrameSize+1))),
		"plain 2^32+1":    footerPack(ten, footerBody(1, footerEntry(10, 1<<32+1))),
		"gap":             footerPack(append(ten, 0), footerBody(1, footerEntry(10, 5))),
		"past footer":     footerPack(ten, footerBody(2, footerEntry(8, 5), footerEntry(8, 5))),
		"second short":    footerPack(ten, footerBody(2, footerEntry(8, 5), footerEntry(2, 5))),
		"trailing bytes":  footerPack(ten, append(footerBody(1, footerEntry(10, 5)), 0)),
		"frames unlisted": footerPack(ten, footerBody(0)),
	} {
		_, err := DecodePackFooter(bad)
		assert.ErrorIs(t, err, ErrCorrupt, what)
	}
	good, err := DecodePackFooter(footerPack(ten, footerBody(1, footerEntry(10, 5))))
	require.NoError(t, err)
	assert.Equal(t, []FrameRef{{Off: 0, Len: 10, Plain: 5}}, good)
}

func TestPackBuilderRejects(t *testing.T) {
	ctx := context.Background()
	b := NewMem()
	s := newPackStore(t, b, Options{})
	pb := s.NewPack("pack")
	for what, p := range map[string][]byte{
		"nil":       nil,
		"empty":     {},
		"oversized": make([]byte, MaxFrameSize+1),
	} {
		_, err := pb.Add(p)
		assert.Error(t, err, what)
	}
	assert.Zero(t, pb.Frames())
	assert.Zero(t, pb.Len())
	_, err := pb.Add(make([]byte, MaxFrameSize))
	require.NoError(t, err, "exactly MaxFrameSize is a frame")
	pack := pb.Finish()
	_, err = pb.Add([]byte("late"))
	assert.Error(t, err, "a finished pack takes no more frames")
	assert.Panics(t, func() { pb.Finish() })

	// PutPack takes finished packs only.
	for what, p := range map[string][]byte{
		"nil":        nil,
		"unfinished": pack[:len(pack)-1],
		"frames":     pack[:headerLen+16],
	} {
		err := s.PutPack(ctx, "packs/p", p)
		assert.ErrorIs(t, err, ErrCorrupt, what)
		assert.Contains(t, err.Error(), "packs/p")
	}
	has, err := b.Has(ctx, "packs/p")
	require.NoError(t, err)
	assert.False(t, has, "nothing written")
	assert.Zero(t, s.Stats().PackPuts)
	assert.Zero(t, s.Stats().BytesStored)
}

func TestFrameErrorNamesPlace(t *testing.T) {
	err := frameCorrupt("packs/ab/12", FrameRef{Off: 4096, Len: 100, Sum: ID{1}}, "why")
	assert.Equal(t, "chunk "+ID{1}.String()+" is corrupt: frame at 4096+100 of pack packs/ab/12: why", err.Error())
	assert.ErrorIs(t, err, ErrCorrupt)
}
