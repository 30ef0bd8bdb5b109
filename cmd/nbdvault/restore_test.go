package main

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/urfave/cli/v2"
)

// TestHashZeros checks that hashZeros, which feeds a hole to the hash in
// blocks of zeros, gives the digest of a real buffer of zeros, for every
// checksum restore prints: from the start and after data that leaves the
// hash in the middle of a block or chunk, for runs shorter and longer
// than its block of zeros and not a whole number of them.
func TestHashZeros(t *testing.T) {
	sizes := []int64{0, 1, 63, 64, 1023, 1024, 1025, 4096, int64(len(zeros)) - 1, int64(len(zeros)),
		int64(len(zeros)) + 1, 3*int64(len(zeros)) + 12345}
	for _, cs := range checksums {
		if cs.new == nil {
			continue
		}
		for _, prefix := range [][]byte{nil, []byte("x"), bytes.Repeat([]byte{0xa5}, 1500)} {
			for _, n := range sizes {
				name := fmt.Sprintf("%s/after %d bytes/%d zeros", cs.name, len(prefix), n)
				h := cs.new()
				h.Write(prefix)
				hashZeros(h, n)
				want := cs.new()
				want.Write(prefix)
				want.Write(make([]byte, n))
				assert.Equal(t, hex.EncodeToString(want.Sum(nil)), hex.EncodeToString(h.Sum(nil)), name)
			}
		}
	}
}

// TestChecksums checks the digests restore prints against the published
// test vectors (b3sum and sha256sum print the same), and that --checksum
// takes blake3, sha256 and none and refuses anything else as a usage error.
func TestChecksums(t *testing.T) {
	for _, c := range []struct{ name, in, want string }{
		{"blake3", "", "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"},
		{"blake3", "abc", "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"},
		{"sha256", "", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
		{"sha256", "abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
	} {
		cs, err := parseChecksum(c.name)
		require.NoError(t, err)
		require.Equal(t, c.name, cs.name)
		h := cs.new()
		h.Write([]byte(c.in))
		assert.Equal(t, c.want, hex.EncodeToString(h.Sum(nil)), "%s of %q", c.name, c.in)
	}
	// A large input, hashed over many 1 KiB chunks at once: the digest
	// b3sum 1.2.0 prints for 3 MiB + 1 bytes of 0..250 repeated.
	large := make([]byte, 3<<20+1)
	for i := range large {
		large[i] = byte(i % 251)
	}
	cs, err := parseChecksum("blake3")
	require.NoError(t, err)
	h := cs.new()
	h.Write(large)
	assert.Equal(t, largeBLAKE3, hex.EncodeToString(h.Sum(nil)), "blake3 of 3 MiB + 1")

	none, err := parseChecksum("none")
	require.NoError(t, err)
	assert.Nil(t, none.new, "none hashes nothing")

	assert.Equal(t, "blake3", checksums[0].name, "the default is first")
	var def string
	for _, f := range restoreCommand().Flags {
		if sf, ok := f.(*cli.StringFlag); ok && sf.Name == "checksum" {
			def = sf.Value
		}
	}
	assert.Equal(t, "blake3", def, "--checksum defaults to blake3")

	for _, bad := range []string{"", "md5", "BLAKE3", "sha-256", "blake3 "} {
		_, err := parseChecksum(bad)
		var ec cli.ExitCoder
		if assert.ErrorAs(t, err, &ec, "%q", bad) {
			assert.Equal(t, exitUsage, ec.ExitCode(), "%q", bad)
			assert.Contains(t, err.Error(), "want blake3", "%q: the error names the values", bad)
		}
	}
}

// largeBLAKE3 is what b3sum 1.2.0 prints for the 3 MiB + 1 bytes that
// TestChecksums hashes.
const largeBLAKE3 = "fd984eaa20053d346cc7c79a175338f91556e68b871d877b23568a4587d9875b"
