package integration

// Tests of nbdvault's NBD server (nbdserver/nbd) with NBD clients written
// elsewhere: libnbd's nbdinfo and nbdcopy here, qemu-img and qemu-io in
// nbdqemu_test.go, fio's nbd engine in nbdfio_test.go, nbdfuse with a loop
// mount in nbdfuse_test.go, and TLS in nbdtls_test.go. Each test starts its
// own nbd.Server in-process (integration/nbdtest) and checks what a user
// would: the bytes read back, the sizes, flags and maps the tools print.

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

const (
	kib = int64(1) << 10
	mib = int64(1) << 20

	// cmdTimeout bounds every client command but fio's.
	cmdTimeout = 2 * time.Minute
)

// nbdinfoJSON is what `nbdinfo --json` and `nbdinfo --list --json` print.
type nbdinfoJSON struct {
	Protocol   string          `json:"protocol"`
	TLS        bool            `json:"TLS"`
	Structured bool            `json:"structured"`
	Exports    []nbdinfoExport `json:"exports"`
}

type nbdinfoExport struct {
	Name           string   `json:"export-name"`
	Description    string   `json:"description"`
	Size           int64    `json:"export-size"`
	Contexts       []string `json:"contexts"`
	IsReadOnly     bool     `json:"is_read_only"`
	CanFlush       bool     `json:"can_flush"`
	CanFUA         bool     `json:"can_fua"`
	CanTrim        bool     `json:"can_trim"`
	CanZero        bool     `json:"can_zero"`
	CanMultiConn   bool     `json:"can_multi_conn"`
	BlockMinimum   *int64   `json:"block_size_minimum"`
	BlockPreferred *int64   `json:"block_size_preferred"`
	BlockMaximum   *int64   `json:"block_size_maximum"`
}

// runNBDInfoJSON runs nbdinfo with args (which include --json) and decodes
// what it prints.
func runNBDInfoJSON(t *testing.T, nbdinfo string, args ...string) nbdinfoJSON {
	t.Helper()
	r := nbdtest.MustRun(t, cmdTimeout, nbdinfo, args...)
	var out nbdinfoJSON
	if err := json.Unmarshal([]byte(r.Stdout), &out); err != nil {
		t.Fatalf("decode the JSON nbdinfo printed: %v\n%s", err, r)
	}
	return out
}

// extent is one entry of `nbdinfo --map --json`: for base:allocation, type
// 0 is data, 1 a hole, 2 zeros, 3 a hole that reads as zeros.
type extent struct {
	Offset      int64  `json:"offset"`
	Length      int64  `json:"length"`
	Type        uint32 `json:"type"`
	Description string `json:"description"`
}

func (e extent) String() string {
	return fmt.Sprintf("[%d, %d) type %d (%s)", e.Offset, e.Offset+e.Length, e.Type, e.Description)
}

func formatMap(m []extent) string {
	var b strings.Builder
	for _, e := range m {
		fmt.Fprintf(&b, "\n\t%v", e)
	}
	return b.String()
}

// nbdMap runs `nbdinfo --map --json` on uri and checks that the extents
// tile [0, size) in order. Adjacent extents of one type are merged: how a
// server splits a run is its business.
func nbdMap(t *testing.T, nbdinfo, uri string, size int64) []extent {
	t.Helper()
	r := nbdtest.MustRun(t, cmdTimeout, nbdinfo, "--map", "--json", uri)
	var raw []extent
	if err := json.Unmarshal([]byte(r.Stdout), &raw); err != nil {
		t.Fatalf("decode the JSON map nbdinfo printed: %v\n%s", err, r)
	}
	var m []extent
	var next int64
	for _, e := range raw {
		if e.Offset != next || e.Length <= 0 {
			t.Fatalf("map of %s: extent %v does not start where the previous one ended (%d):%s", uri, e, next, formatMap(raw))
		}
		next = e.Offset + e.Length
		if n := len(m); n > 0 && m[n-1].Type == e.Type {
			m[n-1].Length += e.Length
			continue
		}
		m = append(m, e)
	}
	if next != size {
		t.Fatalf("map of %s ends at %d, want the export size %d:%s", uri, next, size, formatMap(raw))
	}
	return m
}

