package vm_test

import (
	"bytes"
	"compress/gzip"
	"encoding/base64"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/client/leg"
	"github.com/nbdvault/nbdvault/integration/vm"
	"github.com/nbdvault/nbdvault/internal/testdev"
)

// legDisk is the size of the disks TestLegFixtures makes arrays of.
const legDisk = 32 << 20

// TestLegFixtures makes an MD RAID1 (metadata 1.2) and an LVM raid1 in a
// real kernel with the real tools, and checks that client/leg finds the
// data in a member as mdadm and LVM say it lies. With
// NBDVAULT_UPDATE_FIXTURES=1 it also writes the members' metadata to
// client/leg/testdata, where the package's unit tests read it.
func TestLegFixtures(t *testing.T) {
	m := vm.Start(t, vm.Options{Disks: []vm.Disk{{Size: legDisk}, {Size: legDisk}, {Size: legDisk}, {Size: legDisk}}})
	m.MustRun(t, "modprobe raid1 && modprobe dm-raid")

	// MD: where mdadm says the data of /dev/vdb lies, and its first 8 KiB
	// (the 1.2 superblock is at 4 KiB).
	out := m.MustRun(t, `set -e
mdadm --create /dev/md0 --run --level=1 --raid-devices=2 --metadata=1.2 --bitmap=internal /dev/vda /dev/vdb >/dev/null 2>&1
mdadm --examine /dev/vdb | sed -n 's/^ *Data Offset : \([0-9]*\) sectors.*/offset \1/p; s/^ *Used Dev Size : \([0-9]*\) sectors.*/used \1/p; s/^ *Avail Dev Size : \([0-9]*\) sectors.*/avail \1/p'
echo dump $(dd if=/dev/vdb bs=4096 count=2 2>/dev/null | gzip -9 | base64 | tr -d '\n')`)
	fields := keyed(t, out)
	if fields["used"] == "" { // mdadm says Used Dev Size only when it is not all of Avail Dev Size
		fields["used"] = fields["avail"]
	}
	md := unpack(t, fields["dump"])
	got, err := leg.FindMD(testdev.Placed{Size: legDisk, Parts: map[int64][]byte{0: md}}, legDisk)
	require.NoError(t, err)
	require.NotNil(t, got, "an MD member")
	assert.Equal(t, &leg.MDMember{Version: "1.2", Offset: 512 * number(t, fields["offset"]), Size: 512 * number(t, fields["used"])}, got)

	// LVM: a raid1 LV over /dev/vdc and /dev/vdd; where its image on
	// /dev/vdd lies, and the PV's first MiB (label and metadata area).
	out = m.MustRun(t, `set -e
pvcreate -q /dev/vdc /dev/vdd && vgcreate -q vg /dev/vdc /dev/vdd
lvcreate -q -y --type raid1 -m 1 -L 8M -n data vg >/dev/null
img=$(lvs -a --noheadings -o lv_name,devices vg | awk '/rimage/ && /vdd/ {print $1}' | tr -d '[]')
start=$(pvs --noheadings --units b --nosuffix -o pe_start /dev/vdd | tr -d ' ')
size=$(vgs --noheadings --units b --nosuffix -o vg_extent_size vg | tr -d ' ')
first=$(lvs -a --noheadings -o seg_pe_ranges vg/$img | sed 's/.*://; s/-.*//' | tr -d ' ')
echo image $img
echo offset $((start + first * size))
echo dump $(dd if=/dev/vdd bs=1M count=1 2>/dev/null | gzip -9 | base64 | tr -d '\n')`)
	fields = keyed(t, out)
	pv := unpack(t, fields["dump"])
	lv, err := leg.FindLVM(testdev.Placed{Size: legDisk, Parts: map[int64][]byte{0: pv}}, legDisk)
	require.NoError(t, err)
	require.NotNil(t, lv, "an LVM PV with a raid1 image")
	assert.Equal(t, &leg.LVMLeg{LV: "vg/data", Image: fields["image"], Offset: number(t, fields["offset"]), Size: 8 << 20}, lv)

	if os.Getenv("NBDVAULT_UPDATE_FIXTURES") != "" {
		dir := filepath.Join("..", "..", "client", "leg", "testdata")
		for name, data := range map[string][]byte{"md-1.2-member.gz": md, "lvm-raid1-pv.gz": pv} {
			require.NoError(t, os.WriteFile(filepath.Join(dir, name), pack(t, data), 0o644))
		}
		expect := fmt.Sprintf("md offset=%d size=%d\nlvm image=%s offset=%d size=%d\n", got.Offset, got.Size, lv.Image, lv.Offset, lv.Size)
		require.NoError(t, os.WriteFile(filepath.Join(dir, "expected.txt"), []byte(expect), 0o644))
	}
}

// keyed reads "key value" lines.
func keyed(t *testing.T, out string) map[string]string {
	t.Helper()
	f := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), " "); ok {
			f[k] = strings.TrimSpace(v)
		}
	}
	return f
}

func number(t *testing.T, s string) int64 {
	t.Helper()
	n, err := strconv.ParseInt(s, 10, 64)
	require.NoError(t, err, "%q", s)
	return n
}

func unpack(t *testing.T, b64 string) []byte {
	t.Helper()
	raw, err := base64.StdEncoding.DecodeString(b64)
	require.NoError(t, err)
	zr, err := gzip.NewReader(bytes.NewReader(raw))
	require.NoError(t, err)
	data, err := io.ReadAll(zr)
	require.NoError(t, err)
	return data
}

func pack(t *testing.T, data []byte) []byte {
	t.Helper()
	var b bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&b, gzip.BestCompression)
	_, err := zw.Write(data)
	require.NoError(t, err)
	require.NoError(t, zw.Close())
	return b.Bytes()
}
