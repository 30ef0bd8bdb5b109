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
	"github.com/nbdvault/nbdvault/internal/testcerts"
)

// TestMirrorMDOverTLS is TestMirrorMD's source host as the issue of
// access control has it: the kernel's nbd-client attaches the volume over
// TLS with a client certificate (-certfile, -keyfile, -cacertfile,
// -tlshostname) as the write-mostly leg of an MD RAID1; the snapshot is
// taken in the guest with a token that may only snapshot that volume;
// the snapshot holds exactly the files written before it. The rules give
// the head to the certificate alone: root (QEMU's end of the socket, and
// the host's nbdvault mount) may read snapshots only, so a plaintext
// nbd-client is refused the head, and the attach that works is the
// certificate's.
func TestMirrorMDOverTLS(t *testing.T) {
	dir := t.TempDir()
	ca := testcerts.NewCA(t, "nbdvault")
	serverDir := testcerts.ServerDir(t, filepath.Join(dir, "server"), ca.Server(t, time.Time{}, time.Time{}), ca)
	clientDir := testcerts.ClientDir(t, filepath.Join(dir, "client"), ca, ca.Client(t, "db1"))
	rules := filepath.Join(dir, "access")
	require.NoError(t, os.WriteFile(rules, []byte("cert:db1 md rw\nuid:0 * ro\n"), 0o644))
	s, socks := startServerArgs(t, []string{"--tls-certificates", serverDir, "--access", rules}, "nbd0", "nbd1")
	s.MustCLI("volume", "create", "md", "--size", "64M")
	s.MustCLI("volume", "create", "other", "--size", "1M")
	token := strings.TrimSpace(s.MustCLI("token", "create", "--volume", "md", "--scope", "snapshot").Stdout)

	socks["admin"] = relayAdmin(t, s)
	files := map[string]string{"/usr/bin/nbdvault": guestBinary(t)}
	for _, f := range []string{"ca-cert.pem", "client-cert.pem", "client-key.pem"} {
		files["/etc/nbdvault/tls/"+f] = filepath.Join(clientDir, f)
	}
	m := vm.Start(t, vm.Options{Disks: []vm.Disk{{Size: 64 << 20}}, Ports: socks, Files: files})
	m.ForwardPort(t, "admin", "/run/admin.sock")

	out, code := m.TryAttachNBD(t, "nbd1", "md")
	assert.NotEqual(t, 0, code, "a plaintext nbd-client is refused the head:\n%s", out)
	assert.Contains(t, s.Log(), `uid:0 (root) may not use the head of volume \"md\"`)

	dev := m.AttachNBDTLS(t, "nbd0", "md", "/etc/nbdvault/tls")
	m.MustRun(t, `set -e
modprobe raid1
mdadm --create /dev/md0 --run --level=1 --raid-devices=2 --metadata=1.2 \
	--bitmap=internal --write-behind=256 /dev/vda --write-mostly `+dev+` 2>&1
mdadm --wait /dev/md0 || true`)
	out = m.MustRun(t, `set -e
mkfs.ext4 -q /dev/md0
modprobe ext4 && mkdir -p /mnt && mount -t ext4 /dev/md0 /mnt
for i in 1 2 3; do dd if=/dev/urandom of=/mnt/before-$i bs=64k count=$((i * 5)) 2>/dev/null; done
sync
cd /mnt && sha256sum before-*`)
	before := sums(out)
	require.Len(t, before, 3)

	out = m.MustRun(t, "nbdvault client snapshot --volume md --freeze /mnt --md /dev/md0 --nbd-device "+dev+
		" --label frozen --server unix:/run/admin.sock --token "+token+" 2>&1")
	assert.Contains(t, out, "wrote every block to every leg")
	m.MustRun(t, "dd if=/dev/urandom of=/mnt/after bs=64k count=3 2>/dev/null && sync")
	m.MustRun(t, "umount /mnt && mdadm --stop /dev/md0")
	m.DetachNBD(t, dev)
	m.Shutdown(t)

	assert.Contains(t, s.Log(), "by=\"token ")
	r := nbdtest.RunEnv(t, time.Minute, []string{"NBDVAULT_SERVER=" + s.Admin, "NBDVAULT_TOKEN=" + token}, servertest.Binary(t), "snapshot", "delete", "md@frozen")
	assert.Equal(t, 4, r.ExitCode, "the source host's token may not delete:\n%s", r)
	checkHostMount(t, s, "md@frozen", "MD RAID1 member (metadata 1.2)", before)
}
