package chunkstore_test

import (
	"bytes"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/chunkstore/storetest"
	"github.com/nbdvault/nbdvault/integration/testenv"
)

func TestLocalLayout(t *testing.T) {
	root := filepath.Join(t.TempDir(), "repo")
	b, err := chunkstore.NewLocal(root)
	require.NoError(t, err)
	s, err := chunkstore.NewStore(b, chunkstore.Options{})
	require.NoError(t, err)
	id, err := s.Put(t.Context(), storetest.RandomBytes(4096))
	require.NoError(t, err)

	hex := id.String()
	path := filepath.Join(root, "chunks", hex[:2], hex)
	fi, err := os.Stat(path)
	require.NoError(t, err, "a chunk lives at chunks/<2 hex>/<id>")
	assert.Equal(t, fs.FileMode(0o600), fi.Mode().Perm(), "only the owner reads backups")
	di, err := os.Stat(filepath.Dir(path))
	require.NoError(t, err)
	assert.Equal(t, fs.FileMode(0o700), di.Mode().Perm())

	// A temporary file left by a crash is neither listed nor a key.
	require.NoError(t, os.WriteFile(filepath.Join(root, "chunks", hex[:2], ".tmp-123"), []byte("partial"), 0o600))
	var keys []string
	require.NoError(t, b.List(t.Context(), "", func(k string) error { keys = append(keys, k); return nil }))
	assert.Equal(t, []string{chunkstore.Key(id)}, keys)
	sizes := map[string]int64{}
	require.NoError(t, b.ListSizes(t.Context(), "", func(k string, size int64) error { sizes[k] = size; return nil }))
	assert.Equal(t, map[string]int64{chunkstore.Key(id): fi.Size()}, sizes, "ListSizes hides what List hides")
}

func TestLocalRootIsAFile(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	require.NoError(t, os.WriteFile(file, nil, 0o600))
	_, err := chunkstore.NewLocal(file)
	require.Error(t, err)
	assert.Contains(t, err.Error(), file)
}

// TestLocalDiskFull fills a small tmpfs: a Put that does not fit fails with
// ErrNoSpace, leaves no partial object behind, and what was stored before
// still reads back.
func TestLocalDiskFull(t *testing.T) {
	dir := testenv.Tmpfs(t, "4m")

	b, err := chunkstore.NewLocal(dir)
	require.NoError(t, err)
	s, err := chunkstore.NewStore(b, chunkstore.Options{CacheBytes: -1})
	require.NoError(t, err)
	first := storetest.RandomBytes(1 << 20)
	id, err := s.Put(t.Context(), first)
	require.NoError(t, err)

	var full error
	for range 8 {
		if _, full = s.Put(t.Context(), storetest.RandomBytes(1<<20)); full != nil {
			break
		}
	}
	require.ErrorIs(t, full, chunkstore.ErrNoSpace)
	assert.Contains(t, full.Error(), "no space left")

	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		require.NoError(t, err)
		assert.False(t, strings.HasPrefix(d.Name(), ".tmp-"), "temporary file %s left behind", path)
		return nil
	})
	require.NoError(t, err)
	got, err := s.Get(t.Context(), id)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(first, got), "what was stored before the disk filled is intact")
}

// TestLocalRemoveTemporary: a crash mid-Put leaves a temporary file that
// List hides; RemoveTemporary removes the old ones and leaves a young
// one (a Put in flight) and every object.
func TestLocalRemoveTemporary(t *testing.T) {
	ctx := t.Context()
	l, err := chunkstore.NewLocal(t.TempDir())
	require.NoError(t, err)
	require.NoError(t, l.Put(ctx, "chunks/ab/x", []byte("object")))
	dir := filepath.Join(l.Location(), "chunks", "ab")
	old := filepath.Join(dir, ".tmp-123")
	young := filepath.Join(dir, ".tmp-456")
	require.NoError(t, os.WriteFile(old, make([]byte, 1000), 0o600))
	require.NoError(t, os.WriteFile(young, []byte("y"), 0o600))
	hour := time.Now().Add(-time.Hour)
	require.NoError(t, os.Chtimes(old, hour, hour))

	n, size, err := l.RemoveTemporary(ctx, time.Minute)
	require.NoError(t, err)
	assert.Equal(t, 1, n)
	assert.Equal(t, int64(1000), size)
	assert.NoFileExists(t, old)
	assert.FileExists(t, young)
	got, err := l.Get(ctx, "chunks/ab/x")
	require.NoError(t, err)
	assert.Equal(t, []byte("object"), got)

	found, ok := chunkstore.Under[*chunkstore.Local](chunkstore.NewRetry(l, chunkstore.DefaultRetryPolicy))
	assert.True(t, ok)
	assert.Same(t, l, found)
}
