package integration

// The fault suite (issue #10): the real server, third-party clients, and
// the faults a backup host meets. docs/operations.md ("What nbdvault
// survives") records what each case proves.

import (
	"bytes"
	"encoding/json"
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
	"github.com/nbdvault/nbdvault/integration/testenv"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

const exitDamaged = 7

// qemuIO runs qemu-io commands against uri; every -c runs, and any that
// fails makes the exit status 1.
func qemuIO(t *testing.T, uri string, cmds ...string) *nbdtest.Result {
	t.Helper()
	args := []string{"-f", "raw", uri}
	if strings.Contains(uri, "@") { // a snapshot: read-only
		args = append([]string{"-r"}, args...)
	}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	return nbdtest.Run(t, cmdTimeout, nbdtest.Tool(t, "qemu-io"), args...)
}

func qemuIOOK(t *testing.T, uri string, cmds ...string) {
	t.Helper()
	r := qemuIO(t, uri, cmds...)
	if !r.OK() || strings.Contains(r.Output(), "failed") || strings.Contains(r.Output(), "error") {
		t.Fatalf("qemu-io:\n%s", r)
	}
}

func volumeStatus(t *testing.T, s *servertest.Server, name string) api.Volume {
	t.Helper()
	var v api.Volume
	r := s.CLI("volume", "show", name, "--json")
	require.True(t, r.OK(), "%s", r)
	require.NoError(t, json.Unmarshal([]byte(r.Stdout), &v))
	return v
}

// flip flips one bit of the byte at off of the file at path.
func flip(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	defer f.Close()
	b := []byte{0}
	_, err = f.ReadAt(b, off)
	require.NoError(t, err)
	b[0] ^= 0x01
	_, err = f.WriteAt(b, off)
	require.NoError(t, err)
}

// TestFaultLogDamage flips one byte of a write-log record of a running
// server: the damaged record is EIO to qemu-io, never wrong bytes; it is
// never sealed; the volume says it is damaged. After a restart the
// damaged volume is not served, the other one is, and `volume recover`
// opens it at its newest good state and names the snapshot it lost.
func TestFaultLogDamage(t *testing.T) {
	s := servertest.Start(t, servertest.Options{Args: []string{"--checkpoint-interval", "1h"}})
	s.MustCLI("volume", "create", "a", "--size", "16M")
	s.MustCLI("volume", "create", "b", "--size", "16M")
	// Records hold at most 64 KiB, so these are the first two records of
	// a's log, each 64 KiB.
	qemuIOOK(t, s.URI("a"), "write -P 0x11 0 64k", "write -P 0x22 1M 64k", "flush")
	qemuIOOK(t, s.URI("b"), "write -P 0x33 0 1M", "flush")

	seg := filepath.Join(s.Data, "state", "volumes", "a", "log", "0000000000000001.log")
	const header = 40
	flip(t, seg, header+64<<10+header+1000) // inside the second record's data

	r := qemuIO(t, s.URI("a"), "read -P 0x22 1M 64k")
	assert.False(t, r.OK(), "a damaged record must not read back: %s", r)
	assert.Contains(t, r.Output(), "Input/output error")
	assert.NotContains(t, r.Output(), "Pattern verification failed", "never wrong bytes")
	qemuIOOK(t, s.URI("a"), "read -P 0x11 0 64k", "read -P 0 64k 960k")
	qemuIOOK(t, s.URI("b"), "read -P 0x33 0 1M")

	s.MustCLI("snapshot", "create", "a", "--label", "damaged")
	deadline := time.Now().Add(time.Minute)
	for volumeStatus(t, s, "a").Status.Damaged == "" {
		require.True(t, time.Now().Before(deadline), "the seal's failure is not shown:\n%s", s.Log())
		time.Sleep(100 * time.Millisecond)
	}
	st := volumeStatus(t, s, "a").Status
	assert.Contains(t, st.Damaged, "nbdvault volume recover a")
	assert.Contains(t, st.Damaged, "CRC mismatch")
	snaps := s.MustCLI("snapshot", "list", "a", "--json").Stdout
	assert.Contains(t, snaps, `"sealed": false`, "the snapshot over damage is never sealed")
	manifests, _ := filepath.Glob(filepath.Join(s.Data, "repo", "volumes", "a", "snapshots", "*"))
	assert.Empty(t, manifests, "nothing damaged reaches the repository")

	// After a restart the damage is found on replay: a is not served, b
	// is, and the server runs.
	require.Equal(t, 0, s.Stop())
	s.Restart()
	assert.Contains(t, s.Log(), "volume not served")
	list := s.MustCLI("volume", "list").Stdout
	assert.Regexp(t, `a .*DAMAGED: not served: .*CRC mismatch`, list)
	qemuIOOK(t, s.URI("b"), "read -P 0x33 0 1M")
	r = s.CLI("snapshot", "create", "a")
	assert.Equal(t, exitDamaged, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, "nbdvault volume recover a")
	assert.False(t, qemuIO(t, s.URI("a"), "read 0 4k").OK(), "a damaged volume is not exported")

	r = s.MustCLI("volume", "recover", "a")
	assert.Contains(t, r.Stdout, "cut at record 2")
	assert.Contains(t, r.Stdout, "lost snapshot:")
	assert.Contains(t, r.Stdout, "(damaged)")
	qemuIOOK(t, s.URI("a"), "read -P 0x11 0 64k", "read -P 0 64k 16320k")
	assert.Empty(t, volumeStatus(t, s, "a").Status.Damaged)
	s.MustCLI("snapshot", "create", "a", "--label", "good", "--wait")
	r = s.MustCLI("volume", "recover", "a")
	assert.Contains(t, r.Stdout, "no damage")
}

// nbdcopyOut copies an export into a file with nbdcopy and returns its
// bytes.
func nbdcopyOut(t *testing.T, uri string) ([]byte, *nbdtest.Result) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "copy.img")
	r := nbdtest.Run(t, cmdTimeout, nbdtest.Tool(t, "nbdcopy"), uri, out)
	if !r.OK() {
		return nil, r
	}
	data, err := os.ReadFile(out)
	require.NoError(t, err)
	return data, r
}

