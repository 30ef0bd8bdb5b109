package volume

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestExtentMapModel inserts random writes and zeroes and checks, byte by
// byte, that the map says what a plain array of "newest record per byte"
// says.
func TestExtentMapModel(t *testing.T) {
	const space = 4096
	for seed := range uint64(12) {
		r := rand.New(rand.NewPCG(seed, 1))
		m := newExtentMap()
		// model[i]: 0 = nothing, -1 = zero, else the data position of byte i.
		var model [space]int64
		for op := range 200 {
			off := r.Int64N(space)
			n := 1 + r.Int64N(min(space-off, 1+r.Int64N(space/4)))
			e := extent{off: off, length: n}
			if r.IntN(4) == 0 {
				e.zero = true
			} else {
				e.pos = Pos{Segment: 1, Off: int64(op+1) * 1_000_000}
			}
			m.insert(e)
			for i := off; i < off+n; i++ {
				if e.zero {
					model[i] = -1
				} else {
					model[i] = e.pos.Off + (i - off)
				}
			}

			// Check a random window against the model.
			woff := r.Int64N(space)
			wn := 1 + r.Int64N(space-woff)
			var got [space]int64
			last := woff
			m.visit(woff, wn, func(x extent) bool {
				require.GreaterOrEqual(t, x.off, last, "seed %d: pieces in order, not overlapping", seed)
				require.Greater(t, x.length, int64(0))
				require.LessOrEqual(t, x.end(), woff+wn, "seed %d: piece clipped to the window", seed)
				for i := x.off; i < x.end(); i++ {
					if x.zero {
						got[i] = -1
					} else {
						got[i] = x.pos.Off + (i - x.off)
					}
				}
				last = x.end()
				return true
			})
			for i := woff; i < woff+wn; i++ {
				require.Equal(t, model[i], got[i], "seed %d op %d: byte %d", seed, op, i)
			}
		}
		// Extents never overlap and dataBytes adds up.
		var data, prevEnd int64
		m.t.Ascend(func(x extent) bool {
			require.GreaterOrEqual(t, x.off, prevEnd)
			prevEnd = x.end()
			if !x.zero {
				data += x.length
			}
			return true
		})
		require.Equal(t, data, m.dataBytes)
	}
}

func TestExtentMapHugeZeroIsCheap(t *testing.T) {
	m := newExtentMap()
	for i := range int64(1000) {
		m.insert(extent{off: i << 20, length: 4096, pos: Pos{Segment: 1, Off: i * 4096}})
	}
	m.insert(extent{off: 0, length: 64 << 40, zero: true})
	require.Equal(t, 1, m.len(), "a 64 TiB zero replaces everything it covers with one extent")
	require.Zero(t, m.dataBytes)
	m.insert(extent{off: 1 << 30, length: 10, pos: Pos{Segment: 2, Off: 7}})
	require.Equal(t, 3, m.len(), "a write splits the zero in two")
}
