package main

import (
	"fmt"
	"io"
	"strings"
)

// volumeRow is a row of the volume's table: a metric key of
// results["volume"], its title, and its digits after the point.
type volumeRow struct {
	key, title string
	prec       int
}

var volumeRows = []volumeRow{
	{"snapcall", "Snapshot() call (ms)", 1},
	{"sealtime", "snapshot → sealed, by the running uploader (s)", 2},
	{"sealrate", "seal rate: bytes of the snapshot's layer / time to sealed (MB/s)", 0},
	{"sealcpu", "server CPU from the snapshot to sealed (s per GiB of layer)", 2},
	{"sealdata", "data chunks the seal wrote", 0},
	{"sealpages", "index pages the seal wrote", 0},
	{"sealmanifests", "manifests the seal wrote", 0},
	{"sealbytes", "bytes the seal wrote (MiB)", 1},
	{"sealratio", "zstd: bytes stored per byte of the data chunks written", 3},
	{"coldread", "**cold** sequential read of the sealed snapshot, nbdcopy → null: (MB/s)", 0},
	{"coldreadcpu", "… server CPU (s per GiB)", 2},
	{"coldreadfetched", "… objects fetched from the repository", 0},
	{"coldreadhits", "… chunk store cache hits (index pages, and chunks nbdcopy reads in several requests)", 0},
	{"warmread", "**warm** sequential read of the sealed snapshot, right after (MB/s)", 0},
	{"warmreadcpu", "… server CPU (s per GiB)", 2},
	{"warmreadfetched", "… objects fetched from the repository", 0},
	{"warmreadhits", "… chunk store cache hits", 0},
}

// writeVolume prints what the volume's uploader did during the head
// phases, and the snapshot, seal and read phases.
func (r *report) writeVolume(w io.Writer) {
	res := r.results["volume"]
	fmt.Fprintf(w, "\n### The volume: uploader, snapshot, sealed reads\n\n")
	fmt.Fprintf(w, "The volume server's uploader (`Volume.Run`) ran with the server's defaults: a checkpoint after 30 s of writes or when the write log passes half its 8 GiB limit, writes waiting at the limit. "+
		"Before each head phase the volume was brought to rest, untimed (a checkpoint, then a wait until every layer was sealed): each phase started with an empty write log and an idle uploader, and the head's reads came from the repository through the chunk store (its default 256 MiB cache). "+
		"What the uploader did during the timed head phases (a phase that writes past half the log limit has the uploader sealing while it runs, and past the limit writes wait for it):\n\n")
	fmt.Fprintf(w, "| workload | layers sealed during the phase | largest write log (MiB) |\n|---|---:|---:|\n")
	for _, wl := range workloads {
		title, _, _ := strings.Cut(wl.title, " (")
		fmt.Fprintf(w, "| %s | %s | %s |\n", title, formatCell(res["seals:"+wl.key]), formatCell(res["maxlog:"+wl.key]))
	}

	fmt.Fprintf(w, "\nThen, for the volume only: the whole head overwritten with %d MiB of compressible text-like data (untimed: `nbdcopy --flush`; lines of words drawn at random from a made-up vocabulary of 2048, every 4 KiB block headed by its own label, so no two chunks are alike), the page cache dropped (so the seal reads the write log from disk), a snapshot, and the time from `Snapshot()` returning until the running uploader had sealed it. "+
		"Then the volume was closed and reopened over a new chunk store (an empty cache, as after a restart), the page cache dropped, and the sealed snapshot (`bench@ID`) read with nbdcopy to `null:`: cold. Then it was read again at once: warm (the repository's files in the page cache; the chunk cache keeps 256 MiB, so a larger snapshot is fetched again). "+
		"A read of the snapshot over NBD then equalled the data (untimed).\n\n", r.size>>20)
	fmt.Fprintf(w, "| measurement | volume |\n|---|---:|\n")
	for _, row := range volumeRows {
		fmt.Fprintf(w, "| %s | %s |\n", row.title, formatCellPrec(res[row.key], row.prec))
	}
}

