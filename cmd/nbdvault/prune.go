package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/nbdserver/api"
	"github.com/nbdvault/nbdvault/nbdserver/retention"
)

// keepFlags are a retention policy's flags: restic's names.
func keepFlags() []cli.Flag {
	count := func(name, what string) cli.Flag {
		return &cli.StringFlag{Name: "keep-" + name, Usage: "keep the newest snapshot of each of the last `N` " + what + " that have one (a number, or unlimited)"}
	}
	return []cli.Flag{
		&cli.StringFlag{Name: "keep-last", Usage: "keep the last `N` snapshots (a number, or unlimited)"},
		count("hourly", "hours"), count("daily", "days"), count("weekly", "ISO weeks"),
		count("monthly", "months"), count("yearly", "years"),
		&cli.StringFlag{Name: "keep-within", Usage: "keep every snapshot taken within `SPAN` before the newest one: y, m (months), w, d, h, e.g. 7d or 1y6m"},
	}
}

// policyOf reads the --keep-… flags.
func policyOf(c *cli.Context) (api.Policy, error) {
	var p api.Policy
	for _, f := range []struct {
		name string
		n    *int
	}{{"last", &p.Last}, {"hourly", &p.Hourly}, {"daily", &p.Daily}, {"weekly", &p.Weekly}, {"monthly", &p.Monthly}, {"yearly", &p.Yearly}} {
		s := c.String("keep-" + f.name)
		if s == "" {
			continue
		}
		if s == "unlimited" {
			*f.n = retention.Unlimited
			continue
		}
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 {
			return p, usageErrorf("--keep-%s %q: want a count of 0 or more, or unlimited", f.name, s)
		}
		*f.n = n
	}
	if s := c.String("keep-within"); s != "" {
		sp, err := retention.ParseSpan(s)
		if err != nil {
			return p, usageErrorf("--keep-within: %v", err)
		}
		p.Within = sp
	}
	if p.Empty() {
		return p, usageErrorf("%s: give at least one --keep-… flag (without one every snapshot would go), e.g. --keep-last 2 --keep-daily 7", commandPath(c))
	}
	return p, nil
}

func pruneCommand() *cli.Command {
	return &cli.Command{
		Name:      "prune",
		Usage:     "remove the snapshots a retention policy does not keep",
		ArgsUsage: "VOLUME",
		Description: "The rules are restic's: a snapshot is kept if any rule keeps it, and each\n" +
			"kept snapshot says which rules keep it. Hours, days, weeks, months and years\n" +
			"are the server's local time; weeks run Monday to Sunday (ISO 8601). A rule\n" +
			"with counts left after the oldest snapshot keeps the oldest too. Protected\n" +
			"snapshots (snapshot protect), snapshots still uploading and damaged ones are\n" +
			"kept and not counted. Checkpoints (points in time) leave by themselves with\n" +
			"the server's --journal-retention. Every snapshot is whole: --keep-last 2 keeps\n" +
			"two full images.",
		Flags: append(append(keepFlags(),
			&cli.BoolFlag{Name: "dry-run", Aliases: []string{"n"}, Usage: "say what would be removed, and remove nothing"},
			jsonFlag), clientFlags...),
		Action: prune,
	}
}

func prune(c *cli.Context) error {
	if err := needArgs(c, 1, "VOLUME"); err != nil {
		return err
	}
	p, err := policyOf(c)
	if err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	vol := c.Args().First()
	res, err := cl.Prune(c.Context, vol, api.Prune{Policy: p, DryRun: c.Bool("dry-run")})
	if err != nil {
		return err
	}
	if c.Bool("json") {
		if err := printJSON(res); err != nil {
			return err
		}
	} else {
		printPruned(res)
	}
	if res.Failed > 0 {
		return fmt.Errorf("%d of the snapshots to remove are still there (see ERROR above): run nbdvault prune again", res.Failed)
	}
	return nil
}

func printPruned(res api.Pruned) {
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tLABEL\tTIME\tUSED\tACTION\tWHY")
	kept := 0
	var used int64
	var counted *time.Time
	uncounted := 0
	for _, d := range res.Snapshots {
		switch {
		case d.Keep:
		case d.Used != nil && d.SpaceAsOf != nil:
			used += *d.Used
			counted = d.SpaceAsOf
		default:
			uncounted++
		}
		action, why := "keep", strings.Join(d.Reasons, ", ")
		switch {
		case d.Error != "":
			action, why = "ERROR", d.Error
		case !d.Keep && res.DryRun:
			action, why = "would remove", "no rule keeps it"
		case !d.Keep:
			action, why = "removed", "no rule keeps it"
		default:
			kept++
		}
		label := d.Label
		if label == "" {
			label = "-"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", d.ID, label, d.Time.Local().Format("2006-01-02 15:04:05"), sizeOrDash(d.Used), action, why)
	}
	_ = w.Flush()
	removed := len(res.Snapshots) - kept - res.Failed
	verb := "removed"
	if res.DryRun {
		verb = "would remove"
	}
	fmt.Printf("%s: %s; kept %d, %s %d snapshot(s)\n", res.Volume, res.Policy, kept, verb, removed)
	if res.DryRun && counted != nil {
		line := fmt.Sprintf("USED %s: the snapshots to remove use %s alone; together they may free more (what only they share)", asOf(*counted, time.Now()), formatSize(used))
		if uncounted > 0 {
			line += fmt.Sprintf("; %d not counted yet", uncounted)
		}
		fmt.Println(line)
	}
	if !res.DryRun && removed > 0 {
		fmt.Println("the server now deletes the chunks only they used (garbage collection; nbdvault gc runs it by hand)")
	}
}
