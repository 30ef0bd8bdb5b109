package nbdserver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/nbdserver/nbd"
	"github.com/nbdvault/nbdvault/nbdserver/nbd/backendtest"
	"github.com/nbdvault/nbdvault/nbdserver/volume"
)

// The volume's errors reach NBD clients as the codes the spec asks for.
func TestErrorCodes(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want uint32
	}{
		{fmt.Errorf("write: %w", volume.ErrOutOfRange), nbd.EINVAL},
		{fmt.Errorf("snapshot: %w", volume.ErrNoSnapshot), nbd.EINVAL},
		{&fs.PathError{Op: "append", Path: "log", Err: syscall.ENOSPC}, nbd.ENOSPC},
		{&chunkstore.CorruptError{Reason: "hash"}, nbd.EIO},
		{fmt.Errorf("get: %w", chunkstore.ErrUnavailable), nbd.EIO},
	} {
		assert.Equal(t, tc.want, nbd.Errno(nbdErr(tc.err)), "%v", tc.err)
	}
}

// Once a server has lost its lease, its heads take no more writes (they
// could never be uploaded); reads and flushes go on.
func TestExportsRefuseWrites(t *testing.T) {
	ctx := context.Background()
	mem := chunkstore.NewMem()
	store, err := chunkstore.NewStore(mem, chunkstore.Options{})
	require.NoError(t, err)
	v, err := volume.Create(ctx, &volume.Env{Repo: mem, Store: store, StateDir: t.TempDir()}, volume.Config{Name: "db", Size: 1 << 20})
	require.NoError(t, err)
	defer v.Close()
	e := NewExports()
	e.Add(v)
	x, ok := e.Lookup("db")
	require.True(t, ok)
	b := x.Backend.(interface {
		nbd.Backend
		nbd.Trimmer
	})
	require.NoError(t, b.WriteAt(ctx, []byte("a"), 0, false))
	lost := errors.New("lease lost")
	e.Refuse(lost)
	assert.ErrorIs(t, b.WriteAt(ctx, []byte("b"), 0, false), lost)
	assert.ErrorIs(t, b.Trim(ctx, 0, 4096), lost)
	got := make([]byte, 1)
	require.NoError(t, b.ReadAt(ctx, got, 0))
	assert.Equal(t, "a", string(got), "the refused write changed nothing")
	require.NoError(t, b.Flush(ctx))
}

// testVolume is a new volume of size bytes over an in-memory repository,
// served by a new Exports, with its uploader running.
func testVolume(t *testing.T, size int64) (*Exports, *volume.Volume) {
	t.Helper()
	mem := chunkstore.NewMem()
	store, err := chunkstore.NewStore(mem, chunkstore.Options{})
	require.NoError(t, err)
	v, err := volume.Create(context.Background(), &volume.Env{Repo: mem, Store: store, StateDir: t.TempDir()},
		volume.Config{Name: "db", Size: size, ChunkSize: volume.MinChunkSize})
	require.NoError(t, err)
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { v.Run(ctx); close(done) }()
	t.Cleanup(func() { stop(); <-done; v.Close() })
	e := NewExports()
	e.Add(v)
	return e, v
}

// A volume's head and its snapshots are NBD backends like any other.
func TestHeadBackend(t *testing.T) {
	backendtest.Run(t, func(t *testing.T) backendtest.Subject {
		e, _ := testVolume(t, 2<<20+512)
		x, ok := e.Lookup("db")
		require.True(t, ok)
		return backendtest.Subject{Backend: x.Backend}
	})
}

func TestSnapshotBackend(t *testing.T) {
	for _, sealed := range []bool{false, true} {
		t.Run(map[bool]string{false: "unsealed", true: "sealed"}[sealed], func(t *testing.T) {
			backendtest.Run(t, func(t *testing.T) backendtest.Subject {
				ctx := context.Background()
				const size = 2<<20 + 512
				e, v := testVolume(t, size)
				content := make([]byte, size)
				for i := range 2 << 20 {
					if i%100_000 < 40_000 { // data and holes
						content[i] = byte(i*7 + 1)
					}
				}
				require.NoError(t, v.WriteAt(ctx, content, 0, false))
				s, err := v.Snapshot(ctx, "")
				require.NoError(t, err)
				if sealed {
					require.NoError(t, v.SealAll(ctx))
				}
				// Later writes to the head are not in the snapshot.
				require.NoError(t, v.WriteAt(ctx, make([]byte, 4096), 0, false))
				x, ok := e.Lookup("db@" + s.ID)
				require.True(t, ok)
				return backendtest.Subject{Backend: x.Backend, Content: content, ReadOnly: true}
			})
		})
	}
}
