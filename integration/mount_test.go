package integration

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
)

// Tests of restore by mount: `nbdvault mount VOL@SNAP DIR` and
// `nbdvault umount DIR` run as a user runs them, against a real server.
// Each test gives the commands a run folder of its own (--run-dir), so it
// can tell exactly what a mount left: mounts, loop devices, nbdfuse
// processes and state files that name that folder.

// TestMountSnapshots writes two versions of an ext4 file system into a
// volume, snapshotting each, mounts both snapshots at once (one by label,
// one by ID), checks every file of each and that both are read-only, then
// unmounts both and checks that nothing is left.
func TestMountSnapshots(t *testing.T) {
	m := startMountRig(t)
	const size = 32 * mib

	one := map[string][]byte{
		"hello.txt":        []byte("version one\n"),
		"random.bin":       nbdtest.RandomBytes(1, int(3*mib+123)),
		"dir/sub/data.bin": nbdtest.RandomBytes(2, int(mib)),
		"dir/keep.bin":     nbdtest.RandomBytes(3, int(200*kib)),
	}
	two := map[string][]byte{
		"hello.txt":    []byte("version two, longer than one\n"),
		"random.bin":   nbdtest.RandomBytes(11, int(3*mib+123)),
		"dir/keep.bin": one["dir/keep.bin"],
		"new.bin":      nbdtest.RandomBytes(12, int(512*kib)),
	}

	m.s.MustCLI("volume", "create", "vol", "--size", fmt.Sprint(size))
	m.writeHead("vol", m.ext4Image(one, size))
	m.s.MustCLI("snapshot", "create", "vol", "--label", "one")
	// A second file system over the whole head: a different one, made by
	// the same mkfs, so it overwrites the first one's metadata in place.
	m.writeHead("vol", m.ext4Image(two, size))
	idTwo := strings.TrimSpace(m.s.MustCLI("snapshot", "create", "vol").Stdout)
	require.NotEmpty(t, idTwo)

	dirOne, dirTwo := m.mountDir(), m.mountDir()
	r := m.mustCLI("mount", "vol@one", dirOne)
	assert.Contains(t, r.Stdout, dirOne)
	m.mustCLI("mount", "vol@"+idTwo, dirTwo)

	sameFiles(t, one, dirOne, "vol@one")
	sameFiles(t, two, dirTwo, "vol@"+idTwo)
	for _, dir := range []string{dirOne, dirTwo} {
		err := os.WriteFile(filepath.Join(dir, "write.txt"), []byte("no"), 0o644)
		assert.ErrorIs(t, err, syscall.EROFS, "creating a file in %s", dir)
		f, err := os.OpenFile(filepath.Join(dir, "hello.txt"), os.O_WRONLY, 0)
		if assert.ErrorIs(t, err, syscall.EROFS, "opening %s/hello.txt to write", dir) {
			continue
		}
		f.Close()
	}
	assert.Len(t, m.loops(), 2, "one loop device per mount")

	// A second mount on a mount point is refused.
	r = m.cli("mount", "vol@one", dirOne)
	assert.Equal(t, 6, r.ExitCode, "mount on a mount point:\n%s", r)
	assert.Contains(t, r.Stderr, "already a mount point")

	m.mustCLI("umount", dirOne)
	assert.Len(t, m.loops(), 1, "after the first umount")
	sameFiles(t, two, dirTwo, "vol@"+idTwo+" after the other one's umount")
	m.mustCLI("umount", dirTwo)
	m.requireNothingLeft("after umount")

	r = m.cli("umount", dirOne)
	assert.Equal(t, 1, r.ExitCode, "umount of a directory nbdvault no longer has mounted:\n%s", r)
	assert.Contains(t, r.Stderr, "did not mount")
}

// TestMountNoFileSystem: a snapshot of random bytes has nothing to mount.
// The error names what blkid found, and what mount made before it found
// out (nbdfuse, a loop device) is undone.
func TestMountNoFileSystem(t *testing.T) {
	m := startMountRig(t)
	m.s.MustCLI("volume", "create", "junk", "--size", "8M")
	img := filepath.Join(t.TempDir(), "junk.img")
	require.NoError(t, os.WriteFile(img, nbdtest.RandomBytes(7, int(8*mib)), 0o600))
	m.writeHead("junk", img)
	m.s.MustCLI("snapshot", "create", "junk", "--label", "random")

	dir := m.mountDir()
	r := m.cli("mount", "junk@random", dir)
	assert.NotEqual(t, 0, r.ExitCode, "mount of random bytes:\n%s", r)
	assert.Contains(t, r.Stderr, "no filesystem signature", r.String())
	assert.Contains(t, r.Stderr, "nbdvault restore", "the error says what to do instead")
	m.requireNothingLeft("after a mount that found no file system")
}

