package integration

import (
	"os"
	"testing"

	"github.com/nbdvault/nbdvault/integration/miniotest"
)

// TestMain stops the MinIO server the package's tests share
// (miniotest.StartShared).
func TestMain(m *testing.M) {
	code := m.Run()
	miniotest.StopShared()
	os.Exit(code)
}