// wantMap is the expected map of an export of size bytes where exactly
// the data regions (sorted, not touching) were ever written: data (0) there,
// holes that read as zeros (3) elsewhere.
func wantMap(size int64, data ...region) []extent {
	var m []extent
	var off int64
	add := func(end int64, typ uint32, desc string) {
		if end > off {
			m = append(m, extent{Offset: off, Length: end - off, Type: typ, Description: desc})
			off = end
		}
	}
	for _, d := range data {
		add(d.off, 3, "hole,zero")
		add(d.off+d.len, 0, "data")
	}
	add(size, 3, "hole,zero")
	return m
}

// sameMap compares maps by offset, length and type.
func sameMap(t *testing.T, want, got []extent, what string) {
	t.Helper()
	eq := slices.EqualFunc(want, got, func(a, b extent) bool {
		return a.Offset == b.Offset && a.Length == b.Length && a.Type == b.Type
	})
	if !eq {
		t.Errorf("%s: nbdinfo --map shows%s\nwant%s", what, formatMap(got), formatMap(want))
	}
}

type region struct{ off, len int64 }

// TestNBDInfo checks what nbdinfo shows of three exports: a sparse file
// with some regions written, a sparse memory export, and a read-only file.
func TestNBDInfo(t *testing.T) {
	nbdinfo := nbdtest.Tool(t, "nbdinfo")

	const diskSize = 16 * mib
	diskData := []region{{1 * mib, 1 * mib}, {5 * mib, 192 * kib}, {15 * mib, 1 * mib}}
	diskPath := nbdtest.SparseFile(t, "disk.img", diskSize)
	for i, d := range diskData {
		nbdtest.WriteAt(t, diskPath, nbdtest.RandomBytes(uint64(i+1), int(d.len)), d.off)
	}

	// Mem allocates 64 KiB pages on first write.
	const memSize = 8 * mib
	memData := []region{{64 * kib, 128 * kib}, {4 * mib, 64 * kib}}
	mem := nbd.NewMem(memSize)
	for i, d := range memData {
		require.NoError(t, mem.WriteAt(t.Context(), nbdtest.RandomBytes(uint64(10+i), int(d.len)), d.off, false))
	}

	const roSize = 4 * mib
	roPath := nbdtest.SparseFile(t, "ro.img", roSize)
	nbdtest.WriteAt(t, roPath, nbdtest.RandomBytes(20, int(mib)), 0)

	// 1 TiB, sparse: offsets and extents past 32 bits. Data straddles
	// 4 GiB and ends the export.
	const bigSize = 1 << 40
	bigData := []region{{4<<30 - 64*kib, 128 * kib}, {bigSize - mib, mib}}
	bigPath := nbdtest.SparseFile(t, "big.img", bigSize)
	for i, d := range bigData {
		nbdtest.WriteAt(t, bigPath, nbdtest.RandomBytes(uint64(30+i), int(d.len)), d.off)
	}

	srv := nbdtest.StartUnix(t, &nbd.Server{Exports: nbd.NewExportMap(
		&nbd.Export{Name: "disk", Description: "first disk", Backend: nbdtest.OpenFile(t, diskPath, false)},
		&nbd.Export{Name: "big", Description: "one tebibyte", Backend: nbdtest.OpenFile(t, bigPath, false)},
		&nbd.Export{Name: "scratch", Description: "scratch space in memory", Backend: mem},
		&nbd.Export{Name: "ro", Description: "a read-only disk", Backend: nbdtest.OpenFile(t, roPath, true), ReadOnly: true},
		&nbd.Export{Name: "blocks", Description: "own block sizes", Backend: nbd.NewMem(mib),
			MinBlock: 512, PreferredBlock: 64 << 10, MaxPayload: 1 << 20},
	)})

	t.Run("list", func(t *testing.T) {
		type entry struct {
			Name, Description string
			Size              int64
			ReadOnly          bool
		}
		want := []entry{
			{"big", "one tebibyte", bigSize, false},
			{"blocks", "own block sizes", mib, false},
			{"disk", "first disk", diskSize, false},
			{"ro", "a read-only disk", roSize, true},
			{"scratch", "scratch space in memory", memSize, false},
		}
		out := runNBDInfoJSON(t, nbdinfo, "--list", "--json", srv.URI(""))
		var got []entry
		for _, e := range out.Exports {
			got = append(got, entry{e.Name, e.Description, e.Size, e.IsReadOnly})
		}
		slices.SortFunc(got, func(a, b entry) int { return strings.Compare(a.Name, b.Name) })
		assert.Equal(t, want, got, "nbdinfo --list --json")

		text := nbdtest.MustRun(t, cmdTimeout, nbdinfo, "--list", srv.URI(""))
		for _, e := range want {
			assert.Contains(t, text.Stdout, fmt.Sprintf("export=%q:", e.Name), "nbdinfo --list")
			assert.Contains(t, text.Stdout, "description: "+e.Description, "nbdinfo --list")
		}
	})

	t.Run("json", func(t *testing.T) {
		out := runNBDInfoJSON(t, nbdinfo, "--json", srv.URI("disk"))
		assert.Equal(t, "newstyle-fixed", out.Protocol)
		assert.False(t, out.TLS, "TLS")
		assert.True(t, out.Structured, "structured replies negotiated")
		require.Len(t, out.Exports, 1)
		e := out.Exports[0]
		assert.Equal(t, "disk", e.Name)
		assert.Equal(t, "first disk", e.Description, "NBD_INFO_DESCRIPTION")
		assert.Equal(t, diskSize, e.Size, "export-size")
		assert.Contains(t, e.Contexts, "base:allocation")
		assert.False(t, e.IsReadOnly, "is_read_only")
		assert.True(t, e.CanFlush, "can_flush")
		assert.True(t, e.CanFUA, "can_fua")
		assert.True(t, e.CanTrim, "can_trim")
		assert.True(t, e.CanZero, "can_zero")
		assert.True(t, e.CanMultiConn, "can_multi_conn")
		// NBD_INFO_BLOCK_SIZE with the Export defaults.
		if assert.NotNil(t, e.BlockMinimum, "block_size_minimum (NBD_INFO_BLOCK_SIZE)") {
			assert.EqualValues(t, 1, *e.BlockMinimum, "block_size_minimum")
		}
		if assert.NotNil(t, e.BlockPreferred, "block_size_preferred (NBD_INFO_BLOCK_SIZE)") {
			assert.EqualValues(t, 4096, *e.BlockPreferred, "block_size_preferred")
		}
		if assert.NotNil(t, e.BlockMaximum, "block_size_maximum (NBD_INFO_BLOCK_SIZE)") {
			assert.EqualValues(t, nbd.DefaultMaxPayload, *e.BlockMaximum, "block_size_maximum")
		}

		// An export's own block sizes.
		out = runNBDInfoJSON(t, nbdinfo, "--json", srv.URI("blocks"))
		require.Len(t, out.Exports, 1)
		e = out.Exports[0]
		for _, c := range []struct {
			name string
			got  *int64
			want int64
		}{{"block_size_minimum", e.BlockMinimum, 512}, {"block_size_preferred", e.BlockPreferred, 64 << 10}, {"block_size_maximum", e.BlockMaximum, 1 << 20}} {
			if assert.NotNil(t, c.got, "%s of export blocks", c.name) {
				assert.Equal(t, c.want, *c.got, "%s of export blocks", c.name)
			}
		}

		size := nbdtest.MustRun(t, cmdTimeout, nbdinfo, "--size", srv.URI("scratch"))
		assert.Equal(t, fmt.Sprint(memSize), strings.TrimSpace(size.Stdout), "nbdinfo --size of scratch")
		size = nbdtest.MustRun(t, cmdTimeout, nbdinfo, "--size", srv.URI("big"))
		assert.Equal(t, fmt.Sprint(int64(bigSize)), strings.TrimSpace(size.Stdout), "nbdinfo --size of big")
	})

	t.Run("can", func(t *testing.T) {
		// nbdinfo --can/--is exit 0 for yes, 2 for no, anything else on
		// error.
		for _, export := range []string{"disk", "scratch"} {
			for _, can := range []string{"flush", "fua", "trim", "zero", "multi-conn", "write", "connect"} {
				r := nbdtest.Run(t, cmdTimeout, nbdinfo, "--can", can, srv.URI(export))
				assert.Equal(t, 0, r.ExitCode, "export %s should say it can %s (exit 0):\n%s", export, can, r)
			}
			r := nbdtest.Run(t, cmdTimeout, nbdinfo, "--is", "read-only", srv.URI(export))
			assert.Equal(t, 2, r.ExitCode, "export %s is not read-only (exit 2):\n%s", export, r)
		}
	})

	t.Run("readonly", func(t *testing.T) {
		r := nbdtest.Run(t, cmdTimeout, nbdinfo, "--is", "read-only", srv.URI("ro"))
		assert.Equal(t, 0, r.ExitCode, "export ro is read-only (exit 0):\n%s", r)
		r = nbdtest.Run(t, cmdTimeout, nbdinfo, "--can", "write", srv.URI("ro"))
		assert.Equal(t, 2, r.ExitCode, "export ro cannot be written (exit 2):\n%s", r)
		out := runNBDInfoJSON(t, nbdinfo, "--json", srv.URI("ro"))
		require.Len(t, out.Exports, 1)
		assert.True(t, out.Exports[0].IsReadOnly, "is_read_only")
		assert.Equal(t, roSize, out.Exports[0].Size, "export-size")
	})

	t.Run("map", func(t *testing.T) {
		sameMap(t, wantMap(diskSize, diskData...), nbdMap(t, nbdinfo, srv.URI("disk"), diskSize), "sparse file")
		sameMap(t, wantMap(memSize, memData...), nbdMap(t, nbdinfo, srv.URI("scratch"), memSize), "memory export")
		sameMap(t, wantMap(roSize, region{0, mib}), nbdMap(t, nbdinfo, srv.URI("ro"), roSize), "read-only file")
		// A block status extent is at most 4 GiB - 1 on the wire: the
		// server must split the holes of this one.
		sameMap(t, wantMap(bigSize, bigData...), nbdMap(t, nbdinfo, srv.URI("big"), bigSize), "1 TiB sparse file")
	})

	t.Run("unknown export", func(t *testing.T) {
		// NBD_REP_ERR_UNKNOWN, which libnbd reports as ENOENT.
		r := nbdtest.Run(t, cmdTimeout, nbdinfo, srv.URI("nope"))
		assert.NotEqual(t, 0, r.ExitCode, "nbdinfo on a missing export must fail:\n%s", r)
		assert.Contains(t, r.Stderr, "No such file or directory", "error for a missing export:\n%s", r)
		assert.Contains(t, r.Stderr, "nope", "error for a missing export:\n%s", r)
	})
}

