package volume

import (
	"os"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/integration/miniotest"
	"github.com/nbdvault/nbdvault/integration/seaweedtest"
)

func TestMain(m *testing.M) {
	if dir := os.Getenv("NBDVAULT_CRASH_DIR"); dir != "" {
		crashChild(dir) // the child process of TestCrashKill9
	}
	code := m.Run()
	miniotest.StopShared()
	seaweedtest.StopShared()
	os.Exit(code)
}

// TestVolumeModelMinIO runs the model test with the repository in a real
// MinIO, through the retrying S3 backend the server uses.
func TestVolumeModelMinIO(t *testing.T) {
	m := miniotest.StartShared(t)
	runModel(t, func(t *testing.T) chunkstore.Backend {
		b := m.Backend(t)
		require.NotNil(t, b)
		return chunkstore.NewRetry(b, chunkstore.DefaultRetryPolicy)
	}, 2)
	t.Run("journal", func(t *testing.T) {
		runJournalModel(t, func(t *testing.T) chunkstore.Backend {
			return chunkstore.NewRetry(m.Backend(t), chunkstore.DefaultRetryPolicy)
		}, 1, 600)
	})
	t.Run("encrypted", func(t *testing.T) {
		runModel(t, func(t *testing.T) chunkstore.Backend {
			return encrypted(t, chunkstore.NewRetry(m.Backend(t), chunkstore.DefaultRetryPolicy))
		}, 1)
	})
}

// TestVolumeModelSeaweedFS runs it on SeaweedFS, a second S3 server.
func TestVolumeModelSeaweedFS(t *testing.T) {
	w := seaweedtest.StartShared(t)
	runModel(t, func(t *testing.T) chunkstore.Backend {
		return chunkstore.NewRetry(w.Backend(t), chunkstore.DefaultRetryPolicy)
	}, 2)
	t.Run("journal", func(t *testing.T) {
		runJournalModel(t, func(t *testing.T) chunkstore.Backend {
			return chunkstore.NewRetry(w.Backend(t), chunkstore.DefaultRetryPolicy)
		}, 1, 600)
	})
}
