package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/client"
	"github.com/nbdvault/nbdvault/integration/miniotest"
	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// The CLI's documented exit codes (docs/cli.md).
const (
	exitUsage       = 2
	exitNotFound    = 3
	exitAuth        = 4
	exitUnreachable = 5
	exitConflict    = 6
)

// TestCLIErrors: each kind of mistake gets its one-line message and its
// exit code.
func TestCLIErrors(t *testing.T) {
	s := servertest.Start(t, servertest.Options{})
	s.MustCLI("volume", "create", "web", "--size", "16M")

	r := s.CLI()
	assert.Equal(t, 0, r.ExitCode, "nbdvault alone prints help: %s", r)
	assert.Contains(t, r.Stdout, "USAGE")

	cases := []struct {
		name string
		args []string
		env  []string
		code int
		msg  string
	}{
		{"wrong token", []string{"volume", "list"}, []string{"NBDVAULT_TOKEN=0123456789abcdef0123"}, exitAuth, "refused the token"},
		{"unknown volume", []string{"volume", "show", "db"}, nil, exitNotFound, `volume "db": no such volume (volumes: web)`},
		{"unknown snapshot", []string{"snapshot", "delete", "web@nope"}, nil, exitNotFound, `snapshot "nope" of volume "web"`},
		{"malformed size", []string{"volume", "create", "db", "--size", "12Q"}, nil, exitUsage, `size "12Q"`},
		{"missing size", []string{"volume", "create", "db"}, nil, exitUsage, "--size is required"},
		{"bad name", []string{"volume", "create", "a/b", "--size", "1M"}, nil, exitUsage, "volume name"},
		{"exists", []string{"volume", "create", "web", "--size", "1M"}, nil, exitConflict, "already exists"},
		{"shrink", []string{"volume", "resize", "web", "--size", "1M"}, nil, exitUsage, "grow but not shrink"},
		{"not VOL@SNAP", []string{"snapshot", "delete", "web"}, nil, exitUsage, "want VOLUME@SNAPSHOT"},
		{"unknown flag", []string{"volume", "list", "--colour"}, nil, exitUsage, "colour"},
		{"unknown command", []string{"volum", "list"}, nil, exitUsage, `nbdvault: no command "volum"`},
		{"unknown subcommand", []string{"volume", "lst"}, nil, exitUsage, `nbdvault volume: no command "lst"`},
		{"unreachable", []string{"status"}, []string{"NBDVAULT_SERVER=http://127.0.0.1:1"}, exitUnreachable, "cannot reach the nbdvault server at http://127.0.0.1:1"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := nbdtest.RunEnv(t, time.Minute, append(s.Env(), c.env...), servertest.Binary(t), c.args...)
			assert.Equal(t, c.code, r.ExitCode, "%s", r)
			assert.Contains(t, r.Stderr, c.msg, "%s", r)
			assert.Equal(t, 1, strings.Count(strings.TrimSpace(r.Stderr), "\n")+1, "one line: %s", r)
		})
	}

	// The token file is the server's secret: 0600.
	fi, err := os.Stat(filepath.Join(s.Data, "admin-token"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	// Without the token nothing answers, /metrics included.
	for _, path := range []string{"/v1/status", "/v1/volumes", "/metrics"} {
		resp, err := http.Get(s.Admin + path)
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, http.StatusUnauthorized, resp.StatusCode, path)
	}
}

// TestServeVolumeLifecycle drives a server with the CLI and a client over
// NBD, on a local repository and on MinIO: create, write, snapshot and
// --wait, list, grow, restart, delete; /metrics shows the traffic.
func TestServeVolumeLifecycle(t *testing.T) {
	for _, repo := range []string{"local", "minio"} {
		t.Run(repo, func(t *testing.T) {
			var opts servertest.Options
			if repo == "minio" {
				m := miniotest.StartShared(t)
				opts.Repo, opts.Env = m.Location("lifecycle-"+fmt.Sprint(time.Now().UnixNano())), m.Env()
			}
			s := servertest.Start(t, opts)
			s.MustCLI("volume", "create", "db", "--size", "8M", "--chunk-size", "64K")
			data := nbdtest.RandomBytes(1, 3<<20)
			writeNBD(t, s, "db", data, 1<<20)

			id := strings.TrimSpace(s.MustCLI("snapshot", "create", "db", "--label", "first", "--wait").Stdout)
			require.Regexp(t, `^\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{12}$`, id)
			var snaps []api.Snapshot
			require.NoError(t, json.Unmarshal([]byte(s.MustCLI("snapshot", "list", "db", "--json").Stdout), &snaps))
			require.Len(t, snaps, 1)
			assert.Equal(t, api.Snapshot{Volume: "db", ID: id, Label: "first", Time: snaps[0].Time, Size: 8 << 20, Sealed: true}, snaps[0])

			// Writes after the snapshot are not in it.
			writeNBD(t, s, "db", bytes.Repeat([]byte{7}, 1<<20), 0)
			want := make([]byte, 8<<20)
			copy(want[1<<20:], data)
			assert.True(t, bytes.Equal(want, readNBD(t, s, "db@first")), "db@first holds what was written before it")
			assert.True(t, bytes.Equal(want, readNBD(t, s, "db@"+id)), "by ID too")

			s.MustCLI("volume", "resize", "db", "--size", "16M")
			var v api.Volume
			require.NoError(t, json.Unmarshal([]byte(s.MustCLI("volume", "show", "db", "--json").Stdout), &v))
			assert.Equal(t, int64(16<<20), v.Size)
			require.NotNil(t, v.Status)
			assert.Equal(t, id, v.Status.LastSealedSnapshot)

			metrics := s.Metrics()
			assert.Regexp(t, `nbdvault_nbd_bytes_total\{export="db",op="write"\} [1-9]`, metrics)
			assert.Regexp(t, `nbdvault_chunks_stored_total [1-9]`, metrics)
			assert.Contains(t, metrics, `nbdvault_volume_size_bytes{volume="db"} 1.6777216e+07`)
			for _, m := range []string{"journal_deltas", "journal_packs", "journal_bytes_shipped_total", "chunks_folded_total"} {
				assert.Contains(t, metrics, `nbdvault_volume_`+m+`{volume="db"}`)
			}

			// A restart keeps everything: the head (from the log), the
			// sealed snapshot, the new size.
			require.Equal(t, 0, s.Stop(), s.Log())
			s.Restart()
			head := readNBD(t, s, "db")
			require.Len(t, head, 16<<20)
			copy(want, bytes.Repeat([]byte{7}, 1<<20))
			assert.True(t, bytes.Equal(want, head[:8<<20]))
			assert.True(t, allZero(head[8<<20:]), "what grew reads as zeros")
			assert.Len(t, readNBD(t, s, "db@first"), 8<<20, "the snapshot keeps its size")

			s.MustCLI("snapshot", "delete", "db@first")
			r := s.CLI("snapshot", "list", "db")
			assert.NotContains(t, r.Stdout, id)
			s.MustCLI("volume", "delete", "db")
			r = s.CLI("volume", "show", "db")
			assert.Equal(t, exitNotFound, r.ExitCode, "%s", r)
			assert.Contains(t, r.Stderr, "there are no volumes")
		})
	}
}

