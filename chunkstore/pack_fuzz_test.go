package chunkstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"testing"

	"lukechampine.com/blake3"
)

// fuzzPack is a real pack to seed the fuzzers with, and its frames.
func fuzzPack(tb testing.TB, s *Store) ([]byte, []FrameRef) {
	pb := s.NewPack("pack")
	var refs []FrameRef
	for _, p := range [][]byte{textFrame(1, 2000), randomFrame(2, 300), {9}, make([]byte, 1000)} {
		ref, err := pb.Add(p)
		if err != nil {
			tb.Fatal(err)
		}
		refs = append(refs, ref)
	}
	return pb.Finish(), refs
}

// resum returns pack with its footer's checksum made right, when its
// trailer names a footer that fits: the fuzzer cannot forge a BLAKE3, so
// without this it would never reach the parser behind the checksum.
func resum(pack []byte) []byte {
	if len(pack) < packTrailerLen {
		return pack
	}
	end := len(pack) - packTrailerLen
	n := binary.LittleEndian.Uint32(pack[end:])
	if n < packSumLen || uint64(n) > uint64(end) {
		return pack
	}
	out := bytes.Clone(pack)
	sum := blake3.Sum256(out[end-int(n) : end-packSumLen])
	copy(out[end-packSumLen:end], sum[:])
	return out
}

// FuzzPackFooter feeds DecodePackFooter arbitrary packs, as found in a
// repository: it never panics, refuses with ErrCorrupt, allocates for at
// most what the footer's bytes can list, and what it accepts lists frames
// that tile the pack from offset 0 up to its footer.
func FuzzPackFooter(f *testing.F) {
	s, err := NewStore(NewMem(), Options{})
	if err != nil {
		f.Fatal(err)
	}
	pack, _ := fuzzPack(f, s)
	f.Add(pack)
	f.Add(s.NewPack("pack").Finish())
	f.Add(pack[:len(pack)-1])
	f.Add([]byte("NVPK\x01\x00NVPF"))
	f.Fuzz(func(t *testing.T, pack []byte) {
		for _, p := range [][]byte{pack, resum(pack)} {
			frames, err := DecodePackFooter(p)
			if err != nil {
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("refused with %v, not ErrCorrupt", err)
				}
				continue
			}
			if cap(frames) > len(p)/minFrameEntry {
				t.Fatalf("%d frames' room for a pack of %d bytes", cap(frames), len(p))
			}
			var off int64
			for i, fr := range frames {
				if fr.Off != off {
					t.Fatalf("frame %d at %d, the one before ends at %d", i, fr.Off, off)
				}
				if fr.Len < headerLen || fr.Len > maxFrameStored || fr.Plain == 0 || fr.Plain > MaxFrameSize {
					t.Fatalf("frame %d: %+v", i, fr)
				}
				off += int64(fr.Len)
			}
			footer := int64(binary.LittleEndian.Uint32(p[len(p)-packTrailerLen:]))
			if off+footer+packTrailerLen != int64(len(p)) {
				t.Fatalf("frames end at %d, footer of %d, pack of %d", off, footer, len(p))
			}
		}
	})
}

// FuzzFrame reads a fuzz-chosen ref from a pack of fuzz bytes: GetFrame
// never panics, fails with ErrCorrupt only (the pack exists), and what it
// returns is ref.Plain bytes that hash to ref.Sum.
func FuzzFrame(f *testing.F) {
	ctx := context.Background()
	mem := NewMem()
	// No cache: each input is read from its own bytes.
	s, err := NewStore(mem, Options{CacheBytes: -1})
	if err != nil {
		f.Fatal(err)
	}
	pack, refs := fuzzPack(f, s)
	for _, r := range refs {
		f.Add(pack, r.Off, r.Len, r.Plain, r.Sum[:])
	}
	f.Add(pack, refs[1].Off+1, refs[1].Len, refs[1].Plain, refs[1].Sum[:])
	f.Add([]byte("NV\x01\x00\x01\x00\x00\x00x"), int64(0), uint32(9), uint32(1), []byte{})
	const key = "packs/fuzz"
	f.Fuzz(func(t *testing.T, pack []byte, off int64, n, plain uint32, sum []byte) {
		if err := mem.Put(ctx, key, pack); err != nil {
			t.Fatal(err)
		}
		ref := FrameRef{Off: off, Len: n, Plain: plain}
		copy(ref.Sum[:], sum)
		data, err := s.GetFrame(ctx, key, ref)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("%+v: %v, not ErrCorrupt", ref, err)
			}
			if data != nil {
				t.Fatal("data with an error")
			}
			return
		}
		if len(data) != int(plain) {
			t.Fatalf("%d bytes, the ref says %d", len(data), plain)
		}
		if got := s.hasher.Sum(data); got != ref.Sum {
			t.Fatalf("returned bytes that hash to %s, not %s", got, ref.Sum)
		}
	})
}
