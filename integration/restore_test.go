package integration

// Tests of `nbdvault restore` and `nbdvault import` against the real
// binary (integration/servertest): what they write, byte for byte and
// hole for hole, what they refuse, and what they leave behind when they
// fail.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/nbdvault/nbdvault/integration/miniotest"
	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// restoreSize is the volume the restore tests write: 48 MiB of 1 MiB
// chunks.
const restoreSize = 48 * mib

// restoreImage makes the snapshot the restore tests take, as a sparse
// file: random data, compressible data, holes of several chunks, a few
// bytes in the middle of a chunk, and a hole at the end.
func restoreImage(t *testing.T) (path string, image []byte) {
	t.Helper()
	path = nbdtest.SparseFile(t, "image", restoreSize)
	image = make([]byte, restoreSize)
	put := func(off int64, p []byte) {
		copy(image[off:], p)
		nbdtest.WriteAt(t, path, p, off)
	}
	put(0, nbdtest.RandomBytes(11, int(8*mib)))
	// [8M, 12M) hole
	put(12*mib, compressibleBytes(int(4*mib)))
	put(20*mib+1234, nbdtest.RandomBytes(12, 5000))
	// [24M, 40M) hole
	put(40*mib, nbdtest.RandomBytes(13, int(4*mib)))
	// [44M, 48M) hole
	return path, image
}

// compressibleBytes is n bytes of text that zstd shrinks well.
func compressibleBytes(n int) []byte {
	line := []byte("nbdvault keeps volumes as compressed, deduplicated chunks.\n")
	return bytes.Repeat(line, n/len(line)+1)[:n]
}

// writeRestoreVolume creates volume db, copies the image into its head
// with nbdcopy, snapshots it with label "one" (waiting for the seal if
// seal is set), then writes more with qemu-io that the snapshot must not
// show: into a hole and over data. It returns the snapshot's ID and the
// image and its sparse file.
func writeRestoreVolume(t *testing.T, s *servertest.Server, tools map[string]string, seal bool) (id string, image []byte, path string) {
	t.Helper()
	path, image = restoreImage(t)
	s.MustCLI("volume", "create", "db", "--size", "48M")
	nbdtest.MustRun(t, cmdTimeout, tools["nbdcopy"], "--flush", path, s.URI("db"))
	args := []string{"snapshot", "create", "db", "--label", "one"}
	if seal {
		args = append(args, "--wait")
	}
	id = strings.TrimSpace(s.MustCLI(args...).Stdout)
	require.NotEmpty(t, id)
	nbdtest.MustRun(t, cmdTimeout, tools["qemu-io"], "-f", "raw",
		"-c", "write -P 0xcd 9M 1M", "-c", "write -P 0xee 0 64k", "-c", "write -P 0xab 30M 4k", "-c", "flush", s.URI("db"))
	return id, image, path
}

// digestPrinted is the digest restore's summary ends with, and its name.
var digestPrinted = regexp.MustCompile(`; (blake3|sha256) ([0-9a-f]{64})\n$`)

// checkDigest fails t unless the summary r printed ends with the digest
// name (blake3 or sha256) that tool (b3sum or sha256sum) prints for the
// file at path.
func checkDigest(t *testing.T, r *nbdtest.Result, name, tool, path string) {
	t.Helper()
	m := digestPrinted.FindStringSubmatch(r.Stdout)
	if !assert.NotNil(t, m, "restore prints a digest last:\n%s", r) {
		return
	}
	assert.Equal(t, name, m[1], "the digest printed:\n%s", r)
	out := nbdtest.MustRun(t, cmdTimeout, tool, path)
	want, _, _ := strings.Cut(out.Stdout, " ")
	assert.Equal(t, want, m[2], "the printed %s is what %s prints for %s", name, filepath.Base(tool), path)
}

// allocatedBytes is how much disk the file at path uses.
func allocatedBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	require.NoError(t, syscall.Stat(path, &st))
	return st.Blocks * 512
}

