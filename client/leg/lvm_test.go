package leg

import (
	"encoding/binary"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/internal/testdev"
)

// lvmText is volume group metadata of the shape LVM 2.03 writes for a
// raid1 logical volume with its second image on pv1.
const lvmText = `vg {
id = "Qm3Nhq-1lpV-aYhk-Ad0k-8lQb-5Wvt-5hCkTw"
seqno = 7
format = "lvm2" # informational
status = ["RESIZEABLE", "READ", "WRITE"]
extent_size = 8192		# 4 Megabytes
physical_volumes {
pv0 {
id = "aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaaa"
device = "/dev/vda"
pe_start = 2048
pe_count = 15
}
pv1 {
id = "bbbbbb-bbbb-bbbb-bbbb-bbbb-bbbb-bbbbbb"
device = "/dev/nbd0"	# Hint only
pe_start = 2048
pe_count = 15
}
}
logical_volumes {
data {
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 1
segment1 {
start_extent = 0
extent_count = 8
type = "raid1"
device_count = 2
region_size = 1024
raids = [
"data_rmeta_0", "data_rimage_0",
"data_rmeta_1", "data_rimage_1"
]
}
}
data_rmeta_1 {
segment_count = 1
segment1 {
start_extent = 0
extent_count = 1
type = "striped"
stripe_count = 1
stripes = [
"pv1", 0
]
}
}
data_rimage_1 {
segment_count = 1
segment1 {
start_extent = 0
extent_count = 8
type = "striped"
stripe_count = 1
stripes = [
"pv1", 1
]
}
}
}
}
`

