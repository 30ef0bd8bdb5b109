package vm_test

import (
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/vm"
)

// TestMirrorLVM is issue #6's third scenario: an LVM logical volume in
// use, with files, converted to raid1 with the nbdvault volume as its
// second leg by `client mirror create --lvm` (the data is kept and copied
// to the volume), a snapshot with `client snapshot` (freeze, wait until
// dm-raid's bitmap is clean, flush), and
// a file written after. The snapshot, attached read-only in the guest
// with `client attach`, holds the logical volume's file system at the
// leg's extents: exactly the files written before it; so does the same
// snapshot mounted on the host with nbdvault mount.
func TestMirrorLVM(t *testing.T) {
	s, socks := startServer(t, "nbd0", "nbd1")
	s.MustCLI("volume", "create", "lvleg", "--size", "64M")
	socks["admin"] = relayAdmin(t, s)
	m := vm.Start(t, vm.Options{
		Disks: []vm.Disk{{Size: 64 << 20}},
		Ports: socks,
		Files: map[string]string{"/usr/bin/nbdvault": guestBinary(t)},
	})
	m.MustRun(t, "modprobe nbd && modprobe raid1 && modprobe dm-raid && modprobe ext4 && modprobe loop")
	m.ForwardPort(t, "nbd0", "/run/nbd0.sock")
	m.ForwardPort(t, "admin", "/run/admin.sock")

	// A logical volume in use before the mirror exists.
	out := m.MustRun(t, `set -e
pvcreate -q /dev/vda && vgcreate -q vg /dev/vda && lvcreate -q -y -L 32M -n data vg
mkfs.ext4 -q /dev/vg/data && mkdir -p /mnt && mount -t ext4 /dev/vg/data /mnt
for i in 1 2 3; do dd if=/dev/urandom of=/mnt/before-$i bs=64k count=$((i * 5)) 2>/dev/null; done
sync && cd /mnt && sha256sum before-*`)
	before := sums(out)
	require.Len(t, before, 3)

	out = m.MustRun(t, `set -e
nbdvault client mirror create --lvm --device vg/data --server unix:/run/nbd0.sock --volume lvleg --timeout 10s 2>&1
i=0; until [ "$(lvs --noheadings -o sync_percent vg/data | tr -d ' ')" = "100.00" ]; do
	i=$((i+1)); [ $i -lt 600 ] || { lvs -a -o +devices,sync_percent vg; exit 1; }; usleep 100000
done
lvs -a -o name,attr,devices vg 2>&1`)
	t.Logf("after mirror create --lvm:\n%s", out)
	assert.Contains(t, out, "/dev/nbd0", "a leg on the volume")
	assert.Equal(t, before, sums(m.MustRun(t, "cd /mnt && sha256sum before-*")), "the conversion kept the data")
	status := m.MustRun(t, "nbdvault client mirror status --lvm vg/data")
	assert.Contains(t, status, "data_rimage_1", status)
	assert.Regexp(t, `Write-intent bitmap : \d+ of \d+ regions dirty`, status)

	out = m.MustRun(t, "nbdvault client snapshot --volume lvleg --freeze /mnt --lvm vg/data --nbd-device /dev/nbd0 --label frozen"+
		" --server unix:/run/admin.sock --token "+s.Token()+" 2>/tmp/err; cat /tmp/err >&2")
	id := regexp.MustCompile(`(?m)^\d{8}T\S+$`).FindString(out)
	require.NotEmpty(t, id, "the snapshot's ID: %s", out)
	assert.Contains(t, out, "vg/data wrote every block to every leg", out)
	m.MustRun(t, "dd if=/dev/urandom of=/mnt/after bs=64k count=3 2>/dev/null && sync")

	// Where the leg's image lies on the volume: the PV's first extent
	// plus the rimage's extents on it.
	pe := m.MustRun(t, `set -e
start=$(pvs --noheadings --units b --nosuffix -o pe_start /dev/nbd0 | tr -d ' ')
size=$(vgs --noheadings --units b --nosuffix -o vg_extent_size vg | tr -d ' ')
first=$(lvs -a --noheadings -o seg_pe_ranges vg/data_rimage_1 | sed 's/.*://; s/-.*//' | tr -d ' ')
echo $((start + first * size))`)
	offset, err := strconv.ParseInt(strings.TrimSpace(pe), 10, 64)
	require.NoError(t, err, "%q", pe)
	m.ForwardPort(t, "nbd1", "/run/nbd1.sock")
	out = m.MustRun(t, `set -e
dev=$(nbdvault client attach --server unix:/run/nbd1.sock --export lvleg@`+id+`)
losetup -r -o `+strconv.FormatInt(offset, 10)+` /dev/loop0 $dev
mkdir -p /snap && mount -t ext4 -o ro,noload /dev/loop0 /snap
cd /snap && sha256sum before-*; ls /snap`)
	assert.Equal(t, before, sums(out), "the snapshot holds the files written before it")
	assert.NotContains(t, out, "after")
	m.MustRun(t, "umount /snap && losetup -d /dev/loop0 && nbdvault client detach /dev/nbd1")
	m.Shutdown(t)

	// On the host, restore by mount: nbdvault reads the PV's metadata
	// itself and mounts the image's extents.
	checkHostMount(t, s, "lvleg@frozen", "LVM physical volume with vg/data's image data_rimage_1", before)
}