// TestMountJournalNotReplayed: a crash-consistent copy of a mounted ext4
// needs its journal replayed, which a read-only device cannot do. mount
// mounts it without the replay and says so.
func TestMountJournalNotReplayed(t *testing.T) {
	m := startMountRig(t)
	const size = 16 * mib
	files := map[string][]byte{"a.bin": nbdtest.RandomBytes(21, int(300*kib))}
	img := m.ext4Image(files, size)

	// Copy the image while it is mounted read-write: the copy has the
	// "needs recovery" flag, as a snapshot of a live disk would.
	live := nbdtest.MountLoop(t, img, "")
	require.NoError(t, os.WriteFile(filepath.Join(live.Dir, "late.txt"), []byte("written while mounted\n"), 0o644))
	syscall.Sync()
	crash := filepath.Join(t.TempDir(), "crash.img")
	require.NoError(t, os.WriteFile(crash, nbdtest.ReadFile(t, img), 0o600))
	live.Unmount(t)

	m.s.MustCLI("volume", "create", "live", "--size", fmt.Sprint(size))
	m.writeHead("live", crash)
	m.s.MustCLI("snapshot", "create", "live", "--label", "crash")

	dir := m.mountDir()
	r := m.mustCLI("mount", "live@crash", dir)
	assert.Contains(t, r.Stderr, "journal was not replayed", r.String())
	b, err := os.ReadFile(filepath.Join(dir, "a.bin"))
	if assert.NoError(t, err) {
		nbdtest.SameBytes(t, files["a.bin"], b, "a.bin in a mount without journal replay")
	}
	m.mustCLI("umount", dir)
	m.requireNothingLeft("after umount")
}

// TestMountFailsCleanly: a missing snapshot (exit 3), a directory that is
// not there (2), an umount of what nbdvault did not mount (1) and a mount
// while the server is stopped (5) all fail with a message and leave
// nothing behind.
func TestMountFailsCleanly(t *testing.T) {
	m := startMountRig(t)
	m.s.MustCLI("volume", "create", "vol", "--size", "8M")
	m.s.MustCLI("snapshot", "create", "vol", "--label", "there")
	dir := m.mountDir()

	r := m.cli("mount", "vol@nope", dir)
	assert.Equal(t, 3, r.ExitCode, "mount of a missing snapshot:\n%s", r)
	assert.Contains(t, r.Stderr, "nope")
	m.requireNothingLeft("after a mount of a missing snapshot")

	r = m.cli("mount", "vol@there", filepath.Join(dir, "missing"))
	assert.Equal(t, 2, r.ExitCode, "mount on a missing directory:\n%s", r)
	assert.Contains(t, r.Stderr, "does not exist")

	r = m.cli("umount", dir)
	assert.Equal(t, 1, r.ExitCode, "umount of a directory nbdvault did not mount:\n%s", r)
	assert.Contains(t, r.Stderr, "did not mount")

	require.Equal(t, 0, m.s.Stop(), m.s.Log())
	r = m.cli("mount", "vol@there", dir)
	assert.Equal(t, 5, r.ExitCode, "mount while the server is stopped:\n%s", r)
	assert.Contains(t, r.Stderr, "nbdvault serve")
	m.requireNothingLeft("after a mount while the server is stopped")
}

// mountRig is a server and a run folder for mount tests.
type mountRig struct {
	t      *testing.T
	s      *servertest.Server
	runDir string
	dirs   []string // mount points made by mountDir
	tools  map[string]string
}

func startMountRig(t *testing.T) *mountRig {
	t.Helper()
	return startMountRigWith(t, servertest.Options{})
}

// startMountRigWith is startMountRig with a server started with opts.
func startMountRigWith(t *testing.T, opts servertest.Options) *mountRig {
	t.Helper()
	nbdtest.RequireRoot(t, "nbdvault mount sets up loop devices and mounts")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		nbdtest.Unavailable(t, fmt.Errorf("FUSE is not available (%v): load the fuse module", err))
	}
	tools := nbdtest.Tools(t, "nbdfuse", "fusermount3", "losetup", "blkid", "mount", "umount", "mkfs.ext4", "nbdcopy")
	// Not t.TempDir: its RemoveAll must never walk into a FUSE mount
	// that a failure left.
	run, err := os.MkdirTemp("", "nbdvault-mount-run-")
	require.NoError(t, err)
	m := &mountRig{t: t, runDir: run, tools: tools}
	t.Cleanup(m.cleanUp)
	m.s = servertest.Start(t, opts)
	return m
}

// cli runs an nbdvault command with the rig's run folder.
func (m *mountRig) cli(args ...string) *nbdtest.Result {
	m.t.Helper()
	return m.s.CLI(append(args, "--run-dir", m.runDir)...)
}

func (m *mountRig) mustCLI(args ...string) *nbdtest.Result {
	m.t.Helper()
	r := m.cli(args...)
	if !r.OK() {
		m.t.Fatalf("command failed:\n%s\nserver log:\n%s", r, m.s.Log())
	}
	return r
}

// mountDir makes an empty directory to mount on.
func (m *mountRig) mountDir() string {
	m.t.Helper()
	dir, err := os.MkdirTemp("", "nbdvault-mnt-")
	require.NoError(m.t, err)
	m.dirs = append(m.dirs, dir)
	return dir
}