// TestSecondServerRefused: one server per repository; the second names the
// first, and may start once the first has stopped.
func TestSecondServerRefused(t *testing.T) {
	repo := filepath.Join(t.TempDir(), "repo")
	a := servertest.Start(t, servertest.Options{Repo: repo})
	host, _ := os.Hostname()

	bin := servertest.Binary(t)
	r := nbdtest.Run(t, time.Minute, bin, "serve", "--data", t.TempDir(), "--repo", repo,
		"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0")
	assert.Equal(t, 1, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, "cannot start")
	assert.Contains(t, r.Stderr, host)
	assert.Contains(t, r.Stderr, fmt.Sprint(a.PID()), "names the holder's pid: %s", r)
	before, err := os.ReadFile(filepath.Join(a.Data, "state", "holders"))
	require.NoError(t, err)
	r = nbdtest.Run(t, time.Minute, bin, "serve", "--data", a.Data, "--repo", repo,
		"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0")
	assert.Equal(t, 1, r.ExitCode, "%s", r)
	after, err := os.ReadFile(filepath.Join(a.Data, "state", "holders"))
	require.NoError(t, err)
	assert.Equal(t, string(before), string(after), "a refused start leaves no holder ID behind")

	require.Equal(t, 0, a.Stop())
	b := servertest.Start(t, servertest.Options{Repo: repo})
	b.MustCLI("status")
}

// writeNBD writes p at off of export through our NBD client.
func writeNBD(t *testing.T, s *servertest.Server, export string, p []byte, off int64) {
	t.Helper()
	c, err := client.Dial(t.Context(), s.NBD, client.Options{Export: export})
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.WriteAt(t.Context(), p, off, false))
	require.NoError(t, c.Flush(t.Context()))
}

// readNBD reads a whole export.
func readNBD(t *testing.T, s *servertest.Server, export string) []byte {
	t.Helper()
	c, err := client.Dial(t.Context(), s.NBD, client.Options{Export: export})
	require.NoError(t, err)
	defer c.Close()
	p := make([]byte, c.Size())
	require.NoError(t, c.ReadAt(t.Context(), p, 0))
	return p
}

func allZero(p []byte) bool { return bytes.Count(p, []byte{0}) == len(p) }

// TestServeUnreachableRepository: a repository that cannot be reached
// stops the start with an error that names it and says what to check.
func TestServeUnreachableRepository(t *testing.T) {
	r := nbdtest.Run(t, 2*time.Minute, servertest.Binary(t), "serve", "--data", t.TempDir(),
		"--repo", "s3://bucket/prefix?endpoint=127.0.0.1:1&tls=false", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0")
	assert.Equal(t, 1, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, "cannot start: repository s3://bucket/prefix", "%s", r)
	assert.Contains(t, r.Stderr, "check that the object store is up", "%s", r)
}

// TestStateFolderBelongsToItsRepository: write logs are never replayed
// into another repository's volumes.
func TestStateFolderBelongsToItsRepository(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	s := servertest.Start(t, servertest.Options{Data: data})
	s.MustCLI("volume", "create", "web", "--size", "1M")
	require.Equal(t, 0, s.Stop())

	other := filepath.Join(t.TempDir(), "other-repo")
	r := nbdtest.Run(t, time.Minute, servertest.Binary(t), "serve", "--data", data, "--repo", other,
		"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0")
	assert.Equal(t, 1, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, "holds the write logs of repository", "%s", r)
	assert.Contains(t, r.Stderr, "--data", "says what to do: %s", r)

	s.Restart() // its own repository still starts
	s.MustCLI("volume", "show", "web")
}
