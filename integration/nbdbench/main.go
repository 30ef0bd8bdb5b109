// Command nbdbench measures NBD throughput of nbdvault's server next to the
// servers users would pick instead, qemu-nbd and nbdkit's file plugin, with
// the same clients (nbdcopy and fio's nbd engine), the same data and the
// same file system.
//
// For each server it creates a fresh sparse raw target file, starts the
// server on a Unix socket (nbdvault in this process, the others as child
// processes with their defaults for a plain raw file), and runs four timed
// phases:
//
//	a. nbdcopy SRC URI           sequential write of a random source file
//	b. nbdcopy URI null:         sequential read
//	c. fio, 4 KiB randwrite, iodepth 32, ioengine=nbd, time-based
//	d. fio, 4 KiB randread,  iodepth 32, ioengine=nbd, time-based
//
// Before every timed phase the page cache is written back and dropped
// (sync; echo 3 > /proc/sys/vm/drop_caches; this needs root, see
// -drop-caches), and then it waits 10 s (-settle) before starting the
// phase. The wait is for virtual machines with free page reporting (a
// virtio balloon; the project's machine has one): the guest hands freed
// memory back to the host about 2 s after it is freed, and the next touch
// of such a page is slow. A phase started right after the drop raced that
// and ran at random speeds (the same 1 GiB nbdcopy read from nbdkit took
// 0.5 to 2.6 s); after 6 s or more it took 1.2 to 1.4 s every time, each
// phase then paying the same cost for the memory it fills.
//
// After a and b it checks, untimed, that the target file and a read over
// NBD equal the source. It prints a markdown table and the exact commands.
// A missing tool or a failing command is an error: nothing is skipped.
//
// Run it from the module root:
//
//	go run ./integration/nbdbench [-dir DIR] [-size-mib 1024] [-runtime 20s] [-repeat 1]
package main

import (
	"context"
	"flag"
	"fmt"
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
}

func main() {
	var cfg config
	var servers string
	flag.StringVar(&cfg.dir, "dir", os.TempDir(), "parent `directory` of the temporary work directory (source, targets, sockets)")
	flag.Int64Var(&cfg.sizeMiB, "size-mib", 1024, "size of the source and of each target, in MiB")
	flag.DurationVar(&cfg.runtime, "runtime", 20*time.Second, "runtime of each fio phase")
	flag.IntVar(&cfg.repeat, "repeat", 1, "run every server this many times (the table shows the median and the range; the order of servers rotates between runs)")
	flag.StringVar(&servers, "servers", strings.Join(allServers, ","), "comma-separated servers to run, in this order")
	flag.BoolVar(&cfg.dropCaches, "drop-caches", true, "sync and drop the page cache before every timed phase (needs root; with false the table says so)")
	flag.DurationVar(&cfg.settle, "settle", 10*time.Second, "after dropping the page cache, wait this long before the timed phase (see the package comment)")
	flag.BoolVar(&cfg.keep, "keep", false, "keep the work directory (source, targets, server logs)")
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

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg); err != nil {
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

func run(ctx context.Context, cfg config) (err error) {
	tools, err := checkTools(ctx, cfg.servers)
	if err != nil {
		return err
	}
	if cfg.dropCaches {
		if err := dropCaches(); err != nil {
			return fmt.Errorf("%w (run as root, or pass -drop-caches=false and the report says the cache was kept)", err)
		}
	}

	work, err := os.MkdirTemp(cfg.dir, "nbdbench-")
	if err != nil {
		return err
	}
	if cfg.keep {
		logf("work directory %s is kept", work)
	} else {
		defer os.RemoveAll(work)
	}
	size := cfg.sizeMiB << 20
	fsType, err := checkSpace(work, size*int64(2+len(cfg.servers)))
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
			if err := benchServer(ctx, cfg, rep, name, src, work); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
		}
	}
	rep.loadEnd = loadAverage()
	rep.write(os.Stdout)
	return nil
}

