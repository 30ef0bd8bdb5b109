package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/nbdvault/nbdvault/client"

	"github.com/nbdvault/nbdvault/client/mirror"
)

func mirrorCommand() *cli.Command {
	nbdServer := &cli.StringFlag{Name: "server", Value: defaultListen, Usage: "the nbdvault server's NBD `address`: HOST:PORT or unix:/PATH"}
	volume := &cli.StringFlag{Name: "volume", Usage: "the `VOLUME` that is the mirror leg (required)"}
	dryRun := &cli.BoolFlag{Name: "dry-run", Usage: "print the commands instead of running them"}
	timeout := &cli.DurationFlag{Name: "timeout", Value: 30 * time.Second, Usage: "the NBD device fails I/O the server has not answered in this `long` (MD then fails the leg and keeps going)"}
	return &cli.Command{
		Name:  "mirror",
		Usage: "make a volume a mirror leg of a local disk (MD RAID1 or LVM raid1), watch it, reconnect it",
		Subcommands: []*cli.Command{
			{
				Name:  "create",
				Usage: "attach the volume and add it as the write-mostly, write-behind leg of a mirror",
				Description: "MD (default): creates a new RAID1 array of --device and the volume, with an internal\n" +
					"write-intent bitmap; this OVERWRITES what --device holds (pass --destroy-data to confirm):\n" +
					"start from an empty disk, or restore the data onto the array afterwards.\n" +
					"--lvm: converts the existing logical volume --device (VG/LV) to raid1 with the volume as\n" +
					"its second leg; the data is kept and copied to the volume.",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "device", Usage: "the local `DEVICE`: a disk or partition for MD, VG/LV with --lvm (required)"},
					nbdServer, volume,
					&cli.StringFlag{Name: "md", Value: "/dev/md0", Usage: "the MD `ARRAY` to create"},
					&cli.BoolFlag{Name: "lvm", Usage: "an LVM raid1 leg of the logical volume --device, keeping its data"},
					&cli.IntFlag{Name: "write-behind", Value: 256, Usage: "`WRITES` MD lets the volume lag behind the local disk"},
					&cli.StringFlag{Name: "bitmap-chunk", Usage: "the MD bitmap's region `SIZE` (mdadm's default when empty): a reconnect copies whole dirty regions"},
					&cli.BoolFlag{Name: "destroy-data", Usage: "confirm that creating the MD array may overwrite --device"},
					timeout, dryRun,
				},
				Action: mirrorCreate,
			},
			{
				Name:  "status",
				Usage: "show the mirror's state: the legs, resync progress, writes not yet on every leg",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "md", Value: "/dev/md0", Usage: "the MD `ARRAY`"},
					&cli.StringFlag{Name: "lvm", Usage: "an LVM raid1 logical volume `VG/LV` instead of an MD array"},
				},
				Action: mirrorStatus,
			},
			{
				Name:  "reconnect",
				Usage: "attach the volume again after the NBD leg failed, and re-add it: only the regions the bitmap marks are copied",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "md", Value: "/dev/md0", Usage: "the MD `ARRAY`"},
					nbdServer, volume, timeout, dryRun,
					&cli.DurationFlag{Name: "wait", Value: time.Minute, Usage: "keep trying to reach the server this `long`"},
				},
				Action: mirrorReconnect,
			},
		},
	}
}

// runner runs or, dry, prints commands.
type runner struct{ dry bool }

