package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// The scattered-writes benchmark (issue 11): what the repository pays for
// the source hosts' typical load, small writes scattered over the volume,
// sustained for minutes. It runs the volume server as the other phases do
// (in this process, uploader with its defaults: 1 MiB chunks, checkpoints
// every 10 s):
//
//  1. a volume of -size-mib filled through the volume API with random
//     data (incompressible, so nothing is saved by zstd; or text with
//     -scattered-fill text), snapshot, seal;
//  2. fio's nbd engine writes 4 KiB blocks at random offsets at a fixed
//     rate (-scattered-iops) for -scattered-runtime, queue depth 16;
//  3. every 5 s: the repository's bytes and objects (a walk of its
//     directory) and the volume's lag.
//
// The figure that matters is the repository's growth per byte written;
// the goal is 3× or less, and the lag bounded. The run stops
// early when the disk's free space falls under a reserve.

// scatteredResult is one run of the scattered-writes benchmark.
type scatteredResult struct {
	size, iops    int64
	runtime, took time.Duration
	written       int64 // bytes fio wrote
	repoBefore    int64 // repository bytes after the fill was sealed
	repoAfter     int64
	objsBefore    int64
	objsAfter     int64
	maxLag        time.Duration
	cpu           time.Duration // this process's (NBD server and uploader) while fio ran
	stoppedEarly  string        // why, if it did
	cmd           string
	fill          string // what filled the volume first
}

// scatteredReserve is the free space under which the run stops early.
const scatteredReserve = 4 << 30

func benchScattered(ctx context.Context, cfg config, work string) (*scatteredResult, error) {
	res := &scatteredResult{size: cfg.scatteredSize(), iops: cfg.scatteredIOPS, runtime: cfg.scatteredRuntime}
	sock := filepath.Join(work, "scattered.sock")
	srv, err := startVolume(ctx, work, sock, filepath.Join(work, "scattered-server.log"), res.size, 0)
	if err != nil {
		return nil, err
	}
	defer srv.stop()
	v := srv.vol.v
	res.fill = cfg.scatteredFill
	logf("scattered: filling the %d MiB volume with %s data", res.size>>20, res.fill)
	buf := make([]byte, 1<<20)
	text := newTextGen(7)
	for off := int64(0); off < res.size; off += int64(len(buf)) {
		switch res.fill {
		case "text":
			text.fill(buf, fmt.Sprint("chunk ", off))
		case "random":
			_, _ = rand.Read(buf)
		default:
			return nil, fmt.Errorf("-scattered-fill %q: want random or text", res.fill)
		}
		if err := v.WriteAt(ctx, buf, off, false); err != nil {
			return nil, err
		}
	}
	if _, err := v.Snapshot(ctx, ""); err != nil {
		return nil, err
	}
	if err := v.SealAll(ctx); err != nil {
		return nil, err
	}
	if res.repoBefore, res.objsBefore, err = dirUsage(srv.vol.repoDir); err != nil {
		return nil, err
	}

	args := []string{
		"fio", "--name=scattered", "--ioengine=nbd", "--uri=" + exportURI(sock, volumeName),
		// New random bytes for every write: fio's default reuses its
		// buffers, which zstd then compresses well and flatters the
		// journal.
		"--rw=randwrite", "--bs=4k", "--iodepth=16", "--numjobs=1", "--refill_buffers",
		fmt.Sprintf("--rate_iops=%d", res.iops),
		"--time_based", fmt.Sprintf("--runtime=%ds", int(res.runtime.Seconds())),
		"--output-format=json",
	}
	res.cmd = shellJoin(args)
	logf("scattered: %s", res.cmd)
	fioCtx, stopFio := context.WithCancel(ctx)
	defer stopFio()
	type fioDone struct {
		r   fioResult
		err error
	}
	done := make(chan fioDone, 1)
	start := time.Now()
	cpu0, _ := processCPU(os.Getpid())
	go func() {
		r, err := runFio(fioCtx, args, "randwrite")
		done <- fioDone{r, err}
	}()
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	for {
		select {
		case d := <-done:
			res.took = time.Since(start)
			cpu1, _ := processCPU(os.Getpid())
			res.cpu = cpu1 - cpu0
			if d.err != nil && res.stoppedEarly == "" {
				return nil, d.err
			}
			res.written = d.r.Bytes
			if res.repoAfter, res.objsAfter, err = dirUsage(srv.vol.repoDir); err != nil {
				return nil, err
			}
			return res, nil
		case <-tick.C:
			res.maxLag = max(res.maxLag, v.Status().Lag)
			var st unix.Statfs_t
			if unix.Statfs(work, &st) == nil && int64(st.Bavail)*st.Bsize < scatteredReserve && res.stoppedEarly == "" {
				res.stoppedEarly = fmt.Sprintf("free space under %d GiB after %s", scatteredReserve>>30, time.Since(start).Round(time.Second))
				logf("scattered: stopping early: %s", res.stoppedEarly)
				stopFio()
			}
		}
	}
}

// dirUsage is the bytes and the number of regular files under dir.
func dirUsage(dir string) (bytes, files int64, err error) {
	err = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		bytes += fi.Size()
		files++
		return nil
	})
	return bytes, files, err
}

func (s *scatteredResult) write(w io.Writer) {
	fmt.Fprintf(w, "\n### Sustained scattered 4 KiB writes into a %d MiB volume (%d IOPS, %s)\n\n", s.size>>20, s.iops, s.took.Round(time.Second))
	growth := s.repoAfter - s.repoBefore
	fmt.Fprintln(w, "| written by fio | repository growth | growth / written | objects added | max lag | server CPU (share of one core) |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|")
	ratio := "-"
	if s.written > 0 {
		ratio = fmt.Sprintf("%.1f×", float64(growth)/float64(s.written))
	}
	share := "-"
	if s.took > 0 {
		share = fmt.Sprintf("%.0f%%", 100*s.cpu.Seconds()/s.took.Seconds())
	}
	fmt.Fprintf(w, "| %.1f MiB | %.1f MiB | %s | %d | %s | %s |\n", float64(s.written)/(1<<20), float64(growth)/(1<<20), ratio,
		s.objsAfter-s.objsBefore, s.maxLag.Round(time.Second), share)
	if s.stoppedEarly != "" {
		fmt.Fprintf(w, "\nStopped early: %s.\n", s.stoppedEarly)
	}
	fmt.Fprintf(w, "\nThe volume was filled with "+s.fill+" data and sealed first (repository %.1f MiB, %d objects); then `%s`. Server CPU is this process's (the NBD server, the write log and the uploader) while fio ran. Issue 11's goal: growth ≤ 3× the bytes written, the lag bounded.\n",
		float64(s.repoBefore)/(1<<20), s.objsBefore, s.cmd)
}
