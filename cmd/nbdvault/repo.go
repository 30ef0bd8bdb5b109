package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/nbdserver"
)

func repoCommand() *cli.Command {
	return &cli.Command{
		Name:  "repo",
		Usage: "make a repository without a server",
		Subcommands: []*cli.Command{{
			Name:      "init",
			Usage:     "make a new repository, plain or encrypted, at LOCATION (a path, or s3://BUCKET[/PREFIX]?endpoint=HOST:PORT)",
			ArgsUsage: "LOCATION",
			Flags: []cli.Flag{
				&cli.BoolFlag{Name: "encrypt", Usage: "encrypt it: a random master key, wrapped by the password (NBDVAULT_PASSWORD, --password-file, --password-command, the systemd credential nbdvault-password, or a prompt on a terminal, asked twice)"},
				&cli.StringFlag{Name: "password-file", EnvVars: []string{"NBDVAULT_PASSWORD_FILE"}, Usage: "read the password from this `file`"},
				&cli.StringFlag{Name: "password-command", EnvVars: []string{"NBDVAULT_PASSWORD_COMMAND"}, Usage: "run this `command` (sh -c) for the password: it prints it on stdout"},
				jsonFlag,
			},
			Action: repoInit,
		}},
	}
}

func repoInit(c *cli.Context) error {
	if err := needArgs(c, 1, "LOCATION"); err != nil {
		return err
	}
	encrypt := c.Bool("encrypt")
	if !encrypt && passwordGiven(c) {
		return usageErrorf("a password was given without --encrypt: give --encrypt to make the repository encrypted, or no password to make it plain")
	}
	r, err := nbdserver.InitRepository(c.Context, nbdserver.InitOptions{
		Repo: c.Args().First(), Encrypt: encrypt,
		Password: passwordOf(c, "the password of the new repository", true), PasswordGiven: passwordGiven(c),
	})
	if errors.Is(err, nbdserver.ErrInitialized) {
		return cli.Exit(err.Error(), exitConflict)
	}
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(r)
	}
	if !r.Encrypted {
		fmt.Printf("made plain repository %s (ID %s, format %d)\n", r.Location, r.ID, r.Format)
	} else {
		fmt.Printf("made encrypted repository %s (ID %s, format %d, %s; key %s)\n", r.Location, r.ID, r.Format, r.Cipher, r.Key)
		fmt.Fprintln(os.Stderr, "keep the password safe: without a password that opens one of its keys, nothing in the repository can be read (nbdvault key add adds another once a server runs on it)")
	}
	fmt.Printf("serve it with: nbdvault serve --repo %s\n", r.Location)
	return nil
}
