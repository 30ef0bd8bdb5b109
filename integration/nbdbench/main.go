// Command nbdbench measures nbdvault's NBD server, and the volumes it
// serves, next to the servers users would pick instead, qemu-nbd and
// nbdkit's file plugin, with the same clients (nbdcopy and fio's nbd
// engine), the same data and the same file system.
//
// The servers (-servers):
//
//	nbdvault  nbdvault's NBD server in this process over a raw file
//	          (nbd.File): the protocol layer alone
//	volume    the same server over a volume's head: write log, uploader
//	          (Volume.Run) and a local repository directory, in this
//	          process; what users run
//	qemu-nbd  a child process on a raw file, its defaults
//	nbdkit    nbdkit's file plugin, a child process on a raw file
//
// For each server it creates a fresh target (a sparse raw file, or a new
// volume and repository), starts the server on a Unix socket, and runs
// five timed phases:
//
//	a. nbdcopy SRC URI           sequential write of a random source file
//	b. nbdcopy URI null:         sequential read
//	c. fio, 1 MiB write,   iodepth 32, ioengine=nbd, time-based (sequential)
//	d. fio, 4 KiB randwrite, iodepth 32, ioengine=nbd, time-based
//	e. fio, 4 KiB randread,  iodepth 32, ioengine=nbd, time-based
//
// The volume's uploader runs throughout, with the server's defaults
// (checkpoint every 30 s of writes or at half the 8 GiB log limit; writes
// wait at the limit). Before each timed phase the volume is brought to
// rest, untimed: a checkpoint, then a wait until the uploader has sealed
// every layer. So every phase starts with an empty write log and an idle
// uploader, and the head's reads (b, e) come from the repository. A phase
// that writes more than half the log limit makes the uploader seal while
// it runs, as it would on a real server: the report gives the seals and
// the largest write log of each phase.
//
// Then, for the volume only:
//
//	f. nbdcopy --flush TEXT URI, untimed; then a snapshot, and the time
//	   from Snapshot() returning until the running uploader has sealed it,
//	   with the objects and bytes the seal wrote
//	g. the volume closed and reopened over a new chunk store (an empty
//	   cache, as after a restart), the page cache dropped, and
//	   nbdcopy URI@SNAP null: a cold sequential read of the sealed snapshot
//	h. the same read again at once: warm
//
// TEXT is compressible, text-like data (textdata.go), since the issue's
// read goal is stated on compressible data.
//
// And once per run, when the volume is among the servers, in process and
// without NBD (rewrite.go, -rewrite-size-mib, default 64 GiB): a volume
// with every chunk written, snapshotted and sealed; then 1% of it
// rewritten as whole random chunks, snapshotted and sealed; then 1% as
// random 4 KiB writes, snapshotted and sealed. For each seal it counts the
// objects and bytes written to the repository next to the minimum, the
// changed chunks plus the changed index pages.
//
// Last, with -restic (the default), the real `nbdvault serve` binary next
// to restic through the same MinIO on 127.0.0.1: ingest, restore and a
// scattered change of a 2 GiB ext4 image (restic.go). -only-restic runs
// it alone.
//
// Before every timed phase the page cache is written back and dropped
// (sync; echo 3 > /proc/sys/vm/drop_caches; this needs root, see
// -drop-caches), and then it waits 10 s (-settle) before starting the
// phase (not before h, which is the warm read). The wait is for virtual
// machines with free page reporting (a virtio balloon; the project's
// machine has one): the guest hands freed memory back to the host about
// 2 s after it is freed, and the next touch of such a page is slow. A
// phase started right after the drop raced that and ran at random speeds
// (the same 1 GiB nbdcopy read from nbdkit took 0.5 to 2.6 s); after 6 s
// or more it took 1.2 to 1.4 s every time, each phase then paying the
// same cost for the memory it fills.
//
// Untimed checks: after a, the target file (for the volume, a read of the
// head over NBD) equals the source; after b, a read over NBD equals the
// source; after h, a read of the snapshot over NBD equals TEXT. It prints
// a markdown report with the exact commands. A missing tool or a failing
// command is an error: nothing is skipped.
//
// Run it from the module root:
//
//	go run ./integration/nbdbench [-dir DIR] [-size-mib 1024] [-runtime 20s] [-repeat 1] [-rewrite-size-mib 65536]
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"
)

