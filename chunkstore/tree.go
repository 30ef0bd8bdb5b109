package chunkstore

import (
	"encoding/binary"
	"math/bits"

	"lukechampine.com/blake3/guts"
)

// BLAKE3 hashes its input as a Merkle tree of 1 KiB chunks, and a frame of
// a chunk (a power of two of at least 16 KiB, at a multiple of its own
// size) is one complete subtree of it. So the chunk's ID can be computed
// from its frames' chaining values (CVs), and one frame can be checked
// against the ID with the other frames' CVs alone: Bao's construction, with
// the tree cut at the frame size (framed.go).

// cv is a chaining value: the 256-bit digest of a non-root subtree.
type cv [8]uint32

// treeKey returns the key words and flags h's tree is built with, and
// false for a Hasher that is not BLAKE3 (its chunks are not framed).
func treeKey(h Hasher) (*[8]uint32, uint32, bool) {
	switch h := h.(type) {
	case BLAKE3, *MACBLAKE3: // the MAC is of the root (finishRoot)
		return &guts.IV, 0, true
	case *KeyedBLAKE3:
		return &h.words, guts.FlagKeyedHash, true
	}
	return nil, 0, false
}

// simdBytes is what one guts.CompressBuffer call hashes: 16 chunks.
const simdBytes = guts.MaxSIMD * guts.ChunkSize

// subtreeCV returns the CV of buf (a power of two of simdBytes or more)
// whose first 1 KiB chunk has number counter.
func subtreeCV(buf []byte, key *[8]uint32, counter uint64, flags uint32) cv {
	if len(buf) == simdBytes {
		return guts.ChainingValue(guts.CompressBuffer((*[simdBytes]byte)(buf), simdBytes, key, counter, flags))
	}
	half := len(buf) / 2
	l := subtreeCV(buf[:half], key, counter, flags)
	r := subtreeCV(buf[half:], key, counter+uint64(half/guts.ChunkSize), flags)
	return guts.ChainingValue(guts.ParentNode(l, r, key, flags))
}

// frameCV returns the CV of frame i (of frameSize bytes) of a chunk.
func frameCV(frame []byte, i int, key *[8]uint32, flags uint32) cv {
	return subtreeCV(frame, key, uint64(i)*uint64(len(frame)/guts.ChunkSize), flags)
}

// treeRoot folds the CVs of a chunk's frames, in order (at least two, all
// frames full), into the chunk's ID: BLAKE3's tree is left-complete, so
// the left subtree of n frames holds the largest power of two below n.
func treeRoot(cvs []cv, key *[8]uint32, flags uint32) ID {
	var fold func(cvs []cv) cv
	fold = func(cvs []cv) cv {
		if len(cvs) == 1 {
			return cvs[0]
		}
		k := leftFrames(len(cvs))
		return guts.ChainingValue(guts.ParentNode(fold(cvs[:k]), fold(cvs[k:]), key, flags))
	}
	k := leftFrames(len(cvs))
	out := guts.CompressNode(guts.ParentNode(fold(cvs[:k]), fold(cvs[k:]), key, flags|guts.FlagRoot))
	var id ID
	for i := range 8 {
		binary.LittleEndian.PutUint32(id[4*i:], out[i])
	}
	return id
}

// leftFrames is how many of n ≥ 2 frames the left subtree holds.
func leftFrames(n int) int { return 1 << (bits.Len(uint(n-1)) - 1) }

func (c cv) bytes() (b [32]byte) {
	for i, w := range c {
		binary.LittleEndian.PutUint32(b[4*i:], w)
	}
	return b
}

func cvFromBytes(b []byte) (c cv) {
	for i := range c {
		c[i] = binary.LittleEndian.Uint32(b[4*i:])
	}
	return c
}
