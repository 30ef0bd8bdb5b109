package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/nbdserver/api"
)

func snapshotCommand() *cli.Command {
	return &cli.Command{
		Name:  "snapshot",
		Usage: "take, list and delete snapshots",
		Subcommands: []*cli.Command{
			{
				Name: "create", Usage: "snapshot a volume now, or keep a point in time; prints the snapshot's ID", ArgsUsage: "VOLUME",
				Flags: append([]cli.Flag{
					&cli.StringFlag{Name: "label", Usage: "a `name` for the snapshot, unique in the volume"},
					&cli.StringFlag{Name: "from", Usage: "keep the volume as it was at this `TIME` (RFC 3339, e.g. 2026-11-30T17:55:03Z) as a snapshot, " +
						"so it stays after the server's --journal-retention; no data is copied"},
					&cli.BoolFlag{Name: "wait", Usage: "return once the snapshot is sealed (uploaded)"},
				}, clientFlags...),
				Action: snapshotCreate,
			},
			{Name: "list", Usage: "list a volume's snapshots", ArgsUsage: "VOLUME", Flags: append([]cli.Flag{jsonFlag}, clientFlags...), Action: snapshotList},
			{Name: "delete", Usage: "delete a sealed snapshot", ArgsUsage: "VOLUME@SNAPSHOT", Flags: clientFlags, Action: snapshotDelete},
			{Name: "protect", Usage: "protect a sealed snapshot from delete and prune", ArgsUsage: "VOLUME@SNAPSHOT", Flags: clientFlags,
				Action: func(c *cli.Context) error { return snapshotProtect(c, true) }},
			{Name: "unprotect", Usage: "let delete and prune remove a snapshot again", ArgsUsage: "VOLUME@SNAPSHOT", Flags: clientFlags,
				Action: func(c *cli.Context) error { return snapshotProtect(c, false) }},
		},
	}
}

func snapshotCreate(c *cli.Context) error {
	if err := needArgs(c, 1, "VOLUME"); err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	vol := c.Args().First()
	s, err := cl.KeepPoint(c.Context, vol, c.String("from"), c.String("label"))
	if err != nil {
		return err
	}
	if c.Bool("wait") {
		p := newProgress("sealing "+vol+"@"+s.ID, -1)
		_, err = cl.WaitSealed(c.Context, vol, s.ID, func(v api.Volume) {
			if v.Status != nil {
				p.note(sealNote(v.Status))
			}
		})
		p.finish()
		if err != nil {
			return fmt.Errorf("snapshot %s@%s was taken, but waiting for its seal failed: %w", vol, s.ID, err)
		}
	}
	fmt.Println(s.ID)
	return nil
}

func snapshotList(c *cli.Context) error {
	if err := needArgs(c, 1, "VOLUME"); err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	ss, err := cl.Snapshots(c.Context, c.Args().First())
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(ss)
	}
	return printSnapshots(os.Stdout, ss, time.Now())
}

func snapshotDelete(c *cli.Context) error {
	if err := needArgs(c, 1, "VOLUME@SNAPSHOT"); err != nil {
		return err
	}
	vol, snap, err := splitSnapshot(c.Args().First())
	if err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	before, _ := cl.Snapshot(c.Context, vol, snap) // its space figures, if any: the delete says what is wrong
	if err := cl.DeleteSnapshot(c.Context, vol, snap); err != nil {
		return err
	}
	fmt.Printf("deleted snapshot %s@%s\n", vol, snap)
	if before.Used != nil && before.SpaceAsOf != nil {
		fmt.Printf("it alone used %s, %s: a gc frees about that once the point-in-time window no longer keeps it\n",
			formatSize(*before.Used), asOf(*before.SpaceAsOf, time.Now()))
	}
	return nil
}

func snapshotProtect(c *cli.Context, on bool) error {
	if err := needArgs(c, 1, "VOLUME@SNAPSHOT"); err != nil {
		return err
	}
	vol, snap, err := splitSnapshot(c.Args().First())
	if err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	s, err := cl.ProtectSnapshot(c.Context, vol, snap, on)
	if err != nil {
		return err
	}
	if on {
		fmt.Printf("protected snapshot %s@%s%s: delete and prune leave it\n", vol, s.ID, describePoint(s))
	} else {
		fmt.Printf("unprotected snapshot %s@%s%s\n", vol, s.ID, describePoint(s))
	}
	return nil
}

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "show the server and, per volume, what waits to be uploaded",
		Flags: append([]cli.Flag{jsonFlag}, clientFlags...),
		Action: func(c *cli.Context) error {
			if err := needArgs(c, 0, "no arguments"); err != nil {
				return err
			}
			cl, err := adminClient(c)
			if err != nil {
				return err
			}
			st, err := cl.Status(c.Context)
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(st)
			}
			fmt.Printf("server %s (nbdvault %s)\nrepository %s\n", cl.Server(), st.Version, st.Repository)
			if line := repositoryLine(st.RepositoryState); line != "" {
				fmt.Println(line)
			}
			if d := st.StateDisk; d.TotalBytes > 0 {
				fmt.Printf("state disk %s: %s free of %s\n", d.Path, formatSize(d.FreeBytes), formatSize(d.TotalBytes))
			}
			fmt.Printf("NBD on %v\n%s\n\n", st.NBD, verifyLine(st.LastVerify))
			if len(st.Volumes) == 0 {
				fmt.Println("no volumes yet: nbdvault volume create NAME --size 20G")
				return nil
			}
			printVolumes(st.Volumes)
			fmt.Println()
			return printSpace(os.Stdout, st.Volumes, st.Space, time.Now())
		},
	}
}

// repositoryLine describes a repository that does not answer or is not
// written, or is "" when all is well.
func repositoryLine(rs api.RepositoryState) string {
	var parts []string
	if !rs.Reachable && rs.UnreachableSince != nil {
		parts = append(parts, fmt.Sprintf("UNREACHABLE since %s (%s ago): %s",
			rs.UnreachableSince.Local().Format(time.RFC3339), time.Since(*rs.UnreachableSince).Round(time.Second), rs.LastError))
	}
	if rs.UploadsPaused {
		parts = append(parts, fmt.Sprintf("uploads PAUSED since %s: the repository lease cannot be renewed; NBD goes on and writes wait in the write logs",
			rs.LeaseConfirmedUntil.Local().Format(time.RFC3339)))
	}
	if len(parts) == 0 {
		return ""
	}
	parts = append(parts, formatSize(rs.PendingBytes)+" waiting to be uploaded")
	return "repository state: " + strings.Join(parts, "; ")
}

// sealNote says how an upload goes, and why it does not when it fails.
func sealNote(st *api.VolumeStatus) string {
	s := formatSize(st.PendingBytes) + " left to upload"
	if st.SealError != "" {
		s += "; uploads are failing, retrying: " + st.SealError
	}
	return s
}
