package vm_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/client"
	"github.com/nbdvault/nbdvault/integration/servertest"
	"github.com/nbdvault/nbdvault/integration/vm"
)

// TestMain removes the nbdvault binaries servertest and guestBinary built.
func TestMain(m *testing.M) {
	code := m.Run()
	servertest.Cleanup()
	if guestPath != "" {
		os.RemoveAll(filepath.Dir(guestPath))
	}
	os.Exit(code)
}

// TestVMSmoke: the guest's kernel attaches an nbdvault volume through a
// virtio-serial port, writes 8 MiB to it, and the host reads the same
// bytes back from the server. The guest also has what the MD and LVM
// scenarios build on: raid1 and device-mapper.
func TestVMSmoke(t *testing.T) {
	s, socks := startServer(t, "nbd0")
	s.MustCLI("volume", "create", "vol", "--size", "32M")

	m := vm.Start(t, vm.Options{Ports: socks})

	dev := m.AttachNBD(t, "nbd0", "vol")
	require.Equal(t, "/dev/nbd0", dev)
	require.Equal(t, "33554432\n", m.MustRun(t, "blockdev --getsize64 "+dev))

	// Random bytes from the guest's kernel; the host knows them by their
	// SHA-256, which busybox computes before they go to the device.
	start := time.Now()
	out := m.MustRun(t, `set -e
dd if=/dev/urandom of=/tmp/data bs=1M count=8 2>/dev/null
sha256sum /tmp/data
dd if=/tmp/data of=`+dev+` bs=1M oflag=direct conv=fsync 2>/dev/null
blockdev --flushbufs `+dev)
	t.Logf("guest wrote 8 MiB through /dev/nbd0 in %v", time.Since(start).Round(time.Millisecond))
	guestSum := strings.Fields(out)[0]

	// Read back through the kernel too, past the page cache.
	back := m.MustRun(t, "dd if="+dev+" bs=1M count=8 iflag=direct 2>/dev/null | sha256sum")
	require.Equal(t, guestSum, strings.Fields(back)[0], "the guest reads back what it wrote")
	m.DetachNBD(t, dev)

	head := readHead(t, s)
	sum := sha256.Sum256(head[:8<<20])
	require.Equal(t, guestSum, hex.EncodeToString(sum[:]), "the server has the guest's 8 MiB")
	require.True(t, bytes.Count(head[8<<20:], []byte{0}) == len(head)-8<<20, "the rest of the volume is still zeros")

	// What the MD and LVM scenarios need.
	m.MustRun(t, "modprobe raid1 && grep -q raid1 /proc/mdstat")
	m.MustRun(t, "modprobe dm-raid && dmsetup version && dmsetup targets | grep -q raid")
	m.MustRun(t, "mdadm --version && lvm version && mkfs.ext4 -V && socat -V | head -1")

	// The port reconnects: a second attach after the detach works.
	dev = m.AttachNBD(t, "nbd0", "vol")
	again := m.MustRun(t, "dd if="+dev+" bs=1M count=8 iflag=direct 2>/dev/null | sha256sum")
	require.Equal(t, guestSum, strings.Fields(again)[0])
	m.DetachNBD(t, dev)

	m.Shutdown(t)
}

// startServer starts nbdvault listening on one Unix socket per name, in a
// short folder of its own (socket paths are limited to 108 bytes), and
// returns the sockets by name, ready for vm.Options.Ports.
func startServer(t *testing.T, names ...string) (*servertest.Server, map[string]string) {
	t.Helper()
	return startServerArgs(t, nil, names...)
}

// startServerArgs is startServer with more serve flags.
func startServerArgs(t *testing.T, extra []string, names ...string) (*servertest.Server, map[string]string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "nbdvault-sock-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	socks := map[string]string{}
	var args []string
	for _, n := range names {
		socks[n] = filepath.Join(dir, n+".sock")
		args = append(args, "--listen", "unix:"+socks[n])
	}
	return servertest.Start(t, servertest.Options{Args: append(args, extra...)}), socks
}

// readHead reads the whole head of vol with our NBD client.
func readHead(t *testing.T, s *servertest.Server) []byte {
	t.Helper()
	c, err := client.Dial(t.Context(), s.NBD, client.Options{Export: "vol"})
	require.NoError(t, err)
	defer c.Close()
	p := make([]byte, c.Size())
	require.NoError(t, c.ReadAt(t.Context(), p, 0))
	return p
}
