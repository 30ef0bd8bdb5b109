package vm_test

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
	"github.com/nbdvault/nbdvault/integration/vm"
)

// TestMirrorMD is issue #6's first scenario in a real kernel (the array
// made with mdadm by hand, as a user who already has one would have it;
// `client mirror create` is in TestMirrorReconnect and TestMirrorLVM):
// an MD RAID1 of a local disk and an nbdvault volume attached as the
// write-mostly, write-behind leg; ext4 on the array; files written; the
// `nbdvault client snapshot` in the guest (freeze, wait until the array's
// bitmap is clean, flush, snapshot, thaw); writes after it. The snapshot holds exactly the files
// written before it, with their checksums: mounted on the host with
// nbdvault mount, and in the guest through nbd-client, read-only.
func TestMirrorMD(t *testing.T) {
	s, socks := startServer(t, "nbd0", "nbd1")
	s.MustCLI("volume", "create", "md", "--size", "64M")

	// The guest reaches the admin API through a port too: the host end
	// relays it to the server's TCP admin address.
	socks["admin"] = relayAdmin(t, s)
	m := vm.Start(t, vm.Options{
		Disks: []vm.Disk{{Size: 64 << 20}},
		Ports: socks,
		Files: map[string]string{"/usr/bin/nbdvault": guestBinary(t)},
	})
	m.ForwardPort(t, "admin", "/run/admin.sock")
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

	// nbdvault client snapshot in the guest: freeze, wait until the
	// array's bitmap is clean (every leg has every write, the
	// write-behind one included), flush the NBD device, snapshot, thaw.
	out = m.MustRun(t, "nbdvault client snapshot --volume md --freeze /mnt --md /dev/md0 --nbd-device "+dev+
		" --label frozen --server unix:/run/admin.sock --token "+s.Token()+" 2>&1")
	t.Logf("client snapshot: %s", strings.TrimSpace(out))
	assert.Contains(t, out, "wrote every block to every leg")

	m.MustRun(t, "dd if=/dev/urandom of=/mnt/after bs=64k count=3 2>/dev/null && sync")

	// In the guest, the snapshot through the standard nbd-client on a
	// second port: read-only, an MD member whose data starts at its data
	// offset, holding exactly the files before it.
	snapDev := m.AttachNBD(t, "nbd1", "md@frozen")
	out = m.MustRun(t, `set -e
[ "$(blockdev --getro `+snapDev+`)" = 1 ]
modprobe loop
off=$(mdadm --examine `+snapDev+` | sed -n 's/.*Data Offset : \([0-9]*\) sectors.*/\1/p')
losetup -r -o $((off * 512)) /dev/loop0 `+snapDev+`
mkdir -p /snap && mount -t ext4 -o ro,noload /dev/loop0 /snap
cd /snap && sha256sum before-*; ls /snap`)
	assert.Equal(t, before, sums(out), "the guest reads the snapshot's files")
	assert.NotContains(t, out, "after")
	m.MustRun(t, "umount /snap && losetup -d /dev/loop0")
	m.DetachNBD(t, snapDev)

	// And nbdvault mount in the guest, which has the kernel's NBD driver
	// and no nbdfuse: it attaches the snapshot through the kernel.
	m.ForwardPort(t, "nbd1", "/run/nbd1.sock")
	out = m.MustRun(t, `set -e
mkdir -p /restore
nbdvault mount md@frozen /restore --server unix:/run/admin.sock --token `+s.Token()+` --nbd unix:/run/nbd1.sock 2>&1
cd /restore && sha256sum before-*; ls /restore`)
	assert.Contains(t, out, "MD RAID1 member")
	assert.Equal(t, before, sums(out), "nbdvault mount through the kernel's NBD")
	assert.NotContains(t, out, "after")
	m.MustRun(t, "nbdvault umount /restore && ! grep -q /restore /proc/mounts && [ ! -e /sys/block/nbd1/pid ]")

	m.MustRun(t, "umount /mnt && mdadm --stop /dev/md0")
	m.DetachNBD(t, dev)
	m.Shutdown(t)

	// On the host, restore by mount: nbdvault finds the member's
	// superblock and mounts the array's data.
	checkHostMount(t, s, "md@frozen", "MD RAID1 member (metadata 1.2)", before)
}

// checkHostMount mounts snapshot snap on the host with nbdvault mount,
// which must say found, and checks it holds the files with the sums in
// before and not the file "after".
func checkHostMount(t *testing.T, s *servertest.Server, snap, found string, before map[string]string) {
	t.Helper()
	dir := t.TempDir()
	r := s.MustCLI("mount", snap, dir)
	assert.Contains(t, r.Stderr, found)
	defer s.MustCLI("umount", dir)
	got := sums(nbdtest.MustRun(t, time.Minute, "sh", "-c", "cd "+dir+" && sha256sum before-*").Stdout)
	assert.Equal(t, before, got, "%s mounted on the host holds the files written before it", snap)
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

var (
	guestOnce sync.Once
	guestPath string
	guestErr  error
)

// guestBinary builds nbdvault for the guest (static, no race detector),
// once per test process.
func guestBinary(t *testing.T) string {
	t.Helper()
	guestOnce.Do(func() { guestPath, guestErr = buildGuestBinary() })
	if guestErr != nil {
		t.Fatal(guestErr)
	}
	return guestPath
}

func buildGuestBinary() (string, error) {
	dir, err := os.MkdirTemp("", "nbdvault-guest-")
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, "nbdvault")
	_, file, _, _ := runtime.Caller(0)
	cmd := exec.Command("go", "build", "-o", out, "./cmd/nbdvault")
	cmd.Dir = filepath.Join(filepath.Dir(file), "..", "..")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/nbdvault for the guest: %v\n%s", err, b)
	}
	return out, nil
}

// relayAdmin serves the server's admin API on a Unix socket, for a VM
// port to connect to, and returns the socket's path. QEMU connects the
// port when it boots and keeps that one stream; a relay that dialled the
// server then would see the server close the idle connection long before
// the guest's first request. This one dials at the first bytes the guest
// sends, and again at the next bytes after the server closed an idle
// connection: HTTP requests are sequential on the stream.
func relayAdmin(t *testing.T, s *servertest.Server) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "nbdvault-admin-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	path, addr := filepath.Join(dir, "admin.sock"), strings.TrimPrefix(s.Admin, "http://")
	ln, err := net.Listen("unix", path)
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			guest, err := ln.Accept()
			if err != nil {
				return
			}
			go relayLazily(guest, addr)
		}
	}()
	return path
}

func relayLazily(guest net.Conn, addr string) {
	defer guest.Close()
	var mu sync.Mutex
	var server net.Conn
	buf := make([]byte, 64<<10)
	for {
		n, err := guest.Read(buf)
		if n > 0 {
			mu.Lock()
			if server == nil {
				c, derr := net.Dial("tcp", addr)
				if derr != nil {
					mu.Unlock()
					return
				}
				server = c
				go func() {
					_, _ = io.Copy(guest, c) // ends when the server closes
					mu.Lock()
					if server == c {
						server = nil
					}
					mu.Unlock()
					c.Close()
				}()
			}
			c := server
			mu.Unlock()
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			mu.Lock()
			if server != nil {
				server.Close()
			}
			mu.Unlock()
			return
		}
	}
}
