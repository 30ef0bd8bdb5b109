package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/nbdvault/nbdvault/client"
	"github.com/urfave/cli/v2"
)

// Restore by mount: the snapshot's export is attached read-only on this
// host and the file system in it mounted read-only on DIR. Without the
// kernel's NBD client, nbdfuse shows the export as a file and a read-only
// loop device turns that file into a block device:
//
//	server --NBD--> nbdfuse (FUSE file RUN/mounts/HASH/fuse/nbd) -> /dev/loopN -> mount -o ro DIR
//
// Every step is recorded in RUN/mounts/HASH/state.json before the next
// one starts, so umount (from any shell, even after mount was killed)
// undoes exactly what was made, and nothing else.

const (
	defaultRunDir = "/run/nbdvault"
	stateFileName = "state.json"
	// mountStepTimeout bounds each losetup, blkid, mount and umount call
	// and the wait for nbdfuse.
	mountStepTimeout = 2 * time.Minute
)

var runDirFlag = &cli.StringFlag{
	Name: "run-dir", Value: defaultRunDir, EnvVars: []string{"NBDVAULT_RUN_DIR"},
	Usage: "`folder` where mount records what it set up, so umount can undo it",
}

func mountCommand() *cli.Command {
	return &cli.Command{
		Name:      "mount",
		Usage:     "mount a snapshot's file system read-only on DIR (restore by mount; needs root)",
		ArgsUsage: "VOLUME@SNAPSHOT DIR",
		Description: "SNAPSHOT is an ID or a label, or an RFC 3339 time such as 2026-11-30T17:55:03Z\n" +
			"for the volume as it was then (within the server's --journal-retention). The export is attached through nbdfuse and a\n" +
			"read-only loop device, and stays attached after this command returns;\n" +
			"nbdvault umount DIR undoes it all. A journal that needs replaying\n" +
			"(ext3/ext4, xfs) is not replayed: the device is read-only.",
		Flags:  append([]cli.Flag{runDirFlag, nbdFlag}, clientFlags...),
		Action: mountAction,
	}
}

func umountCommand() *cli.Command {
	return &cli.Command{
		Name:      "umount",
		Usage:     "unmount what nbdvault mount mounted on DIR and detach the snapshot",
		ArgsUsage: "DIR",
		Flags:     []cli.Flag{runDirFlag},
		Action:    umountAction,
	}
}

// mountState is what mount set up for one DIR. Fields are filled in as
// the steps succeed; undo takes apart whatever is there.
type mountState struct {
	Dir     string       `json:"dir"`
	Export  string       `json:"export"` // VOL@ID
	URI     string       `json:"uri"`
	FuseDir string       `json:"fuse_dir"` // nbdfuse's mount point; the export is FuseDir/nbd
	NBDFuse *processMark `json:"nbdfuse,omitempty"`
	// Kernel: attach through the kernel's NBD driver, at Addr, as
	// NBDDevice, instead of nbdfuse.
	Kernel    bool   `json:"kernel,omitempty"`
	Addr      string `json:"addr,omitempty"`
	NBDDevice string `json:"nbd_device,omitempty"`
	Loop      string `json:"loop,omitempty"` // /dev/loopN
	FSType    string `json:"fs_type,omitempty"`
	Options   string `json:"options,omitempty"` // what DIR was mounted with

	folder string // RUN/mounts/HASH: the state file, nbdfuse's pid file and log, FuseDir
}

func (st *mountState) statePath() string { return filepath.Join(st.folder, stateFileName) }
func (st *mountState) pidPath() string   { return filepath.Join(st.folder, "nbdfuse.pid") }
func (st *mountState) logPath() string   { return filepath.Join(st.folder, "nbdfuse.log") }
func (st *mountState) file() string      { return filepath.Join(st.FuseDir, "nbd") }

// source is what the loop device is set up on: the NBD device, or
// nbdfuse's file.
func (st *mountState) source() string {
	if st.Kernel {
		return st.NBDDevice
	}
	return st.file()
}

