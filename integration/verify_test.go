package integration

import (
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// TestVerify damages and deletes random data chunks of a local
// repository under the real binary: verify finds every one (the deleted
// ones without reading data, all with --read-data), names the snapshots
// they hold, exits 7, and status keeps the result.
func TestVerify(t *testing.T) {
	s := servertest.Start(t, servertest.Options{Args: []string{"--journal-retention", "0"}})
	s.MustCLI("volume", "create", "db", "--size", "4M", "--chunk-size", "64K")
	var snaps []string
	for i := range 3 {
		writeNBD(t, s, "db", nbdtest.RandomBytes(uint64(i+20), 1<<20), int64(i)<<20)
		snaps = append(snaps, strings.TrimSpace(s.MustCLI("snapshot", "create", "db", "--wait").Stdout))
	}
	assert.NotContains(t, s.Metrics(), "nbdvault_verify_last", "no verify yet")
	r := s.CLI("verify")
	require.Equal(t, 0, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stdout, "no damage found")
	assert.Contains(t, s.Metrics(), "nbdvault_verify_last_problems 0")
	assert.Contains(t, r.Stdout, "checked 3 snapshots and checkpoints")

	var files []string
	require.NoError(t, filepath.WalkDir(filepath.Join(s.Data, "repo", "chunks"), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || strings.HasPrefix(d.Name(), ".") {
			return err
		}
		// Data chunks only: 64 KiB of random bytes stay over 60 KiB
		// stored, an index page of few IDs is a few KiB. (A damaged page
		// hides the chunks below it, which verify then cannot name; it
		// names the page and the range it covers.)
		if fi, err := d.Info(); err == nil && fi.Size() > 60<<10 {
			files = append(files, p)
		}
		return nil
	}))
	seed := uint64(time.Now().UnixNano())
	rnd := rand.New(rand.NewPCG(seed, 1))
	rnd.Shuffle(len(files), func(i, j int) { files[i], files[j] = files[j], files[i] })
	const n = 6
	deleted, damaged := map[string]bool{}, map[string]bool{}
	for i, f := range files[:n] {
		key := "chunks/" + filepath.Base(filepath.Dir(f)) + "/" + filepath.Base(f)
		if i%2 == 0 {
			require.NoError(t, os.Remove(f))
			deleted[key] = true
			continue
		}
		data, err := os.ReadFile(f)
		require.NoError(t, err)
		data[rnd.IntN(len(data))] ^= 0x40
		require.NoError(t, os.WriteFile(f, data, 0o600))
		damaged[key] = true
	}
	report := func(args ...string) api.VerifyReport {
		t.Helper()
		r := s.CLI(append([]string{"verify", "--json"}, args...)...)
		require.Equal(t, 7, r.ExitCode, "damage is exit 7: %s", r)
		var rep api.VerifyReport
		require.NoError(t, json.Unmarshal([]byte(r.Stdout), &rep), "%s", r)
		return rep
	}
	found := func(rep api.VerifyReport) map[string]api.VerifyProblem {
		out := map[string]api.VerifyProblem{}
		for _, p := range rep.Problems {
			out[p.Object] = p
			assert.NotEmpty(t, p.Affects, "%s names what it holds", p.Object)
			for _, a := range p.Affects {
				assert.Equal(t, "db", a.Volume)
				assert.True(t, slices.Contains(snaps, a.Snapshot), "%s: %s is one of the snapshots", p.Object, a.Snapshot)
			}
		}
		return out
	}
	got := found(report())
	for k := range deleted {
		require.Contains(t, got, k, "verify finds the deleted %s (seed %d)", k, seed)
		assert.Equal(t, "missing", got[k].Kind)
	}
	got = found(report("--read-data"))
	for k := range deleted {
		require.Contains(t, got, k, "seed %d", seed)
	}
	for k := range damaged {
		require.Contains(t, got, k, "verify --read-data finds the damaged %s (seed %d)", k, seed)
		assert.Equal(t, "damaged", got[k].Kind)
	}
	r = s.CLI("verify", "db@"+snaps[2], "--read-data") // the last holds every chunk written
	assert.Equal(t, 7, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, "damaged or missing objects")

	var st api.Status
	require.NoError(t, json.Unmarshal([]byte(s.MustCLI("status", "--json").Stdout), &st))
	require.NotNil(t, st.LastVerify, "status keeps the last verify")
	assert.NotEmpty(t, st.LastVerify.Problems)
	assert.Equal(t, []string{"db@" + snaps[2]}, st.LastVerify.Targets)
	metrics := s.Metrics()
	assert.Regexp(t, `nbdvault_verify_last_problems [1-9]`, metrics)
	assert.Contains(t, metrics, "nbdvault_verify_last_run_timestamp_seconds")
}