// nextData is where the first data at or after off is in the file at path
// (SEEK_DATA), or its size if there is none.
func nextData(t *testing.T, path string, off int64) int64 {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	n, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		fi, err := f.Stat()
		require.NoError(t, err)
		return fi.Size()
	}
	require.NoError(t, err)
	return n
}

func TestRestore(t *testing.T) {
	runRestore(t, servertest.Options{}, false)
}

// TestRestoreMinIO restores a sealed snapshot, so the chunks come from
// the repository, here MinIO.
func TestRestoreMinIO(t *testing.T) {
	m := miniotest.StartShared(t)
	prefix := fmt.Sprintf("restore-%d", time.Now().UnixNano())
	runRestore(t, servertest.Options{Repo: m.Location(prefix), Env: m.Env()}, true)
}

func runRestore(t *testing.T, opts servertest.Options, seal bool) {
	tools := nbdtest.Tools(t, "nbdcopy", "qemu-io", "b3sum", "sha256sum")
	s := servertest.Start(t, opts)
	id, image, imagePath := writeRestoreVolume(t, s, tools, seal)
	dir := t.TempDir()

	// By ID, to a new file. The summary ends with the file's BLAKE3.
	out := filepath.Join(dir, "by-id.img")
	r := s.MustCLI("restore", "db@"+id, "--to", out)
	got := nbdtest.ReadFile(t, out)
	nbdtest.SameBytes(t, image, got, "restore by ID")
	checkDigest(t, r, "blake3", tools["b3sum"], out)
	assert.NoFileExists(t, out+".partial")

	// Sparse where the snapshot has holes: the disk the image uses, give
	// or take the chunk a sealed snapshot holds whole around the few
	// bytes at 20M, and no data in the big holes.
	imageAlloc, gotAlloc := allocatedBytes(t, imagePath), allocatedBytes(t, out)
	assert.LessOrEqual(t, gotAlloc, imageAlloc+2*mib, "the restored file is sparse like the image")
	assert.GreaterOrEqual(t, gotAlloc, 16*mib, "the restored file holds the snapshot's 16 MiB of data")
	assert.Equal(t, 12*mib, nextData(t, out, 8*mib), "the hole at 8M stays a hole")
	assert.Equal(t, 40*mib, nextData(t, out, 24*mib), "the hole at 24M stays a hole")
	assert.Equal(t, restoreSize, nextData(t, out, 44*mib), "the hole at the end stays a hole")

	// By label, with the NBD address given, and the SHA-256 instead.
	out2 := filepath.Join(dir, "by-label.img")
	r = s.MustCLI("restore", "db@one", "--to", out2, "--nbd", s.NBD, "--checksum", "sha256")
	nbdtest.SameBytes(t, image, nbdtest.ReadFile(t, out2), "restore by label")
	checkDigest(t, r, "sha256", tools["sha256sum"], out2)

	// An existing file is refused without --force and left alone.
	keep := filepath.Join(dir, "keep.img")
	require.NoError(t, os.WriteFile(keep, []byte("do not overwrite"), 0o600))
	r = s.CLI("restore", "db@one", "--to", keep)
	assert.Equal(t, 6, r.ExitCode, "an existing file is a conflict:\n%s", r)
	assert.Contains(t, r.Stderr, "--force")
	assert.Equal(t, "do not overwrite", string(nbdtest.ReadFile(t, keep)))
	assert.NoFileExists(t, keep+".partial")
	// With --force, and no digest.
	r = s.MustCLI("restore", "db@one", "--to", keep, "--force", "--checksum", "none")
	nbdtest.SameBytes(t, image, nbdtest.ReadFile(t, keep), "restore with --force")
	assert.True(t, strings.HasSuffix(r.Stdout, " holes not written\n"), "--checksum none prints no digest:\n%s", r)
	assert.NotRegexp(t, `blake3|sha256|[0-9a-f]{64}`, r.Stdout, "--checksum none prints no digest")

	// A missing snapshot: exit code 3, nothing created.
	missing := filepath.Join(dir, "missing.img")
	r = s.CLI("restore", "db@nope", "--to", missing)
	assert.Equal(t, 3, r.ExitCode, "a missing snapshot:\n%s", r)
	assert.NoFileExists(t, missing)
	assert.NoFileExists(t, missing+".partial")

	// Usage errors: exit code 2.
	for _, args := range [][]string{
		{"restore", "db", "--to", missing},
		{"restore", "db@one"},
		{"restore", "db@one", "db@one", "--to", missing},
		{"restore", "db@one", "--to", missing, "--checksum", "md5"},
	} {
		r = s.CLI(args...)
		assert.Equal(t, 2, r.ExitCode, "a usage error:\n%s", r)
		assert.Equal(t, 1, strings.Count(strings.TrimSpace(r.Stderr), "\n")+1, "one line:\n%s", r)
	}
	assert.Contains(t, r.Stderr, "blake3", "a wrong --checksum: the error names the values")
	assert.NoFileExists(t, missing)
	assert.NoFileExists(t, missing+".partial")

	// The head moved on: the snapshot did not.
	head := filepath.Join(dir, "head.img")
	nbdtest.MustRun(t, cmdTimeout, tools["nbdcopy"], s.URI("db"), head)
	assert.NotEqual(t, image, nbdtest.ReadFile(t, head), "the writes after the snapshot are in the head")
}

