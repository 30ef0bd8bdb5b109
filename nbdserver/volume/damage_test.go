package volume

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// flipByte flips one bit of the byte at off of the file at path.
func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	defer f.Close()
	b := []byte{0}
	_, err = f.ReadAt(b, off)
	require.NoError(t, err)
	b[0] ^= 0x10
	_, err = f.WriteAt(b, off)
	require.NoError(t, err)
}

// A failed fdatasync stays failed: the Sync that met it, every later Sync
// and every append get the error, and Err reports it.
func TestLogSyncFailureSticks(t *testing.T) {
	dir := t.TempDir()
	l, _ := replayAll(t, dir)
	defer l.Close()
	_, _, err := l.Append(Record{Type: RecordWrite, Offset: 0, Length: 3, Data: []byte("abc")}, nil)
	require.NoError(t, err)
	// Closing the segment's file makes its fdatasync fail.
	require.NoError(t, l.segs[len(l.segs)-1].f.Close())

	// Many callers wait on the same failing sync: every one must fail.
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Go(func() { errs[i] = l.Sync() })
	}
	wg.Wait()
	for i, err := range errs {
		assert.Error(t, err, "caller %d of the failed sync", i)
	}
	require.Error(t, l.Sync(), "a later sync finds no dirty segment but must still fail")
	require.Error(t, l.Err())
	_, _, err = l.Append(Record{Type: RecordZero, Offset: 0, Length: 1}, nil)
	require.Error(t, err, "no appends after a failed sync")
	assert.Contains(t, l.Err().Error(), "fdatasync")
}

// Every read of log data checks its record's CRC, for whole records and
// for parts of them.
func TestLogReadChecksCRC(t *testing.T) {
	dir := t.TempDir()
	l, _ := replayAll(t, dir)
	defer l.Close()
	data := randomBytes(RecordGrain)
	_, pos, err := l.Append(Record{Type: RecordWrite, Offset: 0, Length: RecordGrain, Data: data}, nil)
	require.NoError(t, err)
	_, pos2, err := l.Append(Record{Type: RecordWrite, Offset: RecordGrain, Length: 4096, Data: randomBytes(4096)}, nil)
	require.NoError(t, err)
	part := pos
	part.Off += 1000
	got := make([]byte, 100)
	require.NoError(t, l.ReadAt(got, part))
	require.Equal(t, data[1000:1100], got)

	flipByte(t, segmentPath(dir, 1), pos.Off+50000) // inside the first record, outside the part read
	err = l.ReadAt(got, part)
	require.ErrorIs(t, err, ErrLogCorrupt, "a part of a damaged record is not served")
	assert.Contains(t, err.Error(), "CRC mismatch")
	require.ErrorIs(t, l.ReadAt(make([]byte, RecordGrain), pos), ErrLogCorrupt, "nor the whole record")
	require.NoError(t, l.ReadAt(make([]byte, 4096), pos2), "the next record is good")

	flipByte(t, segmentPath(dir, 1), pos2.Rec+17) // its header: the offset
	require.ErrorIs(t, l.ReadAt(make([]byte, 4096), pos2), ErrLogCorrupt, "a damaged header is damage too")
}

// appendN appends n 4 KiB writes and syncs.
func appendN(t *testing.T, l *Log, n int) [][]byte {
	t.Helper()
	var out [][]byte
	for i := range n {
		d := randomBytes(4096)
		_, _, err := l.Append(Record{Type: RecordWrite, Offset: int64(i) * 4096, Length: 4096, Data: d}, nil)
		require.NoError(t, err)
		out = append(out, d)
	}
	require.NoError(t, l.Sync())
	return out
}

