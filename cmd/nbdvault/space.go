package main

import (
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// The space figures come from the server's last garbage collection (a
// dry run counts too): every display of them says how old they are.

// refreshSpace says how to get figures, or newer ones.
const refreshSpace = "nbdvault gc --dry-run"

// age is how long ago t was, at now, to the unit that matters.
func age(t, now time.Time) string {
	d := max(0, now.Sub(t))
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

// asOf is "as of the last gc, AGE ago".
func asOf(t, now time.Time) string { return "as of the last gc, " + age(t, now) + " ago" }

// sizeOrDash is formatSize of *n, or "-" for a figure not counted.
func sizeOrDash(n *int64) string {
	if n == nil {
		return "-"
	}
	return formatSize(*n)
}

// ratio prints a ratio as 2.50x, or "-" when there was nothing to divide.
func ratio(r float64) string {
	if r == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", r)
}

// printSnapshots is snapshot list's table, and a line that says how old
// USED and LREFER are.
func printSnapshots(out io.Writer, ss []api.Snapshot, now time.Time) error {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tLABEL\tTIME\tSIZE\tUSED\tLREFER\tSTATE")
	var counted *time.Time
	uncounted := 0
	for _, s := range ss {
		state := "uploading"
		switch {
		case s.Damaged != "":
			state = "DAMAGED: " + s.Damaged
		case s.Sealed:
			state = "sealed"
		}
		if s.Protected {
			state += ", protected"
		}
		label := s.Label
		if label == "" {
			label = "-"
		}
		if s.SpaceAsOf != nil && (counted == nil || s.SpaceAsOf.After(*counted)) {
			counted = s.SpaceAsOf
		}
		if s.Used == nil {
			uncounted++
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.ID, label, s.Time.Local().Format("2006-01-02 15:04:05"), formatSize(s.Size),
			sizeOrDash(s.Used), sizeOrDash(s.LogicalReferenced), state)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	switch {
	case len(ss) == 0:
	case counted == nil:
		fmt.Fprintf(out, "USED and LREFER are counted by garbage collection: not yet (%s counts them)\n", refreshSpace)
	default:
		line := fmt.Sprintf("USED and LREFER %s (%s refreshes them); USED is what deleting that snapshot alone frees", asOf(*counted, now), refreshSpace)
		if uncounted > 0 {
			line += "; - is not counted yet"
		}
		fmt.Fprintln(out, line)
	}
	return nil
}

// printSpace is status's table of space: a row per volume and one for
// the repository, and how old the figures are.
func printSpace(out io.Writer, vs []api.Volume, repo *api.SpaceTotals, now time.Time) error {
	if repo == nil {
		_, err := fmt.Fprintf(out, "space: not counted yet (%s counts it)\n", refreshSpace)
		return err
	}
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "SPACE\tLOGICAL\tSTORED\tSHARED\tDEDUP\tCOMPRESSION")
	sharing := false
	row := func(name string, t *api.SpaceTotals, shared string) {
		if t == nil {
			fmt.Fprintf(w, "%s\t-\t-\t-\t-\t-\n", name)
			return
		}
		dedup := ratio(t.DedupRatio)
		if t.SharesWithOthers {
			dedup, sharing = "-*", true
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", name, formatSize(t.Logical), formatSize(t.Stored), shared, dedup, ratio(t.CompressionRatio))
	}
	for _, v := range vs {
		row(v.Name, v.Space, "-")
	}
	row("repository", repo, formatSize(repo.Shared))
	if err := w.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(out, "space %s (%s refreshes it); a volume's STORED is what only it references: what deleting it frees; SHARED is what several volumes reference\n", asOf(repo.AsOf, now), refreshSpace)
	if err == nil && sharing {
		_, err = fmt.Fprintln(out, "* shares data with other volumes: its dedup ratio is not known; see the repository's")
	}
	return err
}