// kernelNBD reports whether this host has the kernel's NBD driver loaded.
func kernelNBD() bool {
	_, err := os.Stat("/sys/block/nbd0")
	return err == nil
}

// mountFolder is where the state of a mount on dir lives: one folder per
// DIR, named by a hash so any path fits in one file name.
func mountFolder(runDir, dir string) string {
	sum := sha256.Sum256([]byte(dir))
	return filepath.Join(runDir, "mounts", hex.EncodeToString(sum[:8]))
}

// claim creates the state file, failing if one exists: two mounts on one
// DIR must not share a folder.
func (st *mountState) claim() error {
	if err := os.MkdirAll(st.folder, 0o700); err != nil {
		return fmt.Errorf("creating mount's state folder: %w (pass --run-dir to use another place)", err)
	}
	// The kernel names loop devices' files and mount points by their
	// real paths; umount compares with those.
	real, err := filepath.EvalSymlinks(st.folder)
	if err != nil {
		return err
	}
	st.FuseDir = filepath.Join(real, "fuse")
	if err := os.Mkdir(st.FuseDir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("creating mount's state folder: %w", err)
	}
	f, err := os.OpenFile(st.statePath(), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, os.ErrExist) {
		return cli.Exit(fmt.Sprintf("nbdvault already mounted something on %s: run nbdvault umount %s first", st.Dir, st.Dir), exitConflict)
	}
	if err != nil {
		return fmt.Errorf("creating mount's state file: %w", err)
	}
	f.Close()
	return st.save()
}

// save replaces the state file (a temporary file renamed over it, so a
// crash leaves the old state or the new one).
func (st *mountState) save() error {
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	tmp := st.statePath() + ".tmp"
	if err := os.WriteFile(tmp, append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("saving mount's state: %w", err)
	}
	if err := os.Rename(tmp, st.statePath()); err != nil {
		return fmt.Errorf("saving mount's state: %w", err)
	}
	return nil
}

// loadMountState reads the state of what mount made on dir; nil if there
// is none.
func loadMountState(runDir, dir string) (*mountState, error) {
	folder := mountFolder(runDir, dir)
	data, err := os.ReadFile(filepath.Join(folder, stateFileName))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading mount's state: %w", err)
	}
	st := &mountState{folder: folder}
	if err := json.Unmarshal(data, st); err != nil {
		return nil, fmt.Errorf("mount's state %s is damaged (%v): undo the mount by hand (umount, losetup -d, fusermount3 -u) and delete %s", filepath.Join(folder, stateFileName), err, folder)
	}
	return st, nil
}

// nbdConnected reports whether the NBD device has a connection.
func nbdConnected(dev string) bool {
	_, err := os.Stat(filepath.Join("/sys/block", filepath.Base(dev), "pid"))
	return err == nil
}

// mountTools finds the programs mount and umount run; nbdfuse only when
// the kernel's NBD driver is not there to use.
func mountTools(kernel bool) (map[string]string, error) {
	tools := make(map[string]string)
	need := [][2]string{{"losetup", "mount"}, {"blkid", "util-linux"}, {"mount", "mount"}, {"umount", "mount"}}
	if !kernel {
		need = append(need, [2]string{"nbdfuse", "libnbd-bin"})
	}
	for _, t := range need {
		p, err := lookSbin(t[0])
		if err != nil {
			return nil, fmt.Errorf("%s is not installed: apt-get install %s (or your system's package with %s)", t[0], t[1], t[0])
		}
		tools[t[0]] = p
	}
	// fusermount3 is the usual way to end a FUSE mount; umount does it
	// too when run as root.
	if p, err := lookSbin("fusermount3"); err == nil {
		tools["fusermount3"] = p
	}
	return tools, nil
}

// lookSbin is exec.LookPath that also looks in the sbin folders, which
// a $PATH (sudo's, a cron job's) may lack.
func lookSbin(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/local/sbin", "/usr/sbin", "/sbin"} {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", exec.ErrNotFound
}