// TestRestoreCorruptChunk damages a chunk of a sealed snapshot in the
// repository: the restore stops with a clear error and a non-zero exit
// code and leaves no file behind.
func TestRestoreCorruptChunk(t *testing.T) {
	tools := nbdtest.Tools(t, "nbdcopy", "qemu-io")
	s := servertest.Start(t, servertest.Options{})
	id, _, _ := writeRestoreVolume(t, s, tools, true)
	s.Stop()

	// A raw chunk (random data does not compress) is the header and frame
	// table of 16 frames (12 + 16 × 36 bytes, chunkstore/framed.go) and
	// 1 MiB of plaintext: damage one byte of one.
	const head = 12 + 16*36
	var damaged string
	chunks := filepath.Join(s.Data, "repo", "chunks")
	require.NoError(t, filepath.WalkDir(chunks, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || damaged != "" {
			return err
		}
		if fi, err := d.Info(); err == nil && fi.Size() == mib+head {
			damaged = path
		}
		return nil
	}))
	require.NotEmpty(t, damaged, "a raw 1 MiB chunk in %s", chunks)
	data := nbdtest.ReadFile(t, damaged)
	data[head+1000] ^= 0xff
	require.NoError(t, os.WriteFile(damaged, data, 0o600))
	s.Restart()

	out := filepath.Join(t.TempDir(), "restored.img")
	r := s.CLI("restore", "db@"+id, "--to", out)
	assert.Equal(t, 1, r.ExitCode, "a damaged chunk fails the restore:\n%s", r)
	assert.Contains(t, r.Stderr, "could not read")
	assert.Contains(t, r.Stderr, "corrupt", "the server's reason is shown")
	lines := strings.Split(strings.TrimSpace(r.Stderr), "\n")
	assert.True(t, strings.HasPrefix(lines[len(lines)-1], "nbdvault: restore of db@"+id+" failed: "), "the error is the last line:\n%s", r)
	assert.Equal(t, 1, strings.Count(r.Stderr, "nbdvault:"), "the error is one line:\n%s", r)
	assert.NoFileExists(t, out)
	assert.NoFileExists(t, out+".partial")
}