// A bad record followed by good ones is damage, not a torn tail: replay
// refuses it rather than cutting the good records off, and a recovering
// open cuts at it, moves the rest aside and counts what it held.
func TestLogReplayTellsDamageFromATornTail(t *testing.T) {
	dir := t.TempDir()
	l, _ := replayAll(t, dir)
	appendN(t, l, 5)
	_, err := l.AppendMark(func(uint64) []byte { return []byte(`{"id":"m"}`) }, nil)
	require.NoError(t, err)
	appendN(t, l, 2)
	require.NoError(t, l.Close())
	seg := segmentPath(dir, 1)
	flipByte(t, seg, 2*(recordHeaderLen+4096)+recordHeaderLen+7) // record 3's data

	_, err = OpenLog(dir, func(Record, Pos) error { return nil })
	require.ErrorIs(t, err, ErrLogCorrupt)
	assert.Contains(t, err.Error(), "record 3")
	st, err := os.Stat(seg)
	require.NoError(t, err)
	assert.EqualValues(t, 5*(recordHeaderLen+4096)+recordHeaderLen+10, st.Size(), "a refused replay cuts nothing")

	var seqs []uint64
	l, err = openLog(dir, logOpen{first: 1, recover: true}, func(r Record, _ Pos) error {
		seqs = append(seqs, r.Seq)
		return nil
	})
	require.NoError(t, err)
	assert.Equal(t, []uint64{1, 2}, seqs, "recovery keeps the records before the damage")
	c := l.Recovered()
	require.NotNil(t, c)
	assert.EqualValues(t, 3, c.Seq)
	assert.Equal(t, 2+1+2, c.Records, "the good records cut: two writes, the mark, two writes")
	require.Len(t, c.Marks, 1)
	assert.Equal(t, `{"id":"m"}`, string(c.Marks[0].Data))
	assert.FileExists(t, filepath.Join(c.MovedTo, "0000000000000001.log.tail"))
	assert.FileExists(t, filepath.Join(c.MovedTo, "0000000000000007.log"))
	seq, _, err := l.Append(Record{Type: RecordZero, Offset: 0, Length: 1}, nil)
	require.NoError(t, err)
	assert.EqualValues(t, 3, seq, "the log goes on after the last good record")
	require.NoError(t, l.Sync())
	l.Close()
	l, recs := replayAll(t, dir)
	l.Close()
	assert.Len(t, recs, 3, "and replays cleanly")
}

// A volume whose log is damaged while it runs serves EIO, never the
// damaged bytes, and does not seal them; after a restart it does not
// open, and Recover opens it at the newest good state, naming the
// snapshots lost.
func TestVolumeLogDamage(t *testing.T) {
	ctx := context.Background()
	env := testEnv(t)
	v, err := Create(ctx, env, Config{Name: "db", Size: 4 << 20, ChunkSize: 1 << 20})
	require.NoError(t, err)
	a, b := randomBytes(8192), randomBytes(8192)
	require.NoError(t, v.WriteAt(ctx, a, 0, false))
	require.NoError(t, v.WriteAt(ctx, b, 1<<20, true))
	_, err = v.Snapshot(ctx, "after-b")
	require.NoError(t, err)

	// Damage b's record: the second write, the first record in segment 1
	// after a's.
	seg := segmentPath(filepath.Join(env.stateDir("db"), "log"), 1)
	flipByte(t, seg, recordHeaderLen+8192+recordHeaderLen+100)

	got := make([]byte, 4096)
	require.ErrorIs(t, v.ReadAt(ctx, got, 1<<20), ErrLogCorrupt, "the damaged record is not served")
	require.ErrorIs(t, v.ReadAt(ctx, got, 1<<20+4096), ErrLogCorrupt, "nor any part of it")
	require.NoError(t, v.ReadAt(ctx, got, 0))
	assert.Equal(t, a[:4096], got, "other records are served")
	require.ErrorIs(t, v.ReadSnapshotAt(ctx, "after-b", got, 1<<20), ErrLogCorrupt)
	_, err = v.SealNext(ctx)
	require.ErrorIs(t, err, ErrLogCorrupt, "the seal stops at the damage")
	assert.ErrorIs(t, v.Status().SealError, ErrLogCorrupt, "and says so")
	assert.Empty(t, listKeys(t, env, "volumes/db/snapshots/"), "nothing damaged is sealed")
	require.NoError(t, v.Close())

	_, err = Open(ctx, env, "db")
	require.ErrorIs(t, err, ErrLogCorrupt, "a damaged log does not open")

	v, cut, err := Recover(ctx, env, "db")
	require.NoError(t, err)
	defer v.Close()
	require.NotNil(t, cut)
	assert.EqualValues(t, 2, cut.Seq)
	require.Len(t, cut.Marks, 1, "the snapshot's mark was cut")
	assert.Contains(t, string(cut.Marks[0].Data), "after-b")
	require.NoError(t, v.ReadAt(ctx, got, 0))
	assert.Equal(t, a[:4096], got, "what came before the damage is kept")
	require.NoError(t, v.ReadAt(ctx, got, 1<<20))
	assert.Equal(t, make([]byte, 4096), got, "what the damaged record wrote is gone, and reads as it was before")
	assert.Empty(t, v.Snapshots())
	require.NoError(t, v.WriteAt(ctx, b, 1<<20, true), "the recovered volume takes writes")
	_, err = v.Snapshot(ctx, "again")
	require.NoError(t, err)
	require.NoError(t, v.SealAll(ctx))
	require.NoError(t, v.ReadSnapshotAt(ctx, "again", got, 1<<20))
	assert.True(t, bytes.Equal(b[:4096], got))

}

