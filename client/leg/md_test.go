package leg

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/internal/testdev"
)

func TestFindMDMember(t *testing.T) {
	const size = 64 << 20
	find := func(img []byte) (*MDMember, error) { return FindMD(bytes.NewReader(img), int64(len(img))) }

	m, err := find(testdev.MDImage(size, 4096, 1, 2048, 129024, 129024))
	require.NoError(t, err)
	assert.Equal(t, &MDMember{Version: "1.2", Offset: 1 << 20, Size: 129024 * 512}, m)

	m, err = find(testdev.MDImage(size, 0, 1, 16, 131000, 0)) // used 0: the data size
	require.NoError(t, err)
	assert.Equal(t, &MDMember{Version: "1.1", Offset: 8192, Size: 131000 * 512}, m)

	end := ((int64(size) >> 9) - 16) &^ 7 * 512 // where md puts a 1.0 superblock
	m, err = find(testdev.MDImage(size, end, 1, 0, uint64(end/512), uint64(end/512)))
	require.NoError(t, err)
	assert.Equal(t, &MDMember{Version: "1.0", Offset: 0, Size: end}, m)

	m, err = find(make([]byte, size))
	require.NoError(t, err)
	assert.Nil(t, m, "no superblock")

	_, err = find(testdev.MDImage(size, 4096, 5, 2048, 129024, 129024))
	assert.ErrorContains(t, err, "RAID5 member")
	_, err = find(testdev.MDImage(size, 4096, 1, 2048, 1<<40, 1<<40))
	assert.ErrorContains(t, err, "does not fit")
}

// TestFindMDMemberDamaged feeds superblocks whose sector counts overflow
// when made bytes, or put the data over the superblock: each must be an
// error, never a member whose data lies elsewhere than the superblock says.
func TestFindMDMemberDamaged(t *testing.T) {
	const size = 64 << 20
	end := uint64(((int64(size) >> 9) - 16) &^ 7) // sector of a 1.0 superblock
	for _, c := range []struct {
		name string
		img  []byte
		want string
	}{
		{"data offset wrapping to 1 MiB", testdev.MDImage(size, 4096, 1, 1<<55+2048, 129024, 129024), "data offset"},
		{"data offset negative as bytes", testdev.MDImage(size, 4096, 1, 1<<54, 129024, 129024), "data offset"},
		{"data size wrapping to 1 MiB", testdev.MDImage(size, 4096, 1, 2048, 1<<55+2048, 0), "data size"},
		{"used size wrapping", testdev.MDImage(size, 4096, 1, 2048, 1<<56, 1<<55+2048), "data size"},
		{"data over a 1.2 superblock", testdev.MDImage(size, 4096, 1, 8, 1024, 1024), "superblock"},
		{"data over a 1.1 superblock", testdev.MDImage(size, 0, 1, 0, 1024, 1024), "superblock"},
		{"data over a 1.0 superblock", testdev.MDImage(size, int64(end)*512, 1, 0, end+8, end+8), "superblock"},
		{"data past the end", testdev.MDImage(size, 4096, 1, 2048, 1<<40, 1<<40), "does not fit"},
	} {
		t.Run(c.name, func(t *testing.T) {
			m, err := FindMD(bytes.NewReader(c.img), size)
			assert.Nil(t, m)
			assert.ErrorContains(t, err, c.want)
		})
	}
}