type config struct {
	dir        string
	sizeMiB    int64
	runtime    time.Duration
	repeat     int
	servers    []string
	dropCaches bool
	settle     time.Duration
	keep       bool
	// rewriteSizeMiB is the size of the rewrite benchmark's volume; 0
	// skips it.
	rewriteSizeMiB int64
	// scatteredRuntime and scatteredIOPS: the scattered-writes benchmark
	// (scattered.go); a zero runtime skips it.
	scatteredRuntime time.Duration
	scatteredIOPS    int64
	scatteredSizeMiB int64  // 0: sizeMiB
	scatteredFill    string // "random" or "text"
	// restic runs the comparison with restic (restic.go); onlyRestic runs
	// it alone.
	restic, onlyRestic bool
}

func main() {
	var cfg config
	var servers string
	flag.StringVar(&cfg.dir, "dir", os.TempDir(), "parent `directory` of the temporary work directory (sources, targets, the volume's repository and log, sockets)")
	flag.Int64Var(&cfg.sizeMiB, "size-mib", 1024, "size of the sources and of each target (file or volume), in MiB")
	flag.DurationVar(&cfg.runtime, "runtime", 20*time.Second, "runtime of each fio phase")
	flag.IntVar(&cfg.repeat, "repeat", 1, "run every server this many times (the table shows the median and the range; the order of servers rotates between runs)")
	flag.StringVar(&servers, "servers", strings.Join(allServers, ","), "comma-separated servers to run, in this order")
	flag.BoolVar(&cfg.dropCaches, "drop-caches", true, "sync and drop the page cache before every timed phase (needs root; with false the table says so)")
	flag.DurationVar(&cfg.settle, "settle", 10*time.Second, "after dropping the page cache, wait this long before the timed phase (see the package comment)")
	flag.BoolVar(&cfg.keep, "keep", false, "keep the work directory (sources, targets, repositories, server logs)")
	flag.Int64Var(&cfg.rewriteSizeMiB, "rewrite-size-mib", 64<<10, "size in MiB of the volume whose snapshots after a 1% rewrite are counted (runs when the volume server does; 0 skips it)")
	flag.DurationVar(&cfg.scatteredRuntime, "scattered-runtime", 3*time.Minute, "runtime of the sustained scattered 4 KiB writes into a -size-mib volume, counting the repository's growth (runs when the volume server does; 0 skips it)")
	flag.Int64Var(&cfg.scatteredIOPS, "scattered-iops", 1000, "the rate of the scattered writes, in 4 KiB writes per second")
	flag.Int64Var(&cfg.scatteredSizeMiB, "scattered-size-mib", 0, "size in MiB of the scattered-writes volume (0: -size-mib)")
	flag.StringVar(&cfg.scatteredFill, "scattered-fill", "random", "what the scattered-writes volume is filled with first: random, or text (compressible: a 64 GiB volume then fits a smaller disk)")
	flag.BoolVar(&cfg.restic, "restic", true, "compare nbdvault with restic through the same MinIO: ingest, restore and a scattered change of a 2 GiB ext4 image (restic.go; a missing restic skips it, or fails the run under NBDVAULT_REQUIRE_TOOLS)")
	flag.BoolVar(&cfg.onlyRestic, "only-restic", false, "run the restic comparison alone (no NBD throughput, rewrite or scattered-writes benchmark)")
	flag.Parse()
	if flag.NArg() > 0 {
		fatalf("unexpected arguments: %q", flag.Args())
	}
	for s := range strings.SplitSeq(servers, ",") {
		s = strings.TrimSpace(s)
		if !slices.Contains(allServers, s) {
			fatalf("unknown server %q (known: %s)", s, strings.Join(allServers, ", "))
		}
		if slices.Contains(cfg.servers, s) {
			fatalf("server %q listed twice", s)
		}
		cfg.servers = append(cfg.servers, s)
	}
	if cfg.sizeMiB <= 0 || cfg.repeat <= 0 || cfg.runtime < time.Second {
		fatalf("-size-mib and -repeat must be positive and -runtime at least 1s")
	}
	if cfg.rewriteSizeMiB < 0 || cfg.rewriteSizeMiB > maxRewriteMiB {
		fatalf("-rewrite-size-mib must be from 0 (skip) to %d (64 TiB, the largest volume)", maxRewriteMiB)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, os.Stdout); err != nil {
		stop()
		fatalf("%v", err)
	}
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "nbdbench: "+format+"\n", args...)
	os.Exit(1)
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "nbdbench: "+format+"\n", args...)
}

