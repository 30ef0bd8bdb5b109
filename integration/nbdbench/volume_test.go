package main

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/integration/nbdtest"
)

// textMiB is a MiB of the benchmark's compressible data.
func textMiB(seed uint64) []byte {
	g := newTextGen(seed)
	p := make([]byte, 1<<20)
	for b := 0; b < len(p); b += textBlockSize {
		g.fill(p[b:b+textBlockSize], fmt.Sprintf("test block %d", b/textBlockSize))
	}
	return p
}

func TestTextGen(t *testing.T) {
	a, b := textMiB(1), textMiB(1)
	if !bytes.Equal(a, b) {
		t.Fatal("the same seed made different text")
	}
	blocks := make(map[string]bool)
	for k := 0; k < len(a); k += textBlockSize {
		blocks[string(a[k:k+textBlockSize])] = true
	}
	if len(blocks) != len(a)/textBlockSize {
		t.Errorf("%d distinct blocks of %d", len(blocks), len(a)/textBlockSize)
	}
	// It is compressible, but not trivially: what the report calls
	// text-like.
	store, err := chunkstore.NewStore(chunkstore.NewMem(), chunkstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := store.Put(t.Context(), a); err != nil {
		t.Fatal(err)
	}
	st := store.Stats()
	if ratio := float64(st.BytesStored) / float64(st.BytesIn); ratio < 0.2 || ratio > 0.6 {
		t.Errorf("zstd stores the text at %.3f of its size, want 0.2 to 0.6", ratio)
	}
}

func TestCountingBackend(t *testing.T) {
	ctx := t.Context()
	repo := newCountingBackend(chunkstore.NewMem())
	store, err := chunkstore.NewStore(repo, chunkstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	page := make([]byte, indexPageLen)
	rand.NewChaCha8([32]byte{1}).Read(page)
	for _, p := range [][]byte{textMiB(1), textMiB(2), page, textMiB(1)} { // the last is a dedup hit
		if _, err := store.Put(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	if err := repo.Put(ctx, "volumes/v/snapshots/x", []byte("{}")); err != nil {
		t.Fatal(err)
	}
	if err := repo.Put(ctx, "volumes/v/volume", []byte("{}")); err != nil {
		t.Fatal(err)
	}
	c := repo.counts()
	if c.DataPuts != 2 || c.PagePuts != 1 || c.ManifestPuts != 1 || c.OtherPuts != 1 || c.Has != 4 || c.Puts() != 5 {
		t.Errorf("counts %+v: want 2 data chunks, 1 page, 1 manifest, 1 other, 4 existence checks", c)
	}
	if c.PageBytes <= indexPageLen || c.Bytes() != c.DataBytes+c.PageBytes+4 {
		t.Errorf("bytes %+v: a random page is stored raw, with its header", c)
	}
	if d := repo.counts().since(c); d != (repoCounts{}) {
		t.Errorf("since itself: %+v", d)
	}
}

func TestPagesOnPaths(t *testing.T) {
	got := pagesOnPaths([]uint64{0, 1, 4095, 4096, 1 << 24, 1<<24 + 5})
	if want := [indexLevels]int{3, 2, 1}; got != want {
		t.Errorf("pagesOnPaths = %v, want %v", got, want)
	}
	c := rewriteCase{chunks: 6, whole: 6, pages: got}
	if c.minimum() != 6+6+1 || c.most() != 6+6+1+2 {
		t.Errorf("minimum, most = %d, %d, want 13, 15", c.minimum(), c.most())
	}
}

func TestSampleDistinct(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	got := sampleDistinct(rng, 50, 60)
	if len(got) != 50 || !slices.IsSorted(got) || len(slices.Compact(slices.Clone(got))) != 50 || got[0] < 0 || got[49] >= 60 {
		t.Errorf("sampleDistinct(50 of 60) = %v", got)
	}
}

// The volume server's untimed steps: bring to rest, snapshot until sealed,
// reopen cold.
func TestVolumeServer(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	vs, err := newVolumeServer(ctx, filepath.Join(dir, "repo"), filepath.Join(dir, "state"), 8<<20, phaseInterval)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := vs.close(); err != nil {
			t.Error(err)
		}
	}()
	data := slices.Concat(textMiB(1), textMiB(2))
	if err := vs.v.WriteAt(ctx, data, 3<<20, false); err != nil {
		t.Fatal(err)
	}
	if err := vs.drain(ctx); err != nil {
		t.Fatal(err)
	}
	if st := vs.v.Status(); st.PendingLayers != 0 {
		t.Fatalf("after drain: %+v", st)
	}
	if err := vs.v.WriteAt(ctx, data[:4096], 0, false); err != nil {
		t.Fatal(err)
	}
	before := vs.repo.counts()
	snap, err := vs.v.Snapshot(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := vs.waitSealed(wctx, snap.ID); err != nil {
		t.Fatal(err)
	}
	// One 4 KiB write: shipped as journal, no chunk, no index page.
	if c := vs.repo.counts().since(before); c.DataPuts != 0 || c.PagePuts != 0 || c.JournalPuts < 1 || c.JournalPuts > 2 || c.ManifestPuts != 1 {
		t.Errorf("the seal of one 4 KiB write wrote %+v", c)
	}
	if err := vs.reopen(ctx); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if err := vs.v.ReadSnapshotAt(ctx, snap.ID, got, 3<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Error("the reopened snapshot does not read back what was written")
	}
	if st := vs.store.Stats(); st.BackendGets == 0 {
		t.Errorf("a cold read fetched nothing from the repository: %+v", st)
	}
	if err := vs.waitSealed(ctx, "no-such-snapshot"); err == nil {
		t.Error("waitSealed of a missing snapshot: no error")
	}
}

func TestBenchRewrite(t *testing.T) {
	cfg := config{rewriteSizeMiB: 64}
	res, err := benchRewrite(t.Context(), cfg, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if len(res.cases) != 3 {
		t.Fatalf("%d cases", len(res.cases))
	}
	for _, c := range res.cases {
		if !c.withinObjects() || c.counts.Bytes() > c.storedBound() {
			t.Errorf("%s: wrote %+v, expected %d to %d objects and at most %d bytes (%d chunks, %d whole, pages %v)",
				c.title, c.counts, c.minimum(), c.most(), c.storedBound(), c.chunks, c.whole, c.pages)
		}
	}
	if whole := res.cases[1]; whole.counts.DataPuts != 1 {
		t.Errorf("the whole chunk is stored as a chunk: %+v", whole.counts)
	}
	if scattered := res.cases[2]; scattered.counts.DataPuts != 0 || scattered.counts.JournalPuts == 0 {
		t.Errorf("a scattered change is shipped as journal: %+v", scattered.counts)
	}
	if fill := res.cases[0]; fill.chunks != 64 || fill.writes != 64 {
		t.Errorf("fill: %d chunks, %d writes; want 64", fill.chunks, fill.writes)
	}
	if whole := res.cases[1]; whole.chunks != 1 || whole.written != 1<<20 {
		t.Errorf("1%% of 64 chunks: %d chunks, %d bytes; want at least one whole chunk", whole.chunks, whole.written)
	}
	if scattered := res.cases[2]; scattered.writes != 163 || scattered.written != 163*4096 {
		t.Errorf("1%% of 16384 blocks: %d writes of %d bytes, want 163", scattered.writes, scattered.each)
	}
	var b bytes.Buffer
	res.write(&b)
	if want := "| objects as expected | yes | yes | yes |"; !strings.Contains(b.String(), want) {
		t.Errorf("the table lacks %q:\n%s", want, b.String())
	}
}

// TestRunVolume runs the whole benchmark on the volume at tiny sizes, with
// the real clients.
func TestRunVolume(t *testing.T) {
	nbdtest.Tools(t, "nbdcopy", "nbdinfo", "fio")
	cfg := config{
		dir: t.TempDir(), sizeMiB: 8, runtime: time.Second, repeat: 1,
		servers: []string{"volume"}, rewriteSizeMiB: 16,
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	var out bytes.Buffer
	if err := run(ctx, cfg, &out); err != nil {
		t.Fatal(err)
	}
	report := out.String()
	for _, want := range []string{
		"| workload | volume | volume/nbdkit | volume/qemu-nbd |",
		"| 1 MiB sequential write, fio QD32 (MB/s) | ",
		"### The volume: uploader, snapshot, sealed reads",
		"| manifests the seal wrote | 1 |",
		"| data chunks the seal wrote | 8 |",
		"### Snapshot cost after a 1% rewrite",
		"| objects as expected | yes | yes | yes |",
		"| stored ≤ 2 × written + 64 KiB | yes | yes | yes |",
		"### Against the goals of issue 4",
		"nbdcopy --flush ",
	} {
		if !strings.Contains(report, want) {
			t.Errorf("the report lacks %q", want)
		}
	}
	if t.Failed() {
		t.Log(report)
	}
}

func TestSpaceNeeded(t *testing.T) {
	cfg := config{sizeMiB: 1024, runtime: 20 * time.Second, servers: allServers, rewriteSizeMiB: 64 << 10}
	// The random source, three raw files, and the volume's text source,
	// 8 GiB of log, 13 seals of 1 GiB and a twentieth of the rewrite
	// volume: what docs/benchmarks.md quotes (with checkSpace's 10%).
	want := int64(1+3+1+8+13)<<30 + (64<<30)/20
	if got := spaceNeeded(cfg); got != want {
		t.Errorf("spaceNeeded(defaults) = %.1f GiB, want %.1f", float64(got)/(1<<30), float64(want)/(1<<30))
	}
}
