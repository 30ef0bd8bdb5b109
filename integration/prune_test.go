package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// TestPrune drives prune and snapshot protect through the real binary,
// on a local repository and on MinIO: a dry run removes nothing, prune
// removes exactly what no rule keeps, a protected snapshot stays, and
// what stays reads back as it was written, after a restart too.
func TestPrune(t *testing.T) {
	for _, repo := range []string{"local", "minio"} {
		t.Run(repo, func(t *testing.T) {
			s, _ := startOn(t, repo, servertest.Options{})
			s.MustCLI("volume", "create", "db", "--size", "2M", "--chunk-size", "64K")
			var ids []string
			images := map[string][]byte{}
			for i := range 4 {
				writeNBD(t, s, "db", nbdtest.RandomBytes(uint64(i+10), 256<<10), int64(i)*(256<<10))
				id := strings.TrimSpace(s.MustCLI("snapshot", "create", "db", "--label", fmt.Sprintf("s%d", i), "--wait").Stdout)
				ids = append(ids, id)
				images[id] = readNBD(t, s, "db")
			}
			s.MustCLI("snapshot", "protect", "db@s0")

			r := s.CLI("snapshot", "delete", "db@s0")
			assert.Equal(t, exitConflict, r.ExitCode, "%s", r)
			assert.Contains(t, r.Stderr, "nbdvault snapshot unprotect db@"+ids[0])
			r = s.CLI("prune", "db")
			assert.Equal(t, exitUsage, r.ExitCode, "%s", r)
			assert.Contains(t, r.Stderr, "give at least one --keep-")
			r = s.CLI("prune", "db", "--keep-daily", "two")
			assert.Equal(t, exitUsage, r.ExitCode, "%s", r)

			out := s.MustCLI("prune", "db", "--keep-last", "1", "--dry-run").Stdout
			assert.Equal(t, 2, strings.Count(out, "would remove  no rule keeps it"), out)
			assert.Contains(t, out, "keep-last 1; kept 2, would remove 2 snapshot(s)")
			assert.Len(t, listSnapshots(t, s), 4, "a dry run removes nothing")

			var res api.Pruned
			require.NoError(t, json.Unmarshal([]byte(s.MustCLI("prune", "db", "--keep-last", "1", "--json").Stdout), &res))
			assert.Equal(t, 2, res.Removed)
			require.Len(t, res.Snapshots, 4)
			assert.Equal(t, []string{"last snapshot"}, res.Snapshots[0].Reasons)
			assert.Equal(t, []string{"protected"}, res.Snapshots[3].Reasons)

			check := func(what string) {
				t.Helper()
				snaps := listSnapshots(t, s)
				require.Len(t, snaps, 2, what)
				assert.Equal(t, ids[0], snaps[0].ID)
				assert.True(t, snaps[0].Protected, what)
				assert.Equal(t, ids[3], snaps[1].ID)
				for _, id := range []string{ids[0], ids[3]} {
					assert.True(t, bytes.Equal(images[id], readNBD(t, s, "db@"+id)), "%s: db@%s reads as it was", what, id)
				}
			}
			check("after prune")
			require.Equal(t, 0, s.Stop(), s.Log())
			s.Restart()
			check("after a restart")
			r = s.CLI("volume", "delete", "db")
			assert.Equal(t, exitConflict, r.ExitCode, "%s", r)
			assert.Contains(t, r.Stderr, "has 1 protected snapshots ("+ids[0]+"): unprotect them, or delete the volume with --force")
			s.MustCLI("snapshot", "unprotect", "db@s0")
			s.MustCLI("snapshot", "delete", "db@s0")
		})
	}
}

func listSnapshots(t *testing.T, s *servertest.Server) []api.Snapshot {
	t.Helper()
	var snaps []api.Snapshot
	require.NoError(t, json.Unmarshal([]byte(s.MustCLI("snapshot", "list", "db", "--json").Stdout), &snaps))
	return snaps
}
