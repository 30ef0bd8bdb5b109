package nbd_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
	"github.com/nbdvault/nbdvault/nbdserver/nbd/backendtest"
)

func TestMemBackend(t *testing.T) {
	backendtest.Run(t, func(t *testing.T) backendtest.Subject {
		return backendtest.Subject{Backend: nbd.NewMem(2<<20 + 512)}
	})
}

func TestFileBackend(t *testing.T) {
	backendtest.Run(t, func(t *testing.T) backendtest.Subject {
		path := filepath.Join(t.TempDir(), "disk.img")
		if err := os.WriteFile(path, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, 2<<20+512); err != nil {
			t.Fatal(err)
		}
		f, err := nbd.OpenFile(path, false)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return backendtest.Subject{Backend: f}
	})
}
