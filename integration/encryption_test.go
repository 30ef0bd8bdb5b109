package integration

import (
	"bytes"
	"context"
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
	for _, vol := range []string{"db", "copy"} {
		s.MustCLI("volume", "create", vol, "--size", "4M", "--chunk-size", "64K")
		writeNBD(t, s, vol, data, 1<<20)
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

	// A chunk's object swapped for another's: an error, never its bytes.
	var ids []string
	require.NoError(t, bucket.List(t.Context(), "chunks/", func(k string) error { ids = append(ids, k); return nil }))
	require.GreaterOrEqual(t, len(ids), 2)
	a, err := bucket.Get(t.Context(), ids[0])
	require.NoError(t, err)
	for _, k := range ids[1:] {
		require.NoError(t, bucket.Put(t.Context(), k, a))
	}
	r := s.CLI("verify", "--read-data")
	assert.NotEqual(t, 0, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stdout+r.Stderr, "does not open with this repository's key")
}