// resolveMountDir turns DIR into the path the kernel shows in
// /proc/self/mountinfo: absolute, symbolic links resolved.
func resolveMountDir(arg string) (string, error) {
	abs, err := filepath.Abs(arg)
	if err != nil {
		return "", err
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return abs, err
	}
	return real, nil
}

// checkMountDir refuses a DIR that cannot take a mount.
func checkMountDir(arg string) (string, error) {
	dir, err := resolveMountDir(arg)
	if errors.Is(err, os.ErrNotExist) {
		return "", usageErrorf("%s does not exist: create the directory to mount on first (mkdir -p %s)", arg, arg)
	}
	if err != nil {
		return "", usageErrorf("%s: %v", arg, err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return "", usageErrorf("%s: %v", arg, err)
	}
	if !fi.IsDir() {
		return "", usageErrorf("%s is not a directory: give an empty directory to mount on", arg)
	}
	m, ok, err := mountAt(dir)
	if err != nil {
		return "", err
	}
	if ok {
		return "", cli.Exit(fmt.Sprintf("%s is already a mount point (of %s, %s): unmount it first or choose another directory", dir, m.Source, m.FSType), exitConflict)
	}
	return dir, nil
}

func mountAction(c *cli.Context) error {
	if err := needArgs(c, 2, "VOLUME@SNAPSHOT DIR"); err != nil {
		return err
	}
	vol, snap, err := splitSnapshot(c.Args().Get(0))
	if err != nil {
		return err
	}
	dir, err := checkMountDir(c.Args().Get(1))
	if err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return errors.New("mount needs root (it sets up a loop device and mounts a file system): run it as root, e.g. with sudo")
	}
	runDir, err := filepath.Abs(c.String(runDirFlag.Name))
	if err != nil {
		return err
	}
	if st, err := loadMountState(runDir, dir); err != nil || st != nil {
		if err != nil {
			return err
		}
		return cli.Exit(fmt.Sprintf("nbdvault mounted %s on %s before and it was not undone: run nbdvault umount %s first", st.Export, dir, dir), exitConflict)
	}
	kernel := kernelNBD()
	tools, err := mountTools(kernel)
	if err != nil {
		return err
	}
	if _, err := os.Stat("/dev/fuse"); err != nil && !kernel {
		return fmt.Errorf("neither the kernel's NBD driver nor FUSE is available: load one (modprobe nbd, or modprobe fuse)")
	}

	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	s, err := cl.Snapshot(c.Context, vol, snap)
	if err != nil {
		return err
	}
	addr, err := nbdAddressOf(c, cl)
	if err != nil {
		return err
	}
	export := vol + "@" + s.ID
	folder := mountFolder(runDir, dir)
	st := &mountState{Dir: dir, Export: export, URI: mountURI(addr, export), Kernel: kernel, Addr: addr, folder: folder}
	if err := st.claim(); err != nil {
		return err
	}
	if err := st.setUp(c.Context, tools); err != nil {
		if uerr := st.undo(tools); uerr != nil {
			return fmt.Errorf("%w; undoing the steps before failed too: %v (then run nbdvault umount %s)", err, uerr, dir)
		}
		return err
	}
	what := export + describePoint(s)
	fmt.Printf("mounted %s read-only on %s (%s); when done: nbdvault umount %s\n", what, dir, st.FSType, dir)
	return nil
}

// mountURI is the NBD URI of export at addr (HOST:PORT or unix:/PATH), as
// nbdfuse takes it.
func mountURI(addr, export string) string {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		return "nbd+unix:///" + url.PathEscape(export) + "?socket=" + path
	}
	return "nbd://" + addr + "/" + url.PathEscape(export)
}

