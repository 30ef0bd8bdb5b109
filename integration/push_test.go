package integration

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
)

// TestClientPush: a first push sends the image; after 1% of it changes,
// a second sends only the chunks that changed (as the server counts the
// bytes written), before and after the volume is sealed, and the head
// and the snapshot equal the image each time. In an encrypted repository
// too, where the server compares the client's hashes with its MACed IDs.
func TestClientPush(t *testing.T) {
	t.Run("plain", func(t *testing.T) { testClientPush(t, servertest.Options{}) })
	t.Run("encrypted", func(t *testing.T) {
		testClientPush(t, servertest.Options{Args: []string{"--encrypt"}, Env: []string{"NBDVAULT_PASSWORD=push test"}})
	})
}

func testClientPush(t *testing.T, opts servertest.Options) {
	const size = 32 << 20
	s := servertest.Start(t, opts)
	s.MustCLI("volume", "create", "host", "--size", "40M", "--chunk-size", "64K")
	img := filepath.Join(t.TempDir(), "disk.img")
	data := nbdtest.RandomBytes(7, size)
	clear(data[8<<20 : 12<<20]) // zeros are zeroed, not sent
	require.NoError(t, os.WriteFile(img, data, 0o600))

	pushAndCheck := func(what string, maxSent float64) string {
		t.Helper()
		before := s.BytesWritten("host")
		r := s.MustCLI("client", "push", "--from", img, "--to", "nbd://"+s.NBD+"/host", "--snapshot")
		sent := s.BytesWritten("host") - before
		assert.LessOrEqual(t, sent, maxSent, "%s: bytes the server was sent\n%s", what, r)
		head := readNBD(t, s, "host")
		want := append(bytes.Clone(data), make([]byte, 8<<20)...)
		require.True(t, bytes.Equal(want, head), "%s: the head is the image: %s", what, nbdtest.Diff(want, head))
		id := strings.TrimSpace(r.Stdout)
		require.True(t, bytes.Equal(want, readNBD(t, s, "host@"+id)), "%s: the snapshot is the image", what)
		t.Logf("%s: %.0f bytes sent; %s", what, sent, strings.TrimSpace(r.Stderr))
		return id
	}
	pushAndCheck("first push", size)

	// Change 1%: 8 scattered runs of 40 KiB, one of them zeros over data.
	change := func(seed uint64) {
		for i := range 8 {
			off := int64(i)*(4<<20) + int64(seed)*100_003%(3<<20)
			p := nbdtest.RandomBytes(seed*10+uint64(i), 40<<10)
			if i == 0 {
				p = make([]byte, 40<<10)
			}
			copy(data[off:], p)
		}
		require.NoError(t, os.WriteFile(img, data, 0o600))
	}
	change(1)
	// Each run touches at most 2 chunks of 64 KiB: 16 chunks, 1 MiB, 3%.
	id := pushAndCheck("second push, the first still in the log", 16*64<<10)

	_, err := s.API().WaitSealed(t.Context(), "host", id, nil)
	require.NoError(t, err)
	change(2)
	pushAndCheck("third push, over sealed chunks", 16*64<<10)
	pushAndCheck("nothing changed", 0)

	// Mistakes.
	big := filepath.Join(t.TempDir(), "big.img")
	require.NoError(t, os.WriteFile(big, make([]byte, 41<<20), 0o600))
	r := s.CLI("client", "push", "--from", big, "--to", "host")
	assert.Equal(t, 1, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, "nbdvault volume resize host")
	r = s.CLI("client", "push", "--from", img, "--to", "http://x/host")
	assert.Equal(t, exitUsage, r.ExitCode, "%s", r)
	r = s.CLI("client", "push", "--from", img, "--to", "nope")
	assert.Equal(t, exitNotFound, r.ExitCode, "%s", r)
}