// ext4Image makes an ext4 image of size bytes holding files.
func (m *mountRig) ext4Image(files map[string][]byte, size int64) string {
	m.t.Helper()
	src := m.t.TempDir()
	for name, b := range files {
		p := filepath.Join(src, name)
		require.NoError(m.t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(m.t, os.WriteFile(p, b, 0o644))
	}
	img := nbdtest.SparseFile(m.t, "fs.img", size)
	nbdtest.MustRun(m.t, cmdTimeout, m.tools["mkfs.ext4"], "-q", "-F", "-d", src, img)
	return img
}

// writeHead copies a file over the head of volume vol.
func (m *mountRig) writeHead(vol, file string) {
	m.t.Helper()
	nbdtest.MustRun(m.t, cmdTimeout, m.tools["nbdcopy"], "--flush", file, m.s.URI(vol))
}

// sameFiles checks that dir holds exactly want's regular files (besides
// lost+found), with the same SHA-256.
func sameFiles(t *testing.T, want map[string][]byte, dir, what string) {
	t.Helper()
	got := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == "lost+found" {
			return filepath.SkipDir
		}
		if !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		sum := sha256.Sum256(b)
		got[rel] = hex.EncodeToString(sum[:])
		return nil
	})
	require.NoError(t, err, "%s: reading the files", what)
	wantSums := map[string]string{}
	for name, b := range want {
		sum := sha256.Sum256(b)
		wantSums[name] = hex.EncodeToString(sum[:])
	}
	assert.Equal(t, wantSums, got, "%s: the files and their SHA-256", what)
}

// loops lists the loop devices whose backing file is in the run folder
// (losetup -a: "/dev/loopN: [DEV]:INODE (FILE)").
func (m *mountRig) loops() []string {
	m.t.Helper()
	r := nbdtest.MustRun(m.t, nbdtest.MountTimeout, m.tools["losetup"], "-a")
	var devs []string
	for _, line := range strings.Split(r.Stdout, "\n") {
		if dev, _, ok := strings.Cut(line, ":"); ok && strings.Contains(line, m.runDir+"/") {
			devs = append(devs, dev)
		}
	}
	return devs
}

// mountsLeft lists the mounts in the run folder or on the rig's mount points.
func (m *mountRig) mountsLeft() []string {
	m.t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	require.NoError(m.t, err)
	var left []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		dir := f[4]
		if strings.HasPrefix(dir, m.runDir+"/") || slices.Contains(m.dirs, dir) {
			left = append(left, dir)
		}
	}
	return left
}

// nbdfuseLeft lists the nbdfuse processes started for the run folder.
func (m *mountRig) nbdfuseLeft() []int {
	m.t.Helper()
	entries, err := os.ReadDir("/proc")
	require.NoError(m.t, err)
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil { // ended meanwhile; a zombie's is empty
			continue
		}
		args := strings.Split(string(cmdline), "\x00")
		if strings.HasSuffix(args[0], "nbdfuse") && strings.Contains(string(cmdline), m.runDir+"/") {
			pids = append(pids, pid)
		}
	}
	return pids
}

// stateLeft lists what is left in the run folder's mounts folder.
func (m *mountRig) stateLeft() []string {
	entries, _ := os.ReadDir(filepath.Join(m.runDir, "mounts"))
	var left []string
	for _, e := range entries {
		left = append(left, e.Name())
	}
	return left
}

// requireNothingLeft fails the test if a mount, loop device, nbdfuse
// process or state file of the rig's is left.
func (m *mountRig) requireNothingLeft(when string) {
	m.t.Helper()
	assert.Empty(m.t, m.mountsLeft(), "%s: mounts left", when)
	assert.Empty(m.t, m.loops(), "%s: loop devices left (losetup -a)", when)
	assert.Empty(m.t, m.nbdfuseLeft(), "%s: nbdfuse processes left", when)
	assert.Empty(m.t, m.stateLeft(), "%s: state left in %s/mounts", when, m.runDir)
	if m.t.Failed() {
		m.t.FailNow()
	}
}

// cleanUp takes apart whatever a failed test left: mounts on the rig's
// directories, loop devices, FUSE mounts, nbdfuse processes; then removes
// the directories.
func (m *mountRig) cleanUp() {
	t := m.t
	for _, dir := range m.mountsLeft() {
		if !strings.HasPrefix(dir, m.runDir) {
			nbdtest.Run(t, nbdtest.MountTimeout, m.tools["umount"], "-l", dir)
		}
	}
	for _, dev := range m.loops() {
		nbdtest.Run(t, nbdtest.MountTimeout, m.tools["losetup"], "-d", dev)
	}
	for _, dir := range m.mountsLeft() {
		nbdtest.Run(t, nbdtest.MountTimeout, m.tools["fusermount3"], "-u", "-z", dir)
	}
	for _, pid := range m.nbdfuseLeft() {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	if left := m.mountsLeft(); len(left) > 0 {
		t.Errorf("mounts left after clean-up, not removing their directories: %v", left)
		return
	}
	for _, dir := range m.dirs {
		os.Remove(dir) // never RemoveAll a mount point
	}
	os.RemoveAll(m.runDir)
}
