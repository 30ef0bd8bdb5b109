package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
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
			"prints it. Needs root and the nbd module (modprobe nbd).\n" +
			"With --tls-ca or --tls-cert the handshake is TLS and the background process relays\n" +
			"the device's requests over it (the kernel's NBD driver has no TLS).",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "server", Value: defaultListen, Usage: "the NBD `address`: HOST:PORT or unix:/PATH"},
			&cli.StringFlag{Name: "export", Usage: "the `EXPORT`: VOL for a volume's head, VOL@SNAP for a snapshot (required)"},
			&cli.BoolFlag{Name: "readonly", Usage: "attach read-only (a snapshot always is)"},
			&cli.IntFlag{Name: "block-size", Value: 512, Usage: "the device's logical block `SIZE`, 512 to 4096: a mirror leg's must match the local disk's"},
			&cli.DurationFlag{Name: "timeout", Value: 60 * time.Second, Usage: "fail I/O the server has not answered in this `long`"},
			&cli.BoolFlag{Name: "foreground", Hidden: true, Usage: "serve in this process (what the background process runs)"},
		}, nbdTLSFlags...),
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
	server := c.String("server")
	tlsConfig, err := nbdTLS(c, server)
	if err != nil {
		return err
	}
	if c.Bool("foreground") {
		err := client.AttachKernel(c.Context, server, dev, export, tlsConfig, readOnly, c.Int("block-size"), c.Duration("timeout"), func() {
			fmt.Println("ready", dev)
			os.Stdout.Close() // the parent stops waiting
		})
		if refused, ok := nbdOpenError(c, export, server, err); ok {
			return refused
		}
		return err
	}
	tlsArgs, err := tlsFileArgs(c)
	if err != nil {
		return err
	}
	dev, err = attachInBackground(server, export, dev, readOnly, c.Int("block-size"), c.Duration("timeout"), tlsArgs)
	if err != nil {
		return err
	}
	fmt.Println(dev)
	return nil
}

// nbdTLSFlags are --tls-ca, --tls-cert and --tls-key for the commands
// whose --server is an NBD address (client attach, client mirror): the
// names, files and environment variables of every other command's.
var nbdTLSFlags = []cli.Flag{
	&cli.StringFlag{Name: tlsCAFlag.Name, EnvVars: tlsCAFlag.EnvVars,
		Usage: "CA certificate `file` (PEM) to trust for the NBD server's certificate (default: the system's); any of the --tls-* flags attaches over TLS"},
	&cli.StringFlag{Name: clientCertFlag.Name, EnvVars: clientCertFlag.EnvVars,
		Usage: "client certificate `file` (PEM) to present to the NBD server: who you are, for its access rules"},
	&cli.StringFlag{Name: clientKeyFlag.Name, EnvVars: clientKeyFlag.EnvVars,
		Usage: "the private key `file` of --tls-cert"},
}

// attachInBackground runs `nbdvault client attach --foreground` in a
// session of its own, which serves the device after this process exits,
// and returns the device once it is ready. tlsArgs are the TLS flags to
// pass on (tlsFileArgs): with them, that process also pumps the device's
// requests over TLS.
func attachInBackground(server, export, dev string, readOnly bool, blockSize int, timeout time.Duration, tlsArgs []string) (string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	args := []string{"client", "attach", "--foreground", "--server", server, "--export", export,
		"--timeout", timeout.String(), "--block-size", fmt.Sprint(blockSize), dev}
	if readOnly {
		args = append(args, "--readonly")
	}
	args = append(args, tlsArgs...)
	cmd := exec.Command(self, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	// Its stderr goes to a file, not a pipe: a pipe would break when this
	// process exits, and a write to it kill the serving process.
	errFile, err := os.CreateTemp("", "nbdvault-attach-")
	if err != nil {
		return "", err
	}
	defer os.Remove(errFile.Name())
	defer errFile.Close()
	cmd.Stderr = errFile
	out, err := cmd.StdoutPipe()
	if err != nil {
		return "", err
	}
	if err := cmd.Start(); err != nil {
		return "", err
	}
	line, _ := bufio.NewReader(out).ReadString('\n')
	if strings.HasPrefix(line, "ready ") {
		_ = cmd.Process.Release()
		return dev, nil
	}
	_ = cmd.Wait()
	said, _ := os.ReadFile(errFile.Name())
	msg := strings.TrimSpace(strings.TrimPrefix(string(said), "nbdvault: "))
	if msg == "" {
		msg = "the attach process ended without a word"
	}
	return "", fmt.Errorf("attach %s to %s: %s", export, dev, msg)
}
