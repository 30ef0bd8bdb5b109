package volume

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/integration/miniotest"
)

// The crash test runs a writer in a child process (this test binary, which
// TestMain turns into crashChild) and kills it with SIGKILL at random moments, while it
// writes, flushes, snapshots and uploads. After each kill the parent opens
// the volume and checks that every flushed write is there, that what
// survived is a prefix of the writes (no write lost before a later one
// kept), and that every snapshot holds exactly the writes before it.
const (
	crashBlock     = 4096
	crashBlocks    = 2048 // an 8 MiB volume
	crashChunkSize = 64 << 10
)

// crashWrite is write i of round r: which block, and what it holds (the
// first 16 bytes name r and i, so a read tells which write it saw).
func crashWrite(r, i uint64) (block int64, data []byte) {
	g := rand.New(rand.NewPCG(r, i))
	data = make([]byte, crashBlock)
	for k := 16; k < len(data); k += 8 {
		binary.LittleEndian.PutUint64(data[k:], g.Uint64())
	}
	binary.LittleEndian.PutUint64(data, r)
	binary.LittleEndian.PutUint64(data[8:], i)
	return int64(g.IntN(crashBlocks)), data
}

// crashEnv is the volume's environment: its state in dir, its repository
// at NBDVAULT_CRASH_REPO (a location, credentials in the environment), or
// in dir when that is empty.
func crashEnv(dir string) *Env {
	loc := os.Getenv("NBDVAULT_CRASH_REPO")
	if loc == "" {
		loc = filepath.Join(dir, "repo")
	}
	repo, err := chunkstore.Open(loc)
	if err != nil {
		panic(err)
	}
	store, err := chunkstore.NewStore(repo, chunkstore.Options{CacheBytes: -1})
	if err != nil {
		panic(err)
	}
	return &Env{Repo: repo, Store: store, StateDir: filepath.Join(dir, "state"), CheckpointInterval: 30 * time.Millisecond}
}

// crashChild is the writer TestCrashKill9 kills. TestMain runs it, instead
// of the tests, when NBDVAULT_CRASH_DIR is set; it never returns.
func crashChild(dir string) {
	round, _ := strconv.ParseUint(os.Getenv("NBDVAULT_CRASH_ROUND"), 10, 64)
	ctx := context.Background()
	out := bufio.NewWriter(os.Stdout)
	fail := func(err error) {
		fmt.Fprintln(out, "error", err)
		out.Flush()
		os.Exit(1)
	}
	v, err := Open(ctx, crashEnv(dir), "crash")
	if err != nil {
		fail(err)
	}
	go v.Run(ctx)
	for i := uint64(1); ; i++ {
		block, data := crashWrite(round, i)
		if err := v.WriteAt(ctx, data, block*crashBlock, false); err != nil {
			fail(err)
		}
		switch {
		case i%97 == 0:
			s, err := v.Snapshot(ctx, "")
			if err != nil {
				fail(err)
			}
			fmt.Fprintln(out, "snapshot", s.ID, i)
			out.Flush()
		case i%13 == 0:
			if err := v.Flush(ctx); err != nil {
				fail(err)
			}
			fmt.Fprintln(out, "flushed", i)
			out.Flush()
		}
	}
}

func TestCrashKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("kills a child process many times")
	}
	t.Run("local", func(t *testing.T) {
		t.Setenv("NBDVAULT_CRASH_REPO", "")
		crashKill9(t)
	})
	t.Run("minio", func(t *testing.T) {
		m := miniotest.StartShared(t)
		t.Setenv("NBDVAULT_CRASH_REPO", m.Location(fmt.Sprintf("crash-%d", time.Now().UnixNano())))
		for _, kv := range m.Env() {
			k, v, _ := strings.Cut(kv, "=")
			t.Setenv(k, v) // this process's and the child's
		}
		crashKill9(t)
	})
}

func crashKill9(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	v, err := Create(ctx, crashEnv(dir), Config{Name: "crash", Size: crashBlocks * crashBlock, ChunkSize: crashChunkSize})
	require.NoError(t, err)
	require.NoError(t, v.Close())
	state := make([]byte, crashBlocks*crashBlock) // what the volume holds before the round
	g := rand.New(rand.NewPCG(42, 1))
	snaps := map[string][]byte{}

	for round := uint64(1); round <= 8; round++ {
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), "NBDVAULT_CRASH_DIR="+dir, fmt.Sprint("NBDVAULT_CRASH_ROUND=", round))
		stdout, err := cmd.StdoutPipe()
		require.NoError(t, err)
		require.NoError(t, cmd.Start())
		// Let it run a random while, then kill it wherever it is.
		lines := bufio.NewScanner(stdout)
		flushed := uint64(0)
		roundSnaps := map[string]uint64{}
		wantFlushes := 5 + g.IntN(40)
		for n := 0; n < wantFlushes && lines.Scan(); {
			f := strings.Fields(lines.Text())
			switch {
			case len(f) == 2 && f[0] == "flushed":
				flushed, _ = strconv.ParseUint(f[1], 10, 64)
				n++
			case len(f) == 3 && f[0] == "snapshot":
				i, _ := strconv.ParseUint(f[2], 10, 64)
				roundSnaps[f[1]], flushed = i, i // a snapshot is durable, and so is all before it
			case len(f) > 0 && f[0] == "error":
				t.Fatalf("round %d: child failed: %s", round, lines.Text())
			}
		}
		require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
		_ = cmd.Wait()
		require.NotZero(t, flushed, "round %d: the child flushed nothing", round)

		v, err := Open(ctx, crashEnv(dir), "crash")
		require.NoError(t, err, "round %d: open after kill -9", round)
		got := make([]byte, len(state))
		require.NoError(t, v.ReadAt(ctx, got, 0))

		// The survivors are writes 1..m of this round for some m.
		m := uint64(0)
		for b := range crashBlocks {
			blk := got[b*crashBlock:]
			if binary.LittleEndian.Uint64(blk) == round {
				m = max(m, binary.LittleEndian.Uint64(blk[8:]))
			}
		}
		require.GreaterOrEqual(t, m, flushed, "round %d: a flushed write was lost", round)
		apply := func(upTo uint64) []byte {
			img := bytes.Clone(state)
			for i := uint64(1); i <= upTo; i++ {
				b, data := crashWrite(round, i)
				copy(img[b*crashBlock:], data)
			}
			return img
		}
		want := apply(m)
		require.True(t, bytes.Equal(want, got), "round %d: the volume is not writes 1..%d (flushed %d): differs at %d",
			round, m, flushed, firstDiff(want, got))
		for id, i := range roundSnaps {
			snaps[id] = apply(i)
		}
		for id, img := range snaps {
			require.NoError(t, v.ReadSnapshotAt(ctx, id, got, 0), "round %d: snapshot %s", round, id)
			require.True(t, bytes.Equal(img, got), "round %d: snapshot %s differs at %d", round, id, firstDiff(img, got))
		}
		require.NoError(t, v.Close())
		state = want
	}
	// Everything the kills left behind still seals.
	v, err = Open(ctx, crashEnv(dir), "crash")
	require.NoError(t, err)
	defer v.Close()
	require.NoError(t, v.SealAll(ctx))
	got := make([]byte, len(state))
	require.NoError(t, v.ReadAt(ctx, got, 0))
	require.True(t, bytes.Equal(state, got))
	for id, img := range snaps {
		require.NoError(t, v.ReadSnapshotAt(ctx, id, got, 0))
		require.True(t, bytes.Equal(img, got), "sealed snapshot %s", id)
	}
}
