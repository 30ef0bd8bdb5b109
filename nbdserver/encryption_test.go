package nbdserver

import (
	"context"
	"io"
	"log/slog"
	"regexp"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/nbdserver/lease"
)

func pw(s string) func() ([]byte, string, error) {
	return func() ([]byte, string, error) { return []byte(s), "test", nil }
}

// The config of an encrypted repository cannot be downgraded or replaced
// by whoever writes the bucket: each way is refused at start, before
// anything is read or written.
func TestEncryptedConfigRefusals(t *testing.T) {
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	mem := chunkstore.NewMem()
	c, keys, err := checkRepoConfig(ctx, mem, log, &encryption{create: true, password: pw("right")})
	require.NoError(t, err)
	require.NotNil(t, keys)
	assert.Equal(t, repoChunkIDMAC, c.ChunkID)
	good, err := mem.Get(ctx, lease.ConfigKey)
	require.NoError(t, err)

	_, k, err := checkRepoConfig(ctx, mem, log, &encryption{password: pw("right")})
	require.NoError(t, err, "it opens again")
	assert.Equal(t, keys.Fingerprint(), k.Fingerprint())
	_, _, err = checkRepoConfig(ctx, mem, log, &encryption{password: pw("wrong")})
	require.ErrorIs(t, err, chunkstore.ErrWrongPassword)
	assert.Regexp(t, `^wrong password: no key in mem:/keys/ opens with this password \(1 tried\); check the password \(it came from test\)`, err.Error())
	_, _, err = checkRepoConfig(ctx, mem, log, &encryption{})
	assert.ErrorContains(t, err, "is encrypted: give its password")

	put := func(doc string) {
		t.Helper()
		data, err := chunkstore.SumConfig([]byte(doc))
		require.NoError(t, err)
		require.NoError(t, mem.Put(ctx, lease.ConfigKey, data))
	}
	edit := func(from, to string) string {
		return regexp.MustCompile(from).ReplaceAllString(regexp.MustCompile(`"sum": "[0-9a-f]{64}"`).ReplaceAllString(string(good), `"sum": "`+chunkstore.SumConfigPlaceholder+`"`), to)
	}
	// Stripped of its encryption (keys still there).
	stripped := regexp.MustCompile(`(?s),\s*"encryption": \{.*?\}`).ReplaceAllString(edit(`"chunk_id": "blake3-256-mac"`, `"chunk_id": "blake3-256"`), "")
	require.NotContains(t, stripped, "encryption")
	put(stripped)
	_, _, err = checkRepoConfig(ctx, mem, log, &encryption{})
	assert.ErrorContains(t, err, "holds keys (keys/", "a plain config over keys")
	put(edit(`(?s),\s*"encryption": \{.*?\}`, ""))
	_, _, err = checkRepoConfig(ctx, mem, log, &encryption{})
	assert.ErrorContains(t, err, "blake3-256-mac chunk IDs", "MAC IDs without encryption")
	// Another keyset, or another ID scheme: the MAC does not check.
	put(edit(`"keyset": "[0-9a-f]+"`, `"keyset": "00000000000000000000000000000000"`))
	_, _, err = checkRepoConfig(ctx, mem, log, &encryption{password: pw("right")})
	assert.ErrorContains(t, err, "its keyset is not the config's")
	put(edit(`"mac": "[0-9a-f]+"`, `"mac": "00"`))
	_, _, err = checkRepoConfig(ctx, mem, log, &encryption{password: pw("right")})
	assert.ErrorContains(t, err, "the config's MAC does not check")
	put(edit(`"chunk_id": "blake3-256-mac"`, `"chunk_id": "blake3-256"`))
	_, _, err = checkRepoConfig(ctx, mem, log, &encryption{password: pw("right")})
	assert.ErrorContains(t, err, "chunk IDs")
	require.NoError(t, mem.Put(ctx, lease.ConfigKey, good))

	// Stripped, and its keys deleted, on a host without state (review
	// H1): the sealed objects give it away. With state, the state does,
	// before anything is written (review M4: a format 1 config would be
	// upgraded in place).
	store, err := chunkstore.NewStore(chunkstore.NewSealed(mem, keys), chunkstore.Options{Keys: keys})
	require.NoError(t, err)
	_, err = store.Put(ctx, []byte("a chunk of the encrypted repository"))
	require.NoError(t, err)
	ids, err := chunkstore.KeyIDs(ctx, mem)
	require.NoError(t, err)
	for _, id := range ids {
		require.NoError(t, mem.Delete(ctx, chunkstore.KeysPrefix+id))
	}
	put(stripped)
	_, _, err = checkRepoConfig(ctx, mem, log, &encryption{})
	assert.ErrorContains(t, err, "holds encrypted objects (chunks/")
	old := regexp.MustCompile(`"format": 4`).ReplaceAllString(stripped, `"format": 1`)
	put(old)
	before, err := mem.Get(ctx, lease.ConfigKey)
	require.NoError(t, err)
	_, _, err = checkRepoConfig(ctx, mem, log, &encryption{stateSays: "fingerprint " + keys.Fingerprint()})
	assert.ErrorContains(t, err, "the state folder belongs to an encrypted one")
	after, err := mem.Get(ctx, lease.ConfigKey)
	require.NoError(t, err)
	assert.Equal(t, before, after, "a refused start writes nothing")

	// A serve --encrypt cut between its key and its config (review L1).
	cut := chunkstore.NewMem()
	require.NoError(t, cut.Put(ctx, chunkstore.KeysPrefix+"0123456789abcdef", []byte("{}")))
	_, _, err = checkRepoConfig(ctx, cut, log, &encryption{})
	assert.ErrorContains(t, err, "a serve --encrypt was cut short")
	_, k, err = checkRepoConfig(ctx, cut, log, &encryption{create: true, password: pw("right")})
	require.NoError(t, err, "the retry with --encrypt passes the orphan key over")
	require.NotNil(t, k)

	// A plain repository: no password, no --encrypt over it.
	plain := chunkstore.NewMem()
	_, _, err = checkRepoConfig(ctx, plain, log, &encryption{passwordGiven: true, password: pw("x")})
	assert.ErrorContains(t, err, "a password was given without --encrypt", "a new repository")
	_, k, err = checkRepoConfig(ctx, plain, log, &encryption{})
	require.NoError(t, err)
	assert.Nil(t, k)
	_, _, err = checkRepoConfig(ctx, plain, log, &encryption{passwordGiven: true, password: pw("x")})
	assert.ErrorContains(t, err, "is not encrypted, yet a password or --encrypt was given")
	_, _, err = checkRepoConfig(ctx, plain, log, &encryption{create: true, password: pw("x")})
	assert.ErrorContains(t, err, "is not encrypted, yet a password or --encrypt was given")

	// The state folder remembers: a repository that is no longer
	// encrypted, or opens to another master key, is refused.
	dir := t.TempDir()
	require.NoError(t, bindKeys(dir, keys, "mem:"))
	require.NoError(t, bindKeys(dir, keys, "mem:"))
	assert.ErrorContains(t, bindKeys(dir, nil, "mem:"), "is not encrypted, but the state folder")
	_, other, err := checkRepoConfig(ctx, chunkstore.NewMem(), log, &encryption{create: true, password: pw("right")})
	require.NoError(t, err)
	assert.ErrorContains(t, bindKeys(dir, other, "mem:"), "opened with a master key (fingerprint")
	plainDir := t.TempDir()
	require.NoError(t, bindKeys(plainDir, nil, "mem:"))
	assert.Error(t, bindKeys(plainDir, keys, "mem:"), "a plain repository's state folder")
}

// A new repository's password is asked as a new one (a prompt asks it
// twice), an existing one's as one to check: serve --encrypt on an
// existing repository does not ask for a new password.
func TestNewPasswordOnlyForNewRepository(t *testing.T) {
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	mem := chunkstore.NewMem()
	fail := func() ([]byte, string, error) { t.Fatal("asked the wrong way"); return nil, "", nil }
	_, keys, err := checkRepoConfig(ctx, mem, log, &encryption{create: true, password: fail, newPassword: pw("right")})
	require.NoError(t, err)
	require.NotNil(t, keys)
	_, keys, err = checkRepoConfig(ctx, mem, log, &encryption{create: true, password: pw("right"), newPassword: fail})
	require.NoError(t, err, "an existing repository opens with --encrypt, its password asked once")
	require.NotNil(t, keys)
}
