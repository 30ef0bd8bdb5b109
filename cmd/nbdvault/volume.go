package main

import (
	"encoding/json"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/nbdserver/api"
)

var jsonFlag = &cli.BoolFlag{Name: "json", Usage: "print JSON (the admin API's) instead of a table"}

func volumeCommand() *cli.Command {
	return &cli.Command{
		Name:  "volume",
		Usage: "create, list, show, resize, set and delete volumes",
		Subcommands: []*cli.Command{
			{
				Name: "create", Usage: "create a volume", ArgsUsage: "NAME",
				Flags: append([]cli.Flag{
					&cli.StringFlag{Name: "size", Usage: "the volume's `size` (required), e.g. 20G (K, M, G, T: powers of 1024)"},
					&cli.StringFlag{Name: "chunk-size", Value: "1M", Usage: "chunk `size`, a power of two from 64K to 16M"},
				}, clientFlags...),
				Action: volumeCreate,
			},
			{Name: "list", Usage: "list volumes", Flags: append([]cli.Flag{jsonFlag}, clientFlags...), Action: volumeList},
			{Name: "show", Usage: "show a volume", ArgsUsage: "NAME", Flags: append([]cli.Flag{jsonFlag}, clientFlags...), Action: volumeShow},
			{
				Name: "resize", Usage: "grow a volume (clients see the new size when they reconnect)", ArgsUsage: "NAME",
				Flags:  append([]cli.Flag{&cli.StringFlag{Name: "size", Usage: "the new `size`, e.g. 40G (required)"}}, clientFlags...),
				Action: volumeResize,
			},
			{
				Name: "set", Usage: "store a retention policy in a volume, which the server applies after each snapshot is sealed",
				ArgsUsage: "NAME",
				Description: "The --keep-… flags are prune's (nbdvault prune --help): the server prunes the\n" +
					"volume by them after every snapshot it seals, leaving protected snapshots and\n" +
					"snapshots an NBD client has open, then collects garbage (at most once per\n" +
					"serve --gc-interval). They replace the stored policy whole. --no-retention\n" +
					"removes it: every snapshot is kept again. Try a policy first with\n" +
					"nbdvault prune NAME --keep-… --dry-run.",
				Flags: append(append(keepFlags(),
					&cli.BoolFlag{Name: "no-retention", Usage: "remove the stored policy: the server keeps every snapshot"},
					jsonFlag), clientFlags...),
				Action: volumeSet,
			},
			{Name: "delete", Usage: "delete a volume and all its snapshots", ArgsUsage: "NAME", Action: volumeDelete,
				Flags: append([]cli.Flag{&cli.BoolFlag{Name: "force", Usage: "delete it even if it has protected snapshots"}}, clientFlags...)},
			{
				Name: "recover", Usage: "open a volume whose write log is damaged at its newest good state (or holds writes another server's history of it does not have: the log is moved aside), and say what is lost",
				ArgsUsage: "NAME", Flags: append([]cli.Flag{jsonFlag}, clientFlags...), Action: volumeRecover,
			},
		},
	}
}

func volumeCreate(c *cli.Context) error {
	if err := needArgs(c, 1, "NAME"); err != nil {
		return err
	}
	size, err := sizeFlag(c, "size")
	if err != nil {
		return err
	}
	chunk, err := parseSize(c.String("chunk-size"))
	if err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	v, err := cl.CreateVolume(c.Context, api.CreateVolume{Name: c.Args().First(), Size: size, ChunkSize: chunk})
	if err != nil {
		return err
	}
	fmt.Printf("created volume %s: %s, chunks of %s\n", v.Name, formatSize(v.Size), formatSize(v.ChunkSize))
	return nil
}

func volumeList(c *cli.Context) error {
	if err := needArgs(c, 0, "no arguments"); err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	vs, err := cl.Volumes(c.Context)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(vs)
	}
	printVolumes(vs)
	return nil
}

// printVolumes prints volumes with their upload state as a table.
func printVolumes(vs []api.Volume) {
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "NAME\tSIZE\tTO UPLOAD\tLAST CHECKPOINT\tPOINT IN TIME FROM\tLAST SEALED SNAPSHOT\tUPLOAD")
	for _, v := range vs {
		st := v.Status
		if st == nil {
			st = &api.VolumeStatus{}
		}
		last := "never"
		if st.LastSeal != nil {
			last = time.Since(*st.LastSeal).Round(time.Second).String() + " ago"
		}
		from := "-"
		if st.PointsInTimeFrom != nil {
			from = st.PointsInTimeFrom.UTC().Format(time.RFC3339)
		}
		snap := st.LastSealedSnapshot
		if snap == "" {
			snap = "-"
		}
		upload := "ok"
		switch {
		case st.Damaged != "":
			upload = "DAMAGED: " + st.Damaged
		case st.LogError != "":
			upload = "WRITES STOPPED: " + st.LogError
		case st.DiskFull:
			upload = "STATE DISK FULL: writes wait for the uploader to free the write log"
		case st.SealError != "":
			upload = "FAILING: " + st.SealError
		case st.ExpiryError != "":
			upload = "EXPIRY FAILING: " + st.ExpiryError
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", v.Name, formatSize(v.Size), formatSize(st.PendingBytes), last, from, snap, upload)
	}
	w.Flush()
}

