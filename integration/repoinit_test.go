package integration

import (
	"bytes"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/integration/miniotest"
	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
)

// TestRepoInit: nbdvault repo init makes a plain repository in a folder
// and an encrypted one on MinIO, without a server; serve then opens each
// (the encrypted one only with its password); a second init changes
// nothing and says so; init is refused while a server holds the
// repository, and a password without --encrypt is a usage error.
func TestRepoInit(t *testing.T) {
	bin := servertest.Binary(t)
	const pw = "init horse battery staple"

	t.Run("local", func(t *testing.T) {
		repo := filepath.Join(t.TempDir(), "repo")
		r := nbdtest.RunEnv(t, time.Minute, nil, bin, "repo", "init", repo)
		require.Equal(t, 0, r.ExitCode, "%s", r)
		assert.Contains(t, r.Stdout, "made plain repository "+repo)
		r = nbdtest.RunEnv(t, time.Minute, nil, bin, "repo", "init", repo)
		assert.Equal(t, 6, r.ExitCode, "%s", r)
		assert.Contains(t, r.Stderr, "is already an nbdvault repository (format 4, plain")
		r = nbdtest.RunEnv(t, time.Minute, []string{"NBDVAULT_PASSWORD=" + pw}, bin, "repo", "init", filepath.Join(t.TempDir(), "other"))
		assert.Equal(t, 2, r.ExitCode, "%s", r)
		assert.Contains(t, r.Stderr, "a password was given without --encrypt")

		s := servertest.Start(t, servertest.Options{Repo: repo})
		s.MustCLI("volume", "create", "v", "--size", "1M")
		data := bytes.Repeat([]byte("repo init "), 100)
		writeNBD(t, s, "v", data, 0)
		got := readNBD(t, s, "v")
		assert.True(t, bytes.Equal(data, got[:len(data)]))
		r = nbdtest.RunEnv(t, time.Minute, nil, bin, "repo", "init", repo)
		assert.Equal(t, 1, r.ExitCode, "%s", r)
		assert.Contains(t, r.Stderr, "the repository is in use by the nbdvault server on")
	})

	t.Run("minio-encrypted", func(t *testing.T) {
		m := miniotest.StartShared(t)
		prefix := "repo-init-" + fmt.Sprint(time.Now().UnixNano())
		loc := m.Location(prefix)
		env := m.Env()
		r := nbdtest.RunEnv(t, 2*time.Minute, append(env, "NBDVAULT_PASSWORD="+pw), bin, "repo", "init", loc, "--encrypt", "--json")
		require.Equal(t, 0, r.ExitCode, "%s", r)
		assert.Contains(t, r.Stdout, `"encrypted": true`)
		assert.Contains(t, r.Stderr, "keep the password safe")
		b, err := chunkstore.NewS3(m.Config(prefix))
		require.NoError(t, err)
		assert.Equal(t, 1, countObjects(t, b, chunkstore.KeysPrefix), "one key")
		cfg, err := b.Get(t.Context(), "config")
		require.NoError(t, err)
		assert.Contains(t, string(cfg), `"chunk_id": "blake3-256-mac"`)

		// No password: refused; with it: served, sealed.
		data := t.TempDir()
		r = nbdtest.RunEnv(t, time.Minute, env, bin, "serve", "--data", data, "--repo", loc, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0")
		assert.NotEqual(t, 0, r.ExitCode, "%s", r)
		assert.Contains(t, r.Stderr, "is encrypted: the password of the repository was not given")
		s := servertest.Start(t, servertest.Options{Data: data, Repo: loc, Env: append(env, "NBDVAULT_PASSWORD="+pw)})
		s.MustCLI("volume", "create", "v", "--size", "1M", "--chunk-size", "64K")
		marker := []byte("nbdvault-plaintext-marker")
		writeNBD(t, s, "v", bytes.Repeat(marker, 100), 0)
		s.MustCLI("snapshot", "create", "v", "--wait")
		found, n := objectsHolding(t, b, "", marker)
		assert.Empty(t, found)
		assert.Greater(t, n, 3)
		assert.True(t, strings.Contains(s.Log(), "repository keys opened"), "the key repo init made opens")
	})
}
