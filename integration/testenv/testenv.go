// Package testenv is what every test rig shares: whether a missing tool or
// privilege fails the run or skips the test, and a small file system to
// fill.
package testenv

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"testing"
)

// Required reports whether a missing tool or privilege must fail the test
// run instead of skipping the test: in CI, and under `make test`
// (NBDVAULT_REQUIRE_TOOLS).
func Required() bool {
	return os.Getenv("CI") != "" || os.Getenv("NBDVAULT_REQUIRE_TOOLS") != ""
}

// Unavailable ends t because something the test needs (a tool, root, a
// kernel feature) is not there: a failure if Required(), a skip otherwise.
func Unavailable(t testing.TB, err error) {
	t.Helper()
	if Required() {
		t.Fatal(err)
	}
	t.Skip(err)
}

// Tmpfs mounts a tmpfs of size (such as "4m") on a new temporary directory
// and returns it, unmounted at the end of t: a disk that fills. It needs
// root.
func Tmpfs(t testing.TB, size string) string {
	t.Helper()
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		Unavailable(t, fmt.Errorf("mount a %s tmpfs (this test needs root): %v: %s", size, err, out))
	}
	// Lazy: files a failed test left open must not keep it mounted.
	t.Cleanup(func() { _ = exec.Command("umount", "-l", dir).Run() })
	return dir
}

// FreeAddr returns a loopback TCP address that was free a moment ago, for
// a server the test starts.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
