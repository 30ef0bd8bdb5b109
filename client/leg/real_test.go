package leg

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/internal/testdev"
)

// Metadata written by the real mdadm and LVM in the VM tests'
// kernel (integration/vm TestLegFixtures, which checks the same and
// rewrites testdata with NBDVAULT_UPDATE_FIXTURES=1): an MD 1.2 member's
// first 8 KiB and an LVM PV's first MiB, on 32 MiB disks, and where the
// tools said the data lies (expected.txt).
func TestRealMetadata(t *testing.T) {
	const disk = 32 << 20
	load := func(name string) []byte {
		f, err := os.Open(filepath.Join("testdata", name))
		require.NoError(t, err)
		defer f.Close()
		zr, err := gzip.NewReader(f)
		require.NoError(t, err)
		b, err := io.ReadAll(zr)
		require.NoError(t, err)
		return b
	}
	want, err := os.ReadFile(filepath.Join("testdata", "expected.txt"))
	require.NoError(t, err)

	md, err := FindMD(testdev.Placed{Size: disk, Parts: map[int64][]byte{0: load("md-1.2-member.gz")}}, disk)
	require.NoError(t, err)
	require.NotNil(t, md)
	lv, err := FindLVM(testdev.Placed{Size: disk, Parts: map[int64][]byte{0: load("lvm-raid1-pv.gz")}}, disk)
	require.NoError(t, err)
	require.NotNil(t, lv)
	got := fmt.Sprintf("md offset=%d size=%d\nlvm image=%s offset=%d size=%d\n", md.Offset, md.Size, lv.Image, lv.Offset, lv.Size)
	require.Equal(t, string(want), got)
	require.Equal(t, "1.2", md.Version)
	require.Equal(t, "vg/data", lv.LV)

	// Neither is the other.
	none, err := FindLVM(testdev.Placed{Size: disk, Parts: map[int64][]byte{0: load("md-1.2-member.gz")}}, disk)
	require.NoError(t, err)
	require.Nil(t, none)
	notMD, err := FindMD(bytes.NewReader(load("lvm-raid1-pv.gz")), 1<<20)
	require.NoError(t, err)
	require.Nil(t, notMD)
}
