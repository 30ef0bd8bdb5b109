package integration

import (
	"os"
	"testing"

	"github.com/nbdvault/nbdvault/integration/miniotest"
	"github.com/nbdvault/nbdvault/integration/servertest"
)

// TestMain stops the MinIO server the package's tests share
// (miniotest.StartShared) and removes the nbdvault binary they ran.
func TestMain(m *testing.M) {
	code := m.Run()
	miniotest.StopShared()
	servertest.Cleanup()
	os.Exit(code)
}
