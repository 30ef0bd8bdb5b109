package volume

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// FuzzManifest feeds manifest decoding the bytes of an object read from a
// repository: it never panics, and whatever it accepts says what its key
// says and has its checksum.
func FuzzManifest(f *testing.F) {
	const key = "volumes/db/snapshots/20261130T120000.000Z-000000000007"
	m := Manifest{ID: "20261130T120000.000Z-000000000007", Kind: KindSnapshot, Volume: "db", Time: time.Unix(0, 0).UTC(),
		Size: 1 << 30, ChunkSize: 1 << 20, Seq: 7}
	good, _ := encodeObject("repo", key, m)
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add([]byte("{}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		got, err := decodeManifest("repo", key, "db", KindSnapshot, 1<<20, data)
		if err != nil {
			return
		}
		if got.ID != m.ID || got.Volume != "db" || got.Kind != KindSnapshot || got.Seq != 7 || got.ChunkSize != 1<<20 || got.Size <= 0 || got.Size > MaxSize {
			t.Fatalf("accepted a manifest that does not say what its key says: %+v", got)
		}
	})
}

// FuzzLogReplay replays a segment of arbitrary bytes after a good record:
// replay never panics, every record it hands on passed its CRC and comes
// in sequence, and the log it opens takes appends.
func FuzzLogReplay(f *testing.F) {
	good := func(recs ...Record) []byte {
		dir := f.TempDir()
		l, err := OpenLog(dir, func(Record, Pos) error { return nil })
		if err != nil {
			f.Fatal(err)
		}
		for _, r := range recs {
			if _, _, err := l.Append(r, nil); err != nil {
				f.Fatal(err)
			}
		}
		l.Close()
		b, _ := os.ReadFile(segmentPath(dir, 1))
		return b
	}
	f.Add(good(Record{Type: RecordWrite, Offset: 4096, Length: 3, Data: []byte("abc")}, Record{Type: RecordZero, Length: 1 << 40}))
	f.Add(good(Record{Type: RecordMark, Data: []byte(`{"id":"x"}`)}))
	f.Add([]byte("GLVN\x01"))
	f.Fuzz(func(t *testing.T, seg []byte) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "0000000000000001.log"), seg, 0o600); err != nil {
			t.Fatal(err)
		}
		next := uint64(1)
		l, err := OpenLog(dir, func(r Record, p Pos) error {
			if r.Seq != next {
				t.Fatalf("record %d where %d was due", r.Seq, next)
			}
			next++
			if p.RecLen != int64(len(r.Data)) || p.Off != p.Rec+recordHeaderLen {
				t.Fatalf("position %+v for %d bytes", p, len(r.Data))
			}
			if int(p.Rec)+recordHeaderLen+len(r.Data) > len(seg) {
				t.Fatalf("record past the segment's end")
			}
			crc := binary.LittleEndian.Uint32(seg[p.Rec+36:])
			if recordCRC(seg[p.Rec:p.Rec+recordHeaderLen], r.Data) != crc {
				t.Fatalf("record %d handed on with a bad CRC", r.Seq)
			}
			return nil
		})
		if err != nil {
			return // damage: refused, as it should be
		}
		defer l.Close()
		if seq, _, err := l.Append(Record{Type: RecordZero, Length: 1}, nil); err != nil || seq != next {
			t.Fatalf("append after replay: seq %d (want %d), %v", seq, next, err)
		}
	})
}

// pageStore hands out one page of fuzzed bytes for every ID.
type pageStore struct{ page []byte }

func (p pageStore) Put(context.Context, []byte) (chunkstore.ID, error) { return chunkstore.ZeroID, nil }
func (p pageStore) Get(context.Context, chunkstore.ID) ([]byte, error) { return p.page, nil }

// FuzzIndexPage walks the index through pages of any content and length
// (a page passed its hash check, but may have been written by anything):
// a lookup never panics, a page of the wrong length is ErrCorrupt, and a
// hole's run ends past the chunk asked for.
func FuzzIndexPage(f *testing.F) {
	full := make([]byte, pageLen)
	for i := range full {
		full[i] = byte(i)
	}
	f.Add(full, uint64(5))
	f.Add(make([]byte, pageLen), uint64(MaxChunks-1))
	f.Add([]byte("short"), uint64(0))
	f.Fuzz(func(t *testing.T, page []byte, c uint64) {
		root := chunkstore.ID{1}
		id, next, err := lookupRun(context.Background(), pageStore{page}, root, c)
		switch {
		case c >= MaxChunks:
			if err == nil {
				t.Fatalf("chunk %d beyond the index answered", c)
			}
		case len(page) != pageLen:
			if !errors.Is(err, chunkstore.ErrCorrupt) {
				t.Fatalf("a page of %d bytes: %v", len(page), err)
			}
		case err != nil:
			t.Fatal(err)
		case next <= c:
			t.Fatalf("run after chunk %d ends at %d", c, next)
		case !id.IsZero() && next != c+1:
			t.Fatalf("chunk %d has data but its run ends at %d", c, next)
		}
	})
}

// FuzzInventoryFiles feeds the readers of the chunk inventory's files
// (state folder, gc/) what a damaged disk could hold: they never panic,
// and what they accept as closed is what its trailer vouches for.
func FuzzInventoryFiles(f *testing.F) {
	dir := f.TempDir()
	good := filepath.Join(dir, "good")
	w, err := createRecords(good, writtenMagic)
	if err != nil {
		f.Fatal(err)
	}
	for i := range 3 {
		var id chunkstore.ID
		id[0] = byte(i + 1)
		_ = w.add(chunkRec{id, uint32(i) << 20})
	}
	if err := w.finish(); err != nil {
		f.Fatal(err)
	}
	data, _ := os.ReadFile(good)
	f.Add(data)
	f.Add(data[:len(data)-1])
	f.Add(append([]byte(nil), data[:headerLen+recLen]...))
	f.Add([]byte("NBDVINV2"))
	// The format before sizes: its magics, 32-byte records.
	f.Add(append([]byte("NBDVWRT1"), data[headerLen:]...))
	f.Add(append([]byte("NBDVINV1"), make([]byte, 3*32+trailerLen)...))
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(t.TempDir(), "f")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		recs, err := readRecords(path)
		if err == nil && (len(data)-headerLen-trailerLen)/recLen != len(recs) {
			t.Fatalf("accepted %d records from %d bytes", len(recs), len(data))
		}
		if err == nil && string(data[:headerLen]) != string(writtenMagic) {
			t.Fatalf("accepted a file of magic %q", data[:headerLen])
		}
		// The same bytes as an inventory (its own magic).
		if len(data) >= headerLen {
			copy(data, invMagic)
			_ = os.WriteFile(path, data, 0o600)
		}
		r, err := openRecords(path, invMagic)
		if err != nil {
			return
		}
		defer r.close()
		n := 0
		for {
			_, ok, err := r.next()
			if err != nil || !ok {
				if err == nil && n != int(r.n) {
					t.Fatalf("read %d records, the file says %d", n, r.n)
				}
				return
			}
			n++
		}
	})
}
