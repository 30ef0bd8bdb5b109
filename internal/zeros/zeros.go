// Package zeros tells a block of zeros, the one test the chunk store (an
// all-zero chunk is a hole, never stored) and the transfers (a zero block
// is not sent) share.
package zeros

import "bytes"

// Block is 1 MiB of zeros, never written to: what zeros are compared with,
// and written or hashed from.
var Block = make([]byte, 1<<20)

// Is reports whether p is all zeros, comparing it with Block a block at a
// time (memequal's vector speed).
func Is(p []byte) bool {
	for len(p) > 0 {
		n := min(len(p), len(Block))
		if !bytes.Equal(p[:n], Block[:n]) {
			return false
		}
		p = p[n:]
	}
	return true
}