func testEnv(t *testing.T) *Env {
	mem := chunkstore.NewMem()
	store, err := chunkstore.NewStore(mem, chunkstore.Options{})
	require.NoError(t, err)
	return &Env{Repo: mem, Store: store, StateDir: t.TempDir(), CheckpointInterval: time.Hour}
}

func listKeys(t *testing.T, env *Env, prefix string) []string {
	var keys []string
	require.NoError(t, env.Repo.List(context.Background(), prefix, func(k string) error {
		keys = append(keys, k)
		return nil
	}))
	return keys
}

// editObject replaces the object at key with edit(its bytes).
func editObject(t *testing.T, env *Env, key string, edit func([]byte) []byte) {
	t.Helper()
	ctx := context.Background()
	data, err := env.Repo.Get(ctx, key)
	require.NoError(t, err)
	require.NoError(t, env.Repo.Put(ctx, key, edit(bytes.Clone(data))))
}

// Damage in a manifest or a volume record is found, named, and touches
// only what the object describes: a damaged old snapshot is listed as
// damaged and not read, the others are; a damaged newest manifest keeps
// the volume from opening at a wrong place, unless its write log still
// holds what that manifest covered; a damaged record fails its volume.
func TestManifestDamage(t *testing.T) {
	ctx := context.Background()
	env := testEnv(t)
	v, err := Create(ctx, env, Config{Name: "db", Size: 4 << 20, ChunkSize: 1 << 20})
	require.NoError(t, err)
	var ids []string
	var data [][]byte
	for i := range 3 {
		d := randomBytes(4096)
		require.NoError(t, v.WriteAt(ctx, d, 0, false))
		si, err := v.Snapshot(ctx, fmt.Sprintf("s%d", i))
		require.NoError(t, err)
		ids, data = append(ids, si.ID), append(data, d)
	}
	require.NoError(t, v.SealAll(ctx))
	require.NoError(t, v.Close())
	key := func(i int) string { return manifestKey("db", KindSnapshot, ids[i]) }

	// The edit: a bigger size in an old snapshot's manifest.
	editObject(t, env, key(0), func(b []byte) []byte {
		return bytes.Replace(b, []byte(`"size": 4194304`), []byte(`"size": 5194304`), 1)
	})
	v, err = Open(ctx, env, "db")
	require.NoError(t, err, "a damaged old snapshot does not stop its volume")
	snaps := v.Snapshots()
	require.Len(t, snaps, 3)
	require.ErrorIs(t, snaps[0].Damaged, chunkstore.ErrCorrupt)
	assert.Contains(t, snaps[0].Damaged.Error(), key(0), "the error names the object")
	got := make([]byte, 4096)
	require.ErrorIs(t, v.ReadSnapshotAt(ctx, ids[0], got, 0), chunkstore.ErrCorrupt, "and it is not read")
	for i := 1; i < 3; i++ {
		require.NoError(t, v.ReadSnapshotAt(ctx, ids[i], got, 0))
		assert.Equal(t, data[i], got)
	}
	require.NoError(t, v.DeleteSnapshot(ctx, ids[0]), "a damaged snapshot can be deleted")
	require.NoError(t, v.Close())

	// A manifest of another volume, checksum and all, is not this one's.
	other, err := Create(ctx, env, Config{Name: "other", Size: 4 << 20, ChunkSize: 1 << 20})
	require.NoError(t, err)
	require.NoError(t, other.WriteAt(ctx, randomBytes(4096), 0, false))
	osi, err := other.Snapshot(ctx, "")
	require.NoError(t, err)
	require.NoError(t, other.SealAll(ctx))
	require.NoError(t, other.Close())
	foreign, err := env.Repo.Get(ctx, manifestKey("other", KindSnapshot, osi.ID))
	require.NoError(t, err)
	own, err := env.Repo.Get(ctx, key(1))
	require.NoError(t, err)
	require.NoError(t, env.Repo.Put(ctx, key(1), foreign))
	v, err = Open(ctx, env, "db")
	require.NoError(t, err)
	require.ErrorIs(t, v.Snapshots()[0].Damaged, chunkstore.ErrCorrupt, "a copied manifest does not say what its key says")
	require.NoError(t, v.Close())
	require.NoError(t, env.Repo.Put(ctx, key(1), own))

	// The newest manifest raised to a later sequence number: the start
	// would skip log records; instead the volume does not open.
	editObject(t, env, key(2), func(b []byte) []byte {
		return bytes.Replace(b, []byte(`"seq": `), []byte(`"seq": 9`), 1)
	})
	_, err = Open(ctx, env, "db")
	require.ErrorIs(t, err, ErrDamagedManifest)
	assert.Contains(t, err.Error(), key(2))

	// A damaged volume record fails its volume.
	editObject(t, env, volumeKey("other"), func(b []byte) []byte { b[10] ^= 1; return b })
	_, err = Open(ctx, env, "other")
	require.ErrorIs(t, err, chunkstore.ErrCorrupt)
}

