package volume

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/testenv"
)

func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// replayAll opens the log in dir and returns every record it replays, with
// copies of their data.
func replayAll(t *testing.T, dir string) (*Log, []Record) {
	t.Helper()
	var recs []Record
	l, err := OpenLog(dir, func(r Record, _ Pos) error {
		r.Data = bytes.Clone(r.Data)
		recs = append(recs, r)
		return nil
	})
	require.NoError(t, err)
	return l, recs
}

func TestLogAppendReplay(t *testing.T) {
	dir := t.TempDir()
	l, recs := replayAll(t, dir)
	require.Empty(t, recs)
	want := []Record{
		{Type: RecordWrite, Offset: 4096, Length: 5, Data: []byte("hello")},
		{Type: RecordZero, Offset: 0, Length: 64 << 40},
		{Type: RecordMark, Data: []byte(`{"snapshot":"a"}`)},
		{Type: RecordWrite, Offset: 1 << 40, Length: 1 << 20, Data: randomBytes(1 << 20)},
	}
	for i, r := range want {
		seq, pos, err := l.Append(r, nil)
		require.NoError(t, err)
		assert.EqualValues(t, i+1, seq)
		want[i].Seq = seq
		got := make([]byte, len(r.Data))
		require.NoError(t, l.ReadAt(got, pos))
		assert.True(t, bytes.Equal(r.Data, got), "data readable at its position")
	}
	require.NoError(t, l.Sync())
	require.NoError(t, l.Close())

	l, recs = replayAll(t, dir)
	defer l.Close()
	for i := range want {
		if want[i].Data == nil {
			want[i].Data = []byte{}
		}
	}
	assert.Equal(t, want, recs)
	seq, _, err := l.Append(Record{Type: RecordWrite, Offset: 0, Length: 1, Data: []byte{1}}, nil)
	require.NoError(t, err)
	assert.EqualValues(t, 5, seq, "sequence numbers go on after a restart")
}

func TestLogTornTail(t *testing.T) {
	for name, tc := range map[string]struct {
		keep   int // records that survive
		damage func(path string, size int64)
	}{
		"truncated data":   {1, func(p string, size int64) { require.NoError(t, os.Truncate(p, size-10)) }},
		"truncated header": {1, func(p string, size int64) { require.NoError(t, os.Truncate(p, size-(1<<16)-20)) }},
		"garbage after the last record": {2, func(p string, size int64) {
			f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
			require.NoError(t, err)
			_, err = f.Write(randomBytes(100))
			require.NoError(t, err)
			f.Close()
		}},
		"flipped bit": {1, func(p string, size int64) {
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			require.NoError(t, err)
			b := []byte{0}
			_, err = f.ReadAt(b, size-100)
			require.NoError(t, err)
			b[0] ^= 1
			_, err = f.WriteAt(b, size-100)
			require.NoError(t, err)
			f.Close()
		}},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			l, _ := replayAll(t, dir)
			first := randomBytes(1 << 16)
			_, _, err := l.Append(Record{Type: RecordWrite, Offset: 0, Length: 1 << 16, Data: first}, nil)
			require.NoError(t, err)
			_, _, err = l.Append(Record{Type: RecordWrite, Offset: 1 << 16, Length: 1 << 16, Data: randomBytes(1 << 16)}, nil)
			require.NoError(t, err)
			require.NoError(t, l.Sync())
			size := l.Size()
			require.NoError(t, l.Close())
			tc.damage(segmentPath(dir, 1), size)

			l, recs := replayAll(t, dir)
			require.Len(t, recs, tc.keep, "a torn last record is dropped, the ones before kept")
			assert.Equal(t, first, recs[0].Data)
			seq, _, err := l.Append(Record{Type: RecordZero, Offset: 0, Length: 1}, nil)
			require.NoError(t, err)
			assert.EqualValues(t, tc.keep+1, seq, "appends continue where the good records end")
			require.NoError(t, l.Sync())
			l.Close()
			l, recs = replayAll(t, dir)
			l.Close()
			assert.Len(t, recs, tc.keep+1)
		})
	}
}