// setUp attaches the export and mounts it, saving the state after each
// step. On error the caller undoes what the state records.
func (st *mountState) setUp(ctx context.Context, tools map[string]string) error {
	if st.Kernel { // the kernel's NBD driver where there is one
		dev, err := client.FreeKernelDevice()
		if err != nil {
			return err
		}
		st.NBDDevice = dev
		if err := st.save(); err != nil {
			return err
		}
		if _, err := attachInBackground(st.Addr, st.Export, dev, true, 512, time.Minute); err != nil {
			return err
		}
	} else if err := st.startNBDFuse(ctx, tools["nbdfuse"]); err != nil {
		return err
	}
	args := []string{"--find", "--show", "--read-only"}
	what, off, size, err := legData(st.source())
	if err != nil {
		return fmt.Errorf("%s: %w", st.Export, err)
	}
	if what != "" { // a mirror leg: its file system, not the leg's metadata
		fmt.Fprintf(os.Stderr, "nbdvault: %s is %s, %s from offset %d\n", st.Export, what, formatSize(size), off)
		args = append(args, "--offset", fmt.Sprint(off), "--sizelimit", fmt.Sprint(size))
	}
	out, err := runStep(ctx, tools["losetup"], append(args, st.source())...)
	if err != nil {
		return fmt.Errorf("attaching a loop device to %s: %s", st.source(), out)
	}
	st.Loop = strings.TrimSpace(out)
	if err := st.save(); err != nil {
		return err
	}
	fsType, err := st.probe(ctx, tools["blkid"])
	if err != nil {
		return err
	}
	return st.mountFS(ctx, tools["mount"], fsType)
}

// startNBDFuse starts nbdfuse in its own session, so it outlives this
// command and a Ctrl-C meant for this command does not reach it, and
// waits until it serves the export as a file.
func (st *mountState) startNBDFuse(ctx context.Context, nbdfuse string) error {
	logf, err := os.OpenFile(st.logPath(), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(nbdfuse, "--readonly", "-P", st.pidPath(), st.FuseDir, st.URI)
	// A file, not a pipe: nbdfuse must not hold a pipe our caller waits on.
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = newSessionAttr()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting nbdfuse: %w", err)
	}
	mark, err := markProcess(cmd.Process.Pid)
	if err != nil {
		return fmt.Errorf("nbdfuse started but cannot be followed: %w", err)
	}
	st.NBDFuse = &mark
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	if err := st.save(); err != nil {
		return err
	}

	// nbdfuse writes its pid file once it serves the file; nothing
	// tells us when a file appears, so poll, with a deadline.
	deadline := time.Now().Add(mountStepTimeout)
	for {
		if b, err := os.ReadFile(st.pidPath()); err == nil && len(strings.TrimSpace(string(b))) > 0 {
			break
		}
		select {
		case <-exited:
			return fmt.Errorf("nbdfuse could not open %s: %s", st.URI, st.nbdfuseLog())
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nbdfuse did not serve %s within %v: %s", st.URI, mountStepTimeout, st.nbdfuseLog())
		}
	}
	if fi, err := os.Stat(st.file()); err != nil || !fi.Mode().IsRegular() {
		return fmt.Errorf("nbdfuse is ready but %s is not a file (%v): %s", st.file(), err, st.nbdfuseLog())
	}
	return nil
}

// nbdfuseLog is the end of what nbdfuse printed, on one line.
func (st *mountState) nbdfuseLog() string {
	b, _ := os.ReadFile(st.logPath())
	s := strings.Join(strings.Fields(string(b)), " ")
	if len(s) > 300 {
		s = "..." + s[len(s)-300:]
	}
	if s == "" {
		return "it printed nothing"
	}
	return s
}

// probe finds the file system type with blkid, and refuses anything that
// is not a file system mount can read.
func (st *mountState) probe(ctx context.Context, blkid string) (string, error) {
	out, err := runStep(ctx, blkid, "-p", "-o", "export", st.Loop)
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() == 2 { // blkid: nothing found
		return "", fmt.Errorf("%s holds no filesystem signature that blkid knows, so there is nothing to mount: copy it to a file with nbdvault restore %s --to FILE to look at it", st.Export, st.Export)
	}
	if err != nil {
		return "", fmt.Errorf("blkid -p %s (%s): %s", st.Loop, st.Export, out)
	}
	found := make(map[string]string)
	for _, line := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), "="); ok {
			found[k] = v
		}
	}
	switch {
	case found["USAGE"] == "filesystem" && found["TYPE"] != "":
		return found["TYPE"], nil
	case found["TYPE"] == "" && found["PTTYPE"] != "":
		return "", fmt.Errorf("%s holds a %s partition table, not a file system, and mount does not open partitions yet: nbdvault restore %s --to FILE, then losetup --partscan --read-only FILE and mount a partition", st.Export, found["PTTYPE"], st.Export)
	}
	return "", fmt.Errorf("%s holds %s (usage %s), not a file system mount can read: copy it to a file with nbdvault restore %s --to FILE and open it with the tools for %s", st.Export, orNone(found["TYPE"]), orNone(found["USAGE"]), st.Export, orNone(found["TYPE"]))
}

