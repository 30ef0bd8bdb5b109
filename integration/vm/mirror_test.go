package vm_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
	"github.com/nbdvault/nbdvault/integration/vm"
)

// TestMirrorMD is issue #6's first scenario in a real kernel, by hand
// (the `client mirror` and `client snapshot` commands are still to come):
// an MD RAID1 of a local disk and an nbdvault volume attached as the
// write-mostly, write-behind leg; ext4 on the array; files written; the
// filesystem frozen until the array's bitmap is clean (every write,
// write-behind ones included, done on both legs); a snapshot; writes
// after it. The snapshot holds exactly the files
// written before it, with their checksums, mounted with nbdvault mount.
func TestMirrorMD(t *testing.T) {
	sockDir, err := os.MkdirTemp("", "nbdvault-sock-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "nbd.sock")
	s := servertest.Start(t, servertest.Options{Args: []string{"--listen", "unix:" + sock}})
	s.MustCLI("volume", "create", "md", "--size", "64M")

	m := vm.Start(t, vm.Options{Disks: []vm.Disk{{Size: 64 << 20}}, Ports: map[string]string{"nbd0": sock}})
	dev := m.AttachNBD(t, "nbd0", "md")
	m.MustRun(t, `set -e
modprobe raid1
mdadm --create /dev/md0 --run --level=1 --raid-devices=2 --metadata=1.2 \
	--bitmap=internal --write-behind=256 /dev/vda --write-mostly `+dev+` 2>&1
mdadm --wait /dev/md0 || true
cat /proc/mdstat`)
	out := m.MustRun(t, `set -e
mkfs.ext4 -q /dev/md0
modprobe ext4 && mkdir -p /mnt && mount -t ext4 /dev/md0 /mnt
for i in 1 2 3 4; do dd if=/dev/urandom of=/mnt/before-$i bs=64k count=$((i * 7)) 2>/dev/null; done
sync
cd /mnt && sha256sum before-*`)
	before := sums(out)
	require.Len(t, before, 4)

	// Freeze, then wait until the bitmap has no dirty bit: MD clears a
	// bit only once every leg has the writes of its region, write-behind
	// ones included.
	m.MustRun(t, "fsfreeze --freeze /mnt")
	start := time.Now()
	m.MustRun(t, `i=0
until mdadm -X /dev/vda | grep -q ' 0 dirty'; do
	i=$((i + 1)); [ $i -lt 300 ] || { mdadm -X /dev/vda; exit 1; }
	usleep 100000
done`)
	t.Logf("the bitmap was clean %v after the freeze", time.Since(start).Round(100*time.Millisecond))
	r := s.CLI("snapshot", "create", "md", "--label", "frozen")
	m.MustRun(t, "fsfreeze --unfreeze /mnt")
	require.True(t, r.OK(), "%s", r)
	m.MustRun(t, "dd if=/dev/urandom of=/mnt/after bs=64k count=3 2>/dev/null && sync")
	m.MustRun(t, "umount /mnt && mdadm --stop /dev/md0")
	m.DetachNBD(t, dev)
	m.Shutdown(t)

	// On the host, restore by mount: nbdvault finds the member's
	// superblock and mounts the array's data.
	dir := t.TempDir()
	r = s.MustCLI("mount", "md@frozen", dir)
	assert.Contains(t, r.Stderr, "MD RAID1 member (metadata 1.2)")
	defer s.MustCLI("umount", dir)
	got := sums(nbdtest.MustRun(t, time.Minute, "sh", "-c", "cd "+dir+" && sha256sum before-*").Stdout)
	assert.Equal(t, before, got, "the snapshot holds the files written before it")
	assert.NoFileExists(t, filepath.Join(dir, "after"), "and not the one written after")
}

// sums reads sha256sum's output into name → sum.
func sums(out string) map[string]string {
	m := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if f := strings.Fields(line); len(f) == 2 {
			m[f[1]] = f[0]
		}
	}
	return m
}
