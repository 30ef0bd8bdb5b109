package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

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
				Flags: append([]cli.Flag{
					&cli.StringFlag{Name: "device", Usage: "the local `DEVICE`: a disk or partition for MD, VG/LV with --lvm (required)"},
					nbdServer, volume,
					&cli.StringFlag{Name: "md", Value: "/dev/md0", Usage: "the MD `ARRAY` to create"},
					&cli.BoolFlag{Name: "lvm", Usage: "an LVM raid1 leg of the logical volume --device, keeping its data"},
					&cli.IntFlag{Name: "write-behind", Value: 256, Usage: "`WRITES` MD lets the volume lag behind the local disk"},
					&cli.StringFlag{Name: "bitmap-chunk", Usage: "the MD bitmap's region `SIZE` (mdadm's default when empty): a reconnect copies whole dirty regions"},
					&cli.BoolFlag{Name: "destroy-data", Usage: "confirm that creating the MD array may overwrite --device"},
					timeout, dryRun,
				}, nbdTLSFlags...),
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
				Flags: append([]cli.Flag{
					&cli.StringFlag{Name: "md", Value: "/dev/md0", Usage: "the MD `ARRAY`"},
					nbdServer, volume, timeout, dryRun,
					&cli.DurationFlag{Name: "wait", Value: time.Minute, Usage: "keep trying to reach the server this `long`"},
				}, nbdTLSFlags...),
				Action: mirrorReconnect,
			},
		},
	}
}

// runner is the mirror's command runner: it runs mdadm and LVM, or, dry,
// prints them.
func runner(dry bool) mirror.Runner {
	if dry {
		return mirror.DryRun{W: os.Stdout}
	}
	return mirror.Exec{}
}

// attachLeg attaches the volume with the logical block size of local,
// the mirror's other leg (or, dry, prints how), over TLS when the TLS
// flags are given.
func attachLeg(c *cli.Context, dry bool, local string) (string, error) {
	vol := c.String("volume")
	if vol == "" {
		return "", usageErrorf("--volume is required")
	}
	if _, err := nbdTLS(c, c.String("server")); err != nil { // the files read, before anything is attached
		return "", err
	}
	tlsArgs, err := tlsFileArgs(c)
	if err != nil {
		return "", err
	}
	bs, err := mirror.LogicalBlockSize(local)
	if err != nil {
		return "", err
	}
	if dry {
		args := []string{"client", "attach", "--server", c.String("server"), "--export", vol,
			"--timeout", c.Duration("timeout").String(), "--block-size", fmt.Sprint(bs)}
		fmt.Println(mirror.ShellLine("nbdvault", append(append(args, tlsArgs...), "/dev/nbd0")))
		return "/dev/nbd0", nil
	}
	dev, err := client.FreeKernelDevice()
	if err != nil {
		return "", err
	}
	return attachInBackground(c.String("server"), vol, dev, false, bs, c.Duration("timeout"), tlsArgs)
}

func mirrorCreate(c *cli.Context) error {
	device := c.String("device")
	if device == "" {
		return usageErrorf("client mirror create: --device is required")
	}
	dry := c.Bool("dry-run")
	lvm := c.Bool("lvm")
	if !lvm && !c.Bool("destroy-data") && !dry {
		return usageErrorf("client mirror create: a new MD array overwrites %s; pass --destroy-data if it holds nothing you need, use --lvm to keep a logical volume's data, or --dry-run to see the commands", device)
	}
	if _, _, ok := strings.Cut(device, "/"); lvm && !ok {
		return usageErrorf("--device %q: with --lvm, want VG/LV", device)
	}
	local := device
	if lvm {
		local = "/dev/" + device // VG/LV
	}
	leg, err := attachLeg(c, dry, local)
	if err != nil {
		return err
	}
	ctx, r := c.Context, runner(dry)
	what := c.String("md")
	if lvm {
		what = device
		var p *progress
		err = mirror.CreateLVM(ctx, r, device, leg, c.Int("write-behind"), func(pct string) {
			if p == nil {
				p = newProgress("copying "+device+" to the volume", -1)
			}
			p.note(pct + "% in sync")
		})
		if p != nil {
			if err != nil {
				stopProgress(p)
			} else {
				p.finish()
			}
		}
	} else {
		err = mirror.CreateMD(ctx, r, device, leg, mirror.MDOptions{Array: what, WriteBehind: c.Int("write-behind"), BitmapChunk: c.String("bitmap-chunk")})
	}
	if err != nil {
		return err
	}
	if !dry {
		fmt.Printf("%s is the write-mostly leg (%s) of %s\n", c.String("volume"), leg, what)
	}
	return nil
}

func mirrorStatus(c *cli.Context) error {
	md, lv := c.String("md"), c.String("lvm")
	if lv != "" {
		md = "" // bitmapOf: the LV's
	}
	out, err := mirror.Status(c.Context, mirror.Exec{}, md, lv)
	if err != nil {
		return err
	}
	fmt.Print(out)
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
	dry := c.Bool("dry-run")
	r := runner(dry)
	ctx := c.Context
	members, err := mirror.MDMembers(md)
	if err != nil {
		return fmt.Errorf("--md: %w", err)
	}
	detach := func(dev string) error {
		err := client.DetachKernel(dev)
		client.WaitDetached(dev)
		return err
	}
	if dry {
		detach = nil
	}
	leg, err := mirror.Reconnect(ctx, r, md, members, detach, func(local string) (string, error) {
		return attachLeg(c, dry, local)
	}, c.Duration("wait"), func(err error) { fmt.Fprintln(os.Stderr, "nbdvault:", err) })
	if err != nil {
		return err
	}
	if !dry {
		fmt.Printf("%s re-added to %s as %s: MD copies the regions its bitmap marks (nbdvault client mirror status --md %s)\n", c.String("volume"), md, leg, md)
	}
	return nil
}
