package chunkstore_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/chunkstore/storetest"
)

func openMem(*testing.T) chunkstore.Backend { return chunkstore.NewMem() }

func openLocal(t *testing.T) chunkstore.Backend {
	b, err := chunkstore.NewLocal(t.TempDir() + "/repo")
	require.NoError(t, err)
	return b
}

func TestMemBackend(t *testing.T)   { storetest.Backend(t, openMem) }
func TestMemStore(t *testing.T)     { storetest.Store(t, openMem) }
func TestLocalBackend(t *testing.T) { storetest.Backend(t, openLocal) }
func TestLocalStore(t *testing.T)   { storetest.Store(t, openLocal) }

// The suite also holds with Retry in front, as Open builds backends.
func TestRetryLocalBackend(t *testing.T) {
	storetest.Backend(t, func(t *testing.T) chunkstore.Backend {
		return chunkstore.NewRetry(openLocal(t), chunkstore.RetryPolicy{})
	})
}