func serverStatus(t *testing.T, s *servertest.Server) api.Status {
	t.Helper()
	var st api.Status
	r := s.CLI("status", "--json")
	require.True(t, r.OK(), "the server must answer through the outage: %s\n%s", r, s.Log())
	require.NoError(t, json.Unmarshal([]byte(r.Stdout), &st))
	return st
}

// TestFaultS3Outage stops MinIO (SIGSTOP) for three lease TTLs while
// qemu-io writes and flushes, then kills it for two more, then starts it
// again: no write fails, reads of data only the repository holds fail within
// --repo-timeout instead of hanging, the server stays up and says the
// repository is unreachable, and once MinIO is back every snapshot is
// sealed and every byte reads back as written (nbdcopy).
func TestFaultS3Outage(t *testing.T) {
	const (
		mib         = 1 << 20
		size        = 32 * mib
		ttl         = 6 * time.Second
		repoTimeout = 3 * time.Second
	)
	m := miniotest.Start(t)
	s := servertest.Start(t, servertest.Options{Repo: m.Location("outage"), Env: m.Env(), Args: []string{
		"--lease-ttl", ttl.String(), "--repo-timeout", repoTimeout.String(), "--checkpoint-interval", "1s", "--cache", "1M"}})
	s.MustCLI("volume", "create", "db", "--size", "32M", "--chunk-size", "64K")
	want := make([]byte, size)
	fill := func(off, n int, b byte) {
		for i := off; i < off+n; i++ {
			want[i] = b
		}
	}
	qemuIOOK(t, s.URI("db"), "write -P 0x11 0 16M", "flush")
	fill(0, 16*mib, 0x11)
	s.MustCLI("snapshot", "create", "db", "--label", "before", "--wait")
	before := bytes.Clone(want)

	m.Pause()
	outage := time.Now()
	writes := 0
	var during []byte
	for time.Since(outage) < 3*ttl {
		off := 16*mib + (writes%16)*mib
		b := byte(0x20 + writes%64)
		qemuIOOK(t, s.URI("db"), fmt.Sprintf("write -P 0x%02x %d 1M", b, off), "flush",
			fmt.Sprintf("read -P 0x%02x %d 1M", b, off))
		fill(off, mib, b)
		writes++
		if writes == 4 {
			s.MustCLI("snapshot", "create", "db", "--label", "during")
			during = bytes.Clone(want)
		}
	}
	// Sealed data that is not in the cache: only the repository has it.
	start := time.Now()
	r := qemuIO(t, s.URI("db@before"), "read -P 0x11 8M 1M")
	took := time.Since(start)
	assert.False(t, r.OK(), "MinIO is stopped: the read cannot succeed: %s", r)
	assert.NotContains(t, r.Output(), "Pattern verification failed")
	assert.Less(t, took, repoTimeout+20*time.Second, "a read of repository data fails in bounded time, not after the outage")
	st := serverStatus(t, s)
	assert.False(t, st.RepositoryState.Reachable, "status says the repository is unreachable: %+v", st.RepositoryState)
	assert.True(t, st.RepositoryState.UploadsPaused, "and that uploads are paused: %+v", st.RepositoryState)
	assert.Positive(t, st.RepositoryState.PendingBytes)
	assert.Contains(t, s.MustCLI("status").Stdout, "UNREACHABLE since")
	r = s.CLI("volume", "create", "late", "--size", "1M")
	assert.False(t, r.OK(), "a change that writes the repository fails at once: %s", r)
	assert.Contains(t, r.Stderr, "try again once `nbdvault status` shows it reachable")

	t.Logf("a read of repository data failed after %s", took.Round(time.Millisecond))

	// Then the store is gone (connections refused) for two more TTLs.
	m.Kill()
	for killed := time.Now(); time.Since(killed) < 2*ttl; {
		off := 16*mib + (writes%16)*mib
		b := byte(0x20 + writes%64)
		qemuIOOK(t, s.URI("db"), fmt.Sprintf("write -P 0x%02x %d 1M", b, off), "flush")
		fill(off, mib, b)
		writes++
	}
	assert.False(t, serverStatus(t, s).RepositoryState.Reachable)
	m.Restart()
	t.Logf("%d writes and flushes through an outage of %s (MinIO stopped, then killed), all acknowledged", writes, time.Since(outage).Round(time.Second))
	s.MustCLI("snapshot", "create", "db", "--label", "after", "--wait")
	st = serverStatus(t, s)
	assert.True(t, st.RepositoryState.Reachable)
	assert.False(t, st.RepositoryState.UploadsPaused)
	assert.NotContains(t, s.Log(), "lost to another server")
	for _, c := range []struct {
		export string
		want   []byte
	}{{"db@before", before}, {"db@during", during}, {"db@after", want}} {
		got, r := nbdcopyOut(t, s.URI(c.export))
		require.NotNil(t, got, "%s", r)
		nbdtest.SameBytes(t, c.want, got, c.export)
	}
	for _, snap := range []string{"before", "during", "after"} {
		assert.Contains(t, s.MustCLI("snapshot", "list", "db").Stdout, snap)
	}
	var snaps []api.Snapshot
	require.NoError(t, json.Unmarshal([]byte(s.MustCLI("snapshot", "list", "db", "--json").Stdout), &snaps))
	for _, sn := range snaps {
		assert.True(t, sn.Sealed, "every snapshot is sealed once the repository is back: %+v", sn)
	}
}

