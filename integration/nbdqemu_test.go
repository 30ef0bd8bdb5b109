package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// TestQEMUImg writes a raw image into an export with qemu-img convert and
// checks it with qemu-img compare, over a Unix socket and over TCP.
func TestQEMUImg(t *testing.T) {
	tools := nbdtest.Tools(t, "qemu-img", "qemu-io")
	qemuImg := tools["qemu-img"]

	const size = 64 * mib
	// The image: random data, but for 8 MiB at 16 MiB that were never
	// written (a hole in its file, zeros to readers).
	image := nbdtest.SparseFile(t, "image.raw", size)
	want := nbdtest.RandomBytes(7, int(size))
	clear(want[16*mib : 24*mib])
	nbdtest.WriteAt(t, image, want[:16*mib], 0)
	nbdtest.WriteAt(t, image, want[24*mib:], 24*mib)
	// The export starts as all 0xff, so the zeros only come back if qemu-img
	// wrote or zeroed them.
	backing := filepath.Join(t.TempDir(), "disk.img")
	require.NoError(t, os.WriteFile(backing, slices.Repeat([]byte{0xff}, int(size)), 0o600))

	srv := nbdtest.StartUnix(t, &nbd.Server{Exports: nbd.NewExportMap(
		&nbd.Export{Name: "disk", Backend: nbdtest.OpenFile(t, backing, false)},
	)})
	tcp := srv.ListenTCP(t) // the same server on 127.0.0.1 too

	nbdtest.MustRun(t, cmdTimeout, qemuImg, "convert", "-n", "-f", "raw", "-O", "raw", image, srv.URI("disk"))
	nbdtest.SameBytes(t, want, nbdtest.ReadFile(t, backing), "the export's file after qemu-img convert -n")

	for _, uri := range []string{srv.URI("disk"), tcp.URI("disk")} {
		r := nbdtest.MustRun(t, cmdTimeout, qemuImg, "compare", "-f", "raw", "-F", "raw", uri, image)
		assert.Contains(t, r.Stdout, "Images are identical", "qemu-img compare %s", uri)

		info := nbdtest.MustRun(t, cmdTimeout, qemuImg, "info", "--output=json", uri)
		assert.Contains(t, info.Stdout, fmt.Sprintf(`"virtual-size": %d`, size), "qemu-img info %s:\n%s", uri, info)
	}

	// compare must see a change made through the server: one sector at
	// 40 MiB.
	nbdtest.MustRun(t, cmdTimeout, tools["qemu-io"], "-f", "raw", srv.URI("disk"), "-c", "write -P 0x5a 40M 512")
	r := nbdtest.Run(t, cmdTimeout, qemuImg, "compare", "-f", "raw", "-F", "raw", tcp.URI("disk"), image)
	assert.Equal(t, 1, r.ExitCode, "qemu-img compare exits 1 when the images differ:\n%s", r)
	assert.Contains(t, r.Stdout, fmt.Sprintf("Content mismatch at offset %d", 40*mib), "qemu-img compare:\n%s", r)
}