// workDir checks that the page cache can be dropped if asked to, and
// makes the run's work directory; cleanup removes it unless -keep.
func workDir(cfg config) (work string, cleanup func(), err error) {
	if cfg.dropCaches {
		if err := dropCaches(); err != nil {
			return "", nil, fmt.Errorf("%w (run as root, or pass -drop-caches=false and the report says the cache was kept)", err)
		}
	}
	work, err = os.MkdirTemp(cfg.dir, "nbdbench-")
	if err != nil {
		return "", nil, err
	}
	if cfg.keep {
		logf("work directory %s is kept", work)
		return work, func() {}, nil
	}
	return work, func() { os.RemoveAll(work) }, nil
}

// run runs the benchmark and writes the report to out.
func run(ctx context.Context, cfg config, out io.Writer) (err error) {
	if cfg.onlyRestic {
		return runResticOnly(ctx, cfg, out)
	}
	tools, err := checkTools(ctx, cfg.servers)
	if err != nil {
		return err
	}
	work, cleanup, err := workDir(cfg)
	if err != nil {
		return err
	}
	defer cleanup()
	size := cfg.sizeMiB << 20
	withVolume := slices.Contains(cfg.servers, "volume")
	fsType, err := checkSpace(work, spaceNeeded(cfg))
	if err != nil {
		return err
	}

	rep := &report{
		start:      time.Now().UTC(),
		size:       size,
		runtime:    cfg.runtime,
		repeat:     cfg.repeat,
		servers:    cfg.servers,
		dropCaches: cfg.dropCaches,
		settle:     cfg.settle,
		dir:        work,
		fsType:     fsType,
		tools:      tools,
		cpus:       runtime.NumCPU(),
		kernel:     kernelRelease(),
		loadStart:  loadAverage(),
		results:    make(map[string]map[string][]float64),
		advertised: make(map[string]string),
		serverCmd:  make(map[string]string),
		clientCmds: make(map[string][]string),
		other:      make(map[string]otherCPU),
		serverCPU:  make(map[string]map[string][]float64),
	}

	src := filepath.Join(work, "source.raw")
	logf("writing %d MiB of random data to %s", cfg.sizeMiB, src)
	if err := writeRandomFile(src, size); err != nil {
		return err
	}
	text := ""
	if withVolume {
		text = filepath.Join(work, "text.raw")
		logf("writing %d MiB of compressible text-like data to %s", cfg.sizeMiB, text)
		if err := writeTextFile(text, size); err != nil {
			return err
		}
	}

	for i := range cfg.repeat {
		order := cfg.servers
		if cfg.repeat > 1 { // rotate, so no server always runs first
			k := i % len(order)
			order = append(slices.Clone(order[k:]), order[:k]...)
		}
		for _, name := range order {
			if cfg.repeat > 1 {
				logf("run %d of %d: %s", i+1, cfg.repeat, name)
			}
			if err := benchServer(ctx, cfg, rep, name, src, text, work); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
		}
	}
	if withVolume && cfg.rewriteSizeMiB > 0 {
		logf("rewrite benchmark: a %d MiB volume, 1%% rewritten", cfg.rewriteSizeMiB)
		if rep.rewrite, err = benchRewrite(ctx, cfg, work); err != nil {
			return fmt.Errorf("rewrite benchmark: %w", err)
		}
	}
	if withVolume && cfg.scatteredRuntime > 0 {
		logf("scattered-writes benchmark: %d IOPS for %s", cfg.scatteredIOPS, cfg.scatteredRuntime)
		if rep.scattered, err = benchScattered(ctx, cfg, work); err != nil {
			return fmt.Errorf("scattered-writes benchmark: %w", err)
		}
	}
	if cfg.restic {
		logf("restic comparison: a %d MiB ext4 image through the same MinIO", resticImageSize>>20)
		if rep.restic, err = benchRestic(ctx, cfg, work); err != nil {
			return fmt.Errorf("restic comparison: %w", err)
		}
	}
	rep.loadEnd = loadAverage()
	rep.write(out)
	return nil
}

