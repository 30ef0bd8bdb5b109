package main

import (
	"fmt"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/nbdserver/api"
)

func verifyCommand() *cli.Command {
	return &cli.Command{
		Name:      "verify",
		Usage:     "check that snapshots can be restored: manifests, index pages, chunks, journal packs",
		ArgsUsage: "[VOLUME[@SNAPSHOT]...]",
		Description: "Without arguments, every snapshot and checkpoint of every volume. Checks that every\n" +
			"manifest passes its check, every index page and every delta top and page (recent data\n" +
			"is held as journal) reads and hashes right, every chunk and journal pack referenced is\n" +
			"in the repository (one listing); --read-data also reads, decodes and hashes every chunk\n" +
			"and journal frame. --read-data-subset N% reads the next N% of them (by ID) after where\n" +
			"the last N% run stopped, so 100/N runs cover everything; n/m reads the n-th of m parts\n" +
			"(run 1/m to m/m in turn). Each damaged or missing object is listed with the snapshots\n" +
			"and byte ranges it holds; then it exits 7. status shows the last result.",
		Flags: append([]cli.Flag{
			&cli.BoolFlag{Name: "read-data", Usage: "read and hash every chunk and journal frame referenced"},
			&cli.StringFlag{Name: "read-data-subset", Usage: "read and hash a part of the data: `N%` (the next N% after the last such run, e.g. 10%) or n/m (e.g. 1/10)"},
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
		read, framesRead := "", ""
		if rep.ReadData {
			read = fmt.Sprintf(", %d read and hashed", rep.Read)
			framesRead = fmt.Sprintf(", %d read and hashed", rep.FramesRead)
		}
		fmt.Printf("checked %d snapshots and checkpoints: %d index pages, %d chunks referenced%s; %d deltas, %d delta pages, %d journal frames referenced%s (%.1f s)\n",
			rep.Manifests, rep.Pages, rep.Chunks, read, rep.Deltas, rep.DeltaPages, rep.Frames, framesRead, rep.Seconds)
		if line := rangeLine(rep.Range); line != "" {
			fmt.Println(line)
		}
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

// rangeLine says which part of the ID space an N% subset read, or "".
func rangeLine(r *api.VerifyRange) string {
	switch {
	case r == nil:
		return ""
	case r.From == r.To:
		return "read the data of every chunk ID"
	}
	return fmt.Sprintf("read the data whose IDs start from %s up to %s (%.4g%% to %.4g%% of the ID space); the next N%% run starts there",
		r.From, r.To, r.FromPercent, r.ToPercent)
}

// verifyLine describes the last verify for status, or "" without one.
func verifyLine(rep *api.VerifyReport) string {
	if rep == nil {
		return "last verify: never (nbdvault verify, or serve --verify-every)"
	}
	how := "asked for"
	if rep.Scheduled {
		how = "scheduled"
	}
	what := "structure"
	if rep.Subset != "" {
		what += " and data subset " + rep.Subset
	} else if rep.ReadData {
		what += " and data"
	}
	result := "no damage"
	if n := len(rep.Problems); n > 0 {
		result = fmt.Sprintf("%d DAMAGED OR MISSING objects (status --json lists them under last_verify)", n)
	}
	return fmt.Sprintf("last verify %s (%s, %s, %s ago): %s", rep.Time.Local().Format(time.RFC3339), how, what,
		time.Since(rep.Time).Round(time.Second), result)
}
