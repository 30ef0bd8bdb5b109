package main

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestResticReport(t *testing.T) {
	r := &resticResult{
		imageSize: resticImageSize, writes: resticWrites, touched: 1274, settle: 10 * time.Second, dropped: true,
		nbd: resticSide{
			ingest:  phaseCost{wall: 10 * time.Second, client: 4 * time.Second, server: 5 * time.Second, minio: 2 * time.Second},
			restore: phaseCost{wall: 2 * time.Second},
			change:  phaseCost{wall: time.Second},
			stored:  bucketUsage{objects: 32, bytes: 1 << 30},
			added:   bucketUsage{objects: 3, bytes: 5 * resticWrites * resticWriteSize},
		},
		rst: resticSide{
			ingest:  phaseCost{wall: 20 * time.Second},
			restore: phaseCost{wall: 3 * time.Second},
			change:  phaseCost{wall: 10 * time.Second},
			stored:  bucketUsage{objects: 20, bytes: 1 << 29},
			added:   bucketUsage{objects: 10, bytes: 100 << 20},
		},
		nbdKinds:       map[string]bucketUsage{"chunks": {30, 1 << 30}, "config": {1, 10}, "locks": {1, 10}},
		nbdChangeKinds: map[string]bucketUsage{"volumes/*/journal": {2, 8 << 20}},
		versions:       []string{"restic 0.14.0 compiled with go1.19.8 on linux/amd64"},
	}
	var b bytes.Buffer
	r.write(&b)
	out := b.String()
	for _, want := range []string{
		"| ingest: wall time (s) | **10.00** | **20.00** | **2.00** |",
		"| objects per GiB stored | **32** | 40 | 1.25 |",
		"| change: added / the change (7.8 MiB) | **5.00×** |",
		"ingest ≥ 2× restic's speed: 2.00×, met; restore ≥ 2×: 1.50×, **not met**; objects per GiB stored ≤ 64: 32, met; " +
			"a snapshot after 2,000 scattered 4 KiB writes stores ≤ 5× the change: 5.00×, met.",
		"`chunks` 30 (1024.00 MiB), `config` 1 (0.00 MiB), `locks` 1 (0.00 MiB)",
		"restic 0.14.0 writes every byte",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}

	var s bytes.Buffer
	(&resticResult{skipped: "missing tools: restic"}).write(&s)
	if !strings.Contains(s.String(), "Not run: missing tools: restic.") {
		t.Errorf("skipped report: %s", s.String())
	}
}
