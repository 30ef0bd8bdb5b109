package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/client/mount"
)

// Restore by mount (client/mount): mount attaches a snapshot's export
// read-only and mounts its file system on DIR; umount undoes exactly
// what mount recorded.

var runDirFlag = &cli.StringFlag{
	Name: "run-dir", Value: mount.DefaultRunDir, EnvVars: []string{"NBDVAULT_RUN_DIR"},
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
	if st, err := mount.Load(runDir, dir); err != nil || st != nil {
		if err != nil {
			return err
		}
		return cli.Exit(fmt.Sprintf("nbdvault mounted %s on %s before and it was not undone: run nbdvault umount %s first", st.Export, dir, dir), exitConflict)
	}
	kernel := mount.KernelNBD()
	tools, err := mount.FindTools(kernel)
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
	st := mount.New(runDir, dir, export, addr, kernel)
	tlsArgs, err := tlsFileArgs(c)
	if err != nil {
		return err
	}
	if cfg, err := clientTLS(c); err != nil {
		return err
	} else if cfg != nil && !kernel {
		// nbdfuse takes no TLS files in a URI: it runs this binary as a
		// relay that opens the export over TLS. (The kernel's NBD driver
		// is attached as client attach does, which pumps its requests
		// over TLS.)
		self, err := os.Executable()
		if err != nil {
			return err
		}
		st.Command = append([]string{self, "client", "relay", "--nbd", addr, "--export", export}, tlsArgs...)
	}
	if err := st.Claim(); errors.Is(err, mount.ErrClaimed) {
		return cli.Exit(fmt.Sprintf("nbdvault already mounted something on %s: run nbdvault umount %s first", dir, dir), exitConflict)
	} else if err != nil {
		return fmt.Errorf("%w (pass --run-dir to use another place)", err)
	}
	err = st.SetUp(c.Context, tools, mount.Options{
		AttachKernel: func(addr, export, dev string) error {
			_, err := attachInBackground(addr, export, dev, true, 512, time.Minute, tlsArgs)
			return err
		},
		Note: func(msg string) { fmt.Fprintln(os.Stderr, "nbdvault:", msg) },
	})
	if err != nil {
		if uerr := st.Undo(tools); uerr != nil {
			return fmt.Errorf("%w; undoing the steps before failed too: %v (then run nbdvault umount %s)", err, uerr, dir)
		}
		return err
	}
	what := export + describePoint(s)
	fmt.Printf("mounted %s read-only on %s (%s); when done: nbdvault umount %s\n", what, dir, st.FSType, dir)
	return nil
}

func umountAction(c *cli.Context) error {
	if err := needArgs(c, 1, "DIR"); err != nil {
		return err
	}
	arg := c.Args().First()
	dir, err := mount.ResolveDir(arg)
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
	st, err := mount.Load(runDir, dir)
	if err != nil {
		return err
	}
	if st == nil {
		if _, ok, _ := mount.At(dir); ok {
			return fmt.Errorf("nbdvault did not mount %s (no record of it in %s): unmount it with umount %s", dir, runDir, dir)
		}
		return fmt.Errorf("nbdvault did not mount %s (no record of it in %s) and nothing is mounted there", dir, runDir)
	}
	tools, err := mount.FindTools(st.Kernel)
	if err != nil {
		return err
	}
	if err := st.Undo(tools); err != nil {
		return err
	}
	fmt.Printf("unmounted %s from %s\n", st.Export, dir)
	return nil
}

// checkMountDir refuses a DIR that cannot take a mount, in the words of
// the command line.
func checkMountDir(arg string) (string, error) {
	dir, err := mount.CheckDir(arg)
	switch {
	case errors.Is(err, mount.ErrNoDir) && errors.Is(err, os.ErrNotExist):
		return "", usageErrorf("%s does not exist: create the directory to mount on first (mkdir -p %s)", arg, arg)
	case errors.Is(err, mount.ErrNoDir):
		return "", usageErrorf("%v: give an empty directory to mount on", err)
	case errors.Is(err, mount.ErrMountPoint):
		return "", cli.Exit(fmt.Sprintf("%v: unmount it first or choose another directory", err), exitConflict)
	case err != nil:
		return "", usageErrorf("%s: %v", arg, err)
	}
	return dir, nil
}
