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

// damageChunkFile flips a byte of a random data chunk file of the local
// repository under data and returns its key.
func damageChunkFile(t *testing.T, data string, rnd *rand.Rand) string {
	t.Helper()
	var files []string
	require.NoError(t, filepath.WalkDir(filepath.Join(data, "repo", "chunks"), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || strings.HasPrefix(d.Name(), ".") {
			return err
		}
		if fi, err := d.Info(); err == nil && fi.Size() > 60<<10 { // data chunks, not pages
			files = append(files, p)
		}
		return nil
	}))
	require.NotEmpty(t, files)
	f := files[rnd.IntN(len(files))]
	b, err := os.ReadFile(f)
	require.NoError(t, err)
	b[rnd.IntN(len(b))] ^= 0x40
	require.NoError(t, os.WriteFile(f, b, 0o600))
	return "chunks/" + filepath.Base(filepath.Dir(f)) + "/" + filepath.Base(f)
}

// TestVerifySubsetRotates: four runs of --read-data-subset 25% under the
// real binary read consecutive quarters of the ID space, from where the
// last run stopped (kept across a restart), and so every chunk and
// journal frame once; a damaged chunk is found by exactly one of them.
// Bad subsets are refused with exit 2 and a message saying what is
// wanted.
func TestVerifySubsetRotates(t *testing.T) {
	s := servertest.Start(t, servertest.Options{Args: []string{"--journal-retention", "0"}})
	s.MustCLI("volume", "create", "db", "--size", "4M", "--chunk-size", "64K")
	writeNBD(t, s, "db", nbdtest.RandomBytes(7, 4<<20), 0)
	s.MustCLI("snapshot", "create", "db", "--wait")
	for i := range int64(40) { // scattered: journal frames
		writeNBD(t, s, "db", nbdtest.RandomBytes(uint64(100+i), 4096), i*100<<10)
	}
	s.MustCLI("snapshot", "create", "db", "--wait")

	for in, why := range map[string]string{"0%": "more than 0%", "101%": "at most 100%", "ten%": "want N%", "3/2": "want N%"} {
		r := s.CLI("verify", "--read-data-subset", in)
		assert.Equal(t, 2, r.ExitCode, "%s: %s", in, r)
		assert.Contains(t, r.Stderr, why, in)
	}

	var all api.VerifyReport
	require.NoError(t, json.Unmarshal([]byte(s.MustCLI("verify", "--read-data", "--json").Stdout), &all))
	require.Empty(t, all.Problems)
	require.Greater(t, all.Frames, 0, "the scattered writes are journal")

	seed := uint64(time.Now().UnixNano())
	damaged := damageChunkFile(t, s.Data, rand.New(rand.NewPCG(seed, 2)))
	found, read, frames := 0, 0, 0
	to := "0000000000000000"
	for i := range 4 {
		if i == 2 {
			require.Equal(t, 0, s.Stop())
			s.Restart() // the position is kept in the state folder
		}
		r := s.CLI("verify", "--read-data-subset", "25%", "--json")
		require.Contains(t, []int{0, 7}, r.ExitCode, "%s", r)
		var rep api.VerifyReport
		require.NoError(t, json.Unmarshal([]byte(r.Stdout), &rep), "%s", r)
		require.NotNil(t, rep.Range)
		assert.Equal(t, to, rep.Range.From, "run %d starts where the last one stopped", i)
		assert.InDelta(t, float64(i)*25, rep.Range.FromPercent, 0.001)
		to = rep.Range.To
		read += rep.Read
		frames += rep.FramesRead
		for _, p := range rep.Problems {
			assert.Equal(t, damaged, p.Object, "seed %d", seed)
			found++
		}
		assert.Equal(t, len(rep.Problems) > 0, r.ExitCode == 7)
	}
	assert.Equal(t, "0000000000000000", to, "four quarters come round")
	assert.Equal(t, all.Chunks, read, "every chunk read once")
	assert.Equal(t, all.Frames, frames, "every journal frame read once")
	assert.Equal(t, 1, found, "one run finds the damaged chunk (seed %d)", seed)
	// A fifth run reads the first quarter again: exit 7 when the damaged
	// chunk is in it (its ID starts below 4), 0 when not.
	r := s.CLI("verify", "--read-data-subset", "25%")
	assert.Equal(t, map[bool]int{true: 7, false: 0}[damaged < "chunks/40/"], r.ExitCode, "%s", r)
	assert.Contains(t, r.Stdout, "read the data whose IDs start from 0000000000000000 up to 4000000000000000 (0% to 25% of the ID space)")
}

