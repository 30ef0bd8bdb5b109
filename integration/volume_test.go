package integration

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/nbdserver"
	"github.com/nbdvault/nbdvault/nbdserver/nbd"
	"github.com/nbdvault/nbdvault/nbdserver/volume"
)

// TestVolumeSnapshotsThroughNBD writes a volume's head with nbdcopy,
// snapshots it, overwrites part with qemu-io, snapshots again, and reads
// both snapshots back with nbdcopy, before and after they are sealed in the
// repository.
func TestVolumeSnapshotsThroughNBD(t *testing.T) {
	tools := nbdtest.Tools(t, "nbdcopy", "nbdinfo", "qemu-io")
	ctx := t.Context()
	repo, err := chunkstore.NewLocal(filepath.Join(t.TempDir(), "repo"))
	require.NoError(t, err)
	store, err := chunkstore.NewStore(repo, chunkstore.Options{})
	require.NoError(t, err)
	env := &volume.Env{Repo: repo, Store: store, StateDir: t.TempDir()}
	const size = 64 * mib
	v, err := volume.Create(ctx, env, volume.Config{Name: "db", Size: size})
	require.NoError(t, err)
	t.Cleanup(func() { v.Close() })
	exports := nbdserver.NewExports()
	exports.Add(v)
	srv := nbdtest.StartUnix(t, &nbd.Server{Exports: exports})

	// 24 MiB of data, then 40 MiB never written.
	src := filepath.Join(t.TempDir(), "src.img")
	image := append(nbdtest.RandomBytes(1, int(24*mib)), make([]byte, 40*mib)...)
	require.NoError(t, os.WriteFile(src, image, 0o600))
	require.NoError(t, os.Truncate(src, size))
	nbdtest.MustRun(t, cmdTimeout, tools["nbdcopy"], "--flush", src, srv.URI("db"))
	one, err := v.Snapshot(ctx, "one")
	require.NoError(t, err)

	nbdtest.MustRun(t, cmdTimeout, tools["qemu-io"], "-f", "raw", "-c", "write -P 0xab 4M 1M", "-c", "flush", srv.URI("db"))
	two, err := v.Snapshot(ctx, "")
	require.NoError(t, err)
	after := bytes.Clone(image)
	copy(after[4*mib:5*mib], bytes.Repeat([]byte{0xab}, int(mib)))

	readBack := func(export string) []byte {
		t.Helper()
		out := filepath.Join(t.TempDir(), "out.img")
		nbdtest.MustRun(t, cmdTimeout, tools["nbdcopy"], srv.URI(export), out)
		return nbdtest.ReadFile(t, out)
	}
	check := func(when string) {
		nbdtest.SameBytes(t, image, readBack("db@one"), "snapshot one by label, "+when)
		nbdtest.SameBytes(t, image, readBack("db@"+one.ID), "snapshot one by ID, "+when)
		nbdtest.SameBytes(t, after, readBack("db@"+two.ID), "snapshot two, "+when)
		nbdtest.SameBytes(t, after, readBack("db"), "the head, "+when)

		res := nbdtest.MustRun(t, cmdTimeout, tools["nbdinfo"], "--map", "--json", srv.URI("db@"+two.ID))
		var m []struct {
			Offset, Length int64
			Type           int
		}
		require.NoError(t, json.Unmarshal([]byte(res.Stdout), &m), res.Stdout)
		require.NotEmpty(t, m)
		last := m[len(m)-1]
		assert.Equal(t, int64(size), last.Offset+last.Length, "the map covers the volume")
		assert.Equal(t, 3, last.Type, "%s: the never-written tail is a hole that reads as zeros: %+v", when, m)
		assert.LessOrEqual(t, last.Offset, int64(24*mib), "%s: %+v", when, m)
	}
	check("before sealing (read from the write log)")
	require.NoError(t, v.SealAll(ctx))
	for _, s := range v.Snapshots() {
		require.True(t, s.Sealed)
	}
	check("after sealing (read from the repository)")

	res := nbdtest.Run(t, cmdTimeout, tools["qemu-io"], "-f", "raw", "-c", "write -P 0x01 0 4k", srv.URI("db@one"))
	assert.False(t, res.OK(), "a snapshot export is read-only: %s", res)
	nbdtest.SameBytes(t, image, readBack("db@one"), "snapshot one after a refused write")

	res = nbdtest.MustRun(t, cmdTimeout, tools["nbdinfo"], "--list", "--json", "nbd+unix:///?socket="+srv.Addr)
	for _, name := range []string{`"db"`, `"db@` + one.ID + `"`, `"db@` + two.ID + `"`} {
		assert.Contains(t, res.Stdout, name, "nbdinfo --list shows the head and every snapshot")
	}
}
