package nbdserver

import (
	"context"
	"errors"
	"log/slog"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// testAPI opens and serves a server on a local repository and returns
// the admin API's client against its handler (on httptest, beside the
// server's own admin listener), and the server.
func testAPI(t *testing.T) (*api.Client, *Server) {
	t.Helper()
	s, err := Open(context.Background(), Options{Data: filepath.Join(t.TempDir(), "data"),
		Admin: "127.0.0.1:0", Logger: slog.New(slog.DiscardHandler)})
	require.NoError(t, err)
	ctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- s.Serve(ctx) }() // runs the volumes' uploaders and the admin listener
	t.Cleanup(func() { stop(); require.NoError(t, <-served) })
	hs := httptest.NewServer(s.adminHandler())
	t.Cleanup(hs.Close)
	cl, err := api.NewClient(hs.URL, s.token)
	require.NoError(t, err)
	return cl, s
}

// The admin API's handlers, called through its Go client: what each
// answers, and the sentinel each refusal maps to.
func TestAdminAPI(t *testing.T) {
	ctx := context.Background()
	cl, s := testAPI(t)

	st, err := cl.Status(ctx)
	require.NoError(t, err)
	assert.NotEmpty(t, st)

	v, err := cl.CreateVolume(ctx, api.CreateVolume{Name: "db", Size: 8 << 20})
	require.NoError(t, err)
	assert.Equal(t, api.Volume{Name: "db", Size: 8 << 20, ChunkSize: 1 << 20, Created: v.Created, Status: v.Status}, v)
	_, err = cl.CreateVolume(ctx, api.CreateVolume{Name: "db", Size: 8 << 20})
	assert.ErrorIs(t, err, api.ErrExists)
	for _, bad := range []api.CreateVolume{{Name: "", Size: 1 << 20}, {Name: "x/y", Size: 1 << 20}, {Name: "z", Size: 0}, {Name: "c", Size: 1 << 20, ChunkSize: 3000}} {
		_, err = cl.CreateVolume(ctx, bad)
		assert.ErrorIs(t, err, api.ErrInvalid, "%+v", bad)
	}
	vols, err := cl.Volumes(ctx)
	require.NoError(t, err)
	require.Len(t, vols, 1)
	_, err = cl.Volume(ctx, "nope")
	assert.ErrorIs(t, err, api.ErrNotFound)

	v, err = cl.ResizeVolume(ctx, "db", 16<<20)
	require.NoError(t, err)
	assert.EqualValues(t, 16<<20, v.Size)
	_, err = cl.ResizeVolume(ctx, "db", 4<<20)
	assert.ErrorIs(t, err, api.ErrInvalid, "volumes do not shrink")

	// Write through the volume itself (the NBD path is not under test
	// here), then snapshot, wait for the seal, and read the chunk IDs.
	vol, err := s.volumeOf("db")
	require.NoError(t, err)
	require.NoError(t, vol.WriteAt(ctx, make([]byte, 4096), 0, false))
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i * 13)
	}
	require.NoError(t, vol.WriteAt(ctx, data, 2<<20, false))
	snap, err := cl.CreateSnapshot(ctx, "db", "first")
	require.NoError(t, err)
	assert.Equal(t, "first", snap.Label)
	_, err = cl.CreateSnapshot(ctx, "db", "first")
	assert.ErrorIs(t, err, api.ErrExists, "labels are unique")
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	sealed, err := cl.WaitSealed(wctx, "db", snap.ID, nil)
	require.NoError(t, err)
	assert.True(t, sealed.Sealed)
	byLabel, err := cl.Snapshot(ctx, "db", "first")
	require.NoError(t, err)
	assert.Equal(t, snap.ID, byLabel.ID)
	snaps, err := cl.Snapshots(ctx, "db")
	require.NoError(t, err)
	require.Len(t, snaps, 1)
	assert.False(t, snaps[0].Protected)

	ids, err := cl.ChunkIDs(ctx, "db", 0, 4)
	require.NoError(t, err)
	assert.Equal(t, "blake3-256", ids.Hash)
	require.Len(t, ids.IDs, 4)
	assert.Equal(t, []string{"", ""}, ids.IDs[:2], "zero chunks have no ID")
	assert.NotEmpty(t, ids.IDs[2])
	_, err = cl.ChunkIDs(ctx, "db", 100, 4)
	assert.Error(t, err, "past the volume's end")

	// Protected: delete and prune leave it.
	p, err := cl.ProtectSnapshot(ctx, "db", "first", true)
	require.NoError(t, err)
	assert.True(t, p.Protected)
	assert.ErrorIs(t, cl.DeleteSnapshot(ctx, "db", "first"), api.ErrProtected)
	second, err := cl.CreateSnapshot(ctx, "db", "second")
	require.NoError(t, err)
	_, err = cl.WaitSealed(wctx, "db", second.ID, nil)
	require.NoError(t, err)
	_, err = cl.Prune(ctx, "db", api.Prune{})
	assert.ErrorIs(t, err, api.ErrInvalid, "an empty policy")
	pruned, err := cl.Prune(ctx, "db", api.Prune{Policy: api.Policy{Last: 1}, DryRun: true})
	require.NoError(t, err)
	require.Len(t, pruned.Snapshots, 2)
	assert.Equal(t, "second", pruned.Snapshots[0].Label)
	assert.Equal(t, []string{"last snapshot"}, pruned.Snapshots[0].Reasons)
	assert.Equal(t, []string{"protected"}, pruned.Snapshots[1].Reasons)
	_, err = cl.ProtectSnapshot(ctx, "db", "first", false)
	require.NoError(t, err)
	pruned, err = cl.Prune(ctx, "db", api.Prune{Policy: api.Policy{Last: 1}})
	require.NoError(t, err)
	assert.Equal(t, 1, pruned.Removed)
	assert.False(t, pruned.Snapshots[1].Keep)
	_, err = cl.Snapshot(ctx, "db", "first")
	assert.ErrorIs(t, err, api.ErrNotFound, "pruned")

	require.NoError(t, cl.DeleteSnapshot(ctx, "db", "second"))
	_, err = cl.Snapshot(ctx, "db", "second")
	assert.ErrorIs(t, err, api.ErrNotFound)
	third, err := cl.CreateSnapshot(ctx, "db", "third")
	require.NoError(t, err)
	_, err = cl.WaitSealed(wctx, "db", third.ID, nil)
	require.NoError(t, err)
	_, err = cl.ProtectSnapshot(ctx, "db", "third", true)
	require.NoError(t, err)
	assert.ErrorIs(t, cl.DeleteVolume(ctx, "db"), api.ErrProtected, "a volume with a protected snapshot")
	require.NoError(t, cl.DeleteVolumeForce(ctx, "db"))
	_, err = cl.Volume(ctx, "db")
	assert.ErrorIs(t, err, api.ErrNotFound)

	// A wrong token is refused before any handler runs.
	bad, err := api.NewClient(cl.Server(), "not-the-token-at-all")
	require.NoError(t, err)
	_, err = bad.Volumes(ctx)
	assert.True(t, errors.Is(err, api.ErrUnauthorized), "%v", err)
}
