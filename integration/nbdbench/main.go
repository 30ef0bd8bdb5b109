// Command nbdbench compares nbdvault with restic, the file-level backup
// tool users would pick instead, through the same MinIO: ingest, restore
// and a scattered change of a 2 GiB ext4 image (restic.go). It is the part
// of make bench that needs several processes and an S3 server; the volume's
// own figures are testing.B benchmarks in nbdserver/volume, and the
// comparison with qemu-nbd and nbdkit is bench/nbd.sh.
//
// Before every timed phase the page cache is written back and dropped
// (needs root; -drop-caches) and it waits -settle (10 s): on a VM with free
// page reporting the guest hands freed memory back to the host about 2 s
// after the drop, and a phase that started sooner ran at random speeds.
// A missing tool or a failing command is an error; it prints a markdown
// report with the exact commands. Run it from the module root:
//
//	go run ./integration/nbdbench [-dir DIR] [-drop-caches=true] [-settle 10s] [-keep]
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

type config struct {
	dir        string
	dropCaches bool
	settle     time.Duration
	keep       bool
}

func main() {
	var cfg config
	flag.StringVar(&cfg.dir, "dir", os.TempDir(), "parent `directory` of the temporary work directory (image, MinIO's drive, the server's state)")
	flag.BoolVar(&cfg.dropCaches, "drop-caches", true, "sync and drop the page cache before every timed phase (needs root)")
	flag.DurationVar(&cfg.settle, "settle", 10*time.Second, "after dropping the page cache, wait this long before the timed phase")
	flag.BoolVar(&cfg.keep, "keep", false, "keep the work directory")
	flag.Parse()
	if flag.NArg() > 0 {
		fatalf("unexpected arguments: %q", flag.Args())
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

func run(ctx context.Context, cfg config, out io.Writer) error {
	if cfg.dropCaches {
		if err := dropCaches(); err != nil {
			return fmt.Errorf("%w (run as root, or pass -drop-caches=false)", err)
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
	var st unix.Statfs_t
	if err := unix.Statfs(work, &st); err != nil {
		return err
	}
	if free := int64(st.Bavail) * st.Bsize; free < resticSpaceNeeded {
		return fmt.Errorf("%s has %d MiB free; the comparison needs %d MiB", work, free>>20, resticSpaceNeeded>>20)
	}
	start, load := time.Now().UTC(), loadAverage()
	res, err := benchRestic(ctx, cfg, work)
	if err != nil {
		return fmt.Errorf("restic comparison: %w", err)
	}
	fmt.Fprintf(out, "## nbdvault next to restic\n\nRun of %s in %s. %d CPUs; load average (1, 5, 15 min) %s at the start, %s at the end.\n",
		start.Format(time.RFC3339), work, runtime.NumCPU(), load, loadAverage())
	res.write(out)
	return nil
}

// settle drops the page cache and waits cfg.settle, if the run drops
// caches.
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

// dropCaches writes dirty pages back and drops the page cache, dentries
// and inodes.
func dropCaches() error {
	unix.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0); err != nil {
		return fmt.Errorf("dropping the page cache: %w", err)
	}
	return nil
}

// loadAverage is the 1, 5 and 15 minute load averages.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); err == nil && len(f) >= 3 {
		return strings.Join(f[:3], " ")
	}
	return "?"
}

// compareFiles fails unless the files at a and b hold the same bytes.
func compareFiles(a, b string) error {
	fa, err := os.Open(a)
	if err != nil {
		return err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return err
	}
	defer fb.Close()
	const chunk = 4 << 20
	pa, pb := make([]byte, chunk), make([]byte, chunk)
	for off := int64(0); ; off += chunk {
		n, errA := io.ReadFull(fa, pa)
		m, _ := io.ReadFull(fb, pb)
		if n != m || !bytes.Equal(pa[:n], pb[:m]) {
			return fmt.Errorf("%s differs from %s in the 4 MiB at byte %d", b, a, off)
		}
		if errA != nil {
			return nil
		}
	}
}

// shellJoin quotes args for a POSIX shell where they need it.
func shellJoin(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		if a != "" && strings.Trim(a, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./=:,+@%") == "" {
			q[i] = a
		} else {
			q[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
	}
	return strings.Join(q, " ")
}

// processCPU is the user and system time of a live process, all its
// threads (/proc/PID/stat, fields 14 and 15, in USER_HZ: 100 per second).
func processCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, in parentheses, may hold spaces: count fields
	// after its closing parenthesis.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	s, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	return time.Duration(u+s) * time.Second / 100, nil
}

// processPeakRSS is the peak resident memory of process pid since it
// started (VmHWM in /proc/PID/status), in bytes.
func processPeakRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			if f := strings.Fields(rest); len(f) == 2 && f[1] == "kB" {
				n, err := strconv.ParseInt(f[0], 10, 64)
				return n << 10, err
			}
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no VmHWM", pid)
}
