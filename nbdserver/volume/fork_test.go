package volume

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// forkEnv is a server's Env on its own state folder over repo, with the
// lease holder id added to the folder's holders as a server does.
func forkEnv(t *testing.T, repo chunkstore.Backend, dir, id string) *Env {
	t.Helper()
	store, err := chunkstore.NewStore(repo, chunkstore.Options{})
	require.NoError(t, err)
	env := &Env{Repo: repo, Store: store, StateDir: dir, CheckpointInterval: 1 << 62}
	if id != "" {
		env.Holders, err = OpenHolders(dir)
		require.NoError(t, err)
		require.NoError(t, env.Holders.Add(id))
		env.Writer = id
	}
	return env
}

// crash ends a volume as kill -9 would: its log stays as it is, nothing
// is sealed.
func crash(t *testing.T, v *Volume) {
	t.Helper()
	require.NoError(t, v.log.Sync())
	require.NoError(t, v.log.Close())
}

func readVolume(t *testing.T, v *Volume) []byte {
	t.Helper()
	got := make([]byte, v.Size())
	require.NoError(t, v.ReadAt(context.Background(), got, 0))
	return got
}

// aDiesUnsealed is server A on state folder dirA: it makes volume v with
// a sealed snapshot (record 1), writes records 2 to 41 (and, with
// mark, an unsealed snapshot as 42), and dies without uploading them.
func aDiesUnsealed(t *testing.T, repo chunkstore.Backend, dirA string, mark bool) {
	t.Helper()
	ctx := context.Background()
	v, err := Create(ctx, forkEnv(t, repo, dirA, "holderA1"), Config{Name: "v", Size: 4 << 20, ChunkSize: 64 << 10})
	require.NoError(t, err)
	_, err = v.Snapshot(ctx, "base")
	require.NoError(t, err)
	require.NoError(t, v.SealAll(ctx))
	for i := range 40 {
		require.NoError(t, v.WriteAt(ctx, bytes.Repeat([]byte{0x11}, 4096), int64(i)*64<<10, false))
	}
	if mark {
		_, err = v.Snapshot(ctx, "a-unsealed")
		require.NoError(t, err)
	}
	crash(t, v)
}

// bTakesOver is server B (lease holder writer) on state folder dirB: it
// opens v, writes n records, snapshots and seals them, stops, and
// returns what v reads.
func bTakesOver(t *testing.T, repo chunkstore.Backend, dirB, writer string, n int) []byte {
	t.Helper()
	ctx := context.Background()
	v, err := Open(ctx, forkEnv(t, repo, dirB, writer), "v")
	require.NoError(t, err)
	for i := range n {
		require.NoError(t, v.WriteAt(ctx, bytes.Repeat([]byte{0x22}, 4096), int64(i)*4096, false))
	}
	_, err = v.Snapshot(ctx, "b")
	require.NoError(t, err)
	require.NoError(t, v.SealAll(ctx))
	want := readVolume(t, v)
	require.NoError(t, v.Close())
	return want
}

// Server A dies with 40 records unsealed; server B, on another state
// folder, takes over, writes and seals. A, back, must not replay its log
// over B's history: told by B's writer, or (B of an older version, no
// writer) by B's manifest numbered among A's records. Recover opens the
// volume as B left it and keeps A's log aside; what A writes then is its
// own, after a crash too (the adopted history).
func TestForkedLog(t *testing.T) {
	for _, tc := range []struct {
		name    string
		bWriter string // "": a server that keeps no writers
		// bWrites: B's records before its seal; past A's 41, only the
		// writer tells the fork.
		bWrites int
		// aMark: A's unsealed writes end with a snapshot, so a new
		// segment follows them, which a plain open removed unread
		// once B's history numbered past them.
		aMark bool
	}{{"writer", "holderB", 45, false}, {"marks", "", 1, false}, {"writer-mark-tail", "holderB", 45, true}, {"marks-mark-tail", "", 1, true}} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			repo := chunkstore.NewMem()
			dirA, dirB := t.TempDir(), t.TempDir()
			aDiesUnsealed(t, repo, dirA, tc.aMark)
			aRecords := 40
			if tc.aMark {
				aRecords++
			}
			want := bTakesOver(t, repo, dirB, tc.bWriter, tc.bWrites)

			envA := forkEnv(t, repo, dirA, "holderA2")
			_, err := Open(ctx, envA, "v")
			require.ErrorIs(t, err, ErrForkedLog)
			assert.Contains(t, err.Error(), fmt.Sprintf("records 2 to %d of its write log", aRecords+1))

			v, cut, err := Recover(ctx, envA, "v")
			require.NoError(t, err)
			require.NotNil(t, cut)
			assert.True(t, cut.Forked)
			assert.Equal(t, aRecords, cut.Records, "every record A never uploaded is kept")
			if tc.aMark {
				require.Len(t, cut.LostSnapshots(), 1)
				assert.Equal(t, "a-unsealed", cut.LostSnapshots()[0].Label)
			}
			assert.EqualValues(t, 2, cut.Seq)
			segs, err := os.ReadDir(filepath.Join(cut.MovedTo, "log"))
			require.NoError(t, err)
			assert.NotEmpty(t, segs, "A's records are kept")
			assert.Equal(t, filepath.Join(dirA, "forked"), filepath.Dir(cut.MovedTo))
			assert.Equal(t, want, readVolume(t, v), "A serves B's history exactly")

			// A goes on from B's state and crashes before any seal: its
			// records are its own, and replay.
			require.NoError(t, v.WriteAt(ctx, bytes.Repeat([]byte{0x33}, 4096), 1<<20, false))
			copy(want[1<<20:], bytes.Repeat([]byte{0x33}, 4096))
			crash(t, v)
			v, err = Open(ctx, forkEnv(t, repo, dirA, "holderA3"), "v")
			require.NoError(t, err, "the history A adopted is its own")
			assert.Equal(t, want, readVolume(t, v))
			require.NoError(t, v.Close())
		})
	}
}

