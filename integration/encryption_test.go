package integration

import (
	"bytes"
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
)

// secretText is 1 MiB a user would not want read from the bucket: in
// turn 64 KiB of text, which compresses as a database's pages do, and 64
// KiB of random bytes, which zstd leaves as they are, so that the marker
// would show in a plain repository's objects.
func secretText() []byte {
	var b bytes.Buffer
	for i := 0; b.Len() < 1<<20; i++ {
		b.WriteString("customer 0000 card number 4111-1111-1111-1111 nbdvault-plaintext-marker row ")
		b.WriteString(strings.Repeat("x", i%50))
		b.WriteByte('\n')
	}
	data := b.Bytes()[:1<<20]
	for off := 64 << 10; off < len(data); off += 128 << 10 {
		copy(data[off:off+64<<10], nbdtest.RandomBytes(uint64(off), 64<<10))
		for m := off + 100; m < off+64<<10-100; m += 4096 {
			copy(data[m:], "nbdvault-plaintext-marker")
		}
	}
	return data
}

// objectsHolding returns the keys of the objects under prefix whose bytes
// hold needle.
func objectsHolding(t *testing.T, b chunkstore.Backend, prefix string, needle []byte) (found []string, n int) {
	t.Helper()
	ctx := context.Background()
	require.NoError(t, b.List(ctx, prefix, func(k string) error {
		obj, err := b.Get(ctx, k)
		require.NoError(t, err)
		n++
		if bytes.Contains(obj, needle) {
			found = append(found, k)
		}
		return nil
	}))
	return found, n
}

// filesHolding returns the files under dir whose bytes hold needle.
func filesHolding(t *testing.T, dir string, needle []byte) []string {
	t.Helper()
	var found []string
	n := 0
	require.NoError(t, filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		n++
		if bytes.Contains(b, needle) {
			found = append(found, path)
		}
		return nil
	}))
	require.NotZero(t, n)
	return found
}

// objectSet is every object of b but the lease, with its size.
func objectSet(t *testing.T, b chunkstore.Backend) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	require.NoError(t, b.ListSizes(context.Background(), "", func(k string, n int64) error {
		if !strings.HasPrefix(k, "locks/") {
			out[k] = n
		}
		return nil
	}))
	return out
}

func countObjects(t *testing.T, b chunkstore.Backend, prefix string) int {
	t.Helper()
	n := 0
	require.NoError(t, b.List(context.Background(), prefix, func(string) error { n++; return nil }))
	return n
}

