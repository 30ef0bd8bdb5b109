package vm_test

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/vm"
)

// TestClientAttach: nbdvault client attach puts a volume under the
// guest kernel's NBD driver with FLUSH and FUA on (a write-back cache
// the kernel flushes), a snapshot read-only, and detach lets go.
func TestClientAttach(t *testing.T) {
	s, socks := startServer(t, "nbd0", "nbd1")
	s.MustCLI("volume", "create", "vol", "--size", "16M")

	m := vm.Start(t, vm.Options{
		Ports: socks,
		Files: map[string]string{"/usr/bin/nbdvault": guestBinary(t)},
	})
	m.MustRun(t, "modprobe nbd")
	m.ForwardPort(t, "nbd0", "/run/nbd0.sock")
	dev := strings.TrimSpace(m.MustRun(t, "nbdvault client attach --server unix:/run/nbd0.sock --export vol"))
	require.Equal(t, "/dev/nbd0", dev)
	assert.Equal(t, "16777216", strings.TrimSpace(m.MustRun(t, "blockdev --getsize64 "+dev)))
	assert.Equal(t, "write back", strings.TrimSpace(m.MustRun(t, "cat /sys/block/nbd0/queue/write_cache")),
		"the kernel knows the export takes FLUSH")
	assert.Equal(t, "1", strings.TrimSpace(m.MustRun(t, "cat /sys/block/nbd0/queue/fua")), "and FUA")
	sum := strings.Fields(m.MustRun(t, `set -e
dd if=/dev/urandom of=/tmp/data bs=1M count=4 2>/dev/null
dd if=/tmp/data of=`+dev+` bs=1M oflag=direct conv=fsync 2>/dev/null
sha256sum /tmp/data`))[0]
	m.MustRun(t, "nbdvault client detach "+dev)
	m.MustRun(t, "i=0; while [ -e /sys/block/nbd0/pid ]; do i=$((i+1)); [ $i -lt 100 ] || exit 1; usleep 50000; done")

	// A snapshot attaches read-only, with the bytes written before it.
	id := strings.TrimSpace(s.MustCLI("snapshot", "create", "vol").Stdout)
	m.ForwardPort(t, "nbd1", "/run/nbd1.sock")
	dev = strings.TrimSpace(m.MustRun(t, "nbdvault client attach --server unix:/run/nbd1.sock --export vol@"+id))
	assert.Equal(t, "1", strings.TrimSpace(m.MustRun(t, "blockdev --getro "+dev)))
	got := strings.Fields(m.MustRun(t, "dd if="+dev+" bs=1M count=4 iflag=direct 2>/dev/null | sha256sum"))[0]
	assert.Equal(t, sum, got)
	_, code := m.Run(t, "dd if=/dev/zero of="+dev+" bs=4k count=1 oflag=direct 2>/dev/null")
	assert.NotZero(t, code, "a snapshot's device takes no writes")
	m.MustRun(t, "nbdvault client detach "+dev)

	// Mistakes: an unknown export, a device in use.
	out, code := m.Run(t, "nbdvault client attach --server unix:/run/nbd1.sock --export nope 2>&1")
	assert.NotZero(t, code)
	assert.Contains(t, out, "nope", out)
	m.Shutdown(t)
}