// A failback with nothing unsealed refuses nothing: A stops with its log
// sealed, B takes over and seals, A opens at B's state.
func TestForkFailbackSealed(t *testing.T) {
	ctx := context.Background()
	repo := chunkstore.NewMem()
	dirA, dirB := t.TempDir(), t.TempDir()
	v, err := Create(ctx, forkEnv(t, repo, dirA, "holderA1"), Config{Name: "v", Size: 4 << 20, ChunkSize: 64 << 10})
	require.NoError(t, err)
	require.NoError(t, v.WriteAt(ctx, bytes.Repeat([]byte{0x11}, 4096), 0, false))
	_, err = v.Snapshot(ctx, "a")
	require.NoError(t, err)
	require.NoError(t, v.SealAll(ctx))
	require.NoError(t, v.Close())

	v, err = Open(ctx, forkEnv(t, repo, dirB, "holderB"), "v")
	require.NoError(t, err)
	require.NoError(t, v.WriteAt(ctx, bytes.Repeat([]byte{0x22}, 4096), 4096, false))
	_, err = v.Snapshot(ctx, "b")
	require.NoError(t, err)
	require.NoError(t, v.SealAll(ctx))
	want := readVolume(t, v)
	require.NoError(t, v.Close())

	v, err = Open(ctx, forkEnv(t, repo, dirA, "holderA2"), "v")
	require.NoError(t, err)
	assert.Equal(t, want, readVolume(t, v))
	require.NoError(t, v.Close())
}

