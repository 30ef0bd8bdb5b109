package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// tool is an external program the benchmark needs, with the command that
// prints its version.
type tool struct {
	name    string
	version []string
	// firstLine keeps only the first line of the version output.
	firstLine bool
}

// checkTools fails unless every tool the selected servers need is there,
// and returns their versions for the report.
func checkTools(ctx context.Context, servers []string) ([]string, error) {
	tools := []tool{
		{"nbdcopy", []string{"nbdcopy", "--version"}, true},
		{"nbdinfo", []string{"nbdinfo", "--version"}, true},
		{"fio", []string{"fio", "--version"}, true},
	}
	for _, s := range servers {
		switch s {
		case "qemu-nbd":
			tools = append(tools, tool{"qemu-nbd", []string{"qemu-nbd", "--version"}, true})
		case "nbdkit":
			tools = append(tools, tool{"nbdkit", []string{"nbdkit", "--version"}, true})
		}
	}
	var versions, missing []string
	for _, t := range tools {
		if _, err := exec.LookPath(t.name); err != nil {
			missing = append(missing, t.name)
			continue
		}
		out, err := exec.CommandContext(ctx, t.version[0], t.version[1:]...).CombinedOutput()
		if err != nil {
			return nil, fmt.Errorf("%s: %v: %s", shellJoin(t.version), err, out)
		}
		v := strings.TrimSpace(string(out))
		if t.firstLine {
			v, _, _ = strings.Cut(v, "\n")
		}
		versions = append(versions, v)
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("missing tools: %s (run `make deps`: Debian packages libnbd-bin, qemu-utils, nbdkit, fio)",
			strings.Join(missing, ", "))
	}
	// fio must have been built with its nbd engine, and nbdkit with the
	// file plugin.
	if out, err := exec.CommandContext(ctx, "fio", "--enghelp=nbd").CombinedOutput(); err != nil || !bytes.Contains(out, []byte("uri")) {
		return nil, fmt.Errorf("fio has no nbd ioengine (fio --enghelp=nbd: %v: %s)", err, out)
	}
	for _, s := range servers {
		if s == "nbdkit" {
			if out, err := exec.CommandContext(ctx, "nbdkit", "file", "--dump-plugin").CombinedOutput(); err != nil {
				return nil, fmt.Errorf("nbdkit has no file plugin (nbdkit file --dump-plugin: %v: %s)", err, out)
			}
		}
	}
	return versions, nil
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

// checkSpace fails unless dir's file system has need bytes free, and
// returns its type.
func checkSpace(dir string, need int64) (string, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return "", err
	}
	if free := int64(st.Bavail) * st.Bsize; free < need+need/10 {
		return "", fmt.Errorf("%s has %d MiB free; the benchmark needs %d MiB", dir, free>>20, (need+need/10)>>20)
	}
	switch st.Type {
	case unix.EXT4_SUPER_MAGIC:
		return "ext4", nil
	case unix.XFS_SUPER_MAGIC:
		return "xfs", nil
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs", nil
	case unix.TMPFS_MAGIC:
		return "tmpfs", nil
	case unix.OVERLAYFS_SUPER_MAGIC:
		return "overlayfs", nil
	}
	return fmt.Sprintf("file system type %#x", st.Type), nil
}