// TestFaultStateDiskFull puts the server's data folder on a 16 MiB tmpfs
// (the repository elsewhere) and has qemu-io write three times that, then
// fills the disk to its last byte and restarts the server: no write
// fails, they wait for the uploader to free the log, and every byte reads
// back (nbdcopy).
func TestFaultStateDiskFull(t *testing.T) {
	const mib = 1 << 20
	data := testenv.Tmpfs(t, "16m")
	s := servertest.Start(t, servertest.Options{Data: data, Repo: filepath.Join(t.TempDir(), "repo"),
		Args: []string{"--checkpoint-interval", "1h"}})
	s.MustCLI("volume", "create", "db", "--size", "64M", "--chunk-size", "64K")
	want := make([]byte, 64*mib)
	var cmds []string
	for i := range 48 {
		b := byte(1 + i)
		cmds = append(cmds, fmt.Sprintf("write -P %d %d 1M", b, i*mib))
		copy(want[i*mib:(i+1)*mib], bytes.Repeat([]byte{b}, mib))
	}
	qemuIOOK(t, s.URI("db"), append(cmds, "flush")...)
	assert.Contains(t, s.Log(), "state disk full", "the disk did fill")
	got, r := nbdcopyOut(t, s.URI("db"))
	require.NotNil(t, got, "%s", r)
	nbdtest.SameBytes(t, want, got, "db after writing 3× the state disk")

	// Filled to the last byte by something else, with writes in the log:
	// a restart still opens, and the next writes wait for room, then go.
	qemuIOOK(t, s.URI("db"), "write -P 0x77 48M 8M", "flush")
	copy(want[48*mib:56*mib], bytes.Repeat([]byte{0x77}, 8*mib))
	require.Equal(t, 0, s.Stop())
	f, err := os.Create(filepath.Join(data, "filler"))
	require.NoError(t, err)
	for _, size := range []int{mib, 4096, 1} {
		for {
			if _, err := f.Write(make([]byte, size)); err != nil {
				break
			}
		}
	}
	f.Close()
	s.Restart()
	assert.Contains(t, s.MustCLI("status").Stdout, "state disk")
	qemuIOOK(t, s.URI("db"), "write -P 0x78 56M 8M", "flush")
	copy(want[56*mib:], bytes.Repeat([]byte{0x78}, 8*mib))
	require.NoError(t, os.Remove(filepath.Join(data, "filler")))
	got, r = nbdcopyOut(t, s.URI("db"))
	require.NotNil(t, got, "%s", r)
	nbdtest.SameBytes(t, want, got, "db after a restart on a full disk")
}

