package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/client"
)

func attachCommand() *cli.Command {
	return &cli.Command{
		Name:      "attach",
		Usage:     "attach a volume (or a snapshot, read-only) as a kernel block device /dev/nbdN",
		ArgsUsage: "[/dev/nbdN]",
		Description: "Connects the kernel's NBD client to the export and leaves a background process\n" +
			"serving it until `nbdvault client detach`. Without a device it picks a free one and\n" +
			"prints it. Needs root and the nbd module (modprobe nbd).",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "server", Value: defaultListen, Usage: "the NBD `address`: HOST:PORT or unix:/PATH"},
			&cli.StringFlag{Name: "export", Usage: "the `EXPORT`: VOL for a volume's head, VOL@SNAP for a snapshot (required)"},
			&cli.BoolFlag{Name: "readonly", Usage: "attach read-only (a snapshot always is)"},
			&cli.IntFlag{Name: "block-size", Value: 512, Usage: "the device's logical block `SIZE`, 512 to 4096: a mirror leg's must match the local disk's"},
			&cli.DurationFlag{Name: "timeout", Value: 60 * time.Second, Usage: "fail I/O the server has not answered in this `long`"},
			&cli.BoolFlag{Name: "foreground", Hidden: true, Usage: "serve in this process (what the background process runs)"},
		},
		Action: attach,
	}
}

func detachCommand() *cli.Command {
	return &cli.Command{
		Name:      "detach",
		Usage:     "detach a device nbdvault client attach attached",
		ArgsUsage: "/dev/nbdN",
		Action: func(c *cli.Context) error {
			if err := needArgs(c, 1, "/dev/nbdN"); err != nil {
				return err
			}
			return client.DetachKernel(c.Args().First())
		},
	}
}

func attach(c *cli.Context) error {
	if c.NArg() > 1 {
		return usageErrorf("client attach: want at most one device, got %q", c.Args().Slice())
	}
	export := c.String("export")
	if export == "" {
		return usageErrorf("client attach: --export is required (VOL or VOL@SNAP)")
	}
	dev := c.Args().First()
	if dev == "" {
		var err error
		if dev, err = client.FreeKernelDevice(); err != nil {
			return err
		}
	}
	readOnly := c.Bool("readonly") || strings.Contains(export, "@")
	if c.Bool("foreground") {
		return client.AttachKernel(c.Context, c.String("server"), dev, export, readOnly, c.Int("block-size"), c.Duration("timeout"), func() {
			fmt.Println("ready", dev)
			os.Stdout.Close() // the parent stops waiting
		})
	}
	dev, err := attachInBackground(c.String("server"), export, dev, readOnly, c.Int("block-size"), c.Duration("timeout"))
	if err != nil {
		return err
	}
	fmt.Println(dev)
	return nil
}
