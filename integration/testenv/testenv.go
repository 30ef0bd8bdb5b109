// Package testenv is what every test rig shares: whether a missing tool or
// privilege fails the run or skips the test, and a small file system to
// fill.
package testenv

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
	addr, err := PickAddr()
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

// PickAddr is FreeAddr outside a test (a benchmark).
func PickAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// Binary finds the program name that `make deps` installs: at $env if
// set, else on $PATH, else in $(go env GOPATH)/bin or
// ~/.cache/nbdvault/bin. The error lists where it looked and ends with
// install, the way to get it.
func Binary(name, env, install string) (string, error) {
	if p := os.Getenv(env); p != "" {
		return p, nil
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	var candidates []string
	if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
		for _, dir := range filepath.SplitList(strings.TrimSpace(string(out))) {
			candidates = append(candidates, filepath.Join(dir, "bin", name))
		}
	}
	if home, err := os.UserHomeDir(); err == nil {
		candidates = append(candidates, filepath.Join(home, ".cache", "nbdvault", "bin", name))
	}
	for _, p := range candidates {
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found in $%s, $PATH or %s: %s", name, env, strings.Join(candidates, ", "), install)
}

// RandomHex is n random bytes in hex: credentials and names for test
// servers.
func RandomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
