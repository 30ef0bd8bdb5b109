package integration

// The fault suite (issue #10): the real server, third-party clients, and
// the faults a backup host meets. docs/operations.md ("What nbdvault
// survives") records what each case proves.

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

const exitDamaged = 7

// qemuIO runs qemu-io commands against uri; every -c runs, and any that
// fails makes the exit status 1.
func qemuIO(t *testing.T, uri string, cmds ...string) *nbdtest.Result {
	t.Helper()
	args := []string{"-f", "raw", uri}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	return nbdtest.Run(t, cmdTimeout, nbdtest.Tool(t, "qemu-io"), args...)
}

func qemuIOOK(t *testing.T, uri string, cmds ...string) {
	t.Helper()
	r := qemuIO(t, uri, cmds...)
	if !r.OK() || strings.Contains(r.Output(), "failed") || strings.Contains(r.Output(), "error") {
		t.Fatalf("qemu-io:\n%s", r)
	}
}

func volumeStatus(t *testing.T, s *servertest.Server, name string) api.Volume {
	t.Helper()
	var v api.Volume
	r := s.CLI("volume", "show", name, "--json")
	require.True(t, r.OK(), "%s", r)
	require.NoError(t, json.Unmarshal([]byte(r.Stdout), &v))
	return v
}

// flip flips one bit of the byte at off of the file at path.
func flip(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	defer f.Close()
	b := []byte{0}
	_, err = f.ReadAt(b, off)
	require.NoError(t, err)
	b[0] ^= 0x01
	_, err = f.WriteAt(b, off)
	require.NoError(t, err)
}

// TestFaultLogDamage flips one byte of a write-log record of a running
// server: the damaged record is EIO to qemu-io, never wrong bytes; it is
// never sealed; the volume says it is damaged. After a restart the
// damaged volume is not served, the other one is, and `volume recover`
// opens it at its newest good state and names the snapshot it lost.
func TestFaultLogDamage(t *testing.T) {
	s := servertest.Start(t, servertest.Options{Args: []string{"--checkpoint-interval", "1h"}})
	s.MustCLI("volume", "create", "a", "--size", "16M")
	s.MustCLI("volume", "create", "b", "--size", "16M")
	// Records hold at most 64 KiB, so these are the first two records of
	// a's log, each 64 KiB.
	qemuIOOK(t, s.URI("a"), "write -P 0x11 0 64k", "write -P 0x22 1M 64k", "flush")
	qemuIOOK(t, s.URI("b"), "write -P 0x33 0 1M", "flush")

	seg := filepath.Join(s.Data, "state", "volumes", "a", "log", "0000000000000001.log")
	const header = 40
	flip(t, seg, header+64<<10+header+1000) // inside the second record's data

	r := qemuIO(t, s.URI("a"), "read -P 0x22 1M 64k")
	assert.False(t, r.OK(), "a damaged record must not read back: %s", r)
	assert.Contains(t, r.Output(), "Input/output error")
	assert.NotContains(t, r.Output(), "Pattern verification failed", "never wrong bytes")
	qemuIOOK(t, s.URI("a"), "read -P 0x11 0 64k", "read -P 0 64k 960k")
	qemuIOOK(t, s.URI("b"), "read -P 0x33 0 1M")

	s.MustCLI("snapshot", "create", "a", "--label", "damaged")
	deadline := time.Now().Add(time.Minute)
	for volumeStatus(t, s, "a").Status.Damaged == "" {
		require.True(t, time.Now().Before(deadline), "the seal's failure is not shown:\n%s", s.Log())
		time.Sleep(100 * time.Millisecond)
	}
	st := volumeStatus(t, s, "a").Status
	assert.Contains(t, st.Damaged, "nbdvault volume recover a")
	assert.Contains(t, st.Damaged, "CRC mismatch")
	snaps := s.MustCLI("snapshot", "list", "a", "--json").Stdout
	assert.Contains(t, snaps, `"sealed": false`, "the snapshot over damage is never sealed")
	manifests, _ := filepath.Glob(filepath.Join(s.Data, "repo", "volumes", "a", "snapshots", "*"))
	assert.Empty(t, manifests, "nothing damaged reaches the repository")

	// After a restart the damage is found on replay: a is not served, b
	// is, and the server runs.
	require.Equal(t, 0, s.Stop())
	s.Restart()
	assert.Contains(t, s.Log(), "volume not served")
	list := s.MustCLI("volume", "list").Stdout
	assert.Regexp(t, `a .*DAMAGED: not served: .*CRC mismatch`, list)
	qemuIOOK(t, s.URI("b"), "read -P 0x33 0 1M")
	r = s.CLI("snapshot", "create", "a")
	assert.Equal(t, exitDamaged, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, "nbdvault volume recover a")
	assert.False(t, qemuIO(t, s.URI("a"), "read 0 4k").OK(), "a damaged volume is not exported")

	r = s.MustCLI("volume", "recover", "a")
	assert.Contains(t, r.Stdout, "cut at record 2")
	assert.Contains(t, r.Stdout, "lost snapshot:")
	assert.Contains(t, r.Stdout, "(damaged)")
	qemuIOOK(t, s.URI("a"), "read -P 0x11 0 64k", "read -P 0 64k 16320k")
	assert.Empty(t, volumeStatus(t, s, "a").Status.Damaged)
	s.MustCLI("snapshot", "create", "a", "--label", "good", "--wait")
	r = s.MustCLI("volume", "recover", "a")
	assert.Contains(t, r.Stdout, "no damage")
}
