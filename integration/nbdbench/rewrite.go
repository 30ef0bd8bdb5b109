package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"time"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/nbdserver/volume"
)

// The rewrite benchmark: what a snapshot of a large volume costs after a
// small change. Issue 4's goal is that a snapshot's cost grows with the
// change, not with the volume; issue 11's that a scattered change costs
// about its bytes, not the chunks it touched. It runs in this process, on the volume API
// (no NBD: the question is what the seal writes, not how the bytes
// arrived):
//
//  1. fill: a new volume with one 4 KiB text block written at the start of
//     every chunk, so every chunk exists and differs from every other (no
//     dedup) while the write log and the repository stay small (the rest
//     of each chunk is zeros; a fully written 64 GiB volume would push
//     64 GiB through the log for the same index). Snapshot, seal.
//  2. 1% of the volume rewritten as whole chunks, chosen at random: a
//     change that is clustered, like a rewritten file. Snapshot, seal.
//  3. 1% of the volume rewritten as 4 KiB blocks, chosen at random (no
//     block twice): a change scattered over the volume, the worst case for
//     1 MiB chunks. Snapshot, seal.
//
// Each seal is run by calling SealAll right after the page cache is
// dropped (the uploader is not running, so nothing else writes to the
// repository meanwhile), and the objects it writes are counted by a
// wrapper around the repository. Since repository format 3 a seal stores
// the chunks a layer rewrote whole (and the index pages on the paths to
// them) and ships everything else as journal: two journal packs at most
// (the layer's, and the merged delta's when its chain merges) and one
// more per 32 MiB they hold, and the manifest.

// maxRewriteMiB bounds -rewrite-size-mib: 1 TiB. Beyond it the samplers'
// memory and the write log (1% of the volume) grow out of proportion to
// what the figure says.
const maxRewriteMiB = 1 << 20

// The index's geometry, as nbdserver/volume/index.go has it: a radix tree
// of 3 levels of pages of 4096 entries.
const (
	indexFanoutBits = 12
	indexLevels     = 3
)

// rewriteCase is one snapshot of the rewrite benchmark.
type rewriteCase struct {
	title   string
	writes  int   // write calls
	each    int64 // bytes per write
	written int64 // bytes written
	// chunks is how many chunks the writes changed; whole how many of
	// those they rewrote whole (stored as chunks); pages how many index
	// pages lie on the paths to those, leaves first.
	chunks int
	whole  int
	pages  [indexLevels]int

	snapshotCall time.Duration // the Snapshot() call
	seal         time.Duration // SealAll
	sealCPU      time.Duration // this process's CPU time during the seal
	counts       repoCounts    // what the seal asked of the repository
}

func (c rewriteCase) pageTotal() int {
	n := 0
	for _, p := range c.pages {
		n += p
	}
	return n
}

// maxJournalPacks is how many journal packs a seal writes at most: the
// layer's and the merged delta's, and one more for every 32 MiB they hold
// (a pack is closed there).
func (c rewriteCase) maxJournalPacks() int64 { return 2 + c.counts.JournalBytes/(32<<20) }

// minimum is the fewest objects the seal can write: every chunk rewritten
// whole, the index pages on the paths to them, and the manifest; most
// adds the journal packs.
func (c rewriteCase) minimum() int64 { return int64(c.whole + c.pageTotal() + 1) }
func (c rewriteCase) most() int64    { return c.minimum() + c.maxJournalPacks() }

// withinObjects says whether the seal wrote what it should: the whole
// chunks as chunks, their pages, one manifest, and no more journal packs
// than maxJournalPacks (at least one when not every change was a whole
// chunk).
func (c rewriteCase) withinObjects() bool {
	k := c.counts
	journal := k.JournalPuts >= 1 || c.whole == c.chunks
	return k.DataPuts == int64(c.whole) && k.PagePuts == int64(c.pageTotal()) && k.ManifestPuts == 1 &&
		k.JournalPuts <= c.maxJournalPacks() && k.OtherPuts == 0 && journal
}

// storedBound is what a change may cost in bytes: twice what was written
// and 64 KiB (a delta's pages, the manifest).
func (c rewriteCase) storedBound() int64 { return 2*c.written + 64<<10 }

// rewriteResult is the rewrite benchmark's report.
type rewriteResult struct {
	size, chunkSize   int64
	repoDir, stateDir string
	cases             []rewriteCase
}

