// Package mount restores by mount: a snapshot's export attached read-only
// on this host (through the kernel's NBD driver, or nbdfuse and a
// read-only loop device) and its file system mounted read-only on a
// directory, every step recorded so that Undo, from any process, takes
// apart exactly what was made.
package mount

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
	// DefaultRunDir is where mounts record what they set up.
	DefaultRunDir = "/run/nbdvault"
	stateFileName = "state.json"
	// mountStepTimeout bounds each losetup, blkid, mount and umount call
	// and the wait for nbdfuse.
	mountStepTimeout = 2 * time.Minute
)

// State is what a mount set up for one directory. Fields are filled in
// as the steps succeed; Undo takes apart whatever is there.
type State struct {
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
	// Command, if set, is what nbdfuse runs to reach the export (its
	// --command: an NBD server on stdin/stdout) instead of URI: a relay
	// that opens it over TLS.
	Command []string `json:"command,omitempty"`

	folder string // RUN/mounts/HASH: the state file, nbdfuse's pid file and log, FuseDir
}

func (st *State) statePath() string { return filepath.Join(st.folder, stateFileName) }
func (st *State) pidPath() string   { return filepath.Join(st.folder, "nbdfuse.pid") }
func (st *State) logPath() string   { return filepath.Join(st.folder, "nbdfuse.log") }
func (st *State) file() string      { return filepath.Join(st.FuseDir, "nbd") }

// source is what the loop device is set up on: the NBD device, or
// nbdfuse's file.
func (st *State) source() string {
	if st.Kernel {
		return st.NBDDevice
	}
	return st.file()
}

// KernelNBD reports whether this host has the kernel's NBD driver loaded.
func KernelNBD() bool {
	_, err := os.Stat("/sys/block/nbd0")
	return err == nil
}

// Folder is where the state of a mount on dir lives: one folder per
// DIR, named by a hash so any path fits in one file name.
func Folder(runDir, dir string) string {
	sum := sha256.Sum256([]byte(dir))
	return filepath.Join(runDir, "mounts", hex.EncodeToString(sum[:8]))
}

// New is the state of a mount of export (served at addr) on dir, with its
// records under runDir, through the kernel's NBD driver if kernel.
func New(runDir, dir, export, addr string, kernel bool) *State {
	return &State{Dir: dir, Export: export, URI: URI(addr, export), Kernel: kernel, Addr: addr, folder: Folder(runDir, dir)}
}

// Claim creates the state file, failing with ErrClaimed if one exists:
// two mounts on one directory must not share a folder.
func (st *State) Claim() error {
	if err := os.MkdirAll(st.folder, 0o700); err != nil {
		return fmt.Errorf("creating mount's state folder %s: %w", st.folder, err)
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
		return fmt.Errorf("%s: %w", st.Dir, ErrClaimed)
	}
	if err != nil {
		return fmt.Errorf("creating mount's state file: %w", err)
	}
	f.Close()
	return st.save()
}

