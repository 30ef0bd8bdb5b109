package main

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"time"
)

// report collects a benchmark run and prints it as markdown.
type report struct {
	start      time.Time
	size       int64
	runtime    time.Duration
	repeat     int
	servers    []string
	dropCaches bool
	settle     time.Duration
	dir        string
	fsType     string
	tools      []string
	cpus       int
	kernel     string
	loadStart  string
	loadEnd    string

	results    map[string]map[string][]float64 // server → workload key → one value per run
	advertised map[string]string               // server → nbdinfo summary
	serverCmd  map[string]string
	clientCmds map[string][]string
	other      map[string]otherCPU // server → CPU others used in its timed phases
	// serverCPU is server → workload key → the server's CPU time per unit
	// of work, one value per run: seconds per GiB for nbdcopy, µs per I/O
	// for fio.
	serverCPU map[string]map[string][]float64
	// rewrite is the rewrite benchmark's result; nil when it did not run.
	rewrite *rewriteResult
	// scattered is the scattered-writes benchmark's result; nil when it
	// did not run.
	scattered *scatteredResult
	// restic is the restic comparison's result; nil when it did not run.
	restic *resticResult
}

// otherWarn is the share of the CPU that other work may take during the
// timed phases before the report warns that the figures are skewed.
const otherWarn = 5.0

// ratioColumns are the ratio columns of the table: each of ours (those
// that ran) over each of theirs.
var (
	ourServers   = []string{"nbdvault", "volume"}
	ratioColumns = []string{"nbdkit", "qemu-nbd"}
)

func (r *report) write(w io.Writer) {
	fmt.Fprintf(w, "## NBD throughput: %s\n\n", strings.Join(r.servers, ", "))
	runs := "one run per server"
	if r.repeat > 1 {
		runs = fmt.Sprintf("%d runs per server (the order of servers rotating); each cell is the median, the range in brackets", r.repeat)
	}
	cache := fmt.Sprintf("written back and dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before every timed phase, which then started %s later (-settle: lets a VM's free page reporting finish)", r.settle)
	if !r.dropCaches {
		cache = "NOT dropped between phases (-drop-caches=false)"
	}
	targets := "each server gets a fresh sparse raw target file of that size"
	if slices.Contains(r.servers, "volume") {
		targets = "each file server gets a fresh sparse raw target file of that size, the volume server a fresh volume of that size (its repository directory and write log)"
	}
	fmt.Fprintf(w, "Run of %s, %s. Data: %d MiB of random bytes; %s in %s (%s), and listens on a Unix socket there. Page cache: %s. Machine: %d CPUs, Linux %s; load average (1, 5, 15 min) %s at the start, %s at the end.\n\n",
		r.start.Format(time.RFC3339), runs, r.size>>20, targets, r.dir, r.fsType, cache, r.cpus, r.kernel, r.loadStart, r.loadEnd)
	fmt.Fprintf(w, "Tools: %s.\n\n", strings.Join(r.tools, "; "))

	r.writeTable(w)

	r.writeCPUTable(w)

	var shares []string
	worst := 0.0
	for _, s := range r.servers {
		sh := r.other[s].share(r.cpus)
		worst = max(worst, sh)
		shares = append(shares, fmt.Sprintf("%s %.1f%%", s, sh))
	}
	fmt.Fprintf(w, "\nCPU that other work took during the timed phases (machine busy time from /proc/stat minus this program, its clients and the server; kernel threads count as other), as a share of %d CPUs: %s.\n",
		r.cpus, strings.Join(shares, ", "))
	if worst > otherWarn {
		fmt.Fprintf(w, "\n**Warning: other work took more than %.0f%% of the CPU during some timed phases; these figures are skewed. Re-run on an idle machine.**\n", otherWarn)
	}

	fmt.Fprintf(w, "\nMB/s are 10^6 bytes per second: nbdcopy's over the wall time from its start to its exit, fio's over the bytes and runtime it reports. IOPS are fio's, over %s of a time-based run (fio's default randrepeat=1: every server sees the same offsets). "+
		"Clients, the same for every server: nbdcopy with its defaults (up to 4 connections when the server advertises multi-conn but no more than its threads, one thread per core; 64 requests in flight per connection; 256 KiB requests; `nbdcopy -v` prints what it picked); "+
		"fio with one job on one NBD connection, iodepth 32, over the whole export, which the first write has filled: 1 MiB sequential writes (wrapping around at the end), then 4 KiB random writes, then 4 KiB random reads, each time-based. Untimed checks: after the sequential write the target file (for the volume, a read of the head over NBD), and after the sequential read a second read over NBD, equal the source.\n", r.runtime)

	if slices.Contains(r.servers, "volume") {
		r.writeVolume(w)
	}
	if r.scattered != nil {
		r.scattered.write(w)
	}
	if r.rewrite != nil {
		r.rewrite.write(w)
	}
	if slices.Contains(r.servers, "volume") {
		r.writeGoals(w)
	}
	if r.restic != nil {
		r.restic.write(w)
	}

	fmt.Fprintf(w, "\nWhat each server advertised (nbdinfo --json):\n\n")
	for _, s := range r.servers {
		fmt.Fprintf(w, "- %s: %s\n", s, r.advertised[s])
	}
	fmt.Fprintf(w, "\nCommands of the last run, per server:\n\n```\n")
	for _, s := range r.servers {
		fmt.Fprintf(w, "# %s\n%s\n", s, r.serverCmd[s])
		for _, c := range r.clientCmds[s] {
			fmt.Fprintln(w, c)
		}
	}
	if r.rewrite != nil {
		fmt.Fprintf(w, "# rewrite benchmark\n%s\n", r.rewrite.cmdline())
	}
	fmt.Fprintf(w, "```\n")
}