// TestVerifyEvery: serve --verify-every runs verifies on its own and
// records them as a manual run does (status, /metrics), each reading the
// next part of the data with --verify-read-data-subset; a damaged chunk
// is logged with what to do; the server stops cleanly. A schedule with
// an n/m subset, or a subset without a schedule, is refused at start.
func TestVerifyEvery(t *testing.T) {
	s := servertest.Start(t, servertest.Options{Args: []string{"--journal-retention", "0",
		"--verify-every", "2s", "--verify-read-data-subset", "50%"}})
	for _, bad := range [][]string{
		{"serve", "--verify-every", "1h", "--verify-read-data-subset", "1/10"},
		{"serve", "--verify-read-data-subset", "10%"},
		{"serve", "--verify-every", "1h", "--verify-read-data-subset", "0%"},
	} {
		r := s.CLI(bad...)
		assert.Equal(t, 2, r.ExitCode, "%v: %s", bad, r)
		assert.Contains(t, r.Stderr, "--verify-every, --verify-read-data-subset", "%v", bad)
	}
	s.MustCLI("volume", "create", "db", "--size", "2M", "--chunk-size", "64K")
	writeNBD(t, s, "db", nbdtest.RandomBytes(9, 2<<20), 0)
	s.MustCLI("snapshot", "create", "db", "--wait")

	// wait returns the first scheduled run after since that satisfies ok.
	wait := func(since time.Time, ok func(*api.VerifyReport) bool) *api.VerifyReport {
		t.Helper()
		deadline := time.Now().Add(3 * time.Minute) // a busy machine
		for {
			var st api.Status
			require.NoError(t, json.Unmarshal([]byte(s.MustCLI("status", "--json").Stdout), &st))
			if v := st.LastVerify; v != nil && v.Scheduled && v.Time.After(since) && ok(v) {
				return v
			}
			if time.Now().After(deadline) {
				t.Fatalf("no scheduled verify recorded since %s; last: %+v\nserver log:\n%s", since, st.LastVerify, s.Log())
			}
			time.Sleep(500 * time.Millisecond)
		}
	}
	start := time.Now()
	first := wait(start, func(v *api.VerifyReport) bool { return v.Manifests > 0 })
	assert.Empty(t, first.Problems)
	assert.Equal(t, "50%", first.Subset)
	require.NotNil(t, first.Range)
	second := wait(first.Time, func(*api.VerifyReport) bool { return true })
	require.NotNil(t, second.Range)
	assert.Equal(t, first.Range.To, second.Range.From, "each run reads the next half")
	assert.Equal(t, first.Chunks, first.Read+second.Read, "two halves read every chunk")
	assert.Contains(t, s.Metrics(), "nbdvault_verify_last_problems 0")
	assert.Contains(t, s.MustCLI("status").Stdout, "(scheduled, structure and data subset 50%")

	// A missing chunk: the next structure check finds it.
	var key string
	require.NoError(t, filepath.WalkDir(filepath.Join(s.Data, "repo", "chunks"), func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && key == "" {
			if fi, err := d.Info(); err == nil && fi.Size() > 60<<10 {
				key = "chunks/" + filepath.Base(filepath.Dir(p)) + "/" + d.Name()
				return os.Remove(p)
			}
		}
		return err
	}))
	require.NotEmpty(t, key)
	now := time.Now()
	bad := wait(now, func(v *api.VerifyReport) bool { return len(v.Problems) > 0 })
	require.Len(t, bad.Problems, 1)
	assert.Equal(t, key, bad.Problems[0].Object)
	assert.Equal(t, "missing", bad.Problems[0].Kind)
	assert.Regexp(t, `nbdvault_verify_last_problems 1`, s.Metrics())
	assert.Contains(t, s.Log(), "verify found damage: restore the objects named")
	assert.Equal(t, 0, s.Stop(), "stops cleanly, a verify running or not:\n%s", s.Log())
}
