package main

import (
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/nbdserver/api"
)

func gcCommand() *cli.Command {
	return &cli.Command{
		Name:  "gc",
		Usage: "delete the chunks no snapshot, checkpoint or volume references any more",
		Description: "Marks every chunk that a snapshot or checkpoint of any volume references,\n" +
			"and deletes the repository's other chunks, while volumes are\n" +
			"written, snapshotted and uploaded. The server also runs it after prune and\n" +
			"after deleting a volume. A collection stopped midway (Ctrl-C, a crash) loses\n" +
			"nothing; the next one deletes what it left.",
		Flags: append([]cli.Flag{
			&cli.BoolFlag{Name: "dry-run", Aliases: []string{"n"}, Usage: "count what would be deleted, and delete nothing"},
			&cli.BoolFlag{Name: "list", Usage: "list the repository's chunks rather than trust the server's inventory of them (after adding objects by hand)"},
			jsonFlag,
		}, clientFlags...),
		Action: gc,
	}
}

// spin shows desc with a spinner while do runs (not with --json).
func spin(c *cli.Context, desc string, do func() error) error {
	if c.Bool("json") {
		return do()
	}
	p := newProgress(desc, -1)
	err := do()
	if err != nil {
		stopProgress(p)
	} else {
		p.finish()
	}
	return err
}

func gc(c *cli.Context) error {
	if err := needArgs(c, 0, "no arguments"); err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	var rep api.GCReport
	err = spin(c, "collecting garbage", func() (err error) {
		rep, err = cl.CollectGarbage(c.Context, api.GC{DryRun: c.Bool("dry-run"), List: c.Bool("list")})
		return err
	})
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(rep)
	}
	fmt.Printf("marked %d snapshots and checkpoints: %d chunks referenced (%d of them index pages)\n", rep.Manifests, rep.Referenced, rep.IndexPages)
	verb := "deleted"
	n := rep.Deleted
	if rep.DryRun {
		verb, n = "would delete", rep.Unreferenced
	}
	from := "from the server's inventory"
	if rep.Listing {
		from = "listed"
	}
	fmt.Printf("%d chunks in the repository (%s), %d referenced by nothing: %s %d (%.1f s)\n", rep.Listed, from, rep.Unreferenced, verb, n, rep.Seconds)
	for _, m := range rep.DamagedManifests {
		fmt.Printf("WARNING: %s failed its check; what its root references was kept: nbdvault verify\n", m)
	}
	return nil
}
