package main

import "math/rand/v2"

// Compressible data for the image's text files: lines of words drawn at
// random from a fixed made-up vocabulary. zstd stores it at about 0.4 of
// its size, and decoding it takes real work (short matches and Huffman
// literals), unlike runs of zeros. Every 4 KiB block starts with a line
// that names it, so no two blocks are the same.

const textBlockSize = 4096

// textVocab is the vocabulary: 2048 pronounceable made-up words of one to
// three syllables, the same in every run.
var textVocab = func() [][]byte {
	const consonants, vowels = "bcdfghklmnprstvz", "aeiou"
	rng := rand.New(rand.NewPCG(2026, 4))
	words := make([][]byte, 2048)
	for i := range words {
		var w []byte
		for range 1 + rng.IntN(3) {
			w = append(w, consonants[rng.IntN(len(consonants))], vowels[rng.IntN(len(vowels))])
			if rng.IntN(3) == 0 {
				w = append(w, consonants[rng.IntN(len(consonants))])
			}
		}
		words[i] = w
	}
	return words
}()

// textGen makes text blocks from one random stream.
type textGen struct {
	rng *rand.PCG
}

func newTextGen(seed uint64) *textGen {
	return &textGen{rng: rand.NewPCG(seed, 0x6e62647661756c74)}
}

// fill fills dst with text that starts with the line label: words
// separated by spaces, a newline every 12 words.
func (g *textGen) fill(dst []byte, label string) {
	n := copy(dst, label)
	if n < len(dst) {
		dst[n] = '\n'
		n++
	}
	words := 0
	for n < len(dst) {
		r := g.rng.Uint64()
		// Five 11-bit word indices from each 64-bit draw.
		for k := 0; k < 5 && n < len(dst); k++ {
			w := textVocab[r&2047]
			r >>= 11
			n += copy(dst[n:], w)
			if n == len(dst) {
				break
			}
			words++
			if words%12 == 0 {
				dst[n] = '\n'
			} else {
				dst[n] = ' '
			}
			n++
		}
	}
}
