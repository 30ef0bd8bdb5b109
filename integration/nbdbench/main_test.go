package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseFio(t *testing.T) {
	out := []byte(`fio: connected to NBD server
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "randwrite",
      "error" : 0,
      "read" : {"iops" : 0.000000, "total_ios" : 0, "runtime" : 0},
      "write" : {"iops" : 116416.194602, "total_ios" : 349365, "io_bytes" : 1431001088, "runtime" : 3001}
    }
  ]
}`)
	r, err := parseFio(out, "randwrite")
	if err != nil || r != (fioResult{IOPS: 116416.194602, IOs: 349365, Bytes: 1431001088, Time: 3001 * time.Millisecond}) {
		t.Fatalf("parseFio(randwrite) = %+v, %v", r, err)
	}
	if got := r.MBps(); got < 476.8 || got > 476.9 {
		t.Errorf("MBps = %v, want 476.84", got)
	}
	if _, err := parseFio(out, "read"); err == nil {
		t.Fatal("parseFio(read) of a write-only job: no error")
	}
	if _, err := parseFio(out, "randread"); err == nil {
		t.Fatal("parseFio(randread) of a write-only job: no error")
	}
	if _, err := parseFio([]byte(`{"jobs":[{"jobname":"x","error":5,"write":{"iops":1,"total_ios":1,"runtime":1}}]}`), "randwrite"); err == nil {
		t.Fatal("parseFio of a job with an error: no error")
	}
	if _, err := parseFio([]byte("fio: engine nbd not loadable"), "randread"); err == nil {
		t.Fatal("parseFio without JSON: no error")
	}
}

func TestSummariseNbdinfo(t *testing.T) {
	got, err := summariseNbdinfo([]byte(`{"protocol":"newstyle-fixed","structured":true,"exports":[{"export-name":"bench",
		"contexts":["base:allocation"],"can_fua":true,"can_multi_conn":true,"can_trim":true,"can_zero":false,
		"block_size_minimum":1,"block_size_preferred":4096,"block_size_maximum":33554432,"export-size":1073741824}]}`))
	want := "size 1073741824, multi-conn yes, structured replies yes, FUA yes, trim yes, zero no, contexts base:allocation, block sizes min/preferred/max 1/4096/33554432"
	if err != nil || got != want {
		t.Fatalf("summariseNbdinfo = %q, %v; want %q", got, err, want)
	}
}

func TestReportTable(t *testing.T) {
	r := &report{
		servers: []string{"nbdvault", "qemu-nbd", "nbdkit"},
		results: map[string]map[string][]float64{
			"nbdvault": {"seqwrite": {900, 1000, 1100}, "seqread": {2000}},
			"qemu-nbd": {"seqwrite": {500, 450, 400}, "seqread": {1000}},
			"nbdkit":   {"seqwrite": {1000, 1000, 1000}, "seqread": {4000}},
		},
	}
	var b bytes.Buffer
	r.writeTable(&b)
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	wantHeader := "| workload | nbdvault | qemu-nbd | nbdkit | nbdvault/nbdkit | nbdvault/qemu-nbd |"
	if lines[0] != wantHeader {
		t.Errorf("header %q, want %q", lines[0], wantHeader)
	}
	if want := "| sequential write, nbdcopy file → NBD (MB/s) | 1000 (900–1100) | 450 (400–500) | 1000 (1000–1000) | 1.00 | 2.22 |"; lines[2] != want {
		t.Errorf("row %q, want %q", lines[2], want)
	}
	if want := "| sequential read, nbdcopy NBD → null: (MB/s) | 2000 | 1000 | 4000 | 0.50 | 2.00 |"; lines[3] != want {
		t.Errorf("row %q, want %q", lines[3], want)
	}
	if want := "| 1 MiB sequential write, fio QD32 (MB/s) | – | – | – | – | – |"; lines[4] != want {
		t.Errorf("row %q, want %q", lines[4], want)
	}
	if len(lines) != 2+len(workloads) {
		t.Errorf("%d lines, want %d", len(lines), 2+len(workloads))
	}

	// The volume gets ratio columns of its own.
	r.servers = []string{"volume", "qemu-nbd", "nbdkit"}
	r.results["volume"] = map[string][]float64{"seqwrite": {500}}
	b.Reset()
	r.writeTable(&b)
	lines = strings.Split(strings.TrimSpace(b.String()), "\n")
	if want := "| workload | volume | qemu-nbd | nbdkit | volume/nbdkit | volume/qemu-nbd |"; lines[0] != want {
		t.Errorf("header %q, want %q", lines[0], want)
	}
	if want := "| sequential write, nbdcopy file → NBD (MB/s) | 500 | 450 (400–500) | 1000 (1000–1000) | 0.50 | 1.11 |"; lines[2] != want {
		t.Errorf("row %q, want %q", lines[2], want)
	}
}

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{{[]float64{3}, 3}, {[]float64{3, 1, 2}, 2}, {[]float64{4, 1, 3, 2}, 2.5}} {
		if got := median(c.in); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}

func TestMBps(t *testing.T) {
	if got := mbps(1<<30, 2*time.Second); got < 536.8 || got > 536.9 {
		t.Errorf("mbps(1 GiB, 2s) = %v, want 536.87", got)
	}
}

func TestShellJoin(t *testing.T) {
	got := shellJoin([]string{"nbdcopy", "/tmp/a b", "nbd+unix:///bench?socket=/tmp/s", "it's", "null:"})
	want := `nbdcopy '/tmp/a b' 'nbd+unix:///bench?socket=/tmp/s' 'it'\''s' null:`
	if got != want {
		t.Errorf("shellJoin = %s, want %s", got, want)
	}
}

func TestCompare(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	data := bytes.Repeat([]byte("0123456789abcdef"), 600000) // more than one chunk
	os.WriteFile(a, data, 0o644)
	os.WriteFile(b, data, 0o644)
	if err := compareFiles(a, b); err != nil {
		t.Fatalf("equal files: %v", err)
	}
	data[5<<20+7] ^= 1
	os.WriteFile(b, data, 0o644)
	if err := compareFiles(a, b); err == nil || !strings.Contains(err.Error(), "at byte 5242887") {
		t.Fatalf("a flipped bit: %v", err)
	}
	if err := compareReader(a, bytes.NewReader(data[:len(data)-1]), "short"); err == nil {
		t.Fatal("a short stream: no error")
	}
	data[5<<20+7] ^= 1
	if err := compareReader(a, bytes.NewReader(append(data, 0)), "long"); err == nil {
		t.Fatal("a long stream: no error")
	}
}
