package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/nbdserver/api"
)

func ptr[T any](v T) *T { return &v }

// fields splits table lines into their columns (two spaces or more
// apart).
func fields(out string) [][]string {
	var rows [][]string
	for line := range strings.Lines(out) {
		var row []string
		for _, f := range strings.Split(strings.TrimSpace(line), "  ") {
			if f = strings.TrimSpace(f); f != "" {
				row = append(row, f)
			}
		}
		rows = append(rows, row)
	}
	return rows
}

// snapshot list: USED and LREFER of each snapshot the last gc counted,
// "-" for one it did not, and how old the figures are.
func TestPrintSnapshotsSpace(t *testing.T) {
	now := time.Date(2026, 11, 30, 18, 0, 0, 0, time.UTC)
	counted := now.Add(-12 * time.Minute)
	ss := []api.Snapshot{
		{Volume: "db", ID: "a", Label: "monday", Time: now.Add(-time.Hour), Size: 8 << 20, Sealed: true,
			Used: ptr(int64(3 << 20)), LogicalReferenced: ptr(int64(5 << 20)), SpaceAsOf: &counted},
		{Volume: "db", ID: "b", Time: now.Add(-time.Minute), Size: 8 << 20, Sealed: true},
	}
	var out bytes.Buffer
	require.NoError(t, printSnapshots(&out, ss, now))
	rows := fields(out.String())
	require.Len(t, rows, 4, out.String())
	assert.Equal(t, []string{"ID", "LABEL", "TIME", "SIZE", "USED", "LREFER", "STATE"}, rows[0])
	assert.Equal(t, []string{"a", "monday", "8.0 MiB", "3.0 MiB", "5.0 MiB", "sealed"}, append(rows[1][:2], rows[1][3:]...))
	assert.Equal(t, []string{"b", "-", "8.0 MiB", "-", "-", "sealed"}, append(rows[2][:2], rows[2][3:]...))
	assert.Equal(t, "USED and LREFER as of the last gc, 12m ago (nbdvault gc --dry-run refreshes them); "+
		"USED is what deleting that snapshot alone frees; - is not counted yet\n", strings.SplitAfter(out.String(), "\n")[3])

	out.Reset()
	require.NoError(t, printSnapshots(&out, ss[1:], now))
	assert.Contains(t, out.String(), "USED and LREFER are counted by garbage collection: not yet (nbdvault gc --dry-run counts them)")
	out.Reset()
	require.NoError(t, printSnapshots(&out, nil, now))
	assert.Equal(t, "ID  LABEL  TIME  SIZE  USED  LREFER  STATE\n", out.String(), "no snapshots, no footer")
}

// status: logical, stored, unique and the ratios per volume and for the
// repository, "-" for a volume not counted, and their age.
func TestPrintSpace(t *testing.T) {
	now := time.Date(2026, 11, 30, 18, 0, 0, 0, time.UTC)
	counted := now.Add(-3*time.Hour - 5*time.Minute)
	db := &api.SpaceTotals{AsOf: counted, Logical: 3 << 30, Stored: 1 << 30, DedupRatio: 2.5, CompressionRatio: 1.75}
	img := &api.SpaceTotals{AsOf: counted, Logical: 1 << 30, Stored: 1 << 20, SharesWithOthers: true, CompressionRatio: 1.25}
	repo := &api.SpaceTotals{AsOf: counted, Logical: 4 << 30, Stored: 2 << 30, Shared: 512 << 20, DedupRatio: 2, CompressionRatio: 1.5}
	var out bytes.Buffer
	require.NoError(t, printSpace(&out, []api.Volume{{Name: "db", Space: db}, {Name: "img", Space: img}, {Name: "web"}}, repo, now))
	rows := fields(out.String())
	require.Len(t, rows, 7, out.String())
	assert.Equal(t, []string{"SPACE", "LOGICAL", "STORED", "SHARED", "DEDUP", "COMPRESSION"}, rows[0])
	assert.Equal(t, []string{"db", "3.0 GiB", "1.0 GiB", "-", "2.50x", "1.75x"}, rows[1])
	assert.Equal(t, []string{"img", "1.0 GiB", "1.0 MiB", "-", "-*", "1.25x"}, rows[2])
	assert.Equal(t, []string{"web", "-", "-", "-", "-", "-"}, rows[3])
	assert.Equal(t, []string{"repository", "4.0 GiB", "2.0 GiB", "512.0 MiB", "2.00x", "1.50x"}, rows[4])
	lines := strings.SplitAfter(out.String(), "\n")
	assert.Equal(t, "space as of the last gc, 3h05m ago (nbdvault gc --dry-run refreshes it); a volume's STORED is what only it references: what deleting it frees; SHARED is what several volumes reference\n", lines[5])
	assert.Equal(t, "* shares data with other volumes: its dedup ratio is not known; see the repository's\n", lines[6])

	out.Reset()
	require.NoError(t, printSpace(&out, []api.Volume{{Name: "db"}}, nil, now))
	assert.Equal(t, "space: not counted yet (nbdvault gc --dry-run counts it)\n", out.String())
}

func TestAge(t *testing.T) {
	now := time.Date(2026, 11, 30, 18, 0, 0, 0, time.UTC)
	for d, want := range map[time.Duration]string{
		-time.Minute: "0s", 0: "0s", 42 * time.Second: "42s", 12*time.Minute + 59*time.Second: "12m",
		3*time.Hour + 5*time.Minute: "3h05m", 47 * time.Hour: "47h00m", 9 * 24 * time.Hour: "9d",
	} {
		assert.Equal(t, want, age(now.Add(-d), now), "%v", d)
	}
}
