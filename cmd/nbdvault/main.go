// Command nbdvault is the block-level streaming backup server and its CLI.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/client/mirror"
	"github.com/nbdvault/nbdvault/client/mount"
	"github.com/nbdvault/nbdvault/client/transfer"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func newApp() *cli.App {
	app := &cli.App{
		Name:    "nbdvault",
		Usage:   "block-level streaming backup server",
		Version: version,
		Description: "nbdvault keeps volumes that source hosts mirror to it over NBD as\n" +
			"deduplicated, compressed chunks in a local directory or S3, with\n" +
			"instant snapshots restored by mounting them.",
		HideHelpCommand: true,
		Commands: []*cli.Command{
			serveCommand(),
			repoCommand(),
			volumeCommand(),
			snapshotCommand(),
			pruneCommand(),
			gcCommand(),
			verifyCommand(),
			tokenCommand(),
			keyCommand(),
			accessCommand(),
			statusCommand(),
			restoreCommand(),
			importCommand(),
			mountCommand(),
			umountCommand(),
			clientCommand(),
		},
		// Errors are printed and mapped to exit codes in main, not here.
		ExitErrHandler: func(*cli.Context, error) {},
		OnUsageError: func(_ *cli.Context, err error, _ bool) error {
			return cli.Exit(err.Error()+" (see nbdvault --help)", exitUsage)
		},
	}
	for _, c := range app.Commands {
		onUsageError(c)
	}
	app.Action = unknownCommand
	return app
}

// onUsageError makes a wrong flag of command c (and its subcommands) one
// line naming the command's help, with the usage exit code, instead of
// urfave/cli's help dump.
func onUsageError(c *cli.Command) {
	c.OnUsageError = func(ctx *cli.Context, err error, _ bool) error {
		return cli.Exit(fmt.Sprintf("%v (see nbdvault %s --help)", err, commandPath(ctx)), exitUsage)
	}
	for _, sub := range c.Subcommands {
		onUsageError(sub)
	}
	if len(c.Subcommands) > 0 && c.Action == nil {
		c.Action = unknownCommand
	}
}

// unknownCommand is the action of the app and of command groups: help
// when given nothing, a usage error naming the unknown command otherwise
// (urfave/cli would exit 3, which here means "not found").
func unknownCommand(c *cli.Context) error {
	if c.NArg() == 0 {
		if c.Command != nil && c.Command.Name != "" {
			return cli.ShowSubcommandHelp(c)
		}
		return cli.ShowAppHelp(c)
	}
	where := "nbdvault"
	if p := commandPath(c); p != "" {
		where += " " + p
	}
	return usageErrorf("%s: no command %q (see %s --help)", where, c.Args().First(), where)
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		<-ctx.Done()
		stop() // a second signal kills at once, as users expect
	}()
	app := newApp()
	err := app.RunContext(ctx, flagsFirst(app, os.Args))
	stop()
	os.Exit(exitCode(err))
}

// Exit codes, one place for all of them (docs/cli.md lists them).
const (
	exitOK          = 0
	exitFailure     = 1 // any error not listed below
	exitUsage       = 2 // a wrong flag or argument
	exitNotFound    = 3 // no such volume or snapshot
	exitAuth        = 4 // the server refused the token, or its scope does not cover the request
	exitUnreachable = 5 // no server answered
	exitConflict    = 6 // it exists already, or is not sealed yet
	exitDamaged     = 7 // the volume's data is damaged: the message says what to do
	exitInterrupted = 130
)

// exitCode prints err as one line and maps it to the process exit code.
func exitCode(err error) int {
	if err == nil {
		return exitOK
	}
	if msg := err.Error(); msg != "" {
		fmt.Fprintln(os.Stderr, "nbdvault:", msg)
	}
	var ec cli.ExitCoder
	var child *exec.ExitError // a tool's exit status is not ours to pass on
	switch {
	case errors.As(err, &child):
		return exitFailure
	case errors.As(err, &ec):
		return ec.ExitCode()
	case errors.Is(err, api.ErrInvalid), errors.Is(err, mirror.ErrInvalid), errors.Is(err, mount.ErrNoDir),
		errors.Is(err, transfer.ErrNotFileOrDevice):
		return exitUsage
	case errors.Is(err, api.ErrNotFound):
		return exitNotFound
	case errors.Is(err, api.ErrUnauthorized), errors.Is(err, api.ErrForbidden):
		return exitAuth
	case errors.Is(err, api.ErrUnreachable):
		return exitUnreachable
	case errors.Is(err, api.ErrExists), errors.Is(err, api.ErrNotSealed), errors.Is(err, api.ErrTooSoon), errors.Is(err, api.ErrProtected), errors.Is(err, transfer.ErrExists),
		errors.Is(err, mount.ErrClaimed), errors.Is(err, mount.ErrMountPoint):
		return exitConflict
	case errors.Is(err, api.ErrDamaged):
		return exitDamaged
	case errors.Is(err, context.Canceled):
		return exitInterrupted
	}
	return exitFailure
}