// TestEncryptedRepository runs serve --encrypt on MinIO. Nothing of the
// data is in the bucket, yet it reads back, over NBD and as a snapshot,
// and the same data in two volumes is stored once. The wrong password
// gets a clear refusal; a chunk swapped for another's object reads as
// damage, never as the other's bytes.
func TestEncryptedRepository(t *testing.T) {
	const pw = "correct horse battery staple"
	s, bucket := startOn(t, "minio", servertest.Options{Args: []string{"--encrypt", "--journal-retention", "0"},
		Env: []string{"NBDVAULT_PASSWORD=" + pw}})
	data := secretText()
	marker := []byte("nbdvault-plaintext-marker")
	for i, vol := range []string{"db", "copy"} {
		s.MustCLI("volume", "create", vol, "--size", "4M", "--chunk-size", "64K")
		writeNBD(t, s, vol, data, 1<<20)
		if i == 0 {
			// The write log on the server's disk holds it now, sealed.
			assert.Empty(t, filesHolding(t, s.Data, marker), "files of the data folder holding the plaintext")
		}
		s.MustCLI("snapshot", "create", vol, "--label", "first", "--wait")
	}
	assert.Contains(t, s.Log(), "a new encrypted repository")
	chunks := countObjects(t, bucket, "chunks/")
	t.Logf("chunks after two volumes of the same 1 MiB: %d", chunks)
	assert.Less(t, chunks, 24, "16 chunks of data, stored once for both volumes, and their index pages")

	// The bucket: no plaintext, no plain chunk IDs.
	found, n := objectsHolding(t, bucket, "", marker)
	assert.Empty(t, found, "objects holding the plaintext")
	assert.Greater(t, n, 10)
	plainID := chunkstore.BLAKE3{}.Sum(data[:64<<10]).String()
	assert.Zero(t, countObjects(t, bucket, "chunks/"+plainID[:2]+"/"+plainID), "chunks are not named by their plain hash")
	keys := countObjects(t, bucket, chunkstore.KeysPrefix)
	assert.Equal(t, 1, keys)
	cfg, err := bucket.Get(t.Context(), "config")
	require.NoError(t, err)
	assert.Contains(t, string(cfg), `"chunk_id": "blake3-256-mac"`)

	// It reads back, head and snapshot, with third-party clients too.
	want := make([]byte, 4<<20)
	copy(want[1<<20:], data)
	assert.True(t, bytes.Equal(want, readNBD(t, s, "db@first")))
	got := nbdtest.Run(t, time.Minute, "nbdcopy", s.URI("copy"), "-")
	require.Equal(t, 0, got.ExitCode, "%s", got)
	assert.True(t, bytes.Equal(want, []byte(got.Stdout)), "nbdcopy reads the copy")

	// A restart with the wrong password, then none at all.
	require.Equal(t, 0, s.Stop(), s.Log())
	bin := servertest.Binary(t)
	var env []string // the server's, without the password
	for _, e := range s.ServeEnv() {
		if !strings.HasPrefix(e, "NBDVAULT_PASSWORD=") {
			env = append(env, e)
		}
	}
	for _, c := range []struct {
		env, want string
	}{
		{"NBDVAULT_PASSWORD=wrong", "wrong password: no key in s3://nbdvault-test/"},
		{"NBDVAULT_PASSWORD=wrong", "/keys/ opens with this password (1 tried); check the password (it came from environment NBDVAULT_PASSWORD)"},
		{"NBDVAULT_IGNORED=1", "is encrypted: the password of the repository was not given: set NBDVAULT_PASSWORD"},
	} {
		r := nbdtest.RunEnv(t, time.Minute, append(env, c.env), bin, s.ServeArgs()...)
		assert.NotEqual(t, 0, r.ExitCode, "%s", r)
		assert.Contains(t, r.Stderr, c.want)
	}
	s.Restart()
	assert.True(t, bytes.Equal(want, readNBD(t, s, "db")), "the head reads back after a restart")
	_, err = s.API().ChunkIDs(t.Context(), "db", 0, 4)
	require.Error(t, err, "an encrypted repository's chunk IDs are not handed out")
	assert.Contains(t, err.Error(), "chunks/compare")

	// Keys: a second password, a changed one, a removed one.
	keyCLI := func(env ...string) *nbdtest.Result {
		return nbdtest.RunEnv(t, time.Minute, append(s.Env(), env...), bin, "key", "list")
	}
	assert.Regexp(t, `(?m)^[0-9a-f]{16}\s.*made by serve --encrypt\s+yes$`, keyCLI().Stdout)
	run := func(env []string, args ...string) *nbdtest.Result {
		return nbdtest.RunEnv(t, 2*time.Minute, append(s.Env(), env...), bin, args...)
	}
	r := run([]string{"NBDVAULT_PASSWORD=wrong", "NBDVAULT_NEW_PASSWORD=second"}, "key", "add")
	assert.Equal(t, exitAuth, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, "opens with this password")
	r = run([]string{"NBDVAULT_PASSWORD=" + pw, "NBDVAULT_NEW_PASSWORD=second"}, "key", "add", "--label", "second")
	require.Equal(t, 0, r.ExitCode, "%s", r)
	before := objectSet(t, bucket)
	r = run([]string{"NBDVAULT_PASSWORD=" + pw, "NBDVAULT_NEW_PASSWORD=third"}, "key", "passwd")
	require.Equal(t, 0, r.ExitCode, "%s", r)
	after := objectSet(t, bucket)
	var gone, added []string
	for k := range before {
		if _, ok := after[k]; !ok {
			gone = append(gone, k)
		}
	}
	for k, size := range after {
		if was, ok := before[k]; !ok {
			added = append(added, k)
		} else {
			assert.Equal(t, was, size, "%s is as it was", k)
		}
	}
	assert.Len(t, gone, 1, "key passwd deletes one object")
	assert.Len(t, added, 1, "and writes one")
	for _, k := range append(gone, added...) {
		assert.True(t, strings.HasPrefix(k, chunkstore.KeysPrefix), "%s is a key", k)
	}
	out := keyCLI().Stdout
	t.Logf("nbdvault key list\n%s", out)
	assert.Equal(t, 3, strings.Count(out, "\n"), "two keys: the second, and the one that replaced the first")
	var second string
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "second") {
			second = strings.Fields(line)[0]
		}
	}
	require.NotEmpty(t, second)
	r = run(nil, "key", "remove", second)
	require.Equal(t, 0, r.ExitCode, "%s", r)
	last := strings.Fields(strings.Split(keyCLI().Stdout, "\n")[1])[0]
	r = run(nil, "key", "remove", last)
	assert.NotEqual(t, 0, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, "last")

	// The old password no longer opens it; the new one does.
	require.Equal(t, 0, s.Stop(), s.Log())
	r = nbdtest.RunEnv(t, time.Minute, append(env, "NBDVAULT_PASSWORD="+pw), bin, s.ServeArgs()...)
	assert.Contains(t, r.Stderr, "wrong password: no key in")
	s = servertest.Start(t, servertest.Options{Data: s.Data, Repo: s.ServeArgs()[slices.Index(s.ServeArgs(), "--repo")+1],
		Env: append(env, "NBDVAULT_PASSWORD=third")})
	assert.True(t, bytes.Equal(want, readNBD(t, s, "db@first")), "the snapshot reads with the new password")

	// A chunk's object swapped for another's: an error, never its bytes.
	var ids []string
	require.NoError(t, bucket.List(t.Context(), "chunks/", func(k string) error { ids = append(ids, k); return nil }))
	require.GreaterOrEqual(t, len(ids), 2)
	a, err := bucket.Get(t.Context(), ids[0])
	require.NoError(t, err)
	for _, k := range ids[1:] {
		require.NoError(t, bucket.Put(t.Context(), k, a))
	}
	r = s.CLI("verify", "--read-data")
	assert.NotEqual(t, 0, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stdout+r.Stderr, "does not open with this repository's key")
}
