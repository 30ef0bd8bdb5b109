package integration

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
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

// TestWalkthrough is the README's five minutes, end to end, on the default
// local repository and on MinIO: serve, create a volume, attach its head
// with nbdfuse, mkfs.ext4, write files, freeze, snapshot, thaw, write more,
// mount the snapshot (its files, with their checksums, and none written
// after it), restore it (byte for byte the snapshot, a clean fsck), and
// mount the volume at a time after the later files (all of them).
func TestWalkthrough(t *testing.T) {
	for _, repo := range []string{"local", "minio"} {
		t.Run(repo, func(t *testing.T) {
			tools := nbdtest.Tools(t, "mkfs.ext4", "e2fsck", "fsfreeze", "nbdcopy")
			nbdtest.RequireRoot(t, "mount")
			var opts servertest.Options
			if repo == "minio" {
				m := miniotest.StartShared(t)
				opts.Repo, opts.Env = m.Location(fmt.Sprintf("walkthrough-%d", time.Now().UnixNano())), m.Env()
			}
			s := servertest.Start(t, opts)
			s.MustCLI("volume", "create", "web", "--size", "64M")

			head := nbdtest.NBDFuse(t, s.URI("web"))
			nbdtest.MustRun(t, time.Minute, tools["mkfs.ext4"], "-q", "-F", head.File)
			fs := nbdtest.MountLoop(t, head.File, "")
			before := writeFiles(t, fs.Dir, "before", 5, 1)

			nbdtest.MustRun(t, time.Minute, tools["fsfreeze"], "-f", fs.Dir)
			r := s.CLI("snapshot", "create", "web", "--label", "first")
			nbdtest.MustRun(t, time.Minute, tools["fsfreeze"], "-u", fs.Dir) // thaw whatever happened
			require.True(t, r.OK(), "%s", r)
			id := strings.TrimSpace(r.Stdout)
			after := writeFiles(t, fs.Dir, "after", 3, 2)
			nbdtest.MustRun(t, time.Minute, "sync")

			// Restore by mount: the files before, none after.
			dir := t.TempDir()
			s.MustCLI("mount", "web@first", dir)
			mounted := true
			t.Cleanup(func() {
				if mounted {
					s.CLI("umount", dir)
				}
			})
			checkFiles(t, dir, before)
			for name := range after {
				assert.NoFileExists(t, filepath.Join(dir, name), "written after the snapshot")
			}
			s.MustCLI("umount", dir)
			mounted = false

			// Restore to a file: the snapshot byte for byte, a clean file system.
			img := filepath.Join(t.TempDir(), "web-first.img")
			s.MustCLI("restore", "web@"+id, "--to", img)
			got, err := os.ReadFile(img)
			require.NoError(t, err)
			want := readNBD(t, s, "web@"+id)
			require.True(t, bytes.Equal(want, got), "the restored image is the snapshot: %s", nbdtest.Diff(want, got))
			nbdtest.MustRun(t, time.Minute, tools["e2fsck"], "-fn", img)

			// A point in time: frozen, so the point is a clean file system;
			// once the repository holds it, the time after it reads both
			// the files before the snapshot and those after.
			nbdtest.MustRun(t, time.Minute, tools["fsfreeze"], "-f", fs.Dir)
			waitSealed(t, s, "web")
			at := time.Now().UTC().Format(time.RFC3339Nano)
			nbdtest.MustRun(t, time.Minute, tools["fsfreeze"], "-u", fs.Dir)
			then := t.TempDir()
			s.MustCLI("mount", "web@"+at, then)
			checkFiles(t, then, before)
			checkFiles(t, then, after)
			s.MustCLI("umount", then)

			fs.Unmount(t)
			head.Unmount(t)
			s.MustCLI("status")
		})
	}
}

// TestImportThenMount: an ext4 image imported into a volume mounts with
// its files.
func TestImportThenMount(t *testing.T) {
	tools := nbdtest.Tools(t, "mkfs.ext4")
	nbdtest.RequireRoot(t, "mount")
	src := t.TempDir()
	files := writeFiles(t, src, "file", 6, 3)
	img := filepath.Join(t.TempDir(), "seed.img")
	nbdtest.MustRun(t, time.Minute, tools["mkfs.ext4"], "-q", "-d", src, img, "32M")

	s := servertest.Start(t, servertest.Options{})
	s.MustCLI("volume", "create", "seed", "--size", "32M")
	id := strings.TrimSpace(s.MustCLI("import", "seed", "--from", img).Stdout)
	r := s.MustCLI("snapshot", "list", "seed")
	assert.Regexp(t, id+`\s.*sealed`, r.Stdout)

	dir := t.TempDir()
	s.MustCLI("mount", "seed@"+id, dir)
	defer s.MustCLI("umount", dir)
	checkFiles(t, dir, files)
}

// writeFiles writes n files of random sizes named prefix-i into dir and
// returns their SHA-256s by name.
func writeFiles(t *testing.T, dir, prefix string, n int, seed uint64) map[string]string {
	t.Helper()
	sums := map[string]string{}
	for i := range n {
		name := fmt.Sprintf("%s-%d", prefix, i)
		data := nbdtest.RandomBytes(seed*1000+uint64(i), 1000+i*300_000)
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), data, 0o644))
		sum := sha256.Sum256(data)
		sums[name] = hex.EncodeToString(sum[:])
	}
	return sums
}

// checkFiles checks that dir holds the files with these SHA-256s.
func checkFiles(t *testing.T, dir string, sums map[string]string) {
	t.Helper()
	for name, want := range sums {
		data, err := os.ReadFile(filepath.Join(dir, name))
		if !assert.NoError(t, err) {
			continue
		}
		sum := sha256.Sum256(data)
		assert.Equal(t, want, hex.EncodeToString(sum[:]), "%s", name)
	}
}
