package integration

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
	"github.com/nbdvault/nbdvault/nbdserver/api"
	"github.com/nbdvault/nbdvault/nbdserver/volume"
)

// TestSpaceShown drives what the user sees of the last gc's space
// figures through the real binary: nothing counted at first, then, from
// a gc/space.json written by hand in the server's state folder (as a gc
// writes it), snapshot list's USED and LREFER ("-" for a snapshot the
// count missed), status's totals and ratios (and --json's), volume
// show, prune --dry-run, snapshot delete and /metrics.
func TestSpaceShown(t *testing.T) {
	s, _ := startOn(t, "local", servertest.Options{})
	s.MustCLI("volume", "create", "db", "--size", "2M", "--chunk-size", "64K")
	var ids []string
	for i, label := range []string{"counted", "since"} {
		writeNBD(t, s, "db", nbdtest.RandomBytes(uint64(i+20), 128<<10), int64(i)*(128<<10))
		ids = append(ids, strings.TrimSpace(s.MustCLI("snapshot", "create", "db", "--label", label, "--wait").Stdout))
	}
	assert.Contains(t, s.MustCLI("snapshot", "list", "db").Stdout, "USED and LREFER are counted by garbage collection: not yet (nbdvault gc --dry-run counts them)")
	assert.Contains(t, s.MustCLI("status").Stdout, "space: not counted yet (nbdvault gc --dry-run counts it)")

	db := volume.SpaceTotals{Logical: 256 << 10, Written: 384 << 10, Chunks: 4, Pages: 3, Referenced: 256 << 10,
		DataStored: 128 << 10, PageStored: 12 << 10, Journal: 4 << 10, Stored: 144 << 10}
	repo := db
	sp := volume.Space{Time: time.Now().UTC(),
		Manifests:  map[string]volume.ManifestSpace{volume.ManifestKey("db", volume.KindSnapshot, ids[0]): {Used: 64 << 10, LogicalReferenced: 128 << 10}},
		Volumes:    map[string]volume.SpaceTotals{"db": db},
		Repository: repo,
	}
	data, err := json.Marshal(sp)
	require.NoError(t, err)
	dir := filepath.Join(s.Data, "state", "gc")
	require.NoError(t, os.MkdirAll(dir, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "space.json"), data, 0o600))

	out := s.MustCLI("snapshot", "list", "db").Stdout
	t.Logf("nbdvault snapshot list db\n%s", out)
	assert.Regexp(t, regexp.MustCompile(`(?m)^`+ids[0]+`\s+counted\s+\S+ \S+\s+2\.0 MiB\s+64\.0 KiB\s+128\.0 KiB\s+sealed$`), out)
	assert.Regexp(t, regexp.MustCompile(`(?m)^`+ids[1]+`\s+since\s+\S+ \S+\s+2\.0 MiB\s+-\s+-\s+sealed$`), out)
	assert.Regexp(t, `USED and LREFER as of the last gc, \d+s ago \(nbdvault gc --dry-run refreshes them\); USED is what deleting that snapshot alone frees; - is not counted yet\n$`, out)
	snaps := listSnapshots(t, s)
	require.Len(t, snaps, 2)
	require.NotNil(t, snaps[0].Used)
	assert.EqualValues(t, 64<<10, *snaps[0].Used)
	assert.Nil(t, snaps[1].Used)

	out = s.MustCLI("status").Stdout
	t.Logf("nbdvault status\n%s", out)
	assert.Regexp(t, `(?m)^SPACE\s+LOGICAL\s+STORED\s+SHARED\s+DEDUP\s+COMPRESSION$`, out)
	assert.Regexp(t, `(?m)^db\s+256\.0 KiB\s+144\.0 KiB\s+-\s+1\.50x\s+2\.00x$`, out)
	assert.Regexp(t, `(?m)^repository\s+256\.0 KiB\s+144\.0 KiB\s+0 B\s+1\.50x\s+2\.00x$`, out)
	assert.Regexp(t, `space as of the last gc, \d+s ago \(nbdvault gc --dry-run refreshes it\); a volume's STORED is what only it references: what deleting it frees`, out)
	var st api.Status
	require.NoError(t, json.Unmarshal([]byte(s.MustCLI("status", "--json").Stdout), &st))
	require.NotNil(t, st.Space)
	assert.EqualValues(t, 144<<10, st.Space.Stored)
	assert.InDelta(t, 1.5, st.Space.DedupRatio, 1e-9)
	require.Len(t, st.Volumes, 1)
	require.NotNil(t, st.Volumes[0].Space)
	assert.EqualValues(t, 144<<10, st.Volumes[0].Space.Stored)
	assert.True(t, sp.Time.Equal(st.Volumes[0].Space.AsOf))
	assert.Regexp(t, `space as of the last gc, \d+s ago \(nbdvault gc --dry-run refreshes it\): logical 256\.0 KiB, stored 144\.0 KiB \(what only it references: what deleting it frees\), dedup 1\.50x, compression 2\.00x`,
		s.MustCLI("volume", "show", "db").Stdout)

	out = s.MustCLI("prune", "db", "--keep-last", "1", "--dry-run").Stdout
	t.Logf("nbdvault prune db --keep-last 1 --dry-run\n%s", out)
	assert.Regexp(t, `(?m)^`+ids[0]+`\s+counted\s+\S+ \S+\s+64\.0 KiB\s+would remove\s+no rule keeps it$`, out)
	assert.Regexp(t, `USED as of the last gc, \d+s ago: the snapshots to remove use 64\.0 KiB alone; together they may free more \(what only they share\)\n$`, out)

	m := s.Metrics()
	for _, line := range []string{`nbdvault_volume_logical_bytes{volume="db"} 262144`, `nbdvault_volume_stored_bytes{volume="db"} 147456`,
		`nbdvault_repository_shared_bytes 0`, `nbdvault_repository_stored_bytes 147456`, `nbdvault_repository_referenced_bytes 262144`} {
		assert.True(t, strings.Contains(m, line+"\n"), "/metrics has %s", line)
	}
	assert.Regexp(t, `(?m)^nbdvault_space_counted_timestamp_seconds \S+$`, m)

	out = s.MustCLI("snapshot", "delete", "db@counted").Stdout
	t.Logf("nbdvault snapshot delete db@counted\n%s", out)
	assert.Regexp(t, `^deleted snapshot db@counted\nit alone used 64\.0 KiB, as of the last gc, \d+s ago: a gc frees about that once the point-in-time window no longer keeps it\n$`, out)
}
