package nbd

import (
	"math/bits"
	"sync"
)

// Payload buffers come from pools by power-of-two size class, 4 KiB to
// 32 MiB, so a connection under load allocates nothing per request.
const (
	minClassShift = 12
	numClasses    = 26 - minClassShift // up to 2^25 = 32 MiB
)

var bufPools [numClasses]sync.Pool

func sizeClass(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// getBuf returns a buffer of length n. Sizes above the largest class are
// allocated and not pooled.
func getBuf(n int) *[]byte {
	c := sizeClass(n)
	if c >= numClasses {
		b := make([]byte, n)
		return &b
	}
	if v := bufPools[c].Get(); v != nil {
		b := v.(*[]byte)
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<(c+minClassShift))
	return &b
}

func putBuf(b *[]byte) {
	c := sizeClass(cap(*b))
	if c < numClasses && cap(*b) == 1<<(c+minClassShift) {
		bufPools[c].Put(b)
	}
}