func (r *report) writeTable(w io.Writer) {
	header := []string{"workload"}
	align := []string{"---"}
	header = append(header, r.servers...)
	for range r.servers {
		align = append(align, "---:")
	}
	for _, ours := range r.ours() {
		for _, o := range ratioColumns {
			header = append(header, ours+"/"+o)
			align = append(align, "---:")
		}
	}
	fmt.Fprintf(w, "| %s |\n|%s|\n", strings.Join(header, " | "), strings.Join(align, "|"))
	for _, wl := range workloads {
		row := []string{wl.title}
		for _, s := range r.servers {
			row = append(row, formatCell(r.results[s][wl.key]))
		}
		for _, ours := range r.ours() {
			for _, o := range ratioColumns {
				row = append(row, formatRatio(r.results[ours][wl.key], r.results[o][wl.key]))
			}
		}
		fmt.Fprintf(w, "| %s |\n", strings.Join(row, " | "))
	}
}

// ours lists the servers of ours that ran, which get ratio columns.
func (r *report) ours() []string {
	var out []string
	for _, s := range ourServers {
		if slices.Contains(r.servers, s) {
			out = append(out, s)
		}
	}
	return out
}

// cpuUnits names the unit of each workload's row in the CPU table.
var cpuUnits = map[string]string{
	"seqwrite": "s per GiB", "seqread": "s per GiB", "fioseqwrite": "s per GiB",
	"randwrite": "µs per I/O", "randread": "µs per I/O",
}

// writeCPUTable prints the server's CPU time (user + system, all threads)
// per unit of work: what each server spends to do the same job.
func (r *report) writeCPUTable(w io.Writer) {
	fmt.Fprintf(w, "\nServer CPU time (user + system, all threads; for nbdvault and the volume this process's, which otherwise waits; the volume's includes its uploader) per unit of work, same phases:\n\n")
	header := append([]string{"workload"}, r.servers...)
	align := []string{"---"}
	for range r.servers {
		align = append(align, "---:")
	}
	fmt.Fprintf(w, "| %s |\n|%s|\n", strings.Join(header, " | "), strings.Join(align, "|"))
	for _, wl := range workloads {
		title, _, _ := strings.Cut(wl.title, " (")
		row := []string{fmt.Sprintf("%s (%s)", title, cpuUnits[wl.key])}
		for _, s := range r.servers {
			vs := r.serverCPU[s][wl.key]
			switch {
			case len(vs) == 0:
				row = append(row, "–")
			case cpuUnits[wl.key] == "s per GiB":
				row = append(row, fmt.Sprintf("%.2f", median(vs)))
			default:
				row = append(row, fmt.Sprintf("%.1f", median(vs)))
			}
		}
		fmt.Fprintf(w, "| %s |\n", strings.Join(row, " | "))
	}
	if r.repeat > 1 {
		fmt.Fprintf(w, "\n(medians over the runs)\n")
	}
}

// median of vs; vs is not empty.
func median(vs []float64) float64 {
	s := slices.Sorted(slices.Values(vs))
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

func formatCell(vs []float64) string { return formatCellPrec(vs, 0) }

// formatCellPrec is formatCell with prec digits after the point.
func formatCellPrec(vs []float64, prec int) string {
	switch len(vs) {
	case 0:
		return "–"
	case 1:
		return fmt.Sprintf("%.*f", prec, vs[0])
	}
	return fmt.Sprintf("%.*f (%.*f–%.*f)", prec, median(vs), prec, slices.Min(vs), prec, slices.Max(vs))
}

// formatRatio is median(a)/median(b), or a dash when either server did not
// run.
func formatRatio(a, b []float64) string {
	if len(a) == 0 || len(b) == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", median(a)/median(b))
}
