package mirror

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Runner runs the system commands that make and mend a mirror (mdadm,
// the LVM tools) and returns what they printed.
type Runner interface {
	Run(ctx context.Context, name string, args ...string) (string, error)
}

// Exec runs commands. A command that fails is an error naming it, with
// what it printed.
type Exec struct{}

func (Exec) Run(ctx context.Context, name string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %v: %s", ShellLine(name, args), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// DryRun prints each command to W, as a shell line, instead of running it.
type DryRun struct{ W io.Writer }

func (d DryRun) Run(_ context.Context, name string, args ...string) (string, error) {
	fmt.Fprintln(d.W, ShellLine(name, args))
	return "", nil
}

// ShellLine is name and args quoted for a POSIX shell.
func ShellLine(name string, args []string) string {
	q := []string{name}
	for _, a := range args {
		if a == "" || strings.ContainsAny(a, " \t'\"$\\") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		q = append(q, a)
	}
	return strings.Join(q, " ")
}

// MDOptions are the MD array a mirror leg joins.
type MDOptions struct {
	Array       string // the array to create, /dev/mdN
	WriteBehind int    // writes MD lets the leg lag behind the local disk
	BitmapChunk string // the bitmap's region size; "" for mdadm's default
}

// CreateMD creates a new RAID1 array of local and leg, leg write-mostly
// and write-behind, with an internal write-intent bitmap. It overwrites
// what local holds.
func CreateMD(ctx context.Context, r Runner, local, leg string, o MDOptions) error {
	args := []string{"--create", o.Array, "--run", "--level=1", "--raid-devices=2",
		"--metadata=1.2", "--bitmap=internal", fmt.Sprintf("--write-behind=%d", o.WriteBehind)}
	if o.BitmapChunk != "" {
		args = append(args, "--bitmap-chunk="+o.BitmapChunk)
	}
	_, err := r.Run(ctx, "mdadm", append(args, local, "--write-mostly", leg)...)
	return err
}

// CreateLVM makes leg (an attached volume) the second image of the
// existing logical volume lv (VG/LV), converted to raid1, keeping its
// data: pvcreate, vgextend, lvconvert; then, once LVM has copied lv to
// the leg (LVM sets write-mostly only on an array in sync; synced is
// told of the progress, and a dry run says what it would wait for), it
// makes the leg write-mostly and sets write-behind.
func CreateLVM(ctx context.Context, r Runner, lv, leg string, writeBehind int, synced func(percent string)) error {
	vg, _, ok := strings.Cut(lv, "/")
	if !ok {
		return fmt.Errorf("%w: LVM logical volume %q: want VG/LV", ErrInvalid, lv)
	}
	for _, s := range [][]string{
		{"pvcreate", leg},
		{"vgextend", vg, leg},
		{"lvconvert", "--yes", "--type", "raid1", "-m", "1", lv, leg},
	} {
		if _, err := r.Run(ctx, s[0], s[1:]...); err != nil {
			return err
		}
	}
	if err := WaitLVSync(ctx, r, lv, synced); err != nil {
		return err
	}
	for _, s := range [][]string{
		{"lvchange", "--yes", "--writemostly", leg, lv},
		{"lvchange", "--yes", "--writebehind", fmt.Sprint(writeBehind), lv},
	} {
		if _, err := r.Run(ctx, s[0], s[1:]...); err != nil {
			return err
		}
	}
	return nil
}

// WaitLVSync waits until the raid1 logical volume lv is in sync, telling
// synced (if set) how far it is. A dry run prints what it would wait for.
func WaitLVSync(ctx context.Context, r Runner, lv string, synced func(percent string)) error {
	if d, ok := r.(DryRun); ok {
		fmt.Fprintf(d.W, "# wait until `lvs -o sync_percent %s` says 100.00\n", lv)
		return nil
	}
	for {
		out, err := r.Run(ctx, "lvs", "--noheadings", "-o", "sync_percent", lv)
		if err != nil {
			return err
		}
		pct := strings.TrimSpace(out)
		if pct == "100.00" {
			return nil
		}
		if synced != nil {
			synced(pct)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Legs splits the members of an MD array into its local disk and its
// NBD legs (/dev/nbdN).
func Legs(members []string) (local string, nbd []string) {
	for _, m := range members {
		if strings.HasPrefix(m, "/dev/nbd") {
			nbd = append(nbd, m)
		} else {
			local = m
		}
	}
	return local, nbd
}

// RemoveLeg fails and removes leg from array md (MD keeps a failed leg as
// faulty until it is removed).
func RemoveLeg(ctx context.Context, r Runner, md, leg string) error {
	_, err := r.Run(ctx, "mdadm", md, "--fail", leg, "--remove", leg)
	return err
}

// ReAdd adds leg back to array md, which then copies only the regions
// its bitmap marks. It fails when the leg no longer matches the bitmap:
// then `mdadm MD --add LEG` copies it whole.
func ReAdd(ctx context.Context, r Runner, md, leg string) error {
	_, err := r.Run(ctx, "mdadm", md, "--re-add", leg)
	return err
}

// Reconnect puts back the NBD leg of MD array md, whose members are
// members (MDMembers), after its server went away and came back. Unless
// detach is nil (a dry run), it fails and removes each NBD leg MD still
// holds as faulty, detaching its device with detach (what goes wrong is
// passed to warn, and the rest goes on). Then it attaches the volume
// again with attach, given the local leg (whose block size the new leg
// must have), retrying every half second for up to wait while the server
// comes back, and re-adds the new leg: MD copies only the regions its
// bitmap marks. It returns the new leg's device.
func Reconnect(ctx context.Context, r Runner, md string, members []string, detach func(dev string) error,
	attach func(local string) (string, error), wait time.Duration, warn func(error)) (string, error) {
	local, nbdLegs := Legs(members)
	if local == "" {
		return "", fmt.Errorf("%s has no member but NBD devices: which disk does it mirror?", md)
	}
	if detach != nil {
		for _, m := range nbdLegs {
			if err := RemoveLeg(ctx, r, md, m); err != nil {
				warn(err)
			}
			if err := detach(m); err != nil {
				warn(err)
			}
		}
	}
	var leg string
	var err error
	for deadline := time.Now().Add(wait); ; {
		if leg, err = attach(local); err == nil || !time.Now().Before(deadline) {
			break
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("%w (attaching again: %v)", ctx.Err(), err)
		case <-time.After(500 * time.Millisecond):
		}
	}
	if err != nil {
		return "", err
	}
	if err := ReAdd(ctx, r, md, leg); err != nil {
		return "", fmt.Errorf("%w (the volume does not match the array's bitmap any more: `mdadm %s --add %s` copies it whole)", err, md, leg)
	}
	return leg, nil
}

// LogicalBlockSize is a block device's logical block size (BLKSSZGET):
// an NBD leg of a mirror must have its local leg's.
func LogicalBlockSize(dev string) (int, error) {
	f, err := os.Open(dev)
	if err != nil {
		return 0, fmt.Errorf("the mirror's local leg: %w", err)
	}
	defer f.Close()
	n, err := unix.IoctlGetInt(int(f.Fd()), unix.BLKSSZGET)
	if err != nil {
		return 0, fmt.Errorf("the logical block size of %s: %w (is it a block device?)", dev, err)
	}
	return n, nil
}

// Status is what mdadm (for an MD array) or lvs (for an LVM raid1 VG/LV)
// says of a mirror's legs and resync.
func Status(ctx context.Context, r Runner, md, lv string) (string, error) {
	if lv != "" {
		vg, _, _ := strings.Cut(lv, "/")
		return r.Run(ctx, "lvs", "-a", "-o", "name,attr,devices,sync_percent,raid_sync_action,raid_write_behind", vg)
	}
	return r.Run(ctx, "mdadm", "--detail", md)
}
