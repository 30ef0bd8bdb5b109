package chunkstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"strconv"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// mixedChunk is 1 MiB of text, random and zero frames, so a framed object
// holds compressed and raw frames.
func mixedChunk(seed uint64) []byte {
	data := textFrame(seed, 1<<20)
	copy(data[3<<16:], randomFrame(seed, 2<<16))
	clear(data[9<<16 : 10<<16])
	copy(data[12<<16+100:], randomFrame(seed+1, 5000)) // a frame of both
	return data
}

// A read of any range of a framed chunk returns its bytes, whether the
// frames are cached or not, and a small read fetches only the frames it
// needs: the table once, then one ranged GET for the frames.
func TestReadAtFramed(t *testing.T) {
	ctx := context.Background()
	for name, open := range packBackends {
		t.Run(name, func(t *testing.T) {
			rb := &ranges{Backend: open(t)}
			for _, h := range []Hasher{BLAKE3{}, NewKeyedBLAKE3([32]byte{3})} {
				s := newPackStore(t, rb, Options{Hasher: h})
				data := mixedChunk(1)
				id, err := s.Put(ctx, data)
				require.NoError(t, err)
				require.Equal(t, h.Sum(data), id, "a framed chunk's ID is its hash")

				// A 4 KiB read in frame 5: the table and that frame.
				rb.n.Store(0)
				got := make([]byte, 4096)
				require.NoError(t, s.ReadAt(ctx, id, 1<<20, got, 5<<16+100))
				assert.Equal(t, data[5<<16+100:][:4096], got)
				assert.EqualValues(t, 2, rb.n.Load(), "the table, then one frame")
				// Another in frame 11: one GET; again in frame 5: none.
				require.NoError(t, s.ReadAt(ctx, id, 1<<20, got, 11<<16))
				assert.Equal(t, data[11<<16:][:4096], got)
				require.NoError(t, s.ReadAt(ctx, id, 1<<20, got, 5<<16+8000))
				assert.Equal(t, data[5<<16+8000:][:4096], got)
				assert.EqualValues(t, 3, rb.n.Load())
				// Across frames 1 and 2: one GET for both.
				got = make([]byte, 70000)
				require.NoError(t, s.ReadAt(ctx, id, 1<<20, got, 1<<16+1000))
				assert.Equal(t, data[1<<16+1000:][:70000], got)
				assert.EqualValues(t, 4, rb.n.Load())
				// Frame 3 follows a cached frame: the rest of the chunk
				// comes with one GET, and later reads need none.
				got = make([]byte, 4096)
				require.NoError(t, s.ReadAt(ctx, id, 1<<20, got, 3<<16))
				assert.EqualValues(t, 5, rb.n.Load())
				for off := int64(1 << 16); off < 1<<20; off += 4096 {
					require.NoError(t, s.ReadAt(ctx, id, 1<<20, got, off))
					require.Equal(t, data[off:off+4096], got)
				}
				assert.EqualValues(t, 5, rb.n.Load())

				// Random ranges, with and without a cache.
				cold := newPackStore(t, rb, Options{Hasher: h, CacheBytes: -1})
				r := rand.New(rand.NewPCG(7, 7))
				for range 200 {
					n := 1 + r.Int64N(300<<10)
					off := r.Int64N(1<<20 - n + 1)
					for _, st := range []*Store{s, cold} {
						buf := make([]byte, n)
						require.NoError(t, st.ReadAt(ctx, id, 1<<20, buf, off))
						require.True(t, bytes.Equal(data[off:off+n], buf), "[%d, %d)", off, off+n)
					}
				}
				assert.NotZero(t, cold.Stats().FrameReads)
			}
		})
	}
}

// Whole (version 1) objects are read whole by ReadAt, and a store
// reads both kinds of any frame size.
func TestReadAtWhole(t *testing.T) {
	ctx := context.Background()
	b := NewMem()
	whole := newPackStore(t, b, Options{FrameBits: -1})
	small := newPackStore(t, b, Options{FrameBits: 14})
	s := newPackStore(t, b, Options{})
	a, c := mixedChunk(2), mixedChunk(3)
	ida, err := whole.Put(ctx, a)
	require.NoError(t, err)
	idc, err := small.Put(ctx, c)
	require.NoError(t, err)
	obj, err := b.Get(ctx, Key(ida))
	require.NoError(t, err)
	require.EqualValues(t, 1, obj[2])
	obj, err = b.Get(ctx, Key(idc))
	require.NoError(t, err)
	require.EqualValues(t, 2, obj[2])
	require.EqualValues(t, 14, obj[8])
	for _, x := range []struct {
		id   ID
		data []byte
	}{{ida, a}, {idc, c}} {
		for _, off := range []int64{0, 70000, 1<<20 - 4096} {
			got := make([]byte, 4096)
			require.NoError(t, s.ReadAt(ctx, x.id, 1<<20, got, off))
			assert.Equal(t, x.data[off:off+4096], got)
		}
	}
	// The wrong size is damage, not a short read.
	err = s.ReadAt(ctx, idc, 2<<20, make([]byte, 4096), 0)
	require.ErrorIs(t, err, ErrCorrupt)
	err = newPackStore(t, b, Options{}).ReadAt(ctx, ida, 512<<10, make([]byte, 4096), 0)
	require.ErrorIs(t, err, ErrCorrupt)
}

