package main

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestDefaultMaxMemory(t *testing.T) {
	assert.EqualValues(t, 256<<20, defaultMaxMemory(0), "unknown memory: the floor")
	assert.EqualValues(t, 256<<20, defaultMaxMemory(1<<30), "1 GiB machine: the floor")
	assert.EqualValues(t, 1<<30, defaultMaxMemory(8<<30))
	assert.EqualValues(t, 2<<30, defaultMaxMemory(64<<30), "capped")
	assert.Positive(t, physicalMemory(), "this machine's memory")
}

func TestMemoryLimit(t *testing.T) {
	assert.EqualValues(t, 1<<30, memoryLimit(1<<30, 0), "the cache takes its quarter")
	assert.EqualValues(t, 768<<20+1<<30, memoryLimit(1<<30, 1<<30), "a larger --cache adds what it takes past its quarter")
}