func volumeShow(c *cli.Context) error {
	if err := needArgs(c, 1, "NAME"); err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	v, err := cl.Volume(c.Context, c.Args().First())
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(v)
	}
	printVolumes([]api.Volume{v})
	if sp := v.Space; sp != nil {
		dedup := ratio(sp.DedupRatio)
		if sp.SharesWithOthers {
			dedup = "not known (it shares data with other volumes)"
		}
		fmt.Printf("\nspace %s (%s refreshes it): logical %s, stored %s (what only it references: what deleting it frees), dedup %s, compression %s\n",
			asOf(sp.AsOf, time.Now()), refreshSpace, formatSize(sp.Logical), formatSize(sp.Stored), dedup, ratio(sp.CompressionRatio))
	}
	policy := "none (every snapshot is kept)"
	if v.Retention != nil {
		policy = v.Retention.String()
	}
	fmt.Printf("\nretention: %s\n", policy)
	if lp := v.Status; lp != nil && lp.LastPrune != nil {
		lp := lp.LastPrune
		fmt.Printf("last automatic prune: %s, removed %d, kept %d", lp.Time.Local().Format("2006-01-02 15:04:05"), lp.Removed, lp.Kept)
		if lp.Error != "" {
			fmt.Printf(", FAILED: %s", lp.Error)
		}
		fmt.Println()
	}
	return nil
}

func volumeResize(c *cli.Context) error {
	if err := needArgs(c, 1, "NAME"); err != nil {
		return err
	}
	size, err := sizeFlag(c, "size")
	if err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	v, err := cl.ResizeVolume(c.Context, c.Args().First(), size)
	if err != nil {
		return err
	}
	fmt.Printf("volume %s is now %s; clients see it when they reconnect\n", v.Name, formatSize(v.Size))
	return nil
}

func volumeSet(c *cli.Context) error {
	if err := needArgs(c, 1, "NAME"); err != nil {
		return err
	}
	var p api.Policy
	if c.Bool("no-retention") {
		for _, f := range keepFlags() {
			if c.IsSet(f.Names()[0]) {
				return usageErrorf("--no-retention removes the policy: give it without --%s", f.Names()[0])
			}
		}
	} else {
		var err error
		if p, err = policyOf(c); err != nil {
			return err
		}
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	v, err := cl.SetRetention(c.Context, c.Args().First(), p)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(v)
	}
	if v.Retention == nil {
		fmt.Printf("volume %s: no retention policy; every snapshot is kept\n", v.Name)
		return nil
	}
	fmt.Printf("volume %s: retention %s, applied after each snapshot is sealed\n", v.Name, v.Retention)
	return nil
}

func volumeDelete(c *cli.Context) error {
	if err := needArgs(c, 1, "NAME"); err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	del := cl.DeleteVolume
	if c.Bool("force") {
		del = cl.DeleteVolumeForce
	}
	if err := del(c.Context, c.Args().First()); err != nil {
		return err
	}
	fmt.Printf("deleted volume %s\n", c.Args().First())
	return nil
}

func volumeRecover(c *cli.Context) error {
	if err := needArgs(c, 1, "NAME"); err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	r, err := cl.RecoverVolume(c.Context, c.Args().First())
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(r)
	}
	if !r.Damaged {
		fmt.Printf("volume %s: its write log has no damage; nothing was cut, and it is served\n", r.Volume)
		return nil
	}
	if r.Forked {
		fmt.Printf("volume %s recovered: its write log held %d records from record %d on that another server's history of the volume does not have (%s)\n", r.Volume, r.RecordsCut, r.Record, r.Why)
		fmt.Printf("the write log is kept in %s (%s of writes, not in the repository); the volume is served as the repository holds it\n", r.MovedTo, formatSize(r.BytesCut))
		printLostSnapshots(r.SnapshotsLost)
		return nil
	}
	fmt.Printf("volume %s recovered: its write log was cut at record %d (%s, offset %d: %s)\n", r.Volume, r.Record, r.Segment, r.Offset, r.Why)
	fmt.Printf("lost: %s of write log holding at least %d records (writes, snapshots and checkpoints) made after that point\n", formatSize(r.BytesCut), r.RecordsCut)
	printLostSnapshots(r.SnapshotsLost)
	fmt.Printf("what was cut is kept in %s; the volume is served again from its newest good state\n", r.MovedTo)
	return nil
}

func printLostSnapshots(lost []api.Snapshot) {
	for _, s := range lost {
		label := ""
		if s.Label != "" {
			label = " (" + s.Label + ")"
		}
		fmt.Printf("lost snapshot: %s%s, taken %s\n", s.ID, label, s.Time.Format(time.RFC3339))
	}
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
