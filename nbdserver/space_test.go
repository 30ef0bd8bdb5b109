package nbdserver

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/nbdserver/api"
	"github.com/nbdvault/nbdvault/nbdserver/volume"
)

// writeSpace puts sp where the last collection keeps its count, as
// volume.CollectGarbage does.
func writeSpace(t *testing.T, s *Server, sp volume.Space) {
	t.Helper()
	data, err := json.Marshal(sp)
	require.NoError(t, err)
	dir := filepath.Join(s.env.StateDir, "gc")
	require.NoError(t, os.MkdirAll(dir, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "space.json"), data, 0o600))
	got, err := volume.LoadSpace(s.env.StateDir)
	require.NoError(t, err)
	require.NotNil(t, got, "written where LoadSpace reads")
}

// The last collection's space figures, joined to what the API shows: a
// snapshot it counted has its USED and LREFER and their time, one taken
// since has none; a volume and the repository have their totals and
// ratios; a volume created since the count (a name reused) has none;
// /metrics has the gauges. Nothing is shown before a collection counted.
func TestSpaceShown(t *testing.T) {
	ctx := context.Background()
	cl, s := testAPI(t)
	_, err := cl.CreateVolume(ctx, api.CreateVolume{Name: "db", Size: 4 << 20})
	require.NoError(t, err)
	vol, err := s.volumeOf("db")
	require.NoError(t, err)
	require.NoError(t, vol.WriteAt(ctx, []byte("some data"), 0, false))
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var ids []string
	for _, label := range []string{"counted", "since"} {
		snap, err := cl.CreateSnapshot(ctx, "db", label)
		require.NoError(t, err)
		_, err = cl.WaitSealed(wctx, "db", snap.ID, nil)
		require.NoError(t, err)
		ids = append(ids, snap.ID)
	}

	st, err := cl.Status(ctx)
	require.NoError(t, err)
	assert.Nil(t, st.Space, "no collection counted yet")
	require.Len(t, st.Volumes, 1)
	assert.Nil(t, st.Volumes[0].Space)
	snaps, err := cl.Snapshots(ctx, "db")
	require.NoError(t, err)
	assert.Nil(t, snaps[0].Used)
	assert.NotContains(t, string(mustJSON(t, snaps)), "used", "omitted, not 0")

	counted := time.Now().UTC() // after db was created
	db := volume.SpaceTotals{Logical: 3 << 20, Written: 6 << 20, Chunks: 3, Pages: 2, Referenced: 2 << 20,
		DataStored: 1 << 20, PageStored: 8192, Journal: 4096, Stored: 1<<20 + 12288, SharesWithOthers: true}
	repo := db
	repo.Stored, repo.Shared, repo.SharesWithOthers = 5<<20, 1<<20, false
	writeSpace(t, s, volume.Space{Time: counted,
		Manifests: map[string]volume.ManifestSpace{
			volume.ManifestKey("db", volume.KindSnapshot, ids[0]):   {Used: 4096, LogicalReferenced: 3 << 20},
			volume.ManifestKey("db", volume.KindCheckpoint, ids[1]): {Used: 1, LogicalReferenced: 1}, // another kind: not this snapshot
		},
		Volumes:    map[string]volume.SpaceTotals{"db": db, "web": {Stored: 77}},
		Repository: repo,
	})
	_, err = cl.CreateVolume(ctx, api.CreateVolume{Name: "web", Size: 1 << 20}) // created after the count
	require.NoError(t, err)

	snaps, err = cl.Snapshots(ctx, "db")
	require.NoError(t, err)
	require.Len(t, snaps, 2)
	if assert.NotNil(t, snaps[0].Used) && assert.NotNil(t, snaps[0].LogicalReferenced) && assert.NotNil(t, snaps[0].SpaceAsOf) {
		assert.EqualValues(t, 4096, *snaps[0].Used)
		assert.EqualValues(t, 3<<20, *snaps[0].LogicalReferenced)
		assert.True(t, counted.Equal(*snaps[0].SpaceAsOf))
	}
	assert.Nil(t, snaps[1].Used, "taken since the count")
	assert.Nil(t, snaps[1].LogicalReferenced)
	assert.Nil(t, snaps[1].SpaceAsOf)
	one, err := cl.Snapshot(ctx, "db", "counted")
	require.NoError(t, err)
	assert.Equal(t, snaps[0], one)
	pruned, err := cl.Prune(ctx, "db", api.Prune{Policy: api.Policy{Last: 1}, DryRun: true})
	require.NoError(t, err)
	require.Len(t, pruned.Snapshots, 2)
	assert.False(t, pruned.Snapshots[1].Keep)
	if assert.NotNil(t, pruned.Snapshots[1].Used, "prune --dry-run says what a removal frees") {
		assert.EqualValues(t, 4096, *pruned.Snapshots[1].Used)
	}

	st, err = cl.Status(ctx)
	require.NoError(t, err)
	want := &api.SpaceTotals{AsOf: st.Volumes[0].Space.AsOf, Logical: 3 << 20, Written: 6 << 20, Chunks: 3, Pages: 2, Referenced: 2 << 20,
		Stored: 1<<20 + 12288, DataStored: 1 << 20, PageStored: 8192, Journal: 4096, SharesWithOthers: true, CompressionRatio: 2}
	require.Len(t, st.Volumes, 2)
	assert.Equal(t, "db", st.Volumes[0].Name)
	require.NotNil(t, st.Volumes[0].Space)
	assert.True(t, counted.Equal(st.Volumes[0].Space.AsOf))
	assert.Equal(t, want, st.Volumes[0].Space)
	assert.Nil(t, st.Volumes[1].Space, "web was created after the count: its figures are another volume's")
	want.Stored, want.Shared, want.SharesWithOthers, want.DedupRatio = 5<<20, 1<<20, false, 3
	assert.Equal(t, want, st.Space)
	v, err := cl.Volume(ctx, "db")
	require.NoError(t, err)
	assert.Equal(t, st.Volumes[0].Space, v.Space)

	var m string
	for line := range strings.Lines(scrape(t, cl, s)) {
		if strings.HasPrefix(line, "nbdvault_volume_logical") || strings.HasPrefix(line, "nbdvault_volume_stored") || strings.HasPrefix(line, "nbdvault_repository_shared") ||
			strings.HasPrefix(line, "nbdvault_repository_stored") || strings.HasPrefix(line, "nbdvault_repository_referenced") || strings.HasPrefix(line, "nbdvault_space") {
			m += line
		}
	}
	for _, line := range []string{
		`nbdvault_volume_logical_bytes{volume="db"} 3.145728e+06`,
		`nbdvault_volume_stored_bytes{volume="db"} 1.060864e+06`,
		`nbdvault_repository_shared_bytes 1.048576e+06`,
		`nbdvault_repository_stored_bytes 5.24288e+06`,
		`nbdvault_repository_referenced_bytes 2.097152e+06`,
	} {
		assert.Contains(t, m, line+"\n")
	}
	assert.Contains(t, m, "nbdvault_space_counted_timestamp_seconds ")
	assert.NotContains(t, m, `nbdvault_volume_stored_bytes{volume="web"}`)
}