// Any damage to a framed object is an error on every read of every frame
// it reaches and on a whole read, never other bytes: each byte of the
// header and table, bytes in every frame, the object cut or extended, two
// frames swapped.
func TestFramedDamage(t *testing.T) {
	ctx := context.Background()
	data := mixedChunk(4)
	b := NewMem()
	s := newPackStore(t, b, Options{})
	id, good := storeChunk(t, s, b, data)
	tab, err := parseTable(good)
	require.NoError(t, err)

	check := func(t *testing.T, obj []byte, what string, framesFail bool) {
		t.Helper()
		require.NoError(t, b.Put(ctx, Key(id), obj))
		_, err := newPackStore(t, b, Options{}).Get(ctx, id)
		require.ErrorIs(t, err, ErrCorrupt, "%s: whole read", what)
		// Reads of each frame on a fresh store: those the damage reaches
		// fail, and none returns other bytes.
		failed := 0
		for i := range tab.frames() {
			got := make([]byte, 4096)
			err := newPackStore(t, b, Options{}).ReadAt(ctx, id, 1<<20, got, int64(i)<<16)
			if err != nil {
				require.ErrorIs(t, err, ErrCorrupt, "%s: frame %d", what, i)
				failed++
				continue
			}
			require.Equal(t, data[i<<16:][:4096], got, "%s: frame %d read other bytes", what, i)
		}
		if framesFail {
			require.NotZero(t, failed, "%s: no frame read failed", what)
		}
	}
	for at := range tableLen(tab.frames()) {
		if at == 3 || (at >= 9 && at < 12) {
			continue // reserved bytes are checked too, below
		}
		obj := bytes.Clone(good)
		obj[at] ^= 0x10
		check(t, obj, "header or table byte "+itoa(at), true)
	}
	for _, at := range []int{3, 9, 11} {
		obj := bytes.Clone(good)
		obj[at] = 1
		check(t, obj, "reserved byte "+itoa(at), true)
	}
	for i := range tab.frames() {
		obj := bytes.Clone(good)
		obj[(tab.offs[i]+tab.offs[i+1])/2] ^= 0x01
		check(t, obj, "frame "+itoa(i), true)
	}
	check(t, good[:len(good)-1], "cut by a byte", true)
	// Every frame is whole and verifies: only a whole read sees the extra byte.
	check(t, append(bytes.Clone(good), 0), "a byte added", false)
	// Frames 3 and 4 are raw random: swap their bytes and table entries.
	require.EqualValues(t, frameRaw|1<<16, tab.stored[3])
	require.EqualValues(t, frameRaw|1<<16, tab.stored[4])
	obj := bytes.Clone(good)
	e3, e4 := obj[framedHeaderLen+3*frameEntryLen:][:frameEntryLen], obj[framedHeaderLen+4*frameEntryLen:][:frameEntryLen]
	t3 := bytes.Clone(e3)
	copy(e3, e4)
	copy(e4, t3)
	f3 := bytes.Clone(obj[tab.offs[3]:tab.offs[4]])
	copy(obj[tab.offs[3]:], obj[tab.offs[4]:tab.offs[5]])
	copy(obj[tab.offs[4]:], f3)
	check(t, obj, "frames 3 and 4 swapped", true)

	// A frame table from another chunk with this ID's key: refused.
	other, err := s.Put(ctx, mixedChunk(5))
	require.NoError(t, err)
	otherObj, err := b.Get(ctx, Key(other))
	require.NoError(t, err)
	check(t, otherObj, "another chunk's object", true)
}

// storeChunk puts data in s over b and returns its ID and stored object.
func storeChunk(t *testing.T, s *Store, b Backend, data []byte) (ID, []byte) {
	t.Helper()
	id, err := s.Put(context.Background(), data)
	require.NoError(t, err)
	obj, err := b.Get(context.Background(), Key(id))
	require.NoError(t, err)
	return id, obj
}

func itoa(i int) string { return strconv.Itoa(i) }

// A frame table whose lengths are damaged still folds into the chunk ID
// (only the CVs are proved by it): its reads fail, and once the object is
// repaired the same store reads it, as it does a repaired whole chunk.
func TestFramedDamagedLengthsNotRemembered(t *testing.T) {
	ctx := context.Background()
	data := textFrame(8, 1<<20)
	b := NewMem()
	s := newPackStore(t, b, Options{})
	id, good := storeChunk(t, s, b, data)
	bad := bytes.Clone(good)
	l0 := binary.LittleEndian.Uint32(bad[framedHeaderLen:])
	l1 := binary.LittleEndian.Uint32(bad[framedHeaderLen+frameEntryLen:])
	require.Zero(t, l0&frameRaw|l1&frameRaw, "text frames are compressed")
	binary.LittleEndian.PutUint32(bad[framedHeaderLen:], l0+1)
	binary.LittleEndian.PutUint32(bad[framedHeaderLen+frameEntryLen:], l1-1)
	require.NoError(t, b.Put(ctx, Key(id), bad))

	got := make([]byte, 4096)
	require.ErrorIs(t, s.ReadAt(ctx, id, 1<<20, got, 0), ErrCorrupt)
	require.NoError(t, b.Put(ctx, Key(id), good))
	require.NoError(t, s.ReadAt(ctx, id, 1<<20, got, 0), "the damaged table was remembered")
	require.Equal(t, data[:4096], got)
}

