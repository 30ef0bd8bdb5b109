// Package nbdtest is the rig for the tests that drive nbdvault's NBD server
// (nbdserver/nbd) with third-party NBD clients: it finds the client tools,
// starts an nbd.Server in-process on a Unix socket or a 127.0.0.1 port,
// runs commands with a timeout and reports everything they printed when
// they fail, makes sparse and random files, generates TLS certificates, and
// mounts an export with nbdfuse.
//
// A missing tool fails the test when CI or NBDVAULT_REQUIRE_TOOLS is set
// (as `make test` does) and skips it with an install hint otherwise.
package nbdtest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/nbdvault/nbdvault/integration/testenv"
)

// Required reports whether a missing tool or privilege must fail the test
// run instead of skipping the test.
func Required() bool { return testenv.Required() }

// packages names the Debian package that provides each tool the tests run.
var packages = map[string]string{
	"nbdinfo":     "libnbd-bin",
	"nbdcopy":     "libnbd-bin",
	"nbdfuse":     "libnbd-bin",
	"qemu-img":    "qemu-utils",
	"qemu-io":     "qemu-utils",
	"qemu-nbd":    "qemu-utils",
	"nbdkit":      "nbdkit",
	"fio":         "fio",
	"mkfs.ext4":   "e2fsprogs",
	"e2fsck":      "e2fsprogs",
	"debugfs":     "e2fsprogs",
	"fusermount3": "fuse3",
	"mount":       "mount",
	"umount":      "mount",
	"losetup":     "mount",
	"b3sum":       "b3sum",
	"sha256sum":   "coreutils",
}

// sbinDirs are searched after $PATH: a non-root $PATH often lacks them.
var sbinDirs = []string{"/usr/local/sbin", "/usr/sbin", "/sbin"}

// LookTool returns the path of the tool called name, or an error that says
// how to install it.
func LookTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range sbinDirs {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	pkg := packages[name]
	if pkg == "" {
		return "", fmt.Errorf("%s not found in $PATH", name)
	}
	return "", fmt.Errorf("%s not found in $PATH: run `make deps` (scripts/deps.sh), or `apt-get install %s`", name, pkg)
}

// Tool returns the path of the tool called name. When it is missing, t
// fails if Required() and is skipped otherwise.
func Tool(t testing.TB, name string) string {
	t.Helper()
	p, err := LookTool(name)
	if err != nil {
		Unavailable(t, err)
	}
	return p
}

// Tools looks up several tools at once (see Tool) and returns their paths
// by name.
func Tools(t testing.TB, names ...string) map[string]string {
	t.Helper()
	paths := make(map[string]string, len(names))
	var missing []error
	for _, name := range names {
		p, err := LookTool(name)
		if err != nil {
			missing = append(missing, err)
			continue
		}
		paths[name] = p
	}
	if len(missing) > 0 {
		Unavailable(t, errors.Join(missing...))
	}
	return paths
}

// Unavailable ends t because something the test needs (a tool, root, a
// kernel feature) is not there: a failure if Required(), a skip otherwise.
func Unavailable(t testing.TB, err error) {
	t.Helper()
	testenv.Unavailable(t, err)
}

// RequireRoot ends t (see Unavailable) unless the test runs as root.
func RequireRoot(t testing.TB, why string) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, fmt.Errorf("this test needs root (%s)", why))
	}
}