func (r runner) run(ctx context.Context, name string, args ...string) (string, error) {
	if r.dry {
		fmt.Println(shellLine(name, args))
		return "", nil
	}
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %v: %s", shellLine(name, args), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

func shellLine(name string, args []string) string {
	q := []string{name}
	for _, a := range args {
		if a == "" || strings.ContainsAny(a, " \t'\"$\\") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		q = append(q, a)
	}
	return strings.Join(q, " ")
}

// attachLeg attaches the volume with the logical block size of local,
// the mirror's other leg (or, dry, prints how).
func (r runner) attachLeg(c *cli.Context, local string) (string, error) {
	vol := c.String("volume")
	if vol == "" {
		return "", usageErrorf("--volume is required")
	}
	bs, err := logicalBlockSize(local)
	if err != nil {
		return "", err
	}
	if r.dry {
		fmt.Println(shellLine("nbdvault", []string{"client", "attach", "--server", c.String("server"), "--export", vol,
			"--timeout", c.Duration("timeout").String(), "--block-size", fmt.Sprint(bs), "/dev/nbd0"}))
		return "/dev/nbd0", nil
	}
	dev, err := client.FreeKernelDevice()
	if err != nil {
		return "", err
	}
	return attachInBackground(c.String("server"), vol, dev, false, bs, c.Duration("timeout"))
}

// logicalBlockSize is a block device's logical block size (BLKSSZGET).
func logicalBlockSize(dev string) (int, error) {
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

func mirrorCreate(c *cli.Context) error {
	device := c.String("device")
	if device == "" {
		return usageErrorf("client mirror create: --device is required")
	}
	r := runner{dry: c.Bool("dry-run")}
	if !c.Bool("lvm") && !c.Bool("destroy-data") && !r.dry {
		return usageErrorf("client mirror create: a new MD array overwrites %s; pass --destroy-data if it holds nothing you need, use --lvm to keep a logical volume's data, or --dry-run to see the commands", device)
	}
	local := device
	if c.Bool("lvm") {
		local = "/dev/" + device // VG/LV
	}
	leg, err := r.attachLeg(c, local)
	if err != nil {
		return err
	}
	ctx := c.Context
	if c.Bool("lvm") {
		vg, _, ok := strings.Cut(device, "/")
		if !ok {
			return usageErrorf("--device %q: with --lvm, want VG/LV", device)
		}
		steps := [][]string{
			{"pvcreate", leg},
			{"vgextend", vg, leg},
			{"lvconvert", "--yes", "--type", "raid1", "-m", "1", device, leg},
		}
		for _, s := range steps {
			if _, err := r.run(ctx, s[0], s[1:]...); err != nil {
				return err
			}
		}
		// LVM changes write-mostly only on an array in sync: the first
		// copy to the volume has to finish.
		if err := r.waitLVSync(ctx, device); err != nil {
			return err
		}
		for _, s := range [][]string{
			{"lvchange", "--yes", "--writemostly", leg, device},
			{"lvchange", "--yes", "--writebehind", fmt.Sprint(c.Int("write-behind")), device},
		} {
			if _, err := r.run(ctx, s[0], s[1:]...); err != nil {
				return err
			}
		}
	} else {
		args := []string{"--create", c.String("md"), "--run", "--level=1", "--raid-devices=2",
			"--metadata=1.2", "--bitmap=internal", fmt.Sprintf("--write-behind=%d", c.Int("write-behind"))}
		if bc := c.String("bitmap-chunk"); bc != "" {
			args = append(args, "--bitmap-chunk="+bc)
		}
		if _, err := r.run(ctx, "mdadm", append(args, device, "--write-mostly", leg)...); err != nil {
			return err
		}
	}
	if !r.dry {
		fmt.Printf("%s is the write-mostly leg (%s) of %s\n", c.String("volume"), leg, orDefault(c.Bool("lvm"), device, c.String("md")))
	}
	return nil
}

// waitLVSync waits until the raid1 logical volume lv is in sync, showing
// how far the copy is.
func (r runner) waitLVSync(ctx context.Context, lv string) error {
	if r.dry {
		fmt.Printf("# wait until `lvs -o sync_percent %s` says 100.00\n", lv)
		return nil
	}
	p := newProgress("copying "+lv+" to the volume", -1)
	for {
		out, err := r.run(ctx, "lvs", "--noheadings", "-o", "sync_percent", lv)
		if err != nil {
			stopProgress(p)
			return err
		}
		pct := strings.TrimSpace(out)
		if pct == "100.00" {
			p.finish()
			return nil
		}
		p.note(pct + "% in sync")
		select {
		case <-ctx.Done():
			stopProgress(p)
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func orDefault(lvm bool, lv, md string) string {
	if lvm {
		return lv
	}
	return md
}

func mirrorStatus(c *cli.Context) error {
	md, lv := c.String("md"), c.String("lvm")
	if lv != "" {
		vg, _, _ := strings.Cut(lv, "/")
		out, err := runner{}.run(c.Context, "lvs", "-a", "-o", "name,attr,devices,sync_percent,raid_sync_action,raid_write_behind", vg)
		if err != nil {
			return err
		}
		fmt.Print(out)
		md = "" // bitmapOf: the LV's
	} else {
		out, err := runner{}.run(c.Context, "mdadm", "--detail", md)
		if err != nil {
			return err
		}
		fmt.Print(out)
	}
	b, err := bitmapOf(md, lv)
	if err != nil {
		return err
	}
	dirty, chunks, err := b.Dirty()
	if err != nil {
		return err
	}
	fmt.Printf("   Write-intent bitmap : %d of %d regions dirty (writes not yet on every leg of %s)\n", dirty, chunks, b.What)
	return nil
}

func mirrorReconnect(c *cli.Context) error {
	md := c.String("md")
	r := runner{dry: c.Bool("dry-run")}
	ctx := c.Context
	// The failed NBD leg: MD keeps it as faulty until removed; its
	// device is detached so it can be attached again. The volume is
	// attached with the other legs' block size.
	members, err := mirror.MDMembers(md)
	if err != nil {
		return fmt.Errorf("--md: %w", err)
	}
	local := ""
	for _, m := range members {
		if !strings.HasPrefix(m, "/dev/nbd") {
			local = m
		}
	}
	if local == "" {
		return fmt.Errorf("%s has no member but NBD devices: which disk does it mirror?", md)
	}
	if !r.dry {
		for _, m := range members {
			if !strings.HasPrefix(m, "/dev/nbd") {
				continue
			}
			if _, err := r.run(ctx, "mdadm", md, "--fail", m, "--remove", m); err != nil {
				fmt.Fprintln(os.Stderr, "nbdvault:", err)
			}
			if err := client.DetachKernel(m); err != nil {
				fmt.Fprintln(os.Stderr, "nbdvault:", err)
			}
			waitDetached(m)
		}
	}
	// The server may be coming back: try for a while before giving up.
	var leg string
	for deadline := time.Now().Add(c.Duration("wait")); ; {
		if leg, err = r.attachLeg(c, local); err == nil || time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	if _, err := r.run(ctx, "mdadm", md, "--re-add", leg); err != nil {
		return fmt.Errorf("%w (the volume does not match the array's bitmap any more: `mdadm %s --add %s` copies it whole)", err, md, leg)
	}
	if !r.dry {
		fmt.Printf("%s re-added to %s as %s: MD copies the regions its bitmap marks (nbdvault client mirror status --md %s)\n", c.String("volume"), md, leg, md)
	}
	return nil
}
