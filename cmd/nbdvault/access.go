package main

import (
	"fmt"
	"os"
	"text/tabwriter"

	"github.com/urfave/cli/v2"
)

func accessCommand() *cli.Command {
	return &cli.Command{
		Name:  "access",
		Usage: "check an NBD access rules file against the running server before reloading it",
		Subcommands: []*cli.Command{{
			Name: "check", Usage: "parse a rules file and list the open NBD connections a reload to it would close",
			ArgsUsage: "FILE",
			Description: "Closing a mirror leg's connection fails the leg: run this before replacing the\n" +
				"server's --access file (or sending it SIGHUP). Nothing changes on the server.",
			Flags:  append([]cli.Flag{jsonFlag}, clientFlags...),
			Action: accessCheck,
		}},
	}
}

func accessCheck(c *cli.Context) error {
	if err := needArgs(c, 1, "FILE"); err != nil {
		return err
	}
	b, err := os.ReadFile(c.Args().First())
	if err != nil {
		return usageErrorf("%v", err)
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	out, err := cl.CheckAccess(c.Context, string(b))
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(out)
	}
	fmt.Printf("%s: %d rules\n", c.Args().First(), out.Rules)
	if len(out.Closes) == 0 {
		fmt.Println("a reload to it closes no open NBD connection")
		return nil
	}
	fmt.Printf("a reload to it closes %d open NBD connection(s):\n", len(out.Closes))
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "IDENTITY\tFROM\tEXPORT\tWHY")
	for _, r := range out.Closes {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", r.Identity, r.Remote, r.Export, r.Why)
	}
	return w.Flush()
}