// TestRestoreToBlockDevice restores onto a loop device full of old data:
// the snapshot's holes must come out as zeros, and the device past the
// snapshot's end stays as it was. Then the device is imported back.
func TestRestoreToBlockDevice(t *testing.T) {
	nbdtest.RequireRoot(t, "losetup")
	tools := nbdtest.Tools(t, "nbdcopy", "qemu-io", "losetup", "b3sum")
	s := servertest.Start(t, servertest.Options{})
	id, image, _ := writeRestoreVolume(t, s, tools, false)

	const devSize = restoreSize + mib
	backing := filepath.Join(t.TempDir(), "disk")
	require.NoError(t, os.WriteFile(backing, bytes.Repeat([]byte{0x5a}, int(devSize)), 0o600))
	t.Cleanup(func() { nbdtest.DetachLoops(t, backing) })
	dev := strings.TrimSpace(nbdtest.MustRun(t, nbdtest.MountTimeout, tools["losetup"], "-f", "--show", backing).Stdout)
	require.True(t, strings.HasPrefix(dev, "/dev/loop"), dev)

	r := s.MustCLI("restore", "db@"+id, "--to", dev)
	got := nbdtest.ReadFile(t, dev)
	require.Len(t, got, int(devSize))
	nbdtest.SameBytes(t, image, got[:restoreSize], "the device holds the snapshot, zeros over old data in its holes")
	nbdtest.SameBytes(t, bytes.Repeat([]byte{0x5a}, int(mib)), got[restoreSize:], "the device past the snapshot")
	// The digest is of the snapshot's bytes, the device's first ones.
	restored := filepath.Join(t.TempDir(), "restored")
	require.NoError(t, os.WriteFile(restored, got[:restoreSize], 0o600))
	checkDigest(t, r, "blake3", tools["b3sum"], restored)

	// A device smaller than the snapshot is refused.
	small := filepath.Join(t.TempDir(), "small")
	require.NoError(t, os.WriteFile(small, bytes.Repeat([]byte{0x5a}, int(mib)), 0o600))
	t.Cleanup(func() { nbdtest.DetachLoops(t, small) })
	smallDev := strings.TrimSpace(nbdtest.MustRun(t, nbdtest.MountTimeout, tools["losetup"], "-f", "--show", small).Stdout)
	r = s.CLI("restore", "db@"+id, "--to", smallDev)
	assert.Equal(t, 1, r.ExitCode, "a device too small:\n%s", r)
	assert.Contains(t, r.Stderr, "smaller than the snapshot")
	nbdtest.SameBytes(t, bytes.Repeat([]byte{0x5a}, int(mib)), nbdtest.ReadFile(t, smallDev), "the small device is untouched")

	// And back: a block device as import's source.
	s.MustCLI("volume", "create", "copy", "--size", "49M")
	r = s.MustCLI("import", "copy", "--from", dev)
	back := filepath.Join(t.TempDir(), "back.img")
	nbdtest.MustRun(t, cmdTimeout, tools["nbdcopy"], s.URI("copy@"+strings.TrimSpace(r.Stdout)), back)
	nbdtest.SameBytes(t, got, nbdtest.ReadFile(t, back), "the device imported into a volume")
}

