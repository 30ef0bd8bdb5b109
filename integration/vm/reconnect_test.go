package vm_test

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/nbdvault/nbdvault/integration/vm"
)

// TestMirrorReconnect is issue #6's second scenario: `client mirror
// create` makes the volume the write-mostly leg of an MD RAID1; the
// server dies while the guest writes, MD fails the NBD leg and goes on;
// after the server is back, `client mirror reconnect` re-adds the leg,
// MD copies only the regions its bitmap marked (the server counts what it
// is sent), and the volume then matches the array.
func TestMirrorReconnect(t *testing.T) {
	s, socks := startServer(t, "nbd0")
	s.MustCLI("volume", "create", "leg", "--size", "64M")
	m := vm.Start(t, vm.Options{
		Disks: []vm.Disk{{Size: 64 << 20}},
		Ports: socks,
		Files: map[string]string{"/usr/bin/nbdvault": guestBinary(t)},
	})
	m.MustRun(t, "modprobe nbd && modprobe raid1 && modprobe ext4")
	m.ForwardPort(t, "nbd0", "/run/nbd0.sock")
	dry := m.MustRun(t, "nbdvault client mirror create --device /dev/vda --server unix:/run/nbd0.sock --volume leg --dry-run")
	assert.Contains(t, dry, "mdadm --create /dev/md0")
	out := m.MustRun(t, `set -e
nbdvault client mirror create --device /dev/vda --server unix:/run/nbd0.sock --volume leg \
	--destroy-data --bitmap-chunk=1M --timeout 5s
mdadm --wait /dev/md0 || true
mkfs.ext4 -q /dev/md0 && mkdir -p /mnt && mount -t ext4 /dev/md0 /mnt
dd if=/dev/urandom of=/mnt/a bs=1M count=8 2>/dev/null && sync
nbdvault client mirror status --md /dev/md0`)
	assert.Contains(t, out, "writemostly", out)
	assert.Regexp(t, `Write-intent bitmap : \d+ of \d+ regions dirty`, out)
	m.MustRun(t, `i=0; until mdadm -X /dev/vda | grep -q ' 0 dirty'; do i=$((i+1)); [ $i -lt 600 ] || exit 1; usleep 100000; done`)

	// The server dies; the guest goes on writing; MD fails the NBD leg
	// once its requests time out.
	s.Kill()
	m.MustRun(t, `dd if=/dev/urandom of=/mnt/b bs=1M count=4 2>/dev/null; sync
i=0; until [ "$(cat /sys/block/md0/md/degraded)" = 1 ]; do i=$((i+1)); [ $i -lt 600 ] || { mdadm --detail /dev/md0; exit 1; }; usleep 100000; done`)
	s.Restart()
	m.ForwardPort(t, "nbd0", "/run/nbd0.sock") // a fresh relay to the new server

	start := time.Now()
	out = m.MustRun(t, `set -e
nbdvault client mirror reconnect --md /dev/md0 --server unix:/run/nbd0.sock --volume leg --timeout 5s
mdadm --wait /dev/md0 || true
cat /proc/mdstat`)
	t.Logf("reconnect and resync in %v:\n%s", time.Since(start).Round(100*time.Millisecond), out)
	m.MustRun(t, `i=0; until [ "$(cat /sys/block/md0/md/degraded)" = 0 ]; do i=$((i+1)); [ $i -lt 600 ] || { mdadm --detail /dev/md0; exit 1; }; usleep 100000; done`)

	// Only the marked regions were copied: the server was sent (since
	// its restart) the 4 MiB written while it was gone and the regions
	// around them, far less than the 64 MiB array.
	sent := s.BytesWritten("leg")
	t.Logf("the resync sent %.0f bytes to the volume", sent)
	assert.Less(t, sent, float64(24<<20), "a bitmap resync, not a full copy")
	assert.Greater(t, sent, float64(4<<20), "what was written while the leg was gone")

	// The volume now matches the array: both members' data, from the
	// data offset on, past every cache.
	m.MustRun(t, "umount /mnt && sync")
	off := strings.TrimSpace(m.MustRun(t, `mdadm --examine /dev/vda | sed -n 's/.*Data Offset : \([0-9]*\) sectors.*/\1/p'`))
	local := m.MustRun(t, "dd if=/dev/vda bs=512 skip="+off+" count=120000 iflag=direct 2>/dev/null | sha256sum")
	leg := m.MustRun(t, "dd if=/dev/nbd0 bs=512 skip="+off+" count=120000 iflag=direct 2>/dev/null | sha256sum")
	assert.Equal(t, strings.Fields(local)[0], strings.Fields(leg)[0], "the NBD leg holds the array's data")
	m.MustRun(t, "mdadm --stop /dev/md0 && nbdvault client detach /dev/nbd0")
	m.Shutdown(t)
}
