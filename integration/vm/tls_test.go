package vm_test

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/client"
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

// TestClientAttachOverTLS: nbdvault's own attach over TLS with a client
// certificate. The kernel has no TLS, so client attach does the
// handshake and hands the kernel a socket pair whose other end it pumps
// to the TLS connection. What the guest writes through the device
// (direct I/O, then fsync: FLUSH through the pump) is what the host reads
// back over TLS; client mirror create, given the files by relative
// paths, makes the volume an MD leg the same way. A plaintext attach is
// refused by the server, which requires TLS, and told what to give.
func TestClientAttachOverTLS(t *testing.T) {
	dir := t.TempDir()
	ca := testcerts.NewCA(t, "nbdvault")
	serverDir := testcerts.ServerDir(t, filepath.Join(dir, "server"), ca.Server(t, time.Time{}, time.Time{}), ca)
	cert := ca.Client(t, "db1")
	clientDir := testcerts.ClientDir(t, filepath.Join(dir, "client"), ca, cert)
	rules := filepath.Join(dir, "access")
	require.NoError(t, os.WriteFile(rules, []byte("cert:db1 md rw\n"), 0o644))
	s, socks := startServerArgs(t, []string{"--tls-certificates", serverDir, "--tls-required", "--access", rules}, "nbd0")
	s.MustCLI("volume", "create", "md", "--size", "16M")

	files := map[string]string{"/usr/bin/nbdvault": guestBinary(t)}
	for _, f := range []string{"ca-cert.pem", "client-cert.pem", "client-key.pem"} {
		files["/etc/nbdvault/tls/"+f] = filepath.Join(clientDir, f)
	}
	m := vm.Start(t, vm.Options{Disks: []vm.Disk{{Size: 16 << 20}}, Ports: socks, Files: files})
	m.MustRun(t, "modprobe nbd")
	m.ForwardPort(t, "nbd0", "/run/nbd0.sock")

	out, code := m.Run(t, "nbdvault client attach --server unix:/run/nbd0.sock --export md /dev/nbd0 2>&1")
	assert.NotEqual(t, 0, code, "a plaintext attach is refused:\n%s", out)
	assert.Contains(t, out, "the server requires TLS: give --tls-ca FILE")
	m.MustRun(t, "[ ! -e /sys/block/nbd0/pid ]") // and nothing is attached

	// The refused connection ended the port's: wait for QEMU's next.
	m.ForwardPort(t, "nbd0", "/run/nbd0.sock")
	const tlsFlags = " --tls-ca ca-cert.pem --tls-cert client-cert.pem --tls-key client-key.pem"
	dev := strings.TrimSpace(m.MustRun(t, "cd /etc/nbdvault/tls && nbdvault client attach --server unix:/run/nbd0.sock --export md"+tlsFlags))
	require.Equal(t, "/dev/nbd0", dev)
	assert.Equal(t, "write back", strings.TrimSpace(m.MustRun(t, "cat /sys/block/nbd0/queue/write_cache")),
		"the kernel knows the export takes FLUSH")
	sum := strings.Fields(m.MustRun(t, `set -e
dd if=/dev/urandom of=/tmp/data bs=1M count=4 2>/dev/null
dd if=/tmp/data of=/dev/nbd0 bs=1M oflag=direct conv=fsync 2>/dev/null
sha256sum /tmp/data`))[0]
	again := strings.Fields(m.MustRun(t, "dd if=/dev/nbd0 bs=1M count=4 iflag=direct 2>/dev/null | sha256sum"))[0]
	assert.Equal(t, sum, again, "the guest reads back what it wrote")
	m.MustRun(t, "nbdvault client detach /dev/nbd0")
	m.MustRun(t, "i=0; while [ -e /sys/block/nbd0/pid ]; do i=$((i+1)); [ $i -lt 100 ] || exit 1; usleep 50000; done")
	assert.Equal(t, sum, sha256Hex(readOverTLS(t, s, ca, cert, "md", 0, 4<<20)), "the host reads the guest's 4 MiB over TLS")

	// A mirror's leg over TLS: the attach process gets the files' absolute
	// paths (it runs on after mirror create, from /).
	m.ForwardPort(t, "nbd0", "/run/nbd0.sock")
	out = m.MustRun(t, "cd /etc/nbdvault/tls && modprobe raid1 && nbdvault client mirror create --device /dev/vda --volume md --destroy-data --server unix:/run/nbd0.sock"+tlsFlags+" 2>&1")
	assert.Contains(t, out, "md is the write-mostly leg (/dev/nbd0) of /dev/md0")
	out = m.MustRun(t, `set -e
mdadm --wait /dev/md0 >/dev/null 2>&1 || true
dd if=/dev/urandom of=/tmp/md bs=64k count=32 2>/dev/null
dd if=/tmp/md of=/dev/md0 bs=64k oflag=direct conv=fsync 2>/dev/null
sha256sum /tmp/md
mdadm --examine /dev/nbd0 | grep 'Data Offset'
mdadm --stop /dev/md0 >/dev/null 2>&1
nbdvault client detach /dev/nbd0
i=0; while [ -e /sys/block/nbd0/pid ]; do i=$((i+1)); [ $i -lt 100 ] || exit 1; usleep 50000; done`)
	var mdSum string
	var offset int64
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 2 && f[1] == "/tmp/md":
			mdSum = f[0]
		case len(f) >= 4 && f[0] == "Data" && f[1] == "Offset":
			n, err := strconv.ParseInt(f[3], 10, 64)
			require.NoError(t, err, "%s", line)
			offset = n * 512
		}
	}
	require.NotEmpty(t, mdSum, "%s", out)
	require.NotZero(t, offset, "the leg's data offset:\n%s", out)
	m.Shutdown(t)
	assert.Equal(t, mdSum, sha256Hex(readOverTLS(t, s, ca, cert, "md", offset, 2<<20)), "the volume holds what was written to the MD array")
}

// readOverTLS reads n bytes at off of export from the server's TCP
// listener, over TLS with the client certificate cert.
func readOverTLS(t *testing.T, s *servertest.Server, ca *testcerts.CA, cert *testcerts.Pair, export string, off, n int64) []byte {
	t.Helper()
	pair, err := tls.X509KeyPair(cert.CertPEM, cert.KeyPEM)
	require.NoError(t, err)
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	c, err := client.Dial(t.Context(), s.NBD, client.Options{Export: export,
		TLS: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}})
	require.NoError(t, err)
	defer c.Close()
	p := make([]byte, n)
	require.NoError(t, c.ReadAt(t.Context(), p, off))
	return p
}

func sha256Hex(p []byte) string {
	sum := sha256.Sum256(p)
	return hex.EncodeToString(sum[:])
}
