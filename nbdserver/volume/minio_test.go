package volume

import (
	"os"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/integration/miniotest"
)

var (
	minioOnce sync.Once
	minioSrv  *miniotest.Server
)

func sharedMinio(t *testing.T) *miniotest.Server {
	t.Helper()
	minioOnce.Do(func() { minioSrv = miniotest.StartShared(t) })
	if minioSrv == nil {
		t.Fatal("shared MinIO failed to start (see the first test that tried)")
	}
	return minioSrv
}

func TestMain(m *testing.M) {
	code := m.Run()
	miniotest.StopShared()
	os.Exit(code)
}

// TestVolumeModelMinIO runs the model test with the repository in a real
// MinIO, through the retrying S3 backend the server uses.
func TestVolumeModelMinIO(t *testing.T) {
	m := sharedMinio(t)
	runModel(t, func(t *testing.T) chunkstore.Backend {
		b := m.Backend(t)
		require.NotNil(t, b)
		return chunkstore.NewRetry(b, chunkstore.DefaultRetryPolicy)
	}, 2)
}