// spaceNeeded estimates the disk space a run needs: the sources, a raw
// file per file server, and for the volume its write log and repository.
// The log holds what a phase writes, up to the 8 GiB limit; the
// repository keeps every chunk any seal wrote (there is no garbage
// collection yet): each seal stores at most the volume's size, there is
// one per phase and one for every 4 GiB a time-based fio phase writes
// (assume 1 GB/s). The rewrite benchmark uses about 3% of its volume's
// size.
func spaceNeeded(cfg config) int64 {
	const fastest = 1e9 // bytes per second a fio phase may write
	size := cfg.sizeMiB << 20
	phaseBytes := int64(cfg.runtime.Seconds() * fastest)
	need := size // the random source
	for _, s := range cfg.servers {
		switch s {
		case "volume":
			log := min(8<<30, max(size, phaseBytes))
			seals := 5 + 2*(phaseBytes/(4<<30))
			need += size /* text source */ + log + seals*size
			need += (cfg.rewriteSizeMiB << 20) / 20
		default:
			need += size
		}
	}
	if slices.Contains(cfg.servers, "volume") && cfg.scatteredRuntime > 0 {
		// The filled volume's log (at most the log limit: the uploader
		// seals as it fills) and repository (text: zstd stores about
		// 40%); its growth is watched and stopped at scatteredReserve.
		repo := cfg.scatteredSize()
		if cfg.scatteredFill == "text" {
			repo = repo / 2
		}
		need += min(cfg.scatteredSize(), 8<<30) + repo + scatteredReserve
	}
	if cfg.restic {
		need += resticSpaceNeeded
	}
	return need
}

// benchServer runs the phases against a fresh server on a fresh target
// and records the results.
func benchServer(ctx context.Context, cfg config, rep *report, name, src, text, work string) (err error) {
	target := filepath.Join(work, name+".raw")
	sock := filepath.Join(work, name+".sock")
	os.Remove(target)
	os.Remove(sock)
	if name != "volume" {
		if err := createSparse(target, rep.size); err != nil {
			return err
		}
		defer func() {
			if !cfg.keep {
				os.Remove(target)
			}
		}()
	}

	srv, err := startServer(ctx, name, target, work, sock, filepath.Join(work, name+".log"), rep.size)
	if err != nil {
		return err
	}
	defer func() {
		if serr := srv.stop(); serr != nil && err == nil {
			err = serr
		}
	}()
	r := &serverRun{ctx: ctx, cfg: cfg, rep: rep, name: name, srv: srv, sock: sock, uri: exportURI(sock, "bench")}
	defer r.endWatch() // a phase that failed left it running
	if srv.vol != nil {
		r.cmds = append(r.cmds, "# in process, untimed, before every head phase: v.Checkpoint(ctx), then v.Status() polled until PendingLayers == 0")
	}

	adv, err := advertised(ctx, r.uri)
	if err != nil {
		return err
	}
	rep.advertised[name] = adv

	if err := r.headPhases(src, target); err != nil {
		return err
	}
	if srv.vol != nil {
		if err := r.volumePhases(text); err != nil {
			return err
		}
	}
	if err := srv.alive(); err != nil {
		return err
	}
	rep.serverCmd[name] = srv.cmdline
	rep.clientCmds[name] = r.cmds
	return nil
}

// serverRun is one server's turn: its phases and what they measured.
type serverRun struct {
	ctx       context.Context
	cfg       config
	rep       *report
	name      string
	srv       *server
	sock, uri string
	cmds      []string

	before    cpuSample
	watch     *uploaderWatch // the volume's uploader during the phase
	other     float64        // other work's share of the CPU in the last phase, %
	serverCPU time.Duration  // the server's CPU time in the last phase
	activity  uploaderActivity
}

// prepHow says what prep does before a timed phase.
type prepHow int

