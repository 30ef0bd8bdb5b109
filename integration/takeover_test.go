package integration

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/servertest"
)

// TestTakeoverWhileDown: server A dies with writes in its log that it
// never uploaded; server B, on another data folder, takes the repository
// over once A's lease ran out, writes and seals; then A starts again on
// its own folder. A must not replay its old log over B's manifests (a
// mix of two histories): it refuses the volume, saying to recover it, and
// recover serves exactly what B left, with A's log kept aside. Then B
// comes back after A stopped cleanly and opens the volume at A's state:
// a failback with nothing unsealed is refused nothing.
// (docs/architecture.md, "A server back after a takeover it never saw".)
func TestTakeoverWhileDown(t *testing.T) {
	repo := filepath.Join(t.TempDir(), "repo")
	args := []string{"--checkpoint-interval", "1h", "--lease-ttl", "3s"}
	a := servertest.Start(t, servertest.Options{Repo: repo, Args: args})
	a.MustCLI("volume", "create", "v", "--size", "4M", "--chunk-size", "64K")
	for i := range 40 { // 40 records, none uploaded
		writeNBD(t, a, "v", bytes.Repeat([]byte{0x11}, 4096), int64(i)*64<<10)
	}
	a.Kill()

	time.Sleep(5 * time.Second) // A's lease runs out
	b := servertest.Start(t, servertest.Options{Repo: repo, Args: args})
	writeNBD(t, b, "v", bytes.Repeat([]byte{0x22}, 4096), 0)
	b.MustCLI("snapshot", "create", "v", "--wait")
	want := readNBD(t, b, "v")
	require.Equal(t, 0, b.Stop(), b.Log())

	a.Restart()
	assert.Contains(t, a.Log(), "another server held the repository since this state folder was last used", "the start says why volumes may be refused")
	r := a.MustCLI("volume", "list")
	require.Contains(t, r.Stdout, "DAMAGED", "A refuses v rather than serve a mix of its log and B's history")
	require.Contains(t, r.Stdout, "records 1 to 40 of its write log")
	require.Contains(t, r.Stdout, "nbdvault volume recover v")

	r = a.MustCLI("volume", "recover", "v")
	require.Contains(t, r.Stdout, "held 40 records from record 1 on that another server's history")
	moved := regexp.MustCompile(`kept in (\S+) `).FindStringSubmatch(r.Stdout)
	require.NotNil(t, moved, r.Stdout)
	segs, err := os.ReadDir(moved[1])
	require.NoError(t, err)
	require.NotEmpty(t, segs, "A's records are kept where recover says")
	require.Equal(t, want, readNBD(t, a, "v"), "A serves B's state exactly")

	writeNBD(t, a, "v", bytes.Repeat([]byte{0x33}, 4096), 1<<20)
	a.MustCLI("snapshot", "create", "v", "--wait")
	want = readNBD(t, a, "v")
	require.Equal(t, 0, a.Stop(), a.Log())

	b.Restart()
	require.NotContains(t, b.MustCLI("volume", "list").Stdout, "DAMAGED", "B, back after a clean stop of A, opens v")
	require.Equal(t, want, readNBD(t, b, "v"))
}
