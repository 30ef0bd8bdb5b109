// Command nbdvault is the block-level streaming backup server and its CLI.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func newApp() *cli.App {
	return &cli.App{
		Name:    "nbdvault",
		Usage:   "block-level streaming backup server",
		Version: version,
		Description: "nbdvault keeps volumes that source hosts mirror to it over NBD as\n" +
			"deduplicated, compressed chunks in a local directory or S3, with\n" +
			"instant snapshots restored by mounting them.",
		HideHelpCommand: true,
		// Errors are printed and mapped to exit codes in main, not here.
		ExitErrHandler: func(*cli.Context, error) {},
		OnUsageError: func(_ *cli.Context, err error, _ bool) error {
			return cli.Exit(err.Error()+" (see nbdvault --help)", exitUsage)
		},
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newApp().RunContext(ctx, os.Args)
	stop()
	os.Exit(exitCode(err))
}

// Exit codes, one place for all of them (docs/cli.md lists them).
const (
	exitOK      = 0
	exitFailure = 1 // any error not listed below
	exitUsage   = 2 // a wrong flag or argument
)

// exitCode prints err as one line and maps it to the process exit code.
func exitCode(err error) int {
	if err == nil {
		return exitOK
	}
	var ec cli.ExitCoder
	if errors.As(err, &ec) {
		if msg := err.Error(); msg != "" {
			fmt.Fprintln(os.Stderr, "nbdvault:", msg)
		}
		return ec.ExitCode()
	}
	fmt.Fprintln(os.Stderr, "nbdvault:", err)
	return exitFailure
}