// TestImport imports an image with zero blocks and data, not a whole
// number of chunks long, into a volume full of old data.
func TestImport(t *testing.T) {
	tools := nbdtest.Tools(t, "nbdcopy", "qemu-io")
	s := servertest.Start(t, servertest.Options{})
	const volSize = 32 * mib
	s.MustCLI("volume", "create", "db", "--size", "32M", "--chunk-size", "256K")
	nbdtest.MustRun(t, cmdTimeout, tools["qemu-io"], "-f", "raw", "-c", "write -P 0x77 0 32M", "-c", "flush", s.URI("db"))
	s.MustCLI("snapshot", "create", "db", "--label", "old")

	// [0, 4M) random, [4M, 8M) zeros written out, [8M, 12M) compressible,
	// [12M, 20M) a hole but for 5000 random bytes across the boundary of
	// two 256 KiB requests (import asks the file system where the data
	// is, and must not skip it), [20M, 24M+1000) random.
	const imgSize = 24*mib + 1000
	img := nbdtest.SparseFile(t, "image", imgSize)
	image := make([]byte, imgSize)
	put := func(off int64, p []byte) {
		copy(image[off:], p)
		nbdtest.WriteAt(t, img, p, off)
	}
	put(0, nbdtest.RandomBytes(21, int(4*mib)))
	put(4*mib, make([]byte, 4*mib))
	put(8*mib, compressibleBytes(int(4*mib)))
	put(20*mib, nbdtest.RandomBytes(22, int(4*mib+1000)))
	put(16*mib+256<<10-1000, nbdtest.RandomBytes(23, 5000))

	r := s.MustCLI("import", "db", "--from", img, "--label", "seed")
	id := strings.TrimSpace(r.Stdout)
	require.NotContains(t, id, "\n", "import prints the snapshot ID alone:\n%s", r)
	assert.Contains(t, r.Stderr, "24.0 MiB read, 11.5 MiB of it zero chunks not sent, 12.5 MiB sent", "the summary")

	want := append(bytes.Clone(image), make([]byte, volSize-imgSize)...)
	readBack := func(export string) []byte {
		out := filepath.Join(t.TempDir(), "out.img")
		nbdtest.MustRun(t, cmdTimeout, tools["nbdcopy"], s.URI(export), out)
		return nbdtest.ReadFile(t, out)
	}
	nbdtest.SameBytes(t, want, readBack("db"), "the head after the import")
	nbdtest.SameBytes(t, want, readBack("db@"+id), "the import's snapshot")
	nbdtest.SameBytes(t, want, readBack("db@seed"), "the import's snapshot by label")

	snapshots := func() []api.Snapshot {
		var ss []api.Snapshot
		res := s.MustCLI("snapshot", "list", "db", "--json")
		require.NoError(t, json.Unmarshal([]byte(res.Stdout), &ss), res.Stdout)
		return ss
	}
	before := snapshots()
	var found bool
	for _, sn := range before {
		if sn.ID == id {
			found = true
			assert.True(t, sn.Sealed, "the import waited for the seal")
			assert.Equal(t, "seed", sn.Label)
		}
	}
	assert.True(t, found, "snapshot %s is listed: %+v", id, before)

	// A source larger than the volume: refused with exit code 1, nothing
	// written, no snapshot taken.
	big := nbdtest.SparseFile(t, "big", volSize+4096)
	nbdtest.WriteAt(t, big, bytes.Repeat([]byte{0x99}, int(mib)), 0)
	r = s.CLI("import", "db", "--from", big)
	assert.Equal(t, 1, r.ExitCode, "a source larger than the volume:\n%s", r)
	assert.Contains(t, r.Stderr, "nbdvault volume resize db")
	nbdtest.SameBytes(t, want, readBack("db"), "the head after a refused import")
	assert.Len(t, snapshots(), len(before), "no snapshot after a refused import")

	// A label the volume has: refused before anything is written.
	other := nbdtest.SparseFile(t, "other", mib)
	nbdtest.WriteAt(t, other, bytes.Repeat([]byte{0x99}, int(mib)), 0)
	r = s.CLI("import", "db", "--from", other, "--label", "seed")
	assert.Equal(t, 6, r.ExitCode, "a label taken is a conflict:\n%s", r)
	nbdtest.SameBytes(t, want, readBack("db"), "the head after an import refused for its label")

	// Usage errors: exit code 2.
	for _, args := range [][]string{
		{"import", "db"},
		{"import", "db@seed", "--from", img},
		{"import", "db", "--from", filepath.Join(t.TempDir(), "nothing")},
	} {
		r = s.CLI(args...)
		assert.Equal(t, 2, r.ExitCode, "a usage error:\n%s", r)
	}
}