const (
	// restAndDrop brings the volume to rest (every layer sealed) and
	// drops the page cache: the start of every head phase.
	restAndDrop prepHow = iota
	// dropOnly drops the page cache and leaves the volume as it is.
	dropOnly
	// keepCache drops nothing: a warm read.
	keepCache
)

// prep readies a timed phase, and done ends it: they measure the CPU the
// server and other work took meanwhile, and what the volume's uploader
// did.
func (r *serverRun) prep(how prepHow) error {
	if err := r.srv.alive(); err != nil {
		return err
	}
	if r.srv.vol != nil && how == restAndDrop {
		if err := r.srv.vol.drain(r.ctx); err != nil {
			return err
		}
	}
	if how != keepCache {
		if err := settle(r.ctx, r.cfg); err != nil {
			return err
		}
	}
	if r.srv.vol != nil {
		r.watch = watchUploader(r.srv.vol)
	}
	var err error
	r.before, err = sampleCPU(r.srv.pid)
	return err
}

func (r *serverRun) done() error {
	after, err := sampleCPU(r.srv.pid)
	if err != nil {
		return err
	}
	r.endWatch()
	o := r.rep.other[r.name]
	o.add(r.before, after)
	r.rep.other[r.name] = o
	var phase otherCPU
	phase.add(r.before, after)
	r.other = phase.share(r.rep.cpus)
	r.serverCPU = after.server - r.before.server
	return nil
}

// endWatch stops watching the volume's uploader, if a watch runs, and
// keeps what it saw.
func (r *serverRun) endWatch() {
	if r.watch != nil {
		r.activity = r.watch.end()
		r.watch = nil
	}
}