func orNone(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// noReplay are the options that mount a file system without replaying its
// journal. A crash-consistent snapshot of a mounted file system needs
// that replay, which the kernel refuses to do on a read-only device.
var noReplay = map[string]string{"ext3": "ro,noload", "ext4": "ro,noload", "xfs": "ro,nouuid,norecovery"}

// roOptions are the read-only mount options for a file system type. XFS
// refuses a second file system with the same UUID, which two snapshots
// of one volume (or a snapshot next to its mounted original) have.
func roOptions(fsType string) string {
	if fsType == "xfs" {
		return "ro,nouuid"
	}
	return "ro"
}

// mountFS mounts the loop device on DIR read-only, without journal
// replay if a plain read-only mount is refused.
func (st *mountState) mountFS(ctx context.Context, mount, fsType string) error {
	opts := roOptions(fsType)
	out, err := runStep(ctx, mount, "-t", fsType, "-o", opts, st.Loop, st.Dir)
	if err != nil && noReplay[fsType] != "" && ctx.Err() == nil {
		opts = noReplay[fsType]
		var out2 string
		if out2, err = runStep(ctx, mount, "-t", fsType, "-o", opts, st.Loop, st.Dir); err == nil {
			fmt.Fprintf(os.Stderr, "nbdvault: the %s journal was not replayed (mount -o ro refused: %s), so %s is mounted -o %s as the crash-consistent snapshot left it: writes of the last moments before the snapshot may be missing\n",
				fsType, firstLine(out), st.Export, opts)
		} else {
			out += "; with -o " + opts + ": " + firstLine(out2)
		}
	}
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("mount refused the %s file system in %s: %s (see dmesg; to check it, nbdvault restore %s --to FILE and run fsck on the file)", fsType, st.Export, firstLine(out), st.Export)
	}
	st.FSType, st.Options = fsType, opts
	return st.save()
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(line)
}

// runStep runs a program with a deadline and returns its output, trimmed
// (stderr too: the message for an error).
func runStep(ctx context.Context, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, mountStepTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	s := strings.TrimSpace(string(out))
	if err != nil && s == "" {
		s = fmt.Sprintf("%s %s: %v", filepath.Base(name), strings.Join(args, " "), err)
	}
	return s, err
}

// undo takes apart what the state records, last step first, skipping
// what is already gone, and removes the state. It stops at the first step
// that fails (a busy DIR), keeping the state so it can be run again.
// It runs to its end even when the command was interrupted.
func (st *mountState) undo(tools map[string]string) error {
	ctx := context.Background()
	if st.Loop != "" {
		if m, ok, err := mountAt(st.Dir); err != nil {
			return err
		} else if ok && m.Source == st.Loop {
			if out, err := runStep(ctx, tools["umount"], st.Dir); err != nil {
				return fmt.Errorf("unmounting %s: %s (close the files and shells that use it, see fuser -vm %s, then run nbdvault umount %s again)", st.Dir, firstLine(out), st.Dir, st.Dir)
			}
		}
		// Only a loop device still on our file: the number may have been
		// given to someone else since.
		if loopBackingFile(st.Loop) == st.source() {
			if out, err := runStep(ctx, tools["losetup"], "-d", st.Loop); err != nil {
				return fmt.Errorf("detaching %s: %s", st.Loop, firstLine(out))
			}
		}
	}
	if st.Kernel {
		if st.NBDDevice != "" && nbdConnected(st.NBDDevice) {
			if err := client.DetachKernel(st.NBDDevice); err != nil {
				return err
			}
			waitDetached(st.NBDDevice)
		}
	} else if err := st.stopNBDFuse(ctx, tools); err != nil {
		return err
	}
	for _, p := range []string{st.pidPath(), st.logPath(), st.statePath() + ".tmp"} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	// Remove, never RemoveAll: FuseDir must not be walked if a FUSE
	// mount is somehow still there.
	if err := os.Remove(st.FuseDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing %s: %w", st.FuseDir, err)
	}
	if err := os.Remove(st.statePath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.Remove(st.folder); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing %s: %w", st.folder, err)
	}
	return nil
}

