package main

import (
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/nbdserver/api"
)

func tokenCommand() *cli.Command {
	return &cli.Command{
		Name:  "token",
		Usage: "create, list and revoke tokens that may only do one thing to one volume",
		Description: "A scoped token is for a source host: with --scope snapshot its\n" +
			"`nbdvault client snapshot` can take snapshots of its volume and read its status,\n" +
			"and nothing else: no deletes, no prune, no other volume. Scopes: status (read\n" +
			"the volume's status and snapshots), snapshot (and take snapshots, at most once\n" +
			"per serve --scoped-snapshot-interval), push (and compare chunks, for\n" +
			"nbdvault client push). The server keeps only each token's SHA-256.",
		Subcommands: []*cli.Command{
			{
				Name: "create", Usage: "make a token and print it (the only time it is shown)",
				Flags: append([]cli.Flag{
					&cli.StringFlag{Name: "volume", Usage: "the `VOL` it is for (required)"},
					&cli.StringFlag{Name: "scope", Value: api.ScopeSnapshot, Usage: "what it may do: status, snapshot or push"},
					jsonFlag,
				}, clientFlags...),
				Action: tokenCreate,
			},
			{Name: "list", Usage: "list the tokens (never their secrets)", Flags: append([]cli.Flag{jsonFlag}, clientFlags...), Action: tokenList},
			{Name: "revoke", Usage: "revoke a token: it is refused from now on", ArgsUsage: "ID", Flags: clientFlags, Action: tokenRevoke},
		},
	}
}

func tokenCreate(c *cli.Context) error {
	if err := needArgs(c, 0, ""); err != nil {
		return err
	}
	if c.String("volume") == "" {
		return usageErrorf("--volume VOL is required: a scoped token is for one volume")
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	t, err := cl.CreateToken(c.Context, api.CreateToken{Scope: c.String("scope"), Volume: c.String("volume")})
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(t)
	}
	fmt.Println(t.Token)
	fmt.Fprintf(os.Stderr, "token %s: scope %s on volume %s. Keep it now: it is not shown again (NBDVAULT_TOKEN=... on the source host).\n", t.ID, t.Scope, t.Volume)
	return nil
}

func tokenList(c *cli.Context) error {
	if err := needArgs(c, 0, ""); err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	ts, err := cl.Tokens(c.Context)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(ts)
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tSCOPE\tVOLUME\tCREATED\tLAST USED")
	for _, t := range ts {
		used := "-"
		if t.LastUsed != nil {
			used = t.LastUsed.Local().Format(time.DateTime)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", t.ID, t.Scope, t.Volume, t.Created.Local().Format(time.DateTime), used)
	}
	return w.Flush()
}

func tokenRevoke(c *cli.Context) error {
	if err := needArgs(c, 1, "ID"); err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	if err := cl.RevokeToken(c.Context, c.Args().First()); err != nil {
		return err
	}
	fmt.Printf("revoked token %s\n", c.Args().First())
	return nil
}