// withSpace finds a checkpoint under its own key, not a snapshot's.
func TestWithSpaceKind(t *testing.T) {
	sp := &volume.Space{Manifests: map[string]volume.ManifestSpace{
		"volumes/db/checkpoints/c1": {Used: 1, LogicalReferenced: 2},
		"volumes/db/snapshots/s1":   {Used: 3, LogicalReferenced: 4},
	}}
	got := withSpace(api.Snapshot{Volume: "db", ID: "c1", Kind: "checkpoint"}, sp)
	require.NotNil(t, got.Used)
	assert.EqualValues(t, 1, *got.Used)
	assert.Nil(t, withSpace(api.Snapshot{Volume: "db", ID: "c1"}, sp).Used)
	got = withSpace(api.Snapshot{Volume: "db", ID: "s1"}, sp)
	require.NotNil(t, got.LogicalReferenced)
	assert.EqualValues(t, 4, *got.LogicalReferenced)
	assert.Nil(t, withSpace(api.Snapshot{Volume: "db", ID: "s1"}, nil).Used)
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	data, err := json.Marshal(v)
	require.NoError(t, err)
	return data
}

// scrape is what the server's /metrics says now.
func scrape(t *testing.T, cl *api.Client, s *Server) string {
	t.Helper()
	req, err := http.NewRequest("GET", cl.Server()+"/metrics", nil)
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+s.token)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	return string(body)
}