// stopNBDFuse unmounts nbdfuse's FUSE mount, which makes it exit, and
// waits for it to end. An nbdfuse that is not mounted (it failed, or was
// not ready yet) is stopped with SIGTERM, then SIGKILL.
func (st *mountState) stopNBDFuse(ctx context.Context, tools map[string]string) error {
	_, mounted, err := mountAt(st.FuseDir)
	if err != nil {
		return err
	}
	if err := st.unmountFUSE(ctx, tools, false); err != nil {
		return err
	}
	p := st.NBDFuse
	if p == nil || !p.alive() {
		return nil
	}
	// Unmounted, nbdfuse ends by itself once it has closed its connections.
	if mounted && p.waitGone(30*time.Second) {
		return nil
	}
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		p.signal(sig)
		if p.waitGone(5 * time.Second) {
			// Killed before or while it mounted: a mount may be left.
			return st.unmountFUSE(ctx, tools, true)
		}
	}
	return fmt.Errorf("nbdfuse (pid %d) does not end even with SIGKILL: check it with ps -p %d", p.PID, p.PID)
}

// unmountFUSE ends the FUSE mount on FuseDir if there is one; lazy is for
// a mount whose nbdfuse is gone.
func (st *mountState) unmountFUSE(ctx context.Context, tools map[string]string, lazy bool) error {
	if _, ok, err := mountAt(st.FuseDir); err != nil || !ok {
		return err
	}
	var out string
	var err error
	switch {
	case tools["fusermount3"] != "" && lazy:
		out, err = runStep(ctx, tools["fusermount3"], "-u", "-z", st.FuseDir)
	case tools["fusermount3"] != "":
		out, err = runStep(ctx, tools["fusermount3"], "-u", st.FuseDir)
	case lazy:
		out, err = runStep(ctx, tools["umount"], "-l", st.FuseDir)
	default:
		out, err = runStep(ctx, tools["umount"], st.FuseDir)
	}
	if err != nil {
		return fmt.Errorf("unmounting nbdfuse from %s: %s", st.FuseDir, firstLine(out))
	}
	return nil
}

func umountAction(c *cli.Context) error {
	if err := needArgs(c, 1, "DIR"); err != nil {
		return err
	}
	arg := c.Args().First()
	dir, err := resolveMountDir(arg)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return usageErrorf("%s: %v", arg, err)
	}
	if os.Geteuid() != 0 {
		return errors.New("umount needs root (it unmounts a file system and detaches a loop device): run it as root, e.g. with sudo")
	}
	runDir, err := filepath.Abs(c.String(runDirFlag.Name))
	if err != nil {
		return err
	}
	st, err := loadMountState(runDir, dir)
	if err != nil {
		return err
	}
	if st == nil {
		if _, ok, _ := mountAt(dir); ok {
			return fmt.Errorf("nbdvault did not mount %s (no record of it in %s): unmount it with umount %s", dir, runDir, dir)
		}
		return fmt.Errorf("nbdvault did not mount %s (no record of it in %s) and nothing is mounted there", dir, runDir)
	}
	tools, err := mountTools(st.Kernel)
	if err != nil {
		return err
	}
	if err := st.undo(tools); err != nil {
		return err
	}
	fmt.Printf("unmounted %s from %s\n", st.Export, dir)
	return nil
}