// stripSum removes an object's checksum line, as format 1 wrote it.
func stripSum(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	i := bytes.LastIndex(bytes.TrimSuffix(b, []byte("\n")), []byte("\n"))
	require.Positive(t, i)
	require.True(t, bytes.HasPrefix(b[i+1:], []byte("nbdvault-sum ")), "%s has its checksum line", path)
	require.NoError(t, os.WriteFile(path, b[:i+1], 0o600))
}

func editFile(t *testing.T, path, from, to string) {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Contains(t, string(b), from)
	require.NoError(t, os.WriteFile(path, bytes.Replace(b, []byte(from), []byte(to), 1), 0o600))
}

// TestFaultRepositoryObjects damages what describes the data in a local
// repository: a snapshot manifest's size (the edit), the newest
// manifest's sequence number, the config. Each is found and named, and
// touches only what it describes. A format 1 repository (no checksum
// lines) is upgraded in place at start.
func TestFaultRepositoryObjects(t *testing.T) {
	repo := filepath.Join(t.TempDir(), "repo")
	s := servertest.Start(t, servertest.Options{Repo: repo})
	s.MustCLI("volume", "create", "a", "--size", "16M")
	s.MustCLI("volume", "create", "b", "--size", "16M")
	qemuIOOK(t, s.URI("a"), "write -P 0x11 0 1M")
	s1 := strings.TrimSpace(s.MustCLI("snapshot", "create", "a", "--label", "s1", "--wait").Stdout)
	qemuIOOK(t, s.URI("a"), "write -P 0x22 0 1M")
	s2 := strings.TrimSpace(s.MustCLI("snapshot", "create", "a", "--label", "s2", "--wait").Stdout)
	qemuIOOK(t, s.URI("b"), "write -P 0x33 0 1M")
	s.MustCLI("snapshot", "create", "b", "--wait")
	require.Equal(t, 0, s.Stop())

	// Format 1: every descriptive object without its checksum line.
	cfg := filepath.Join(repo, "config")
	objects, _ := filepath.Glob(filepath.Join(repo, "volumes", "*", "*"))
	manifests, _ := filepath.Glob(filepath.Join(repo, "volumes", "*", "*", "*"))
	for _, p := range append(objects, manifests...) {
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			stripSum(t, p)
		}
	}
	var c map[string]any
	b, err := os.ReadFile(cfg)
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &c))
	delete(c, "sum")
	c["format"] = 1
	b, _ = json.Marshal(c)
	require.NoError(t, os.WriteFile(cfg, b, 0o600))
	s.Restart()
	assert.Contains(t, s.Log(), "repository upgraded")
	qemuIOOK(t, s.URI("a@s1"), "read -P 0x11 0 1M")
	qemuIOOK(t, s.URI("a"), "read -P 0x22 0 1M")
	require.Equal(t, 0, s.Stop())
	b, err = os.ReadFile(filepath.Join(repo, "volumes", "a", "snapshots", s1))
	require.NoError(t, err)
	assert.Contains(t, string(b), "nbdvault-sum blake3-256 ", "upgraded objects carry their checksum")

	// The edit: a bigger size in an old snapshot's manifest.
	editFile(t, filepath.Join(repo, "volumes", "a", "snapshots", s1), `"size": 16777216`, `"size": 26777216`)
	s.Restart()
	list := s.MustCLI("snapshot", "list", "a").Stdout
	assert.Regexp(t, s1+`.*DAMAGED: .*checksum mismatch`, list)
	assert.False(t, qemuIO(t, s.URI("a@"+s1), "read 0 4k").OK(), "a damaged snapshot is not exported")
	qemuIOOK(t, s.URI("a@s2"), "read -P 0x22 0 1M")
	qemuIOOK(t, s.URI("b"), "read -P 0x33 0 1M")
	require.Equal(t, 0, s.Stop())

	// The newest manifest's sequence number raised: a is not served (it
	// would skip log records), b is.
	editFile(t, filepath.Join(repo, "volumes", "a", "snapshots", s2), `"seq": `, `"seq": 9`)
	s.Restart()
	assert.Regexp(t, `a .*DAMAGED: not served: .*newest manifest is damaged.*`+s2, s.MustCLI("volume", "list").Stdout)
	qemuIOOK(t, s.URI("b"), "read -P 0x33 0 1M")
	require.Equal(t, 0, s.Stop())

	// A state folder whose server lost the lease to another is not
	// replayed over what that server wrote.
	marker := filepath.Join(s.Data, "state", "lease-lost")
	require.NoError(t, os.WriteFile(marker, []byte("2026-11-30T00:00:00Z: lost\n"), 0o600))
	out := nbdtest.Run(t, cmdTimeout, servertest.Binary(t), "serve", "--data", s.Data, "--repo", repo,
		"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0")
	assert.False(t, out.OK())
	assert.Contains(t, out.Stderr, "lost the repository's lease to another")
	require.NoError(t, os.Remove(marker))

	// A damaged config stops the start, naming it.
	flip(t, cfg, 5)
	out = nbdtest.Run(t, cmdTimeout, servertest.Binary(t), "serve", "--data", s.Data, "--repo", repo,
		"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0")
	assert.False(t, out.OK())
	assert.Contains(t, out.Stderr, "its config is damaged")
	assert.Contains(t, out.Stderr, "checksum mismatch")

	// A config gone: the start stops rather than make a new repository
	// (a new ID) over the objects.
	require.NoError(t, os.Remove(cfg))
	out = nbdtest.Run(t, cmdTimeout, servertest.Binary(t), "serve", "--data", s.Data, "--repo", repo,
		"--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0")
	assert.False(t, out.OK())
	assert.Contains(t, out.Stderr, "has no config but holds objects")
	_, err = os.Stat(cfg)
	assert.ErrorIs(t, err, os.ErrNotExist, "no new config written")
}
