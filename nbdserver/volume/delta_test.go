package volume

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
)

func testRef(r *rand.Rand) chunkstore.FrameRef {
	ref := chunkstore.FrameRef{Off: r.Int64N(1 << 30), Len: 1 + r.Uint32N(1<<20), Plain: frameTarget}
	for i := range ref.Sum {
		ref.Sum[i] = byte(r.Uint32())
	}
	return ref
}

// randomPage makes a valid page of n extents from first on.
func randomPage(r *rand.Rand, first int64, n int, npacks int) (deltaPage, pageRef) {
	var p deltaPage
	for range 1 + r.IntN(5) {
		p.frames = append(p.frames, frameLoc{pack: uint32(r.IntN(npacks)), ref: testRef(r)})
	}
	at, data := first, int64(0)
	for range n {
		x := dext{off: at + r.Int64N(3)*4096, length: 1 + r.Int64N(frameTarget/2), kind: dkind(1 + r.IntN(3))}
		if x.kind == dxData {
			x.frame = uint32(r.IntN(len(p.frames)))
			x.in = uint32(r.Int64N(frameTarget - x.length + 1))
			data += x.length
		}
		p.ext = append(p.ext, x)
		at = x.end()
	}
	return p, pageRef{first: first, end: at, extents: int64(n), dataBytes: data}
}

func TestDeltaEncoding(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	top := deltaTop{packs: []string{"volumes/v/journal/0000000000000001-aa", "volumes/v/journal/0000000000000002-bb"}}
	at := int64(0)
	for i := range 20 {
		p, pr := randomPage(r, at+r.Int64N(1<<20), 1+r.IntN(200), len(top.packs))
		pr.pack, pr.ref = uint32(i%2), testRef(r)
		b := encodePage(p, pr.first)
		pr.ref.Plain = uint32(len(b))
		got, err := decodePage(b, pr, len(top.packs))
		require.NoError(t, err)
		require.Equal(t, p, got)
		top.pages = append(top.pages, pr)
		at = pr.end

		// Every truncation is an error, never a shorter page.
		for cut := range len(b) {
			_, err := decodePage(b[:cut], pr, len(top.packs))
			require.ErrorIs(t, err, chunkstore.ErrCorrupt, "page cut at %d", cut)
		}
		// A page that says other than its top is refused.
		wrong := pr
		wrong.dataBytes++
		_, err = decodePage(b, wrong, len(top.packs))
		require.ErrorIs(t, err, chunkstore.ErrCorrupt)
		wrong = pr
		wrong.end = p.ext[len(p.ext)-1].end() - 1
		_, err = decodePage(b, wrong, len(top.packs))
		require.ErrorIs(t, err, chunkstore.ErrCorrupt)
	}
	b := encodeTop(top)
	got, err := decodeTop(b)
	require.NoError(t, err)
	require.Equal(t, top, got)
	for cut := range len(b) {
		_, err := decodeTop(b[:cut])
		require.ErrorIs(t, err, chunkstore.ErrCorrupt, "top cut at %d", cut)
	}
}

// TestDeltaEncodingSmallest: a top and a page whose entries take the
// fewest bytes they can (a delta of a few bytes near the start of the
// volume, in a frame near the start of its pack) decode. The entry counts
// are bounded by the smallest entry: a bound one byte too high refused
// the delta of a 9-byte write at offset 100.
func TestDeltaEncodingSmallest(t *testing.T) {
	ref := chunkstore.FrameRef{Off: 1, Len: 20, Plain: 9}
	p := deltaPage{frames: []frameLoc{{pack: 0, ref: ref}}, ext: []dext{{off: 100, length: 9, kind: dxData}}}
	pr := pageRef{first: 100, end: 109, extents: 1, dataBytes: 9, pack: 0}
	b := encodePage(p, pr.first)
	got, err := decodePage(b, pr, 1)
	require.NoError(t, err)
	require.Equal(t, p, got)
	pr.ref = chunkstore.FrameRef{Off: 21, Len: uint32(len(b)), Plain: uint32(len(b))}
	top := deltaTop{packs: []string{"volumes/v/journal/0000000000000002-a"}, pages: []pageRef{pr}}
	gotTop, err := decodeTop(encodeTop(top))
	require.NoError(t, err)
	require.Equal(t, top, gotTop)
}

