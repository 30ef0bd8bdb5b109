package main

import (
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/nbdserver/api"
)

func verifyCommand() *cli.Command {
	return &cli.Command{
		Name:      "verify",
		Usage:     "check that snapshots can be restored: manifests, index pages, chunks, journal packs",
		ArgsUsage: "[VOLUME[@SNAPSHOT]...]",
		Description: "Without arguments, every snapshot and checkpoint of every volume. Checks that every\n" +
			"manifest passes its check, every index page reads and hashes right, every chunk and\n" +
			"journal pack referenced is in the repository (one listing); --read-data also reads,\n" +
			"decodes and hashes every chunk, and --read-data-subset n/m the n-th of m parts of them\n" +
			"(run 1/m to m/m in turn to cover everything). Each damaged or missing object is listed\n" +
			"with the snapshots and byte ranges it holds; then it exits 7. status shows the last result.",
		Flags: append([]cli.Flag{
			&cli.BoolFlag{Name: "read-data", Usage: "read and hash every chunk referenced"},
			&cli.StringFlag{Name: "read-data-subset", Usage: "read and hash the `n/m`-th part of the chunks referenced, e.g. 1/10"},
			jsonFlag,
		}, clientFlags...),
		Action: verify,
	}
}

func verify(c *cli.Context) error {
	req := api.Verify{Targets: c.Args().Slice(), ReadData: c.Bool("read-data"), Subset: c.String("read-data-subset")}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	var rep api.VerifyReport
	err = spin(c, "verifying", func() (err error) {
		rep, err = cl.Verify(c.Context, req)
		return err
	})
	if err != nil {
		return err
	}
	if c.Bool("json") {
		if err := printJSON(rep); err != nil {
			return err
		}
	} else {
		read := ""
		if rep.ReadData {
			read = fmt.Sprintf(", %d read and hashed", rep.Read)
		}
		fmt.Printf("checked %d snapshots and checkpoints: %d index pages, %d chunks referenced%s (%.1f s)\n",
			rep.Manifests, rep.Pages, rep.Chunks, read, rep.Seconds)
		for _, pr := range rep.Problems {
			fmt.Printf("%s %s: %s\n", pr.Kind, pr.Object, pr.Reason)
			for _, a := range pr.Affects {
				fmt.Printf("    %s@%s (%s): bytes %d to %d\n", a.Volume, a.Snapshot, a.Kind, a.Offset, a.Offset+a.Length)
			}
		}
	}
	if len(rep.Problems) > 0 {
		return cli.Exit(fmt.Sprintf("%d damaged or missing objects (listed above): restore them from a copy of the repository, or delete the snapshots they hold, then run nbdvault gc",
			len(rep.Problems)), exitDamaged)
	}
	if !c.Bool("json") {
		fmt.Println("no damage found")
	}
	return nil
}
