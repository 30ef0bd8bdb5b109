package main

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
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
	assert.Equal(t, &lvmLeg{LV: "vg/data", Image: "data_rimage_1", Offset: 1<<20 + 4<<20, Size: 32 << 20}, leg)

	_, err = legFromMetadata(lvmText, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", 64<<20)
	assert.ErrorContains(t, err, "holds no whole image", "pv0's image is not in this metadata")
	_, err = legFromMetadata(lvmText, "cccccccccccccccccccccccccccccccc", 64<<20)
	assert.ErrorContains(t, err, "does not list this physical volume")
	_, err = legFromMetadata(lvmText, "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", 16<<20)
	assert.ErrorContains(t, err, "does not fit")
	_, err = legFromMetadata("vg { = }", "b", 1)
	assert.Error(t, err)
}
