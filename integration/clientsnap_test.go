package integration

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
	"github.com/nbdvault/nbdvault/integration/testenv"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// TestClientSnapshotFreezes: client snapshot freezes the file systems,
// takes the snapshot, and thaws them and runs --post whatever happens:
// on success, when the server refuses the snapshot, and when a second
// file system cannot be frozen.
func TestClientSnapshotFreezes(t *testing.T) {
	tools := nbdtest.Tools(t, "mkfs.ext4", "timeout", "touch")
	nbdtest.RequireRoot(t, "mount and fsfreeze")
	s := servertest.Start(t, servertest.Options{})
	s.MustCLI("volume", "create", "v", "--size", "8M")
	img := filepath.Join(t.TempDir(), "fs.img")
	nbdtest.MustRun(t, time.Minute, tools["mkfs.ext4"], "-q", img, "16M")
	fs := nbdtest.MountLoop(t, img, "")
	hooks := t.TempDir()
	pre, post := filepath.Join(hooks, "pre"), filepath.Join(hooks, "post")
	writable := func(what string) {
		t.Helper()
		r := nbdtest.Run(t, time.Minute, tools["timeout"], "5", tools["touch"], filepath.Join(fs.Dir, "probe"))
		assert.True(t, r.OK(), "%s: the file system takes writes again (thawed): %s", what, r)
	}

	r := s.MustCLI("client", "snapshot", "--volume", "v", "--freeze", fs.Dir, "--label", "one",
		"--pre", "echo ran > "+pre, "--post", "echo ran > "+post)
	assert.Regexp(t, `^\d{8}T`, strings.TrimSpace(r.Stdout))
	assert.FileExists(t, pre)
	assert.FileExists(t, post)
	writable("after a snapshot")
	assert.Contains(t, s.MustCLI("snapshot", "list", "v").Stdout, "one")

	// The server refuses (the label is taken) while the file system is
	// frozen: thawed all the same, --post run all the same.
	require.NoError(t, os.Remove(post))
	r = s.CLI("client", "snapshot", "--volume", "v", "--freeze", fs.Dir, "--label", "one", "--post", "echo ran > "+post)
	assert.Equal(t, exitConflict, r.ExitCode, "%s", r)
	assert.FileExists(t, post)
	writable("after a refused snapshot")

	// A second mount point that cannot be frozen (tmpfs): the first is
	// thawed again and nothing is snapshotted.
	tmp := testenv.Tmpfs(t, "1M")
	r = s.CLI("client", "snapshot", "--volume", "v", "--freeze", fs.Dir, "--freeze", tmp)
	assert.Equal(t, 1, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, "cannot be frozen")
	writable("after a failed freeze")

	// A failing --pre stops before anything is frozen.
	r = s.CLI("client", "snapshot", "--volume", "v", "--freeze", fs.Dir, "--pre", "exit 3")
	assert.Equal(t, 1, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, `--pre "exit 3" failed`)
	var snaps []api.Snapshot
	require.NoError(t, json.Unmarshal([]byte(s.MustCLI("snapshot", "list", "v", "--json").Stdout), &snaps))
	assert.Len(t, snaps, 1, "only the first snapshot")

	// An unknown volume is refused before anything is frozen.
	r = s.CLI("client", "snapshot", "--volume", "nope", "--freeze", fs.Dir)
	assert.Equal(t, exitNotFound, r.ExitCode, "%s", r)
	writable("at the end")
}