func kernelRelease() string {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return "?"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// loadAverage is the 1, 5 and 15 minute load averages.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func writeRandomFile(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	buf := make([]byte, 4<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		p := buf[:min(int64(len(buf)), size-off)]
		rand.Read(p)
		if _, err := f.Write(p); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func createSparse(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// compareFiles fails unless the files at a and b hold the same bytes.
func compareFiles(a, b string) error {
	fb, err := os.Open(b)
	if err != nil {
		return err
	}
	defer fb.Close()
	return compareReader(a, fb, b)
}

// compareReader fails unless r yields exactly the bytes of the file at
// path. what names r in the error.
func compareReader(path string, r io.Reader, what string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	const chunk = 4 << 20
	want, got := make([]byte, chunk), make([]byte, chunk)
	var off int64
	for {
		n, werr := io.ReadFull(f, want)
		m, gerr := io.ReadFull(r, got[:n])
		if m < n || !bytes.Equal(want[:n], got[:n]) {
			i := 0
			for i < m && want[i] == got[i] {
				i++
			}
			return fmt.Errorf("%s differs from %s at byte %d (read error: %v)", what, path, off+int64(i), gerr)
		}
		off += int64(n)
		if werr == io.EOF || werr == io.ErrUnexpectedEOF {
			break
		}
		if werr != nil {
			return werr
		}
	}
	if n, _ := r.Read(got[:1]); n > 0 {
		return fmt.Errorf("%s is longer than %s (%d bytes)", what, path, off)
	}
	return nil
}

// compareCommandOutput runs args and fails unless their stdout equals the
// file at path.
func compareCommandOutput(ctx context.Context, args []string, path string) error {
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	cerr := compareReader(path, bufio.NewReaderSize(out, 1<<20), "output of "+shellJoin(args))
	if cerr != nil {
		cmd.Process.Kill()
	}
	if err := cmd.Wait(); err != nil && cerr == nil {
		return fmt.Errorf("%s: %v: %s", shellJoin(args), err, stderr.Bytes())
	}
	return cerr
}

// timeCommand runs args and returns how long they took, from start to
// exit.
func timeCommand(ctx context.Context, args []string) (time.Duration, error) {
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	err := cmd.Run()
	d := time.Since(start)
	if err != nil {
		return 0, fmt.Errorf("%s: %v: %s", shellJoin(args), err, out.Bytes())
	}
	return d, nil
}

// fioResult is the read or write side of fio's job.
type fioResult struct {
	IOPS  float64
	IOs   int64
	Bytes int64         // bytes read or written
	Time  time.Duration // fio's runtime of the job
}

// MBps is the job's throughput in MB/s (10^6 bytes).
func (r fioResult) MBps() float64 { return mbps(r.Bytes, r.Time) }

// runFio runs fio with JSON output and returns the job's read or write
// side.
func runFio(ctx context.Context, args []string, rw string) (fioResult, error) {
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return fioResult{}, fmt.Errorf("%s: %v: %s%s", shellJoin(args), err, stderr.Bytes(), stdout.Bytes())
	}
	r, err := parseFio(stdout.Bytes(), rw)
	if err != nil {
		return fioResult{}, fmt.Errorf("%s: %v; stderr: %s", shellJoin(args), err, stderr.Bytes())
	}
	return r, nil
}

type fioOutput struct {
	Jobs []struct {
		Jobname string `json:"jobname"`
		Error   int    `json:"error"`
		Read    fioRW  `json:"read"`
		Write   fioRW  `json:"write"`
	} `json:"jobs"`
}

type fioRW struct {
	IOPS      float64 `json:"iops"`
	TotalIOs  int64   `json:"total_ios"`
	IOBytes   int64   `json:"io_bytes"`
	RuntimeMS int64   `json:"runtime"`
}

// parseFio reads the result of fio's single job from its JSON output,
// which some versions precede with lines of text. rw is the job's --rw:
// read and randread report the read side, the others the write side.
func parseFio(out []byte, rw string) (fioResult, error) {
	i := bytes.IndexByte(out, '{')
	if i < 0 {
		return fioResult{}, errors.New("no JSON in fio's output")
	}
	var o fioOutput
	if err := json.Unmarshal(out[i:], &o); err != nil {
		return fioResult{}, fmt.Errorf("fio's JSON output: %v", err)
	}
	if len(o.Jobs) != 1 {
		return fioResult{}, fmt.Errorf("fio reported %d jobs, want 1", len(o.Jobs))
	}
	j := o.Jobs[0]
	if j.Error != 0 {
		return fioResult{}, fmt.Errorf("fio job %s: error %d", j.Jobname, j.Error)
	}
	side := j.Write
	if rw == "randread" || rw == "read" {
		side = j.Read
	}
	if side.TotalIOs == 0 || side.IOPS <= 0 || side.RuntimeMS <= 0 {
		return fioResult{}, fmt.Errorf("fio job %s did no %s I/O", j.Jobname, rw)
	}
	return fioResult{IOPS: side.IOPS, IOs: side.TotalIOs, Bytes: side.IOBytes,
		Time: time.Duration(side.RuntimeMS) * time.Millisecond}, nil
}

// advertised summarises what the server offers the clients (nbdinfo), the
// things that change how nbdcopy and fio drive it.
func advertised(ctx context.Context, uri string) (string, error) {
	args := []string{"nbdinfo", "--json", uri}
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%s: %v: %s", shellJoin(args), err, out)
	}
	return summariseNbdinfo(out)
}

func summariseNbdinfo(out []byte) (string, error) {
	var info struct {
		Structured bool `json:"structured"`
		Exports    []struct {
			Size      int64    `json:"export-size"`
			MultiConn bool     `json:"can_multi_conn"`
			FUA       bool     `json:"can_fua"`
			Trim      bool     `json:"can_trim"`
			Zero      bool     `json:"can_zero"`
			Contexts  []string `json:"contexts"`
			MinBlock  *int64   `json:"block_size_minimum"`
			PrefBlock *int64   `json:"block_size_preferred"`
			MaxBlock  *int64   `json:"block_size_maximum"`
		} `json:"exports"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		return "", fmt.Errorf("nbdinfo --json: %v", err)
	}
	if len(info.Exports) != 1 {
		return "", fmt.Errorf("nbdinfo --json: %d exports, want 1", len(info.Exports))
	}
	e := info.Exports[0]
	yn := func(b bool) string {
		if b {
			return "yes"
		}
		return "no"
	}
	blocks := "not advertised"
	if e.MinBlock != nil && e.PrefBlock != nil && e.MaxBlock != nil {
		blocks = fmt.Sprintf("%d/%d/%d", *e.MinBlock, *e.PrefBlock, *e.MaxBlock)
	}
	return fmt.Sprintf("size %d, multi-conn %s, structured replies %s, FUA %s, trim %s, zero %s, contexts %s, block sizes min/preferred/max %s",
		e.Size, yn(e.MultiConn), yn(info.Structured), yn(e.FUA), yn(e.Trim), yn(e.Zero),
		strings.Join(e.Contexts, ","), blocks), nil
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