// flatten is what a list of deltas (oldest first) says of [0, size):
// for each byte, the newest extent's kind and source, as a string.
func flatten(size int64, deltas [][]xext) []string {
	out := make([]string, size)
	for _, d := range deltas {
		for _, x := range d {
			for o := x.off; o < x.end(); o++ {
				s := fmt.Sprint(x.kind)
				if x.kind == dxData {
					s = fmt.Sprintf("%s@%d", x.pack, int64(x.in)+o-x.off)
				}
				out[o] = s
			}
		}
	}
	return out
}

func randomDelta(r *rand.Rand, size int64, name string) []xext {
	var out []xext
	for at := r.Int64N(50); at < size; {
		n := min(size-at, 1+r.Int64N(40))
		x := xext{off: at, length: n, kind: dkind(1 + r.IntN(3))}
		if x.kind == dxData {
			x.pack, x.in = name, uint32(r.IntN(1000))
		}
		out = append(out, x)
		at += n + r.Int64N(60)
	}
	return out
}

// TestOverlay checks the merge of sorted deltas against byte-by-byte
// replay: the newest extent over each byte wins, and nothing else moves.
func TestOverlay(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for round := range 200 {
		size := int64(1 + r.IntN(2000))
		var deltas [][]xext
		var srcs []*deltaSource
		for i := range 1 + r.IntN(5) {
			d := randomDelta(r, size, fmt.Sprint("p", i))
			deltas = append(deltas, d)
			srcs = append(srcs, memSource(d))
		}
		var merged []xext
		at := int64(-1)
		require.NoError(t, overlay(srcs, func(x xext) error {
			require.Greater(t, x.length, int64(0))
			require.GreaterOrEqual(t, x.off, at, "round %d: out of order", round)
			at = x.end()
			merged = append(merged, x)
			return nil
		}))
		require.Equal(t, flatten(size, deltas), flatten(size, [][]xext{merged}), "round %d", round)
	}
}

func FuzzDeltaTop(f *testing.F) {
	r := rand.New(rand.NewPCG(5, 6))
	p, pr := randomPage(r, 0, 10, 1)
	pr.ref = testRef(r)
	f.Add(encodeTop(deltaTop{packs: []string{"volumes/v/journal/x"}, pages: []pageRef{pr}}))
	f.Add(encodePage(p, 0))
	f.Fuzz(func(t *testing.T, b []byte) {
		top, err := decodeTop(b)
		if err != nil {
			return
		}
		at := int64(0)
		for _, p := range top.pages {
			if p.first < at || p.end <= p.first || int(p.pack) >= len(top.packs) {
				t.Fatalf("accepted a bad page %+v", p)
			}
			at = p.end
		}
	})
}

func FuzzDeltaPage(f *testing.F) {
	r := rand.New(rand.NewPCG(7, 8))
	p, pr := randomPage(r, 4096, 30, 3)
	f.Add(encodePage(p, pr.first), pr.first, pr.end, pr.extents, pr.dataBytes)
	f.Fuzz(func(t *testing.T, b []byte, first, end, extents, data int64) {
		if first < 0 || end <= first || end > MaxSize {
			return
		}
		pr := pageRef{first: first, end: end, extents: extents, dataBytes: data}
		p, err := decodePage(b, pr, 3)
		if err != nil {
			return
		}
		at := first
		for _, x := range p.ext {
			if x.off < at || x.length <= 0 || x.end() > end {
				t.Fatalf("accepted a bad extent %+v", x)
			}
			if x.kind == dxData && (int(x.frame) >= len(p.frames) || int64(x.in)+x.length > int64(p.frames[x.frame].ref.Plain)) {
				t.Fatalf("accepted an extent past its frame %+v", x)
			}
			at = x.end()
		}
	})
}