// The holders file survives a torn append: a line cut short by a crash
// (its lease PUT never sent) is dropped, and the next ID is whole.
func TestHoldersTornLine(t *testing.T) {
	dir := t.TempDir()
	h, err := OpenHolders(dir)
	require.NoError(t, err)
	assert.False(t, h.Used())
	require.NoError(t, h.Add("aaaa"))
	f, err := os.OpenFile(filepath.Join(dir, HoldersFile), os.O_APPEND|os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteString("bb\x00\x00")
	require.NoError(t, err)
	require.NoError(t, f.Close())

	h, err = OpenHolders(dir)
	require.NoError(t, err)
	assert.True(t, h.Own("aaaa"))
	assert.False(t, h.Own("bb"))
	require.NoError(t, h.Add("cccc"))
	h, err = OpenHolders(dir)
	require.NoError(t, err)
	assert.True(t, h.Own("aaaa"))
	assert.True(t, h.Own("cccc"), "the ID after a torn line is read whole")
	assert.True(t, h.Own(""), "a writer from before writers were kept")
}

// A forked log that is damaged too: recover moves both parts, the
// records before the damage and those a recovery cut after it, to the
// same folder, and counts them all.
func TestForkedLogDamaged(t *testing.T) {
	ctx := context.Background()
	repo := chunkstore.NewMem()
	dirA, dirB := t.TempDir(), t.TempDir()
	aDiesUnsealed(t, repo, dirA, false) // records 2 to 41, one segment; 20 damaged:
	flipByte(t, segmentPath(filepath.Join(dirA, "volumes", "v", "log"), 2), 18*(recordHeaderLen+4096)+100)
	want := bTakesOver(t, repo, dirB, "holderB", 1)

	v, cut, err := Recover(ctx, forkEnv(t, repo, dirA, "holderA2"), "v")
	require.NoError(t, err)
	defer v.Close()
	assert.True(t, cut.Forked)
	assert.Equal(t, 39, cut.Records, "18 before the damage, 21 after it")
	assert.Contains(t, cut.Why, "damaged at record 20")
	for _, part := range []string{"log", "damaged"} {
		entries, err := os.ReadDir(filepath.Join(cut.MovedTo, part))
		require.NoError(t, err, part)
		assert.NotEmpty(t, entries, part)
	}
	leftovers, err := filepath.Glob(filepath.Join(dirA, "volumes", "v", "damaged-*"))
	require.NoError(t, err)
	assert.Empty(t, leftovers, "nothing left where volume delete would remove it")
	assert.Equal(t, want, readVolume(t, v))
}

// Remove takes an ID back for good; the others stay.
func TestHoldersRemove(t *testing.T) {
	dir := t.TempDir()
	h, err := OpenHolders(dir)
	require.NoError(t, err)
	require.NoError(t, h.Add("aaaa"))
	require.NoError(t, h.Add("bbbb"))
	require.NoError(t, h.Remove("bbbb"))
	require.NoError(t, h.Remove("never"))
	h, err = OpenHolders(dir)
	require.NoError(t, err)
	assert.True(t, h.Own("aaaa"))
	assert.False(t, h.Own("bbbb"))
	require.NoError(t, h.Add("cccc"))
	h, err = OpenHolders(dir)
	require.NoError(t, err)
	assert.True(t, h.Own("aaaa"))
	assert.True(t, h.Own("cccc"))
}

// Another server deleted the volume and created it again, with lower
// sequence numbers than this folder's log: a log with nothing unsealed
// opens at the new volume (not "a manifest is missing"); one with
// unsealed writes is a fork, told by the new record's writer when the
// new volume has no manifest yet.
func TestForkVolumeCreatedAgain(t *testing.T) {
	ctx := context.Background()
	createAgain := func(t *testing.T, repo chunkstore.Backend, dirB string) *Env {
		envB := forkEnv(t, repo, dirB, "holderB")
		require.NoError(t, Delete(ctx, envB, "v"))
		v, err := Create(ctx, envB, Config{Name: "v", Size: 4 << 20, ChunkSize: 64 << 10})
		require.NoError(t, err)
		require.NoError(t, v.Close())
		return envB
	}

	t.Run("sealed", func(t *testing.T) {
		repo := chunkstore.NewMem()
		dirA := t.TempDir()
		v, err := Create(ctx, forkEnv(t, repo, dirA, "holderA1"), Config{Name: "v", Size: 4 << 20, ChunkSize: 64 << 10})
		require.NoError(t, err)
		for i := range 5 {
			require.NoError(t, v.WriteAt(ctx, bytes.Repeat([]byte{0x11}, 4096), int64(i)*4096, false))
		}
		_, err = v.Snapshot(ctx, "a") // record 6; the log goes on at 7
		require.NoError(t, err)
		require.NoError(t, v.SealAll(ctx))
		require.NoError(t, v.Close())

		createAgain(t, repo, t.TempDir())
		want := bTakesOver(t, repo, t.TempDir(), "holderB", 1) // sealed at 2
		v, err = Open(ctx, forkEnv(t, repo, dirA, "holderA2"), "v")
		require.NoError(t, err, "the new volume's history is another's: its lower numbers are no missing manifest")
		assert.Equal(t, want, readVolume(t, v))
		require.NoError(t, v.Close())
	})

	t.Run("unsealed", func(t *testing.T) {
		repo := chunkstore.NewMem()
		dirA := t.TempDir()
		aDiesUnsealed(t, repo, dirA, false)
		createAgain(t, repo, t.TempDir())
		_, err := Open(ctx, forkEnv(t, repo, dirA, "holderA2"), "v")
		require.ErrorIs(t, err, ErrForkedLog)
		assert.Contains(t, err.Error(), "its record was written by another server (lease holder holderB)")
		v, cut, err := Recover(ctx, forkEnv(t, repo, dirA, "holderA3"), "v")
		require.NoError(t, err)
		assert.Equal(t, 40, cut.Records)
		assert.Equal(t, make([]byte, 4<<20), readVolume(t, v), "the new, empty volume")
		require.NoError(t, v.Close())
	})
}
