package main

import (
	"log/slog"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/internal/password"
)

// passwordSource is where the flags say an encrypted repository's password
// comes from.
func passwordSource(c *cli.Context) password.Source {
	return password.Source{File: c.String("password-file"), Command: c.String("password-command")}
}

// passwordOf returns the function that reads the password when it is
// needed (a new one, asked twice on a terminal, if isNew).
func passwordOf(c *cli.Context, what string, isNew bool) func() ([]byte, string, error) {
	src := passwordSource(c)
	return func() ([]byte, string, error) {
		if src.File != "" {
			if w := password.FileWarning(src.File); w != "" {
				slog.Warn(w)
			}
		}
		if isNew {
			return src.ReadNew(what)
		}
		return src.Read(what)
	}
}

// passwordGiven reports whether the user gave a password: a flag, the
// environment or a systemd credential (a terminal prompt is only asked
// for when one is needed: keep --encrypt in a unit that types it).
func passwordGiven(c *cli.Context) bool {
	_, env := os.LookupEnv(password.DefaultEnv)
	return c.String("password-file") != "" || c.String("password-command") != "" || env || password.CredentialGiven()
}
