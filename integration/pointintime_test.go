package integration

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/miniotest"
	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
)

// TestPointInTime writes a known sequence through qemu-io, noting the time
// after each step reached the repository, then reads VOL@TIME for each
// time with nbdcopy (and once with nbdvault restore), before and after a
// restart, on a local repository and on MinIO: each reads exactly what
// the volume held then. Times before the oldest point kept and in the
// future are refused.
func TestPointInTime(t *testing.T) {
	t.Run("local", func(t *testing.T) {
		testPointInTime(t, servertest.Options{Repo: filepath.Join(t.TempDir(), "repo")})
	})
	t.Run("minio", func(t *testing.T) {
		m := miniotest.StartShared(t)
		testPointInTime(t, servertest.Options{Repo: m.Location(fmt.Sprint("pit-", time.Now().UnixNano())), Env: m.Env()})
	})
}

func testPointInTime(t *testing.T, opts servertest.Options) {
	const mib = 1 << 20
	opts.Args = append(opts.Args, "--checkpoint-interval", "300ms")
	s := servertest.Start(t, opts)
	s.MustCLI("volume", "create", "db", "--size", "8M", "--chunk-size", "64K")
	type point struct {
		at   time.Time
		data []byte
	}
	var points []point
	want := make([]byte, 8*mib)
	for i := range 6 {
		// A scattered write, a rewrite of the first block, and a zeroed
		// range: each point differs from the one before in all three.
		b := byte(0x10 + i)
		off := (i*1237 + 3) % 7 * mib
		qemuIOOK(t, s.URI("db"),
			fmt.Sprintf("write -P 0x%02x %d 96k", b, off),
			fmt.Sprintf("write -P 0x%02x 0 4k", b+0x40),
			fmt.Sprintf("write -z %d 8k", (i+1)*mib-4096),
			"flush")
		copy(want[off:off+96<<10], bytes.Repeat([]byte{b}, 96<<10))
		copy(want[:4096], bytes.Repeat([]byte{b + 0x40}, 4096))
		clear(want[(i+1)*mib-4096 : (i+1)*mib+4096])
		waitSealed(t, s, "db")
		points = append(points, point{at: time.Now(), data: bytes.Clone(want)})
		time.Sleep(20 * time.Millisecond)
	}
	read := func(what string) {
		for i, p := range points {
			export := "db@" + p.at.UTC().Format(time.RFC3339Nano)
			got, r := nbdcopyOut(t, s.URI(export))
			require.NotNil(t, got, "%s: %s", what, r)
			nbdtest.SameBytes(t, p.data, got, fmt.Sprintf("%s: point %d, %s", what, i, export))
		}
		before := "db@" + points[0].at.Add(-time.Hour).UTC().Format(time.RFC3339)
		_, r := nbdcopyOut(t, s.URI(before))
		assert.False(t, r.OK(), "%s: a time before the volume was written has no point: %s", what, r)
		r = s.CLI("restore", before, "--to", filepath.Join(t.TempDir(), "x.img"))
		assert.False(t, r.OK())
		assert.Contains(t, r.Stderr, "no point in time kept for it")
		future := "db@" + time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
		_, r = nbdcopyOut(t, s.URI(future))
		assert.False(t, r.OK(), "%s: a time in the future has no point: %s", what, r)
	}
	read("served")

	// The restore command takes a time, and says what it restored.
	out := filepath.Join(t.TempDir(), "restored.img")
	at := points[2].at.UTC().Format(time.RFC3339Nano)
	r := s.MustCLI("restore", "db@"+at, "--to", out)
	assert.Contains(t, r.Stdout, "the volume at ")
	got, err := os.ReadFile(out)
	require.NoError(t, err)
	nbdtest.SameBytes(t, points[2].data, got, "nbdvault restore db@"+at)
	st := volumeStatus(t, s, "db").Status
	require.NotNil(t, st.PointsInTimeFrom)
	assert.False(t, st.PointsInTimeFrom.After(points[0].at), "the window starts at or before the first point: %s", st.PointsInTimeFrom)

	// A point kept as a snapshot: listed, and read by its label.
	r = s.MustCLI("snapshot", "create", "db", "--from", points[3].at.UTC().Format(time.RFC3339Nano), "--label", "keep")
	id := strings.TrimSpace(r.Stdout)
	assert.Contains(t, s.MustCLI("snapshot", "list", "db").Stdout, id)
	got, r2 := nbdcopyOut(t, s.URI("db@keep"))
	require.NotNil(t, got, "%s", r2)
	nbdtest.SameBytes(t, points[3].data, got, "db@keep, kept from a point in time")
	r = s.CLI("snapshot", "create", "db", "--from", points[0].at.Add(-time.Hour).UTC().Format(time.RFC3339))
	assert.Equal(t, exitNotFound, r.ExitCode, "a time with no point: %s", r)
	// A delete takes a snapshot's name, never a time (which would find
	// whatever snapshot lies before it).
	r = s.CLI("snapshot", "delete", "db@"+points[3].at.UTC().Format(time.RFC3339Nano)) // resolves to the kept point
	assert.Equal(t, exitUsage, r.ExitCode, "%s", r)
	assert.Contains(t, s.MustCLI("snapshot", "list", "db").Stdout, id, "the kept point is still there")

	// Kept in the repository: a restart reads the same times.
	require.Equal(t, 0, s.Stop())
	s.Restart()
	read("after a restart")
}

// waitSealed waits until the repository holds every write volume vol has
// acknowledged.
func waitSealed(t *testing.T, s *servertest.Server, vol string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		st := volumeStatus(t, s, vol).Status
		if st.LagSeconds == 0 && st.PendingSnapshots == 0 {
			return
		}
		require.True(t, time.Now().Before(deadline), "volume %s not sealed within a minute: %+v", vol, st)
		time.Sleep(50 * time.Millisecond)
	}
}