func TestLegFromMetadata(t *testing.T) {
	leg, err := legFromMetadata(lvmText, "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", 64<<20)
	require.NoError(t, err)
	assert.Equal(t, &LVMLeg{LV: "vg/data", Image: "data_rimage_1", Offset: 1<<20 + 4<<20, Size: 32 << 20}, leg)

	_, err = legFromMetadata(lvmText, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", 64<<20)
	assert.ErrorContains(t, err, "holds no whole image", "pv0's image is not in this metadata")
	_, err = legFromMetadata(lvmText, "cccccccccccccccccccccccccccccccc", 64<<20)
	assert.ErrorContains(t, err, "does not list this physical volume")
	_, err = legFromMetadata(lvmText, "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", 16<<20)
	assert.ErrorContains(t, err, "does not fit")
	_, err = legFromMetadata("vg { = }", "b", 1)
	assert.Error(t, err)
}

// lvmPV is the start of an LVM2 physical volume with uuid (undashed):
// the label in sector 1, one metadata area at 4 KiB of mdaSize bytes
// holding text at textOff into the area (512 at least: the ring follows
// the area's header).
func lvmPV(uuid, text string, mdaSize, textOff uint64) []byte {
	const mda = 4096
	img := make([]byte, mda+mdaSize)
	le := binary.LittleEndian
	l := img[512:]
	copy(l, "LABELONE")
	le.PutUint64(l[8:], 1)
	le.PutUint32(l[20:], 32)
	copy(l[24:], "LVM2 001")
	pvh := l[32:]
	copy(pvh, uuid)
	le.PutUint64(pvh[32:], 64<<20)
	le.PutUint64(pvh[40:], 1<<20) // data area at pe_start, then the end of the list
	le.PutUint64(pvh[72:], mda)   // metadata area, then the end of the list
	le.PutUint64(pvh[80:], mdaSize)
	h := img[mda:]
	copy(h[4:], " LVM2 x[5A%r0N*>")
	le.PutUint32(h[20:], 1)
	le.PutUint64(h[24:], mda)
	le.PutUint64(h[32:], mdaSize)
	le.PutUint64(h[40:], textOff)
	le.PutUint64(h[48:], uint64(len(text)))
	n := copy(h[textOff:], text)
	copy(h[512:], text[n:]) // wrapped round the ring
	return img
}

const pv1UUID = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"

func TestFindLVMLeg(t *testing.T) {
	find := func(img []byte) (*LVMLeg, error) {
		return FindLVM(testdev.Placed{Size: 64 << 20, Parts: map[int64][]byte{0: img}}, 64<<20)
	}
	want := &LVMLeg{LV: "vg/data", Image: "data_rimage_1", Offset: 1<<20 + 4<<20, Size: 32 << 20}

	leg, err := find(lvmPV(pv1UUID, lvmText, 1<<20, 512))
	require.NoError(t, err)
	assert.Equal(t, want, leg)

	leg, err = find(lvmPV(pv1UUID, lvmText, 4096, 4096-100)) // the text wraps round the ring
	require.NoError(t, err)
	assert.Equal(t, want, leg)

	leg, err = find(make([]byte, 4096))
	require.NoError(t, err)
	assert.Nil(t, leg, "no label")
}

// TestFindLVMLegDamaged feeds physical volumes whose label or metadata
// area header point outside the sector, the area or the volume: each must
// be an error that says what is wrong, not a panic.
func TestFindLVMLegDamaged(t *testing.T) {
	le := binary.LittleEndian
	for _, c := range []struct {
		name   string
		damage func(img []byte)
		want   string
	}{
		{"pv header past the sector", func(img []byte) { le.PutUint32(img[512+20:], 4000) }, "LVM label in sector 1: its PV header at 4000"},
		{"pv header overlapping the label", func(img []byte) { le.PutUint32(img[512+20:], 8) }, "LVM label in sector 1: its PV header at 8"},
		{"pv header cut by the sector's end", func(img []byte) { le.PutUint32(img[512+20:], 500) }, "LVM label in sector 1: its PV header at 500"},
		{"metadata area past the end", func(img []byte) { le.PutUint64(img[512+32+72:], 1<<40) }, "LVM metadata area at offset 1099511627776"},
		{"metadata area at a negative offset", func(img []byte) { le.PutUint64(img[512+32+72:], 1<<63) }, "LVM metadata area at offset 9223372036854775808"},
		{"text past the area", func(img []byte) { le.PutUint64(img[4096+48:], 1<<20) }, "LVM metadata area at offset 4096: text of 1048576 bytes runs past the area's end"},
		{"text offset in the header", func(img []byte) { le.PutUint64(img[4096+40:], 100) }, "LVM metadata area at offset 4096: text at 100"},
		{"text offset past the area", func(img []byte) { le.PutUint64(img[4096+40:], 1<<62) }, "LVM metadata area at offset 4096: text at 4611686018427387904"},
		{"area past the volume", func(img []byte) { le.PutUint64(img[4096+32:], 1<<62) }, "LVM metadata area at offset 4096: 4611686018427387904 bytes run past the volume's end"},
		{"area start elsewhere", func(img []byte) { le.PutUint64(img[4096+24:], 1<<62) }, "LVM metadata area at offset 4096: its header says it starts at 4611686018427387904"},
		{"huge text", func(img []byte) { le.PutUint64(img[4096+48:], 1<<62) }, "LVM metadata area at offset 4096: text of 4611686018427387904 bytes"},
	} {
		t.Run(c.name, func(t *testing.T) {
			img := lvmPV(pv1UUID, lvmText, 8192, 512)
			c.damage(img)
			leg, err := FindLVM(testdev.Placed{Size: 64 << 20, Parts: map[int64][]byte{0: img}}, 64<<20)
			assert.Nil(t, leg)
			assert.ErrorContains(t, err, c.want)
		})
	}
}

// TestLegFromMetadataDamaged feeds metadata with numbers and shapes no
// LVM writes: errors, not panics, overflows or a leg outside the volume.
func TestLegFromMetadataDamaged(t *testing.T) {
	for _, c := range []struct{ old, new, want string }{
		{"data_rmeta_1 {", "data_rmeta_1 = 1\nx {", ""},                       // a logical volume that is not a section: skipped
		{"data_rimage_1 {", "data_rimage_1 = 1\ny {", "holds no whole image"}, // an image that is not a section
		{"extent_size = 8192", "extent_size = 36028797018963968", "extent size"},
		{"extent_size = 8192", "extent_size = -8", "extent size"},
		{"pe_start = 2048\npe_count = 15\n}\n}", "pe_start = -2048\npe_count = 15\n}\n}", "pe_start"},
		{`"pv1", 1`, `"pv1", 4503599627370496`, "does not fit"},
		{`"pv1", 1`, `"pv1", -1`, "first extent"},
		{`"pv1", 1`, `"pv1", "x"`, "first extent"},
		{"extent_count = 8\ntype = \"striped\"", "extent_count = 4503599627370496\ntype = \"striped\"", "does not fit"},
		{"extent_count = 8\ntype = \"striped\"", "extent_count = 0\ntype = \"striped\"", "extents"},
		{"vg {", "vg {\n}\nvg2 {", "2 volume groups"},
	} {
		text := strings.Replace(lvmText, c.old, c.new, 1)
		require.NotEqual(t, lvmText, text, c.old)
		leg, err := legFromMetadata(text, pv1UUID, 64<<20)
		if c.want == "" {
			assert.NoError(t, err, c.new)
			continue
		}
		assert.Nil(t, leg, c.new)
		assert.ErrorContains(t, err, c.want, c.new)
	}
}

func TestParseLVMConfig(t *testing.T) {
	root, err := parseLVMConfig(`a = "x \"q\" \\ y" # c
b = [1, "two", 3]
s { t = 5 }`)
	require.NoError(t, err)
	assert.Equal(t, lvmSection{"a": `x "q" \ y`, "b": []string{"1", "two", "3"}, "s": lvmSection{"t": "5"}}, root)

	for text, want := range map[string]string{
		"vg { = }":                  "unexpected",
		"a = }":                     "unexpected",
		"a = [1, 2":                 "not closed",
		"s { t = 5":                 "not closed",
		"}":                         "unexpected",
		`a = "x`:                    "not closed",
		"a":                         "ends the metadata",
		"a =":                       "ends the metadata",
		strings.Repeat("s {", 1000): "nested",
	} {
		_, err := parseLVMConfig(text)
		assert.ErrorContains(t, err, want, text)
	}
}