// save replaces the state file (a temporary file renamed over it, so a
// crash leaves the old state or the new one).
func (st *State) save() error {
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

// Load reads the state of what a mount made on dir; nil if there is none.
func Load(runDir, dir string) (*State, error) {
	folder := Folder(runDir, dir)
	data, err := os.ReadFile(filepath.Join(folder, stateFileName))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading mount's state: %w", err)
	}
	st := &State{folder: folder}
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

// Tools are the programs a mount runs, by name.
type Tools map[string]string

// FindTools finds the programs a mount and Undo run; nbdfuse only when
// the kernel's NBD driver is not there to use (kernel).
func FindTools(kernel bool) (Tools, error) {
	tools := make(Tools)
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

// ResolveDir turns DIR into the path the kernel shows in
// /proc/self/mountinfo: absolute, symbolic links resolved.
func ResolveDir(arg string) (string, error) {
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

// Errors of CheckDir and Claim.
var (
	// ErrNoDir: the directory to mount on does not exist, or is not a
	// directory.
	ErrNoDir = errors.New("not a directory")
	// ErrMountPoint: something is mounted on the directory already.
	ErrMountPoint = errors.New("already a mount point")
	// ErrClaimed: a mount recorded on the directory was not undone.
	ErrClaimed = errors.New("a mount is recorded there already")
)

// CheckDir resolves arg (ResolveDir) and refuses a directory that cannot
// take a mount: missing or not a directory (ErrNoDir), a mount point
// already (ErrMountPoint).
func CheckDir(arg string) (string, error) {
	dir, err := ResolveDir(arg)
	if errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("%s: %w: %w", arg, ErrNoDir, err)
	}
	if err != nil {
		return "", err
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return "", err
	}
	if !fi.IsDir() {
		return "", fmt.Errorf("%s: %w", arg, ErrNoDir)
	}
	m, ok, err := At(dir)
	if err != nil {
		return "", err
	}
	if ok {
		return "", fmt.Errorf("%s is %w (of %s, %s)", dir, ErrMountPoint, m.Source, m.FSType)
	}
	return dir, nil
}

// URI is the NBD URI of export at addr (HOST:PORT or unix:/PATH), as
// nbdfuse takes it.
func URI(addr, export string) string {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		return "nbd+unix:///" + url.PathEscape(export) + "?socket=" + path
	}
	return "nbd://" + addr + "/" + url.PathEscape(export)
}

// Options are what SetUp needs from its caller.
type Options struct {
	// AttachKernel attaches export at addr to the kernel NBD device dev,
	// read-only, in the background (the process that holds it must
	// outlive the caller).
	AttachKernel func(addr, export, dev string) error
	// Note, if set, hears what the user should know: the data found
	// inside a mirror leg, a journal not replayed.
	Note func(msg string)
}

// SetUp attaches the export and mounts it, saving the state after each
// step. On error the caller undoes what the state records (Undo).
func (st *State) SetUp(ctx context.Context, tools Tools, o Options) error {
	note := o.Note
	if note == nil {
		note = func(string) {}
	}
	if st.Kernel { // the kernel's NBD driver where there is one
		dev, err := client.FreeKernelDevice()
		if err != nil {
			return err
		}
		st.NBDDevice = dev
		if err := st.save(); err != nil {
			return err
		}
		if err := o.AttachKernel(st.Addr, st.Export, dev); err != nil {
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
		note(fmt.Sprintf("%s is %s, %d bytes from offset %d", st.Export, what, size, off))
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
	return st.mountFS(ctx, tools["mount"], fsType, note)
}

// startNBDFuse starts nbdfuse in its own session, so it outlives this
// command and a Ctrl-C meant for this command does not reach it, and
// waits until it serves the export as a file.
func (st *State) startNBDFuse(ctx context.Context, nbdfuse string) error {
	logf, err := os.OpenFile(st.logPath(), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	args := []string{"--readonly", "-P", st.pidPath(), st.FuseDir, st.URI}
	if len(st.Command) > 0 {
		args = append(append(args[:4:4], "--command"), st.Command...)
	}
	cmd := exec.Command(nbdfuse, args...)
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
func (st *State) nbdfuseLog() string {
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
func (st *State) probe(ctx context.Context, blkid string) (string, error) {
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
func (st *State) mountFS(ctx context.Context, mount, fsType string, note func(string)) error {
	opts := roOptions(fsType)
	out, err := runStep(ctx, mount, "-t", fsType, "-o", opts, st.Loop, st.Dir)
	if err != nil && noReplay[fsType] != "" && ctx.Err() == nil {
		opts = noReplay[fsType]
		var out2 string
		if out2, err = runStep(ctx, mount, "-t", fsType, "-o", opts, st.Loop, st.Dir); err == nil {
			note(fmt.Sprintf("the %s journal was not replayed (mount -o ro refused: %s), so %s is mounted -o %s as the crash-consistent snapshot left it: writes of the last moments before the snapshot may be missing",
				fsType, firstLine(out), st.Export, opts))
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

// Undo takes apart what the state records, last step first, skipping
// what is already gone, and removes the state. It stops at the first step
// that fails (a busy DIR), keeping the state so it can be run again.
// It runs to its end even when the command was interrupted.
func (st *State) Undo(tools Tools) error {
	ctx := context.Background()
	if st.Loop != "" {
		if m, ok, err := At(st.Dir); err != nil {
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
			client.WaitDetached(st.NBDDevice)
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
func (st *State) stopNBDFuse(ctx context.Context, tools Tools) error {
	_, mounted, err := At(st.FuseDir)
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
func (st *State) unmountFUSE(ctx context.Context, tools Tools, lazy bool) error {
	if _, ok, err := At(st.FuseDir); err != nil || !ok {
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