// Chunks share frames (an all-zero frame at one place is the same in
// every chunk): a read in one chunk after a read of a shared frame in
// another is not taken for a reader going through the chunk in order.
func TestFramedReadAheadIsPerChunk(t *testing.T) {
	ctx := context.Background()
	rb := &ranges{Backend: NewMem()}
	s := newPackStore(t, rb, Options{})
	a, b := randomFrame(1, 1<<20), randomFrame(2, 1<<20)
	clear(a[3<<16 : 4<<16])
	clear(b[3<<16 : 4<<16])
	ida, err := s.Put(ctx, a)
	require.NoError(t, err)
	idb, err := s.Put(ctx, b)
	require.NoError(t, err)
	got := make([]byte, 4096)
	require.NoError(t, s.ReadAt(ctx, ida, 1<<20, got, 3<<16)) // a's zero frame 3: the same as b's
	require.NoError(t, s.ReadAt(ctx, idb, 1<<20, got, 4<<16)) // b's frame 4, after a shared frame 3: a jump
	assert.Equal(t, b[4<<16:][:4096], got)
	assert.EqualValues(t, 4, rb.n.Load(), "a's table and frame, b's table and frame 4")
	assert.Less(t, rb.bytes.Load(), int64(3<<16), "only the frames asked for")
	// Frame 5 of b follows b's last read: the rest of b in one GET.
	require.NoError(t, s.ReadAt(ctx, idb, 1<<20, got, 5<<16))
	require.NoError(t, s.ReadAt(ctx, idb, 1<<20, got, 15<<16))
	assert.EqualValues(t, 5, rb.n.Load())
	assert.Equal(t, b[15<<16:][:4096], got)
}

// BenchmarkFrameCompression compresses 1 MiB of log-like text as one zstd
// input (a version 1 object) and as 16 frames of 64 KiB (a framed one),
// reporting the bytes stored.
func BenchmarkFrameCompression(b *testing.B) {
	data := textFrame(3, 1<<20)
	c, err := newCodec(CompressionZstd, zstd.SpeedDefault)
	require.NoError(b, err)
	cvs, _ := frameCVs(data, FrameBits, 16, BLAKE3{})
	for _, kind := range []string{"whole", "framed"} {
		b.Run(kind, func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			stored := 0
			for b.Loop() {
				var bp *[]byte
				if kind == "framed" {
					bp = c.encodeFramed(data, FrameBits, cvs)
				} else {
					bp = c.encode(data)
				}
				stored = len(*bp)
				bufPool.Put(bp)
			}
			b.ReportMetric(float64(stored), "stored-bytes")
		})
	}
}

// The cache holds journal frames under the hash of what a client wrote. A
// client that writes the bytes a table's key would be made of with a
// plain hash (a prefix and the chunk ID, both known) must not plant an
// entry that a read of that chunk takes for its table.
func TestFrameTableKeyNotPlantable(t *testing.T) {
	ctx := context.Background()
	b := NewMem()
	s := newPackStore(t, b, Options{})
	data := mixedChunk(6)
	id, err := s.Put(ctx, data)
	require.NoError(t, err)
	for _, prefix := range []string{"nbdvault-frame-table\n", "nbdvault 2026-12-01 chunk frame table"} {
		pb := s.NewPack("pack")
		ref, err := pb.Add(append([]byte(prefix), id[:]...))
		require.NoError(t, err)
		require.NoError(t, s.PutPack(ctx, "packs/planted", pb.Finish()))
		_, err = s.GetFrame(ctx, "packs/planted", ref) // now cached under its hash
		require.NoError(t, err)
	}
	got := make([]byte, 4096)
	require.NoError(t, s.ReadAt(ctx, id, 1<<20, got, 7<<16))
	assert.Equal(t, data[7<<16:][:4096], got)
}

// A deleted chunk is gone for frame reads too: its table leaves the cache
// with it.
func TestFramedDeleteDropsTable(t *testing.T) {
	ctx := context.Background()
	s := newPackStore(t, NewMem(), Options{})
	id, err := s.Put(ctx, mixedChunk(7))
	require.NoError(t, err)
	got := make([]byte, 4096)
	require.NoError(t, s.ReadAt(ctx, id, 1<<20, got, 2<<16)) // table and frame 2 cached
	require.NoError(t, s.Delete(ctx, id))
	// Frame 2 stays cached (frames are shared by content), but the read
	// needs the table, which is gone.
	require.ErrorIs(t, s.ReadAt(ctx, id, 1<<20, got, 2<<16), ErrNotFound)
}
