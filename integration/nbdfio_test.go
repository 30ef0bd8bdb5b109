package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// fioJSON is the part of fio's --output-format=json report the test reads.
type fioJSON struct {
	Version string `json:"fio version"`
	Jobs    []struct {
		Name  string `json:"jobname"`
		Error int    `json:"error"`
		Read  struct {
			IOBytes   int64 `json:"io_bytes"`
			TotalIOs  int64 `json:"total_ios"`
			ShortIOs  int64 `json:"short_ios"`
			DroppedIO int64 `json:"drop_ios"`
		} `json:"read"`
		Write struct {
			IOBytes   int64 `json:"io_bytes"`
			TotalIOs  int64 `json:"total_ios"`
			ShortIOs  int64 `json:"short_ios"`
			DroppedIO int64 `json:"drop_ios"`
		} `json:"write"`
	} `json:"jobs"`
}

// TestFio writes an export with fio's nbd engine, 32 requests in flight,
// and has fio verify every block (crc32c) by reading it back.
func TestFio(t *testing.T) {
	fio := nbdtest.Tool(t, "fio")
	const size = 64 * mib

	for _, tc := range []struct {
		name, rw, bs string
		file         bool // nbd.File, else nbd.Mem
	}{
		{name: "randwrite file", rw: "randwrite", bs: "--bs=4k", file: true},
		{name: "randwrite mixed sizes mem", rw: "randwrite", bs: "--bsrange=4k-256k"},
		{name: "sequential write file", rw: "write", bs: "--bs=128k", file: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var backend nbd.Backend = nbd.NewMem(size)
			if tc.file {
				backend = nbdtest.OpenFile(t, nbdtest.SparseFile(t, "disk.img", size), false)
			}
			srv := nbdtest.StartTCP(t, &nbd.Server{Exports: nbd.NewExportMap(
				&nbd.Export{Name: "fio", Backend: backend},
			)})

			report := filepath.Join(t.TempDir(), "fio.json")
			r := nbdtest.Run(t, 5*time.Minute, fio,
				"--name=nbdvault",
				"--ioengine=nbd",
				"--uri="+srv.URI("fio"),
				"--rw="+tc.rw,
				tc.bs,
				"--iodepth=32",
				"--size="+fmt.Sprint(size),
				"--verify=crc32c",
				"--verify_fatal=1",
				"--verify_state_save=0", // no state file in the package directory

				"--output-format=json",
				"--output="+report,
			)
			out, err := os.ReadFile(report)
			require.NoError(t, err, "fio wrote no report:\n%s", r)
			// fio appends its verify errors after the JSON.
			dec := json.NewDecoder(bytes.NewReader(out))
			var rep fioJSON
			require.NoError(t, dec.Decode(&rep), "decode fio's report:\n%s\n%s", out, r)
			rest := string(out[dec.InputOffset():])

			assert.True(t, r.OK(), "fio must exit 0:\n%s\n%s", r, rest)
			assert.NotContains(t, rest+r.Output(), "verify:", "fio reported verify errors")
			require.Len(t, rep.Jobs, 1)
			job := rep.Jobs[0]
			assert.Zero(t, job.Error, "fio job error (errno)")
			assert.EqualValues(t, size, job.Write.IOBytes, "bytes fio wrote")
			assert.EqualValues(t, size, job.Read.IOBytes, "bytes fio read back to verify")
			assert.Zero(t, job.Write.ShortIOs+job.Read.ShortIOs, "short I/Os")
			if t.Failed() {
				t.Logf("fio report:\n%s", strings.TrimSpace(string(out)))
			}
		})
	}
}