// TestNBDCopy copies files into exports and back out with nbdcopy, with
// several connections and many requests in flight, and compares bytes.
func TestNBDCopy(t *testing.T) {
	tools := nbdtest.Tools(t, "nbdcopy", "nbdinfo")
	nbdcopy := tools["nbdcopy"]
	// --threads too: nbdcopy opens no more connections than threads, and
	// defaults to one thread per core.
	parallel := []string{"--connections", "4", "--threads", "4", "--requests", "64"}

	t.Run("random", func(t *testing.T) {
		const size = 64 * mib
		dir := t.TempDir()
		src := filepath.Join(dir, "src.img")
		want := nbdtest.RandomBytes(1, int(size))
		require.NoError(t, os.WriteFile(src, want, 0o600))

		backing := nbdtest.SparseFile(t, "disk.img", size)
		srv := nbdtest.StartUnix(t, &nbd.Server{Exports: nbd.NewExportMap(
			&nbd.Export{Name: "disk", Backend: nbdtest.OpenFile(t, backing, false)},
		)})

		before := srv.Accepted()
		nbdtest.MustRun(t, cmdTimeout, nbdcopy, append(parallel, "--flush", src, srv.URI("disk"))...)
		assert.GreaterOrEqual(t, srv.Accepted()-before, int64(4),
			"nbdcopy --connections 4 should open 4 connections to a server that advertises multi-conn")
		nbdtest.SameBytes(t, want, nbdtest.ReadFile(t, backing), "the export's file after nbdcopy into it")

		out := filepath.Join(dir, "out.img")
		nbdtest.MustRun(t, cmdTimeout, nbdcopy, append(parallel, srv.URI("disk"), out)...)
		nbdtest.SameBytes(t, want, nbdtest.ReadFile(t, out), "nbdcopy out of the export")

		// The largest requests the export takes (block_size_maximum, 32 MiB),
		// both ways, on one connection.
		largest := []string{"--connections", "1", "--request-size", fmt.Sprint(nbd.DefaultMaxPayload), "--queue-size", fmt.Sprint(2 * nbd.DefaultMaxPayload)}
		rev := slices.Clone(want)
		slices.Reverse(rev)
		require.NoError(t, os.WriteFile(src, rev, 0o600))
		nbdtest.MustRun(t, cmdTimeout, nbdcopy, append(largest, src, srv.URI("disk"))...)
		nbdtest.SameBytes(t, rev, nbdtest.ReadFile(t, backing), "the export's file after nbdcopy of 32 MiB requests")
		outMax := filepath.Join(dir, "out-max.img")
		nbdtest.MustRun(t, cmdTimeout, nbdcopy, append(largest, srv.URI("disk"), outMax)...)
		nbdtest.SameBytes(t, rev, nbdtest.ReadFile(t, outMax), "nbdcopy of 32 MiB requests out of the export")
	})

	t.Run("sparse", func(t *testing.T) {
		const size = 32 * mib
		data := []region{{0, mib}, {8 * mib, 512 * kib}, {31 * mib, mib}}
		src := nbdtest.SparseFile(t, "sparse.img", size)
		want := make([]byte, size)
		for i, d := range data {
			p := nbdtest.RandomBytes(uint64(100+i), int(d.len))
			nbdtest.WriteAt(t, src, p, d.off)
			copy(want[d.off:], p)
		}

		// The export starts full of 0xff, so the holes only read as zeros
		// if nbdcopy's zeroing reached the backend.
		mem := nbd.NewMem(size)
		require.NoError(t, mem.WriteAt(t.Context(), slices.Repeat([]byte{0xff}, int(size)), 0, false))
		srv := nbdtest.StartTCP(t, &nbd.Server{Exports: nbd.NewExportMap(
			&nbd.Export{Name: "mem", Backend: mem},
		)})

		nbdtest.MustRun(t, cmdTimeout, nbdcopy, append(parallel, src, srv.URI("mem"))...)
		got := make([]byte, size)
		require.NoError(t, mem.ReadAt(t.Context(), got, 0))
		nbdtest.SameBytes(t, want, got, "the export after nbdcopy of a sparse file")

		out := filepath.Join(t.TempDir(), "out.img")
		nbdtest.MustRun(t, cmdTimeout, nbdcopy, append(parallel, srv.URI("mem"), out)...)
		nbdtest.SameBytes(t, want, nbdtest.ReadFile(t, out), "nbdcopy of the export back out")

		// The source's holes read as zeros on the export too (type 2 or 3),
		// and its data as data.
		m := nbdMap(t, tools["nbdinfo"], srv.URI("mem"), size)
		isData := func(off int64) bool {
			for _, d := range data {
				if off >= d.off && off < d.off+d.len {
					return true
				}
			}
			return false
		}
		for _, e := range m {
			for off := e.Offset; off < e.Offset+e.Length; off += 64 * kib {
				if isData(off) && e.Type != 0 {
					t.Errorf("offset %d holds data but the map says %v", off, e)
					break
				}
				if !isData(off) && e.Type&nbd.StateZero == 0 {
					t.Errorf("offset %d is a hole of the source but the map says %v, not zero", off, e)
					break
				}
			}
		}
		if t.Failed() {
			t.Logf("map:%s", formatMap(m))
		}
	})
}
