package nbdtest

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// MountTimeout bounds each mount, umount, fusermount3 and losetup call.
const MountTimeout = 60 * time.Second

// FUSE is an NBD export that nbdfuse shows as a file.
type FUSE struct {
	Dir  string // the FUSE mount point
	File string // Dir/nbd: the export

	fusermount string
	cmd        *exec.Cmd
	exited     chan struct{}
	out        *syncBuffer
	stopped    bool
}

// NBDFuse runs nbdfuse on uri with extra options args (for example "-C",
// "1") and waits until it is ready. At the end of t it is unmounted (after
// anything mounted from it later in t, see MountLoop) if Unmount was not
// called.
func NBDFuse(t testing.TB, uri string, args ...string) *FUSE {
	t.Helper()
	tools := Tools(t, "nbdfuse", "fusermount3")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		Unavailable(t, fmt.Errorf("FUSE is not available (%v): load the fuse module", err))
	}
	// Our own directories, not t.TempDir(): t.TempDir's RemoveAll must
	// never walk into a FUSE mount that failed to go away.
	dir, err := os.MkdirTemp("", "nbdtest-fuse-")
	if err != nil {
		t.Fatal(err)
	}
	run, err := os.MkdirTemp("", "nbdtest-fuse-run-")
	if err != nil {
		t.Fatal(err)
	}
	f := &FUSE{
		Dir:        dir,
		File:       filepath.Join(dir, "nbd"),
		fusermount: tools["fusermount3"],
		exited:     make(chan struct{}),
		out:        &syncBuffer{},
	}
	pidfile := filepath.Join(run, "nbdfuse.pid")
	f.cmd = exec.Command(tools["nbdfuse"], append(append([]string{}, args...), "-P", pidfile, dir, uri)...)
	f.cmd.Stdout, f.cmd.Stderr = f.out, f.out
	if err := f.cmd.Start(); err != nil {
		t.Fatalf("start nbdfuse: %v", err)
	}
	go func() { _ = f.cmd.Wait(); close(f.exited) }()
	t.Cleanup(func() {
		f.Unmount(t)
		os.Remove(dir) // never RemoveAll: see above
		os.RemoveAll(run)
	})

	// nbdfuse writes its pid file once the mount is ready; nothing tells
	// us when a file appears, so poll for it, with a deadline, and stop at
	// once if nbdfuse exits.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if b, err := os.ReadFile(pidfile); err == nil && len(strings.TrimSpace(string(b))) > 0 {
			break
		}
		select {
		case <-f.exited:
			t.Fatalf("nbdfuse %s exited before it was ready: %v\n%s", uri, f.cmd.ProcessState, f.out.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("nbdfuse %s not ready after 30s:\n%s", uri, f.out.String())
		}
	}
	if fi, err := os.Stat(f.File); err != nil || !fi.Mode().IsRegular() {
		t.Fatalf("nbdfuse is ready but %s is not a file: %v, %v\n%s", f.File, fi, err, f.out.String())
	}
	return f
}

// Output is what nbdfuse printed so far.
func (f *FUSE) Output() string { return f.out.String() }

// Unmount unmounts the FUSE file system with fusermount3 -u and waits for
// nbdfuse to exit; it fails t if either goes wrong. It does nothing the
// second time.
func (f *FUSE) Unmount(t testing.TB) {
	t.Helper()
	if f.stopped {
		return
	}
	f.stopped = true
	select {
	case <-f.exited:
		t.Errorf("nbdfuse exited before it was unmounted: %v\n%s", f.cmd.ProcessState, f.out.String())
		_ = Run(t, MountTimeout, f.fusermount, "-u", "-z", f.Dir) // a mount left behind
		return
	default:
	}
	if r := Run(t, MountTimeout, f.fusermount, "-u", f.Dir); !r.OK() {
		t.Errorf("unmount nbdfuse:\n%s", r)
		_ = Run(t, MountTimeout, f.fusermount, "-u", "-z", f.Dir)
	}
	select {
	case <-f.exited:
		if !f.cmd.ProcessState.Success() {
			t.Errorf("nbdfuse: %v\n%s", f.cmd.ProcessState, f.out.String())
		}
	case <-time.After(MountTimeout):
		_ = f.cmd.Process.Signal(syscall.SIGKILL)
		<-f.exited
		t.Errorf("nbdfuse did not exit within %v of its unmount; killed\n%s", MountTimeout, f.out.String())
	}
}

// Loop is a file system mounted with mount -o loop.
type Loop struct {
	Dir   string // mount point
	Image string

	umount  string
	mounted bool
}

// MountLoop mounts the file system in image on a new directory with
// `mount -o loop` and options opts (comma-separated). At the end of t it is
// unmounted if still mounted, and any loop device left on image detached.
func MountLoop(t testing.TB, image, opts string) *Loop {
	t.Helper()
	RequireRoot(t, "mount -o loop")
	tools := Tools(t, "mount", "umount", "losetup")
	dir, err := os.MkdirTemp("", "nbdtest-mnt-")
	if err != nil {
		t.Fatal(err)
	}
	m := &Loop{Dir: dir, Image: image, umount: tools["umount"]}
	t.Cleanup(func() {
		if m.mounted {
			m.Unmount(t)
		}
		if m.mounted { // still: detach lazily so the next cleanups can go on
			_ = Run(t, MountTimeout, tools["umount"], "-l", dir)
		}
		DetachLoops(t, image)
		os.Remove(dir) // never RemoveAll a directory that may be a mount
	})
	o := "loop"
	if opts != "" {
		o += "," + opts
	}
	MustRun(t, MountTimeout, tools["mount"], "-o", o, image, dir)
	m.mounted = true
	return m
}

// Unmount unmounts the file system (umount also frees the loop device
// mount -o loop set up), failing t if it cannot.
func (m *Loop) Unmount(t testing.TB) {
	t.Helper()
	if !m.mounted {
		return
	}
	if r := Run(t, MountTimeout, m.umount, m.Dir); !r.OK() {
		t.Errorf("umount:\n%s", r)
		return
	}
	m.mounted = false
}

// DetachLoops detaches every loop device whose backing file is image
// (losetup -j), reporting failures on t.
func DetachLoops(t testing.TB, image string) {
	t.Helper()
	losetup := Tool(t, "losetup")
	r := Run(t, MountTimeout, losetup, "-j", image)
	if !r.OK() {
		return // image gone: no loop device can use it by that name
	}
	sc := bufio.NewScanner(strings.NewReader(r.Stdout))
	for sc.Scan() {
		dev, _, ok := strings.Cut(sc.Text(), ":")
		if !ok || !strings.HasPrefix(dev, "/dev/loop") {
			continue
		}
		if d := Run(t, MountTimeout, losetup, "-d", dev); !d.OK() {
			t.Errorf("detach %s from %s:\n%s", dev, image, d)
		}
	}
}