// settle drops the page cache and waits cfg.settle, if the run drops
// caches (see the package comment).
func settle(ctx context.Context, cfg config) error {
	if !cfg.dropCaches {
		return nil
	}
	if err := dropCaches(); err != nil {
		return err
	}
	select {
	case <-time.After(cfg.settle):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// put records one value of the server's metric key.
func (r *serverRun) put(key string, v float64) {
	if r.rep.results[r.name] == nil {
		r.rep.results[r.name] = make(map[string][]float64)
		r.rep.serverCPU[r.name] = make(map[string][]float64)
	}
	r.rep.results[r.name][key] = append(r.rep.results[r.name][key], v)
}

// record keeps a head phase's result v and the server's CPU time per unit
// of work (units: GiB or I/Os), and for the volume what its uploader did.
func (r *serverRun) record(key string, v float64, units float64) {
	w := workloadByKey(key)
	r.put(key, v)
	perUnit := r.serverCPU.Seconds() / units
	unit := "MB/s"
	if cpuUnits[key] == "µs per I/O" {
		perUnit *= 1e6
		unit = "IOPS"
	}
	r.rep.serverCPU[r.name][key] = append(r.rep.serverCPU[r.name][key], perUnit)
	if r.srv.vol != nil {
		r.put("seals:"+key, float64(r.activity.seals))
		r.put("maxlog:"+key, float64(r.activity.maxLog)/(1<<20))
	}
	logf("%s: %s: %.0f %s; server CPU %.2fs (other work took %.1f%% of the CPU)",
		r.name, w.title, v, unit, r.serverCPU.Seconds(), r.other)
}

// command runs a timed client command between prep and done and returns
// its wall time.
func (r *serverRun) command(how prepHow, args []string) (time.Duration, error) {
	if err := r.prep(how); err != nil {
		return 0, err
	}
	r.cmds = append(r.cmds, shellJoin(args))
	d, err := timeCommand(r.ctx, args)
	if err != nil {
		return 0, err
	}
	return d, r.done()
}

// headPhases are a to e, the same for every server.
func (r *serverRun) headPhases(src, target string) error {
	gib := float64(r.rep.size) / (1 << 30)

	// a. sequential write.
	d, err := r.command(restAndDrop, nbdcopyArgs(src, r.uri))
	if err != nil {
		return err
	}
	r.record("seqwrite", mbps(r.rep.size, d), gib)
	if r.srv.vol != nil {
		// No file to compare: read the head back.
		verify := nbdcopyArgs(r.uri, "-")
		if err := compareCommandOutput(r.ctx, verify, src); err != nil {
			return fmt.Errorf("reading the head back after the sequential write (untimed check): %w", err)
		}
		r.cmds = append(r.cmds, shellJoin(verify)+"   # untimed check: equals the source")
	} else if err := compareFiles(src, target); err != nil {
		return fmt.Errorf("after the sequential write: %w", err)
	}

	// b. sequential read.
	d, err = r.command(restAndDrop, nbdcopyArgs(r.uri, "null:"))
	if err != nil {
		return err
	}
	r.record("seqread", mbps(r.rep.size, d), gib)
	verify := nbdcopyArgs(r.uri, "-")
	if err := compareCommandOutput(r.ctx, verify, src); err != nil {
		return fmt.Errorf("reading back over NBD (untimed check): %w", err)
	}
	r.cmds = append(r.cmds, shellJoin(verify)+"   # untimed check: equals the source")

	// c, d, e. fio sequential write, random write, random read.
	for _, p := range fioPhases {
		if err := r.prep(restAndDrop); err != nil {
			return err
		}
		args := fioArgs(r.uri, p, r.cfg.runtime)
		r.cmds = append(r.cmds, shellJoin(args))
		res, err := runFio(r.ctx, args, p.rw)
		if err != nil {
			return err
		}
		if err := r.done(); err != nil {
			return err
		}
		if p.bs == "4k" {
			r.record(p.key, res.IOPS, float64(res.IOs))
		} else {
			r.record(p.key, res.MBps(), float64(res.Bytes)/(1<<30))
		}
	}
	return r.srv.alive()
}

// exportURI is the NBD URI of export name on the Unix socket sock.
func exportURI(sock, name string) string {
	return "nbd+unix:///" + url.PathEscape(name) + "?socket=" + sock
}

// workload is one row of the table.
type workload struct {
	key, title string
}

var workloads = []workload{
	{"seqwrite", "sequential write, nbdcopy file → NBD (MB/s)"},
	{"seqread", "sequential read, nbdcopy NBD → null: (MB/s)"},
	{"fioseqwrite", "1 MiB sequential write, fio QD32 (MB/s)"},
	{"randwrite", "4 KiB random write, fio QD32 (IOPS)"},
	{"randread", "4 KiB random read, fio QD32 (IOPS)"},
}

// workloadByKey is the workload with key; the key is one of ours.
func workloadByKey(key string) workload {
	for _, w := range workloads {
		if w.key == key {
			return w
		}
	}
	panic("nbdbench: no workload " + key)
}

// fioPhase is one fio job: its workload key, --rw and --bs.
type fioPhase struct {
	key, rw, bs string
}

// fioPhases are phases c, d and e. The sequential 1 MiB write is the
// issue's "sequential 1 MiB writes (fio, iodepth 32)", which phase a is not
// (nbdcopy sends 256 KiB requests, 64 per connection, in one pass).
var fioPhases = []fioPhase{
	{"fioseqwrite", "write", "1m"},
	{"randwrite", "randwrite", "4k"},
	{"randread", "randread", "4k"},
}

// mbps is the throughput of n bytes in d, in MB/s (10^6 bytes).
func mbps(n int64, d time.Duration) float64 {
	return float64(n) / 1e6 / d.Seconds()
}

// nbdcopyArgs is the nbdcopy command line, with its defaults (up to 4
// connections if the server advertises multi-conn, 64 requests in flight
// per connection, 256 KiB requests, one thread per core).
func nbdcopyArgs(src, dst string) []string {
	return []string{"nbdcopy", src, dst}
}

// fioArgs is the fio command line for one time-based phase.
func fioArgs(uri string, p fioPhase, runtime time.Duration) []string {
	return []string{
		"fio", "--name=" + p.key, "--ioengine=nbd", "--uri=" + uri,
		"--rw=" + p.rw, "--bs=" + p.bs, "--iodepth=32", "--numjobs=1",
		"--time_based", fmt.Sprintf("--runtime=%ds", int(runtime.Seconds())),
		"--output-format=json",
	}
}

// scatteredSize is the size of the scattered-writes volume in bytes.
func (cfg config) scatteredSize() int64 {
	if cfg.scatteredSizeMiB > 0 {
		return cfg.scatteredSizeMiB << 20
	}
	return cfg.sizeMiB << 20
}
