package integration

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// TestNBDFuseExt4 puts an ext4 file system on an export through nbdfuse and
// a loop mount, writes files, unmounts everything, then mounts the export
// again through a new nbdfuse and reads the files back. Last, the export's
// own file, read without NBD, must hold a clean file system with the same
// files.
func TestNBDFuseExt4(t *testing.T) {
	nbdtest.RequireRoot(t, "mount -o loop")
	tools := nbdtest.Tools(t, "nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "debugfs", "mount", "umount", "losetup")

	const size = 64 * mib
	backing := nbdtest.SparseFile(t, "fs.img", size)
	srv := nbdtest.StartUnix(t, &nbd.Server{Exports: nbd.NewExportMap(
		&nbd.Export{Name: "fs", Description: "ext4 through nbdfuse", Backend: nbdtest.OpenFile(t, backing, false)},
	)})

	files := map[string][]byte{
		"hello.txt":        []byte("hello from nbdvault\n"),
		"random.bin":       nbdtest.RandomBytes(42, int(3*mib+123)),
		"dir/sparse.bin":   append(make([]byte, mib), nbdtest.RandomBytes(43, int(257*kib))...),
		"dir/sub/tiny.bin": {0},
	}
	sums := make(map[string]string)
	for name, b := range files {
		s := sha256.Sum256(b)
		sums[name] = hex.EncodeToString(s[:])
	}

	// Session 1: mkfs, mount, write, unmount.
	{
		fuse := nbdtest.NBDFuse(t, srv.URI("fs"))
		fi, err := os.Stat(fuse.File)
		require.NoError(t, err)
		require.Equal(t, size, fi.Size(), "size of the nbdfuse file")

		nbdtest.MustRun(t, cmdTimeout, tools["mkfs.ext4"], "-q", "-F", "-L", "nbdvault", fuse.File)
		mnt := nbdtest.MountLoop(t, fuse.File, "")
		for name, b := range files {
			path := filepath.Join(mnt.Dir, name)
			require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
			f, err := os.Create(path)
			require.NoError(t, err)
			_, err = f.Write(b)
			require.NoError(t, err)
			require.NoError(t, f.Sync())
			require.NoError(t, f.Close())
		}
		mnt.Unmount(t)
		fuse.Unmount(t)
		if t.Failed() {
			t.FailNow()
		}
	}

	// Session 2: a new nbdfuse, so nothing comes from the first one's
	// caches.
	{
		fuse := nbdtest.NBDFuse(t, srv.URI("fs"))
		fsck := nbdtest.Run(t, cmdTimeout, tools["e2fsck"], "-f", "-n", fuse.File)
		assert.True(t, fsck.OK(), "e2fsck -fn through nbdfuse must find a clean file system:\n%s", fsck)

		mnt := nbdtest.MountLoop(t, fuse.File, "")
		for name := range files {
			b, err := os.ReadFile(filepath.Join(mnt.Dir, name))
			if !assert.NoError(t, err, "read %s back", name) {
				continue
			}
			s := sha256.Sum256(b)
			assert.Equal(t, sums[name], hex.EncodeToString(s[:]), "sha256 of %s read back (%d bytes, want %d)", name, len(b), len(files[name]))
		}
		mnt.Unmount(t)
		fuse.Unmount(t)
	}

	// The export's file itself, without NBD.
	fsck := nbdtest.Run(t, cmdTimeout, tools["e2fsck"], "-f", "-n", backing)
	assert.True(t, fsck.OK(), "e2fsck -fn on the export's file must find a clean file system:\n%s", fsck)
	for _, name := range []string{"hello.txt", "random.bin"} {
		r := nbdtest.MustRun(t, cmdTimeout, tools["debugfs"], "-R", "cat /"+name, backing)
		if r.Stdout != string(files[name]) {
			s := sha256.Sum256([]byte(r.Stdout))
			t.Errorf("debugfs cat /%s on the export's file: sha256 %x (%d bytes), want %s (%d bytes)",
				name, s, len(r.Stdout), sums[name], len(files[name]))
		}
	}
}