// benchRewrite runs the rewrite benchmark on a volume of
// cfg.rewriteSizeMiB in its own repository and state directories in work.
func benchRewrite(ctx context.Context, cfg config, work string) (*rewriteResult, error) {
	res := &rewriteResult{
		size:     cfg.rewriteSizeMiB << 20,
		repoDir:  filepath.Join(work, "rewrite-repo"),
		stateDir: filepath.Join(work, "rewrite-state"),
	}
	repo, err := openVolumeRepo(res.repoDir)
	if err != nil {
		return nil, err
	}
	store, err := chunkstore.NewStore(repo, chunkstore.Options{})
	if err != nil {
		return nil, err
	}
	// No uploader runs: each seal is started by hand. So the log limit is
	// set out of the way, or a write past it would wait for an uploader
	// that never comes.
	env := &volume.Env{Repo: repo, Store: store, StateDir: res.stateDir, LogLimit: 1 << 62}
	v, err := volume.Create(ctx, env, volume.Config{Name: "rewrite", Size: res.size})
	if err != nil {
		return nil, fmt.Errorf("create the rewrite volume: %w", err)
	}
	defer v.Close()
	res.chunkSize = v.Config().ChunkSize
	cs := res.chunkSize
	nChunks := (res.size + cs - 1) / cs
	nBlocks := res.size / textBlockSize
	text := newTextGen(2)
	rng := rand.New(rand.NewPCG(3, 4)) // the same choices in every run
	block := make([]byte, textBlockSize)

	// 1. fill.
	fill := rewriteCase{title: "fill: every chunk written", each: textBlockSize}
	logf("rewrite: fill: one 4 KiB block in each of %d chunks", nChunks)
	var changed []uint64
	for c := range nChunks {
		text.fill(block, fmt.Sprintf("nbdbench rewrite fill: chunk %d", c))
		if err := v.WriteAt(ctx, block, c*cs, false); err != nil {
			return nil, err
		}
		fill.writes++
		changed = append(changed, uint64(c))
	}
	if err := sealCase(ctx, cfg, v, repo, &fill, changed); err != nil {
		return nil, err
	}
	res.cases = append(res.cases, fill)

	// 2. 1% as whole chunks.
	whole := rewriteCase{title: "1% rewritten as whole chunks", each: cs, whole: -1}
	picked := sampleDistinct(rng, max(1, nChunks/100), nChunks)
	logf("rewrite: %d whole chunks of %d", len(picked), nChunks)
	buf := make([]byte, cs)
	changed = changed[:0]
	for _, c := range picked {
		for b := int64(0); b < cs; b += textBlockSize {
			text.fill(buf[b:b+textBlockSize], fmt.Sprintf("nbdbench rewrite whole chunk %d, block %d", c, b/textBlockSize))
		}
		if err := v.WriteAt(ctx, buf, c*cs, false); err != nil {
			return nil, err
		}
		whole.writes++
		changed = append(changed, uint64(c))
	}
	if err := sealCase(ctx, cfg, v, repo, &whole, changed); err != nil {
		return nil, err
	}
	res.cases = append(res.cases, whole)

	// 3. 1% as scattered 4 KiB blocks.
	scattered := rewriteCase{title: "1% rewritten as 4 KiB blocks", each: textBlockSize}
	picked = sampleDistinct(rng, max(1, nBlocks/100), nBlocks)
	logf("rewrite: %d random 4 KiB blocks of %d", len(picked), nBlocks)
	changed = changed[:0]
	for _, k := range picked {
		off := k * textBlockSize
		text.fill(block, fmt.Sprintf("nbdbench rewrite scattered block %d", k))
		if err := v.WriteAt(ctx, block, off, false); err != nil {
			return nil, err
		}
		scattered.writes++
		if c := uint64(off / cs); len(changed) == 0 || changed[len(changed)-1] != c {
			changed = append(changed, c) // picked is sorted, so chunks come in order
		}
	}
	if err := sealCase(ctx, cfg, v, repo, &scattered, changed); err != nil {
		return nil, err
	}
	res.cases = append(res.cases, scattered)
	return res, nil
}

// sealCase snapshots v, drops the page cache, seals, and records in c
// what the seal cost. changed lists the chunks the case wrote, sorted and
// unique.
//
// A case whose whole is -1 rewrote its chunks whole; the others stay
// journal.
func sealCase(ctx context.Context, cfg config, v *volume.Volume, repo *countingBackend, c *rewriteCase, changed []uint64) error {
	c.written = int64(c.writes) * c.each
	c.chunks = len(changed)
	if c.whole < 0 {
		c.whole = len(changed)
		c.pages = pagesOnPaths(changed)
	} else {
		c.whole = 0
	}
	t0 := time.Now()
	if _, err := v.Snapshot(ctx, ""); err != nil {
		return fmt.Errorf("%s: snapshot: %w", c.title, err)
	}
	c.snapshotCall = time.Since(t0)
	if err := settle(ctx, cfg); err != nil {
		return err
	}
	before := repo.counts()
	cpu0, err := sampleCPU(0)
	if err != nil {
		return err
	}
	t1 := time.Now()
	if err := v.SealAll(ctx); err != nil {
		return fmt.Errorf("%s: seal: %w", c.title, err)
	}
	c.seal = time.Since(t1)
	cpu1, err := sampleCPU(0)
	if err != nil {
		return err
	}
	c.sealCPU = cpu1.server - cpu0.server
	c.counts = repo.counts().since(before)
	logf("rewrite: %s: seal %.2fs, %d objects written (%d to %d), %.2f MiB for %.2f MiB written",
		c.title, c.seal.Seconds(), c.counts.Puts(), c.minimum(), c.most(), float64(c.counts.Bytes())/(1<<20), float64(c.written)/(1<<20))
	return nil
}

// pagesOnPaths counts the index pages on the paths from the root to the
// chunks, per level, leaves first: the pages a change of those chunks must
// rewrite.
func pagesOnPaths(chunks []uint64) [indexLevels]int {
	var pages [indexLevels]int
	for level := range indexLevels {
		shift := indexFanoutBits * (level + 1)
		seen := make(map[uint64]bool)
		for _, c := range chunks {
			seen[c>>shift] = true
		}
		pages[level] = len(seen)
	}
	return pages
}

// sampleDistinct returns n distinct numbers from [0, total), sorted.
func sampleDistinct(rng *rand.Rand, n, total int64) []int64 {
	seen := make(map[int64]bool, n)
	out := make([]int64, 0, n)
	for int64(len(out)) < n {
		k := rng.Int64N(total)
		if !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}
