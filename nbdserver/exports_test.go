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