// writeGoals sets what was measured against issue 4's goals.
func (r *report) writeGoals(w io.Writer) {
	res := r.results["volume"]
	fmt.Fprintf(w, "\n### Against the goals of issue 4\n\n| goal | measured | met |\n|---|---|---|\n")
	for _, key := range []string{"seqwrite", "fioseqwrite", "randwrite"} {
		title, _, _ := strings.Cut(workloadByKey(key).title, " (")
		v, q := res[key], r.results["qemu-nbd"][key]
		measured, met := "–", "not measured"
		if len(v) > 0 && len(q) > 0 {
			ratio := median(v) / median(q)
			measured = fmt.Sprintf("volume / qemu-nbd = %.2f", ratio)
			met = yesNo(ratio >= 1.0)
		}
		fmt.Fprintf(w, "| head writes ≥ 1.0× qemu-nbd: %s | %s | %s |\n", title, measured, met)
	}
	if rw := r.rewrite; rw != nil {
		for _, c := range rw.cases[1:] {
			fmt.Fprintf(w, "| a snapshot's cost follows the change: %s | %d objects, %.2f MiB for %.2f MiB written | %s |\n",
				c.title, c.counts.Puts(), float64(c.counts.Bytes())/(1<<20), float64(c.written)/(1<<20), yesNo(c.withinObjects() && c.counts.Bytes() <= c.storedBound()))
		}
	}
	if v := res["coldread"]; len(v) > 0 {
		fmt.Fprintf(w, "| cold read of a sealed snapshot from a local repository ≥ 500 MB/s on compressible data | %.0f MB/s | %s |\n",
			median(v), yesNo(median(v) >= 500))
	}
	// Issue 11: the head's random reads come from the repository (the
	// volume is at rest, sealed), over a volume of -size-mib against the
	// chunk cache's 256 MiB.
	if v, q := res["randread"], r.results["qemu-nbd"]["randread"]; len(v) > 0 && len(q) > 0 {
		ratio := median(v) / median(q)
		fmt.Fprintf(w, "| (issue 11) 4 KiB random reads of a sealed volume %d MiB, 256 MiB chunk cache, ≥ 0.2× qemu-nbd | volume / qemu-nbd = %.2f | %s |\n",
			r.size>>20, ratio, yesNo(ratio >= 0.2))
	}
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// write prints the rewrite benchmark's table.
func (rw *rewriteResult) write(w io.Writer) {
	fmt.Fprintf(w, "\n### Snapshot cost after a 1%% rewrite of a %d GiB volume\n\n", rw.size>>30)
	if rw.size < 1<<30 {
		fmt.Fprintf(w, "(The volume is %d MiB: -rewrite-size-mib.)\n\n", rw.size>>20)
	}
	fmt.Fprintf(w, "In process, without NBD, on a new volume (%d KiB chunks) in its own repository directory and write log in the work directory. "+
		"Fill: one 4 KiB block of text written at the start of every chunk, so every chunk exists and is unique while the log and the repository stay small (the rest of each chunk is zeros). "+
		"Then 1%% of the volume rewritten as whole chunks chosen at random (a clustered change, like a rewritten file), then 1%% as 4 KiB blocks chosen at random, no block twice (a scattered change, the worst case for %d KiB chunks). "+
		"After each: a snapshot, the page cache dropped, and `SealAll` (no uploader runs, so nothing else writes to the repository). "+
		"Objects and bytes are what the seal wrote to the repository (a counting wrapper around it; index pages told from data chunks by the plaintext length in the object header). "+
		"Since repository format 3 a seal stores as chunks only those the layer rewrote whole, with the index pages on the paths to them (the index is 3 levels of 4096-entry pages), and ships the rest as journal: "+
		"two journal packs at most (the layer's, and the merged delta's when the chain of deltas merges) and one more per 32 MiB they hold, and the manifest. "+
		"A change should so cost its bytes: at most twice what was written plus 64 KiB.\n\n",
		rw.chunkSize>>10, rw.chunkSize>>10)
	header, align := []string{""}, []string{"---"}
	for _, c := range rw.cases {
		header = append(header, c.title)
		align = append(align, "---:")
	}
	fmt.Fprintf(w, "| %s |\n|%s|\n", strings.Join(header, " | "), strings.Join(align, "|"))
	row := func(title string, cell func(c rewriteCase) string) {
		cells := []string{title}
		for _, c := range rw.cases {
			cells = append(cells, cell(c))
		}
		fmt.Fprintf(w, "| %s |\n", strings.Join(cells, " | "))
	}
	mib := func(n int64) string { return fmt.Sprintf("%.1f", float64(n)/(1<<20)) }
	row("writes", func(c rewriteCase) string { return fmt.Sprintf("%d × %d KiB", c.writes, c.each>>10) })
	row("bytes written (MiB)", func(c rewriteCase) string { return mib(c.written) })
	row("chunks changed", func(c rewriteCase) string { return fmt.Sprint(c.chunks) })
	row("… rewritten whole (stored as chunks)", func(c rewriteCase) string { return fmt.Sprint(c.whole) })
	row("index pages on their paths: leaf + inner + root", func(c rewriteCase) string {
		return fmt.Sprintf("%d + %d + %d", c.pages[0], c.pages[1], c.pages[2])
	})
	row("**objects expected**: those chunks + pages + manifest, and the journal packs", func(c rewriteCase) string {
		return fmt.Sprintf("%d to %d", c.minimum(), c.most())
	})
	row("**objects the seal wrote**", func(c rewriteCase) string { return fmt.Sprint(c.counts.Puts()) })
	row("… data chunks / index pages / journal packs / manifests", func(c rewriteCase) string {
		return fmt.Sprintf("%d / %d / %d / %d", c.counts.DataPuts, c.counts.PagePuts, c.counts.JournalPuts, c.counts.ManifestPuts)
	})
	row("**bytes the seal wrote (MiB)**", func(c rewriteCase) string { return mib(c.counts.Bytes()) })
	row("… of which journal packs / index pages (MiB)", func(c rewriteCase) string {
		return mib(c.counts.JournalBytes) + " / " + mib(c.counts.PageBytes)
	})
	row("bytes stored ÷ bytes written", func(c rewriteCase) string {
		return fmt.Sprintf("%.2f", float64(c.counts.Bytes())/float64(max(c.written, 1)))
	})
	row("existence checks (Has) / reads (Get) of objects", func(c rewriteCase) string {
		return fmt.Sprintf("%d / %d", c.counts.Has, c.counts.Gets)
	})
	row("Snapshot() call (ms)", func(c rewriteCase) string { return fmt.Sprintf("%.1f", c.snapshotCall.Seconds()*1e3) })
	row("seal (s)", func(c rewriteCase) string { return fmt.Sprintf("%.2f", c.seal.Seconds()) })
	row("CPU during the seal (s)", func(c rewriteCase) string { return fmt.Sprintf("%.2f", c.sealCPU.Seconds()) })
	row("objects as expected", func(c rewriteCase) string { return yesNo(c.withinObjects()) })
	row("stored ≤ 2 × written + 64 KiB", func(c rewriteCase) string { return yesNo(c.counts.Bytes() <= c.storedBound()) })
}

// cmdline describes the rewrite benchmark the way the servers' command
// lines do.
func (rw *rewriteResult) cmdline() string {
	return fmt.Sprintf("in process: repo := chunkstore.Open(%q); v := volume.Create(ctx, &volume.Env{Repo: repo, Store: chunkstore.NewStore(repo, chunkstore.Options{}), StateDir: %q, LogLimit: 1 << 62}, volume.Config{Name: \"rewrite\", Size: %d}); "+
		"per case: v.WriteAt(...) as the table says; v.Snapshot(ctx, \"\"); sync; echo 3 > /proc/sys/vm/drop_caches; v.SealAll(ctx)",
		rw.repoDir, rw.stateDir, rw.size)
}
