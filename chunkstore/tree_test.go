package chunkstore

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
	"lukechampine.com/blake3"
)

// The frames' CVs fold into exactly BLAKE3 of the whole plaintext, keyed
// or not, for power-of-two and other frame counts; and a frame's CV
// depends on its place.
func TestTreeRootIsBLAKE3(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	key := [32]byte{9, 8, 7}
	keyed := NewKeyedBLAKE3(key)
	for _, fs := range []int{16 << 10, 64 << 10, 256 << 10} {
		for _, n := range []int{2, 3, 5, 7, 16, 17} {
			data := make([]byte, fs*n)
			for i := range data {
				data[i] = byte(rng.Uint32())
			}
			for _, h := range []Hasher{BLAKE3{}, keyed} {
				k, flags, ok := treeKey(h)
				require.True(t, ok)
				cvs := make([]cv, n)
				for i := range cvs {
					cvs[i] = frameCV(data[i*fs:(i+1)*fs], i, k, flags)
				}
				require.Equal(t, h.Sum(data), treeRoot(cvs, k, flags), "frame %d, %d frames, %s", fs, n, h.Scheme())
			}
			// Swapping two equal-length frames changes the root: a CV
			// binds its frame's place.
			k, flags, _ := treeKey(BLAKE3{})
			a, b := frameCV(data[:fs], 0, k, flags), frameCV(data[:fs], 1, k, flags)
			require.NotEqual(t, a, b)
		}
	}
	require.Equal(t, ID(blake3.Sum256(make([]byte, 1<<20))), BLAKE3{}.Sum(make([]byte, 1<<20)))
}

func BenchmarkTreeHash1MiB(b *testing.B) {
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i * 7)
	}
	k, flags, _ := treeKey(BLAKE3{})
	b.Run("frames", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		cvs := make([]cv, 16)
		for b.Loop() {
			for i := range cvs {
				cvs[i] = frameCV(data[i<<16:(i+1)<<16], i, k, flags)
			}
			treeRoot(cvs, k, flags)
		}
	})
	b.Run("Sum256", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			blake3.Sum256(data)
		}
	})
}
