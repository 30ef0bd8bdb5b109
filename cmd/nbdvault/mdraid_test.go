package main

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// mdImage is a size-byte device with a version-1 superblock at at.
func mdImage(size, at int64, level uint32, dataOffset, dataSize, used uint64) []byte {
	img := make([]byte, size)
	sb := img[at:]
	le := binary.LittleEndian
	le.PutUint32(sb[0:], mdMagic)
	le.PutUint32(sb[4:], 1)
	le.PutUint32(sb[72:], level)
	le.PutUint64(sb[80:], used)
	le.PutUint64(sb[128:], dataOffset)
	le.PutUint64(sb[136:], dataSize)
	return img
}

func TestFindMDMember(t *testing.T) {
	const size = 64 << 20
	find := func(img []byte) (*mdMember, error) { return findMDMember(bytes.NewReader(img), int64(len(img))) }

	m, err := find(mdImage(size, 4096, 1, 2048, 129024, 129024))
	require.NoError(t, err)
	assert.Equal(t, &mdMember{Version: "1.2", Offset: 1 << 20, Size: 129024 * 512}, m)

	m, err = find(mdImage(size, 0, 1, 16, 131000, 0)) // used 0: the data size
	require.NoError(t, err)
	assert.Equal(t, &mdMember{Version: "1.1", Offset: 8192, Size: 131000 * 512}, m)

	end := ((int64(size) >> 9) - 16) &^ 7 * 512 // where md puts a 1.0 superblock
	m, err = find(mdImage(size, end, 1, 0, uint64(end/512), uint64(end/512)))
	require.NoError(t, err)
	assert.Equal(t, &mdMember{Version: "1.0", Offset: 0, Size: end}, m)

	m, err = find(make([]byte, size))
	require.NoError(t, err)
	assert.Nil(t, m, "no superblock")

	_, err = find(mdImage(size, 4096, 5, 2048, 129024, 129024))
	assert.ErrorContains(t, err, "RAID5 member")
	_, err = find(mdImage(size, 4096, 1, 2048, 1<<40, 1<<40))
	assert.ErrorContains(t, err, "does not fit")
}
