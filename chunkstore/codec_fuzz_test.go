package chunkstore

import (
	"bytes"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// FuzzCodecDecode feeds the chunk decoder objects read from a repository:
// it never panics, never returns more than MaxChunkSize, and what it
// returns is exactly as long as the header says.
func FuzzCodecDecode(f *testing.F) {
	c, err := newCodec(CompressionZstd, zstd.SpeedDefault)
	if err != nil {
		f.Fatal(err)
	}
	for _, plain := range [][]byte{[]byte("hello"), bytes.Repeat([]byte("abc"), 5000), make([]byte, 4096)} {
		bp := c.encode(plain)
		f.Add(bytes.Clone(*bp))
	}
	f.Add([]byte("NV\x01\x00\x05\x00\x00\x00hello"))
	f.Add([]byte("NV\x01\x01\xff\xff\xff\x00"))
	f.Fuzz(func(t *testing.T, obj []byte) {
		plain, err := c.decode(obj)
		if err != nil {
			return
		}
		if len(plain) > MaxChunkSize {
			t.Fatalf("decoded %d bytes", len(plain))
		}
		if n := int(uint32(obj[4]) | uint32(obj[5])<<8 | uint32(obj[6])<<16 | uint32(obj[7])<<24); n != len(plain) {
			t.Fatalf("header says %d, decoded %d", n, len(plain))
		}
	})
}

// FuzzFramed feeds the framed-object decoders objects read from a
// repository: the table parser and the whole decode never panic, a table
// that parses places its frames in order after it, and a decode that
// succeeds returns bytes that hash to the ID it was asked for.
func FuzzFramed(f *testing.F) {
	c, err := newCodec(CompressionZstd, zstd.SpeedDefault)
	if err != nil {
		f.Fatal(err)
	}
	h := BLAKE3{}
	plain := append(bytes.Repeat([]byte("framed "), 16<<10/7+1)[:16<<10], make([]byte, 16<<10)...)
	cvs, id := frameCVs(plain, minFrameBits, 2, h)
	bp := c.encodeFramed(plain, minFrameBits, cvs)
	f.Add(bytes.Clone(*bp))
	f.Add((*bp)[:tableLen(2)])
	f.Fuzz(func(t *testing.T, obj []byte) {
		if tab, err := parseTable(obj); err == nil {
			for i := range tab.frames() {
				if tab.offs[i] < int64(tableLen(tab.frames())) || tab.offs[i+1] <= tab.offs[i] {
					t.Fatalf("frame %d at [%d, %d)", i, tab.offs[i], tab.offs[i+1])
				}
			}
		}
		got, err := c.decodeFramed(obj, id, h, nil)
		if err != nil {
			return
		}
		if h.Sum(got) != id {
			t.Fatalf("decoded %d bytes that are not chunk %s", len(got), id)
		}
	})
}
