package main

import (
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/internal/password"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

func keyCommand() *cli.Command {
	passwordFlags := []cli.Flag{
		&cli.StringFlag{Name: "password-file", EnvVars: []string{"NBDVAULT_PASSWORD_FILE"},
			Usage: "a current password, from this `file` (else NBDVAULT_PASSWORD, --password-command, or a prompt on a terminal)"},
		&cli.StringFlag{Name: "password-command", EnvVars: []string{"NBDVAULT_PASSWORD_COMMAND"},
			Usage: "a current password, printed by this `command` (sh -c)"},
		&cli.StringFlag{Name: "new-password-file", EnvVars: []string{"NBDVAULT_NEW_PASSWORD_FILE"},
			Usage: "the new password, from this `file` (else NBDVAULT_NEW_PASSWORD, or a prompt on a terminal, twice)"},
	}
	return &cli.Command{
		Name:  "key",
		Usage: "list, add, change and remove the passwords of an encrypted repository",
		Description: "Each password wraps the repository's master key in an object of its own\n" +
			"(keys/ID); adding or changing one writes that object and nothing else. Adding or\n" +
			"changing a password needs a current one. Lose every password and the data is lost:\n" +
			"keep two, in two places. A password once known still opens any copy of the\n" +
			"repository made before it was changed.",
		Subcommands: []*cli.Command{
			{Name: "list", Usage: "list the keys (which one opened the repository)", Flags: append([]cli.Flag{jsonFlag}, clientFlags...), Action: keyList},
			{Name: "add", Usage: "add a password", Flags: append(append([]cli.Flag{
				&cli.StringFlag{Name: "label", Usage: "a `note` shown by key list (whose password it is)"}, jsonFlag}, passwordFlags...), clientFlags...),
				Action: keyAdd},
			{Name: "passwd", Usage: "change a password: the key it opens is replaced (one new object, one deleted)",
				Flags: append(append([]cli.Flag{jsonFlag}, passwordFlags...), clientFlags...), Action: keyPasswd},
			{Name: "remove", Usage: "remove a key: its password no longer opens the repository (the last key is refused)",
				ArgsUsage: "ID", Flags: clientFlags, Action: keyRemove},
		},
	}
}

func keyList(c *cli.Context) error {
	if err := needArgs(c, 0, ""); err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	ks, err := cl.Keys(c.Context)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(ks)
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tCREATED\tHOST\tLABEL\tOPENED")
	for _, k := range ks {
		opened := ""
		if k.Opened {
			opened = "yes"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", k.ID, k.Created.Local().Format(time.DateTime), k.Host, k.Label, opened)
	}
	return w.Flush()
}

// keyPasswords reads a current password and a new one.
func keyPasswords(c *cli.Context) (api.AddKey, error) {
	var req api.AddKey
	pw, _, err := passwordSource(c).Read("a current password of the repository")
	if err != nil {
		return req, err
	}
	npw, _, err := password.Source{File: c.String("new-password-file"), Env: "NBDVAULT_NEW_PASSWORD"}.ReadNew("the new password")
	if err != nil {
		return req, err
	}
	req.Password, req.NewPassword = string(pw), string(npw)
	return req, nil
}

func keyAdd(c *cli.Context) error { return keyChange(c, false) }

func keyPasswd(c *cli.Context) error { return keyChange(c, true) }

// keyChange adds a password, or (passwd) replaces the key a current one
// opens.
func keyChange(c *cli.Context, passwd bool) error {
	if err := needArgs(c, 0, ""); err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	req, err := keyPasswords(c)
	if err != nil {
		return err
	}
	var k api.Key
	if passwd {
		k, err = cl.ChangePassword(c.Context, req)
	} else {
		req.Label = c.String("label")
		k, err = cl.AddKey(c.Context, req)
	}
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(k)
	}
	if passwd {
		fmt.Printf("changed the password: key %s replaces the one it opened\n", k.ID)
	} else {
		fmt.Printf("added key %s\n", k.ID)
	}
	return nil
}

func keyRemove(c *cli.Context) error {
	if err := needArgs(c, 1, "ID"); err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	if err := cl.RemoveKey(c.Context, c.Args().First()); err != nil {
		return err
	}
	fmt.Printf("removed key %s\n", c.Args().First())
	return nil
}