// TestQEMUIO drives an export with qemu-io: writes of a pattern, reads that
// check it, zeroing, discard, flush, FUA and asynchronous writes; then the
// export's file must hold exactly what those commands wrote. A read-only
// export cannot be written.
func TestQEMUIO(t *testing.T) {
	qemuIO := nbdtest.Tool(t, "qemu-io")

	const size = 16 * mib
	backing := nbdtest.SparseFile(t, "disk.img", size)
	const roSize = 4 * mib
	roPath := nbdtest.SparseFile(t, "ro.img", roSize)
	roWant := slices.Repeat([]byte{0x77}, int(roSize))
	nbdtest.WriteAt(t, roPath, roWant, 0)

	const bigSize = 1 << 40 // offsets past 32 bits
	bigPath := nbdtest.SparseFile(t, "big.img", bigSize)

	srv := nbdtest.StartTCP(t, &nbd.Server{Exports: nbd.NewExportMap(
		&nbd.Export{Name: "disk", Backend: nbdtest.OpenFile(t, backing, false)},
		&nbd.Export{Name: "ro", Backend: nbdtest.OpenFile(t, roPath, true), ReadOnly: true},
		&nbd.Export{Name: "big", Backend: nbdtest.OpenFile(t, bigPath, false)},
	)})
	uri := srv.URI("disk")

	// qemu-io runs every -c command, prints what failed, and exits 1 if any
	// did.
	qemuio := func(t *testing.T, args ...string) *nbdtest.Result {
		t.Helper()
		var cmd []string
		for _, c := range args {
			cmd = append(cmd, "-c", c)
		}
		return nbdtest.Run(t, cmdTimeout, qemuIO, append([]string{"-f", "raw", uri}, cmd...)...)
	}
	ok := func(t *testing.T, r *nbdtest.Result) {
		t.Helper()
		if !r.OK() || strings.Contains(r.Output(), "failed") || strings.Contains(r.Output(), "error") {
			t.Fatalf("qemu-io:\n%s", r)
		}
	}

	// want mirrors what the export must hold.
	want := make([]byte, size)
	fill := func(off, n int64, b byte) { copy(want[off:off+n], slices.Repeat([]byte{b}, int(n))) }

	t.Run("write and read pattern", func(t *testing.T) {
		ok(t, qemuio(t, "write -P 0xab 1M 1M", "read -P 0xab 1M 1M", "read -P 0 0 1M", "read -P 0 2M 1M"))
		fill(mib, mib, 0xab)
	})

	t.Run("wrong pattern fails", func(t *testing.T) {
		r := qemuio(t, "read -P 0xcd 1M 1M")
		assert.Equal(t, 1, r.ExitCode, "a read with the wrong pattern must fail:\n%s", r)
		assert.Contains(t, r.Output(), fmt.Sprintf("Pattern verification failed at offset %d", mib), "qemu-io:\n%s", r)
		r = qemuio(t, "read -P 0xab 1536k 1M") // half 0xab, half zeros
		assert.Equal(t, 1, r.ExitCode, "a read across the pattern's end must fail:\n%s", r)
	})

	t.Run("write zeroes", func(t *testing.T) {
		ok(t, qemuio(t,
			"write -z 1280k 256k", // NBD_CMD_WRITE_ZEROES
			"read -P 0 1280k 256k",
			"read -P 0xab 1M 256k",
			"read -P 0xab 1536k 512k",
		))
		fill(1280*kib, 256*kib, 0)
	})

	t.Run("discard", func(t *testing.T) {
		// NBD_CMD_TRIM. The protocol lets trimmed bytes read as anything;
		// nbd.File punches a hole, so they read as zeros.
		ok(t, qemuio(t,
			"write -P 0x3c 4M 1M",
			"discard 4M 512k",
			"read -P 0 4M 512k",
			"read -P 0x3c 4608k 512k",
		))
		fill(4*mib+512*kib, 512*kib, 0x3c)
	})

	t.Run("flush and fua", func(t *testing.T) {
		ok(t, qemuio(t,
			"write -P 0x21 6M 64k",
			"flush",                      // NBD_CMD_FLUSH
			"write -f -P 0x22 6208k 64k", // NBD_CMD_FLAG_FUA
			"read -P 0x21 6M 64k",
			"read -P 0x22 6208k 64k",
		))
		fill(6*mib, 64*kib, 0x21)
		fill(6*mib+64*kib, 64*kib, 0x22)
	})

	t.Run("aio", func(t *testing.T) {
		// Requests in flight together, answered in any order.
		var cmds []string
		for i := range int64(16) {
			cmds = append(cmds, fmt.Sprintf("aio_write -P 0x%02x %d 128k", 0x40+i, 8*mib+i*128*kib))
		}
		cmds = append(cmds, fmt.Sprintf("aio_write -f -P 0x%02x %d 4k", 0x60, 12*mib))
		cmds = append(cmds, "aio_flush")
		for i := range int64(16) {
			cmds = append(cmds, fmt.Sprintf("aio_read -P 0x%02x %d 128k", 0x40+i, 8*mib+i*128*kib))
		}
		cmds = append(cmds, "aio_flush")
		for i := range int64(16) {
			cmds = append(cmds, fmt.Sprintf("read -P 0x%02x %d 128k", 0x40+i, 8*mib+i*128*kib))
		}
		cmds = append(cmds, fmt.Sprintf("read -P 0x60 %d 4k", 12*mib))
		ok(t, qemuio(t, cmds...))
		for i := range int64(16) {
			fill(8*mib+i*128*kib, 128*kib, byte(0x40+i))
		}
		fill(12*mib, 4*kib, 0x60)
	})

	t.Run("unaligned", func(t *testing.T) {
		// block_size_minimum is 1: qemu sends these as they are.
		ok(t, qemuio(t,
			"write -P 0x71 1000 3000",
			"write -P 0x72 14680063 4099", // 14 MiB - 1
			"read -P 0x71 1000 3000",
			"read -P 0 0 1000",
			"read -P 0 4000 96",
			"read -P 0x72 14680063 4099",
			"read -P 0 14680062 1",
		))
		fill(1000, 3000, 0x71)
		fill(14*mib-1, 4099, 0x72)
	})

	t.Run("beyond 4 GiB", func(t *testing.T) {
		big := srv.URI("big")
		at4G := int64(4<<30 - 32*kib) // straddles 4 GiB
		atEnd := int64(bigSize - 64*kib)
		r := nbdtest.Run(t, cmdTimeout, qemuIO, "-f", "raw", big,
			"-c", fmt.Sprintf("write -P 0x4a %d 64k", at4G),
			"-c", fmt.Sprintf("write -P 0xe0 %d 64k", atEnd),
			"-c", fmt.Sprintf("read -P 0x4a %d 64k", at4G),
			"-c", fmt.Sprintf("read -P 0xe0 %d 64k", atEnd),
			"-c", fmt.Sprintf("read -P 0 %d 64k", at4G+64*kib),
			"-c", "read -P 0 0 64k")
		ok(t, r)
		f, err := os.Open(bigPath)
		require.NoError(t, err)
		defer f.Close()
		for _, c := range []struct {
			off int64
			b   byte
		}{{at4G, 0x4a}, {atEnd, 0xe0}} {
			got := make([]byte, 64*kib)
			_, err := f.ReadAt(got, c.off)
			require.NoError(t, err)
			nbdtest.SameBytes(t, slices.Repeat([]byte{c.b}, int(64*kib)), got, fmt.Sprintf("the 1 TiB file at %d", c.off))
		}
	})

	t.Run("backend holds the writes", func(t *testing.T) {
		nbdtest.SameBytes(t, want, nbdtest.ReadFile(t, backing), "the export's file after the qemu-io commands")
	})

	t.Run("read-only export", func(t *testing.T) {
		r := nbdtest.Run(t, cmdTimeout, qemuIO, "-f", "raw", srv.URI("ro"), "-c", "write -P 0x11 0 64k")
		assert.NotEqual(t, 0, r.ExitCode, "writing to a read-only export must fail:\n%s", r)
		r = nbdtest.Run(t, cmdTimeout, qemuIO, "-r", "-f", "raw", srv.URI("ro"), "-c", "read -P 0x77 0 4M")
		assert.True(t, r.OK(), "read of the read-only export:\n%s", r)
		nbdtest.SameBytes(t, roWant, nbdtest.ReadFile(t, roPath), "the read-only export's file")
	})
}