// A damaged newest manifest whose records the write log still holds (a
// seal cut short before it freed them) is sealed again.
func TestDamagedNewestManifestResealed(t *testing.T) {
	ctx := context.Background()
	env := testEnv(t)
	v, err := Create(ctx, env, Config{Name: "db", Size: 4 << 20, ChunkSize: 1 << 20})
	require.NoError(t, err)
	d := randomBytes(8192)
	require.NoError(t, v.WriteAt(ctx, d, 4096, false))
	si, err := v.Snapshot(ctx, "last")
	require.NoError(t, err)
	// Keep the log as it was before the seal freed it.
	logDir := filepath.Join(env.stateDir("db"), "log")
	saved := t.TempDir()
	require.NoError(t, os.CopyFS(saved, os.DirFS(logDir)))
	require.NoError(t, v.SealAll(ctx))
	require.NoError(t, v.Close())
	require.NoError(t, os.RemoveAll(logDir))
	require.NoError(t, os.CopyFS(logDir, os.DirFS(saved)))
	key := manifestKey("db", KindSnapshot, si.ID)
	editObject(t, env, key, func(b []byte) []byte { b[20] ^= 1; return b })

	v, err = Open(ctx, env, "db")
	require.NoError(t, err, "the log holds what the damaged manifest covered")
	defer v.Close()
	got := make([]byte, len(d))
	require.NoError(t, v.ReadSnapshotAt(ctx, "last", got, 4096))
	assert.Equal(t, d, got)
	require.NoError(t, v.SealAll(ctx))
	var m Manifest
	require.NoError(t, getJSON(ctx, env.Repo, env.RepoID, key, &m), "sealed again, the manifest is whole")
	assert.Equal(t, si.ID, m.ID)
}

// Deleting a damaged newest manifest (as its error suggests) must not
// open the volume with later writes laid over an older state: the log
// starts after what the manifest before covers, and the volume says so.
func TestLogAfterAGapDoesNotOpen(t *testing.T) {
	ctx := context.Background()
	env := testEnv(t)
	v, err := Create(ctx, env, Config{Name: "db", Size: 4 << 20, ChunkSize: 1 << 20})
	require.NoError(t, err)
	var last SnapshotInfo
	for range 2 {
		require.NoError(t, v.WriteAt(ctx, randomBytes(4096), 0, false))
		last, err = v.Snapshot(ctx, "")
		require.NoError(t, err)
		require.NoError(t, v.SealAll(ctx))
	}
	require.NoError(t, v.WriteAt(ctx, randomBytes(4096), 8192, true)) // in the log only
	require.NoError(t, v.Close())
	require.NoError(t, env.Repo.Delete(ctx, manifestKey("db", KindSnapshot, last.ID)))

	_, err = Open(ctx, env, "db")
	require.ErrorIs(t, err, ErrDamagedManifest)
	assert.Contains(t, err.Error(), "its write log starts at record")
}

// A label names a snapshot in VOL@LABEL, in URIs and on command lines:
// no '/', NUL, '@' or spaces, not endless, never an ID.
func TestValidLabel(t *testing.T) {
	for _, ok := range []string{"nightly", "s1", "db-2026-11-30T20:15:00+01:00", "pre_upgrade.v2", "2026-11-30"} {
		assert.NoError(t, ValidLabel(ok), ok)
	}
	for _, bad := range []string{"", "a/b", "a\x00b", "a@b", " a", "a b", strings.Repeat("x", 10000), "-x",
		"20261130T120000.000Z-000000000007",
		"2026-11-30T20:15:00+01:00", "2026-11-30T20:15:00.5Z"} { // VOL@TIME is a point in time
		assert.ErrorIs(t, ValidLabel(bad), ErrInvalid, "%q", bad)
	}
	ctx := context.Background()
	v, err := Create(ctx, testEnv(t), Config{Name: "db", Size: 1 << 20})
	require.NoError(t, err)
	defer v.Close()
	si, err := v.Snapshot(ctx, "")
	require.NoError(t, err)
	_, err = v.Snapshot(ctx, si.ID)
	require.Error(t, err, "a label may not be another snapshot's ID")
	_, err = v.Snapshot(ctx, "a/b")
	require.ErrorIs(t, err, ErrInvalid)
}