func TestLogMarksRemoveAndCorruption(t *testing.T) {
	dir := t.TempDir()
	l, _ := replayAll(t, dir)
	for i := range 3 {
		_, _, err := l.Append(Record{Type: RecordWrite, Offset: int64(i), Length: 3, Data: []byte("abc")}, nil)
		require.NoError(t, err)
		seq, err := l.AppendMark(func(seq uint64) []byte { return []byte(fmt.Sprint(seq)) }, nil)
		require.NoError(t, err)
		assert.EqualValues(t, 2*i+2, seq)
	}
	names, err := segmentNames(dir)
	require.NoError(t, err)
	assert.Equal(t, []uint64{1, 3, 5, 7}, names, "every mark starts a new segment")

	require.NoError(t, l.RemoveBefore(5))
	names, _ = segmentNames(dir)
	assert.Equal(t, []uint64{5, 7}, names)
	require.NoError(t, l.Close())
	l, recs := replayAll(t, dir)
	require.Len(t, recs, 2)
	assert.EqualValues(t, 5, recs[0].Seq)
	assert.Equal(t, RecordMark, recs[1].Type)
	assert.Equal(t, "6", string(recs[1].Data), "the mark's data is made from its sequence number")
	l.Close()

	// Damage in a segment that is not the last is not a torn write.
	f, err := os.OpenFile(segmentPath(dir, 5), os.O_RDWR, 0)
	require.NoError(t, err)
	_, err = f.WriteAt([]byte{0xff}, recordHeaderLen)
	require.NoError(t, err)
	f.Close()
	_, err = OpenLog(dir, func(Record, Pos) error { return nil })
	require.ErrorIs(t, err, ErrLogCorrupt)
	assert.Contains(t, err.Error(), "CRC mismatch")
}

func TestLogConcurrentAppendSync(t *testing.T) {
	dir := t.TempDir()
	l, _ := replayAll(t, dir)
	var wg sync.WaitGroup
	var mu sync.Mutex
	order := map[uint64]int64{}
	for g := range 8 {
		wg.Go(func() {
			for i := range 50 {
				off := int64(g*1000 + i)
				data := []byte(fmt.Sprintf("g%d-i%d", g, i))
				_, _, err := l.Append(Record{Type: RecordWrite, Offset: off, Length: int64(len(data)), Data: data},
					func(seq uint64, _ Pos) {
						mu.Lock()
						order[seq] = off // apply runs under the append lock
						mu.Unlock()
					})
				assert.NoError(t, err)
				if i%5 == 0 {
					assert.NoError(t, l.Sync())
				}
			}
		})
	}
	wg.Wait()
	require.NoError(t, l.Sync())
	l.Close()
	_, recs := replayAll(t, dir)
	require.Len(t, recs, 400)
	for i, r := range recs {
		require.EqualValues(t, i+1, r.Seq)
		assert.Equal(t, order[r.Seq], r.Offset, "replay order is the order apply saw")
	}
}

// TestLogDiskFull fills a small tmpfs: the append that does not fit fails
// with ENOSPC, leaves no partial record, and every earlier record replays.
func TestLogDiskFull(t *testing.T) {
	dir := testenv.Tmpfs(t, "2m")
	logDir := filepath.Join(dir, "log")
	l, _ := replayAll(t, logDir)
	t.Cleanup(func() { l.Close() })
	var full error
	n := 0
	for range 40 {
		_, _, full = l.Append(Record{Type: RecordWrite, Offset: int64(n) << 16, Length: 1 << 16, Data: randomBytes(1 << 16)}, nil)
		if full != nil {
			break
		}
		n++
	}
	require.True(t, errors.Is(full, syscall.ENOSPC), "got %v", full)
	require.NoError(t, l.Sync())
	// Space comes back; appends work again.
	_, _, err := l.Append(Record{Type: RecordZero, Offset: 0, Length: 1 << 16}, nil)
	require.NoError(t, err, "a small record still fits after the failed one was cut")
	require.NoError(t, l.Sync())
	l.Close()
	l2, recs := replayAll(t, logDir)
	l2.Close()
	assert.Len(t, recs, n+1, "every record that was appended replays, nothing partial")
}