// benchServer runs the four phases against a fresh server on a fresh
// target and records the results.
func benchServer(ctx context.Context, cfg config, rep *report, name, src, work string) (err error) {
	target := filepath.Join(work, name+".raw")
	sock := filepath.Join(work, name+".sock")
	os.Remove(target)
	os.Remove(sock)
	if err := createSparse(target, rep.size); err != nil {
		return err
	}
	defer func() {
		if !cfg.keep {
			os.Remove(target)
		}
	}()

	srv, err := startServer(ctx, name, target, sock, filepath.Join(work, name+".log"))
	if err != nil {
		return err
	}
	defer func() {
		if serr := srv.stop(); serr != nil && err == nil {
			err = serr
		}
	}()
	uri := "nbd+unix:///bench?socket=" + sock

	adv, err := advertised(ctx, uri)
	if err != nil {
		return err
	}
	rep.advertised[name] = adv

	var cmds []string
	var before cpuSample
	var lastOther float64
	var lastServerCPU time.Duration
	// record keeps a phase's result v and the server's CPU time per unit
	// of work (units: GiB or I/Os).
	record := func(w workload, v float64, unit string, units float64) {
		if rep.results[name] == nil {
			rep.results[name] = make(map[string][]float64)
			rep.serverCPU[name] = make(map[string][]float64)
		}
		rep.results[name][w.key] = append(rep.results[name][w.key], v)
		perUnit := lastServerCPU.Seconds() / units
		if unit == "IOPS" {
			perUnit *= 1e6 // µs per I/O
		}
		rep.serverCPU[name][w.key] = append(rep.serverCPU[name][w.key], perUnit)
		logf("%s: %s: %.0f %s; server CPU %.2fs (other work took %.1f%% of the CPU)",
			name, w.title, v, unit, lastServerCPU.Seconds(), lastOther)
	}
	// prep readies a timed phase, and done ends it: they measure the CPU
	// that other work took meanwhile.
	prep := func() error {
		if err := srv.alive(); err != nil {
			return err
		}
		if cfg.dropCaches {
			if err := dropCaches(); err != nil {
				return err
			}
			select {
			case <-time.After(cfg.settle):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		before, err = sampleCPU(srv.pid)
		return err
	}
	done := func() error {
		after, err := sampleCPU(srv.pid)
		if err != nil {
			return err
		}
		o := rep.other[name]
		o.add(before, after)
		rep.other[name] = o
		var phase otherCPU
		phase.add(before, after)
		lastOther = phase.share(rep.cpus)
		lastServerCPU = after.server - before.server
		return nil
	}

	// a. sequential write.
	if err := prep(); err != nil {
		return err
	}
	args := nbdcopyArgs(src, uri)
	cmds = append(cmds, shellJoin(args))
	d, err := timeCommand(ctx, args)
	if err != nil {
		return err
	}
	if err := done(); err != nil {
		return err
	}
	gib := float64(rep.size) / (1 << 30)
	record(workloads[0], mbps(rep.size, d), "MB/s", gib)
	if err := compareFiles(src, target); err != nil {
		return fmt.Errorf("after the sequential write: %w", err)
	}

	// b. sequential read.
	if err := prep(); err != nil {
		return err
	}
	args = nbdcopyArgs(uri, "null:")
	cmds = append(cmds, shellJoin(args))
	d, err = timeCommand(ctx, args)
	if err != nil {
		return err
	}
	if err := done(); err != nil {
		return err
	}
	record(workloads[1], mbps(rep.size, d), "MB/s", gib)
	verify := nbdcopyArgs(uri, "-")
	if err := compareCommandOutput(ctx, verify, src); err != nil {
		return fmt.Errorf("reading back over NBD (untimed check): %w", err)
	}
	cmds = append(cmds, shellJoin(verify)+"   # untimed check: equals the source")

	// c, d. fio random write, then random read.
	for i, rw := range []string{"randwrite", "randread"} {
		if err := prep(); err != nil {
			return err
		}
		args := fioArgs(uri, rw, cfg.runtime)
		cmds = append(cmds, shellJoin(args))
		res, err := runFio(ctx, args, rw)
		if err != nil {
			return err
		}
		if err := done(); err != nil {
			return err
		}
		record(workloads[2+i], res.IOPS, "IOPS", float64(res.IOs))
	}
	if err := srv.alive(); err != nil {
		return err
	}
	rep.serverCmd[name] = srv.cmdline
	rep.clientCmds[name] = cmds
	return nil
}

// workload is one row of the table.
type workload struct {
	key, title string
}

var workloads = []workload{
	{"seqwrite", "sequential write, nbdcopy file → NBD (MB/s)"},
	{"seqread", "sequential read, nbdcopy NBD → null: (MB/s)"},
	{"randwrite", "4 KiB random write, fio QD32 (IOPS)"},
	{"randread", "4 KiB random read, fio QD32 (IOPS)"},
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

// fioArgs is the fio command line for one random-I/O phase.
func fioArgs(uri, rw string, runtime time.Duration) []string {
	return []string{
		"fio", "--name=" + rw, "--ioengine=nbd", "--uri=" + uri,
		"--rw=" + rw, "--bs=4k", "--iodepth=32", "--numjobs=1",
		"--time_based", fmt.Sprintf("--runtime=%ds", int(runtime.Seconds())),
		"--output-format=json",
	}
}
