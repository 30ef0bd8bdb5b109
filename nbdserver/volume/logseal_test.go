package volume

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A sealed log holds none of what was written, replays it whole, reads
// any part of a record back, and survives a torn tail as a plain one. A
// segment copied into another volume's log, or opened without the key,
// or with another, is an error that cuts nothing.
func TestSealedLog(t *testing.T) {
	dir := t.TempDir()
	key := [32]byte{7}
	open := func(dir string, seal *logSeal) (*Log, []Record, error) {
		var recs []Record
		l, err := openLog(dir, logOpen{first: 1, seal: seal}, func(r Record, p Pos) error {
			assert.EqualValues(t, len(r.Data), p.RecLen, "Pos in plaintext lengths")
			r.Data = bytes.Clone(r.Data)
			recs = append(recs, r)
			return nil
		})
		return l, recs, err
	}
	marker := bytes.Repeat([]byte("secret-log-marker "), 4000)
	want := []Record{
		{Type: RecordWrite, Offset: 4096, Length: int64(len(marker)), Data: marker},
		{Type: RecordZero, Offset: 0, Length: 64 << 40},
		{Type: RecordMark, Data: []byte(`{"snapshot":"secret-label"}`)},
		{Type: RecordWrite, Offset: 1 << 30, Length: RecordGrain, Data: randomBytes(RecordGrain)},
	}
	l, recs, err := open(dir, newLogSeal(key, "db"))
	require.NoError(t, err)
	require.Empty(t, recs)
	for i, r := range want {
		seq, pos, err := l.Append(r, nil)
		require.NoError(t, err)
		want[i].Seq = seq
		got := make([]byte, len(r.Data))
		require.NoError(t, l.ReadAt(got, pos))
		assert.True(t, bytes.Equal(r.Data, got), "record %d reads back whole", i)
		if len(r.Data) > 100 {
			part := pos
			part.Off += 50
			got := make([]byte, 30)
			require.NoError(t, l.ReadAt(got, part))
			assert.Equal(t, r.Data[50:80], got, "record %d reads back in part", i)
		}
	}
	require.NoError(t, l.Sync())
	require.NoError(t, l.Close())

	segs, err := filepath.Glob(filepath.Join(dir, "*.log"))
	require.NoError(t, err)
	require.Len(t, segs, 1)
	raw, err := os.ReadFile(segs[0])
	require.NoError(t, err)
	assert.NotContains(t, string(raw), "secret", "the segment holds no plaintext")

	l, recs, err = open(dir, newLogSeal(key, "db"))
	require.NoError(t, err)
	assert.Equal(t, want, recs, "replay opens every record")
	require.NoError(t, l.Close())

	for name, seal := range map[string]*logSeal{
		"no key":         nil,
		"another key":    newLogSeal([32]byte{8}, "db"),
		"another volume": newLogSeal(key, "web"),
	} {
		_, _, err := open(dir, seal)
		require.ErrorIs(t, err, ErrLogCorrupt, name)
		after, err := os.ReadFile(segs[0])
		require.NoError(t, err)
		assert.Equal(t, raw, after, "%s: nothing is cut", name)
	}
	// A plain log opened with a key is refused too.
	plain := t.TempDir()
	pl, _, err := open(plain, nil)
	require.NoError(t, err)
	_, _, err = pl.Append(want[0], nil)
	require.NoError(t, err)
	require.NoError(t, pl.Close())
	_, _, err = open(plain, newLogSeal(key, "db"))
	require.ErrorIs(t, err, ErrLogCorrupt)

	// A torn last record is cut, as in a plain log.
	require.NoError(t, os.WriteFile(segs[0], raw[:len(raw)-100], 0o600))
	l, recs, err = open(dir, newLogSeal(key, "db"))
	require.NoError(t, err)
	assert.Equal(t, want[:3], recs)
	require.NotNil(t, l.TornTail())
	require.NoError(t, l.Close())
}

// FuzzSealedLogReplay replays a sealed log's segment of arbitrary bytes:
// replay never panics, and every record it hands on opened with the key
// (so it is one the sealer wrote: the fuzzer cannot forge one).
func FuzzSealedLogReplay(f *testing.F) {
	seal := newLogSeal([32]byte{7}, "db")
	dir := f.TempDir()
	l, err := openLog(dir, logOpen{first: 1, seal: seal}, func(Record, Pos) error { return nil })
	if err != nil {
		f.Fatal(err)
	}
	written := []Record{{Type: RecordWrite, Offset: 4096, Length: 3, Data: []byte("abc")}, {Type: RecordZero, Length: 1 << 40},
		{Type: RecordMark, Data: []byte(`{"id":"x"}`)}}
	for _, r := range written {
		if _, _, err := l.Append(r, nil); err != nil {
			f.Fatal(err)
		}
	}
	l.Close()
	good, _ := os.ReadFile(segmentPath(dir, 1))
	f.Add(good)
	f.Add(good[:len(good)-5])
	f.Fuzz(func(t *testing.T, seg []byte) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "0000000000000001.log"), seg, 0o600); err != nil {
			t.Fatal(err)
		}
		l, err := openLog(dir, logOpen{first: 1, seal: seal}, func(r Record, p Pos) error {
			if r.Seq > uint64(len(written)) {
				t.Fatalf("record %d opened: the sealer wrote %d", r.Seq, len(written))
			}
			w := written[r.Seq-1]
			if r.Type != w.Type || r.Offset != w.Offset || r.Length != w.Length || !bytes.Equal(r.Data, w.Data) {
				t.Fatalf("record %d opened as %+v, not as written", r.Seq, r)
			}
			return nil
		})
		if err == nil {
			l.Close()
		}
	})
}
