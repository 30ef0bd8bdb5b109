//go:build linux

package client

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// backend is a real server configuration the common tests run against.
type backend struct {
	name   string
	start  func(t *testing.T) string // returns the address
	opts   Options
	simple bool // no structured replies
}

var backends = []backend{
	{name: "nbdkit-memory", start: func(t *testing.T) string {
		return startNbdkit(t, "memory", strconv.Itoa(exportSize))
	}},
	{name: "nbdkit-file", start: func(t *testing.T) string {
		return startNbdkit(t, "file", sparseFile(t, t.TempDir(), exportSize))
	}},
	{name: "nbdkit-no-sr", simple: true, start: func(t *testing.T) string {
		return startNbdkit(t, "--no-sr", "memory", strconv.Itoa(exportSize))
	}},
	{name: "qemu-nbd", start: func(t *testing.T) string {
		return startQemuNBD(t)
	}},
	{name: "qemu-nbd-simple", simple: true, opts: Options{SimpleReplies: true}, start: func(t *testing.T) string {
		return startQemuNBD(t)
	}},
	{name: "nbdvault-mem", start: func(t *testing.T) string {
		return startNbdvault(t, nbd.NewMem(exportSize))
	}},
	{name: "nbdvault-file", start: nbdvaultFile},
	{name: "nbdvault-simple", simple: true, opts: Options{SimpleReplies: true}, start: func(t *testing.T) string {
		return startNbdvault(t, nbd.NewMem(exportSize))
	}},
}

// forEachBackend runs test against a fresh server of each backend.
func forEachBackend(t *testing.T, test func(t *testing.T, b backend, c *Conn)) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			c := mustDial(t, b.start(t), b.opts)
			test(t, b, c)
		})
	}
}

func randomBytes(r *rand.Rand, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(r.Uint32())
	}
	return p
}

func TestNegotiatedFeatures(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend, c *Conn) {
		assert.Equal(t, int64(exportSize), c.Size())
		assert.Equal(t, !b.simple, c.Structured())
		if b.simple {
			assert.Empty(t, c.MetaContexts())
		} else {
			assert.Equal(t, []string{nbd.ContextBaseAllocation}, c.MetaContexts())
		}
		want := nbd.FlagHasFlags | nbd.FlagSendFlush | nbd.FlagSendFUA | nbd.FlagSendTrim | nbd.FlagSendWriteZeroes
		assert.Equal(t, want, c.TransmissionFlags()&want, "flags %#x", c.TransmissionFlags())
		minimum, _, maximum := c.BlockSizes()
		assert.Equal(t, uint32(1), minimum)
		assert.GreaterOrEqual(t, maximum, uint32(1<<20))
	})
}

func TestUnwrittenReadsZeros(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend, c *Conn) {
		for _, r := range []struct{ off, n int64 }{{0, 4096}, {8<<20 + 3, 1<<20 + 5}, {exportSize - 1, 1}} {
			p := bytes.Repeat([]byte{0xee}, int(r.n))
			require.NoError(t, c.ReadAt(t.Context(), p, r.off))
			assert.Equal(t, make([]byte, r.n), p, "read of %d bytes at %d", r.n, r.off)
		}
	})
}

func TestWriteReadBack(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend, c *Conn) {
		rnd := rand.New(rand.NewPCG(1, 2))
		model := make([]byte, exportSize) // what the export should hold
		sizes := []int{1, 3, 511, 512, 4096, 4097, 65537, 1<<20 + 3, 3 << 20}
		for i, n := range sizes {
			off := rnd.Int64N(exportSize - int64(n))
			if i%2 == 0 {
				off &^= 511
			}
			p := randomBytes(rnd, n)
			require.NoError(t, c.WriteAt(t.Context(), p, off, false), "write %d bytes at %d", n, off)
			copy(model[off:], p)

			got := make([]byte, n)
			require.NoError(t, c.ReadAt(t.Context(), got, off))
			require.True(t, bytes.Equal(p, got), "read back %d bytes at %d", n, off)
		}
		for range 20 {
			n := 1 + rnd.IntN(256<<10)
			off := rnd.Int64N(exportSize - int64(n))
			got := make([]byte, n)
			require.NoError(t, c.ReadAt(t.Context(), got, off))
			require.True(t, bytes.Equal(model[off:off+int64(n)], got), "read %d bytes at %d", n, off)
		}
		got := make([]byte, exportSize)
		require.NoError(t, c.ReadAt(t.Context(), got, 0))
		require.True(t, bytes.Equal(model, got), "the whole export")
	})
}

func TestConcurrentRequests(t *testing.T) {
	const (
		workers = 8
		ops     = 150
		region  = exportSize / workers
	)
	forEachBackend(t, func(t *testing.T, b backend, c *Conn) {
		var wg sync.WaitGroup
		for w := range workers {
			wg.Go(func() {
				rnd := rand.New(rand.NewPCG(uint64(w), 7))
				base := int64(w * region)
				model := make([]byte, region)
				for i := range ops {
					n := 1 + rnd.IntN(64<<10)
					off := rnd.Int64N(region - int64(n))
					switch i % 4 {
					case 0, 1:
						p := randomBytes(rnd, n)
						if !assert.NoError(t, c.WriteAt(t.Context(), p, base+off, i%8 == 1)) {
							return
						}
						copy(model[off:], p)
					case 2:
						got := make([]byte, n)
						if !assert.NoError(t, c.ReadAt(t.Context(), got, base+off)) ||
							!assert.True(t, bytes.Equal(model[off:off+int64(n)], got), "worker %d op %d: read %d bytes at %d", w, i, n, base+off) {
							return
						}
					case 3:
						if !assert.NoError(t, c.Flush(t.Context())) {
							return
						}
					}
				}
				got := make([]byte, region)
				if assert.NoError(t, c.ReadAt(t.Context(), got, base)) {
					assert.True(t, bytes.Equal(model, got), "worker %d: its whole region", w)
				}
			})
		}
		wg.Wait()
	})
}

func TestFlushAndFUA(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend, c *Conn) {
		p := bytes.Repeat([]byte("durable!"), 512)
		require.NoError(t, c.WriteAt(t.Context(), p, 4096, true))
		require.NoError(t, c.Flush(t.Context()))
		require.NoError(t, c.Trim(t.Context(), 1<<20, 64<<10, true))
		require.NoError(t, c.Zero(t.Context(), 4096, 512, false, false, true))
		got := make([]byte, len(p))
		require.NoError(t, c.ReadAt(t.Context(), got, 4096))
		assert.Equal(t, append(make([]byte, 512), p[512:]...), got)
	})
}

func TestOutOfRange(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend, c *Conn) {
		var e *Error
		err := c.ReadAt(t.Context(), make([]byte, 1024), exportSize-512)
		require.ErrorAs(t, err, &e)
		assert.Equal(t, nbd.EINVAL, e.Errno, "%v", err)
		assert.Contains(t, err.Error(), "EINVAL")
		t.Logf("read past the end: %v", err)

		err = c.WriteAt(t.Context(), make([]byte, 1024), exportSize, false)
		require.ErrorAs(t, err, &e)
		assert.Contains(t, []uint32{nbd.ENOSPC, nbd.EINVAL}, e.Errno, "%v", err)
		t.Logf("write past the end: %v", err)

		// The connection still works.
		p := []byte("still here")
		require.NoError(t, c.WriteAt(t.Context(), p, 0, false))
		got := make([]byte, len(p))
		require.NoError(t, c.ReadAt(t.Context(), got, 0))
		assert.Equal(t, p, got)
	})
}

func TestZeroAndCache(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend, c *Conn) {
		p := bytes.Repeat([]byte{0xab}, 256<<10)
		require.NoError(t, c.WriteAt(t.Context(), p, 0, false))
		require.NoError(t, c.Zero(t.Context(), 0, 64<<10, true, false, false))
		require.NoError(t, c.Zero(t.Context(), 64<<10, 64<<10, false, false, false))
		if c.TransmissionFlags()&nbd.FlagSendFastZero != 0 {
			err := c.Zero(t.Context(), 128<<10, 64<<10, false, true, false)
			var e *Error
			if errors.As(err, &e) {
				assert.Equal(t, nbd.ENOTSUP, e.Errno, "a fast zero may only fail with ENOTSUP")
			} else {
				require.NoError(t, err)
				copy(p[128<<10:], make([]byte, 64<<10))
			}
		} else {
			assert.ErrorIs(t, c.Zero(t.Context(), 0, 512, false, true, false), errors.ErrUnsupported)
		}
		copy(p, make([]byte, 128<<10))
		got := make([]byte, len(p))
		require.NoError(t, c.ReadAt(t.Context(), got, 0))
		assert.True(t, bytes.Equal(p, got))

		if c.TransmissionFlags()&nbd.FlagSendCache != 0 {
			assert.NoError(t, c.Cache(t.Context(), 0, 1<<20))
		} else {
			assert.ErrorIs(t, c.Cache(t.Context(), 0, 1<<20), errors.ErrUnsupported)
		}
	})
}

func TestBlockStatusAfterTrimAndZero(t *testing.T) {
	const (
		data  = 0
		holes = nbd.StateHole | nbd.StateZero
	)
	servers := map[string]func(t *testing.T) string{
		"nbdkit-memory": func(t *testing.T) string { return startNbdkit(t, "memory", strconv.Itoa(exportSize)) },
		"nbdkit-file": func(t *testing.T) string {
			return startNbdkit(t, "file", sparseFile(t, t.TempDir(), exportSize))
		},
		"qemu-nbd":      func(t *testing.T) string { return startQemuNBD(t, "--discard=unmap") },
		"nbdvault-file": nbdvaultFile,
	}
	for name, start := range servers {
		t.Run(name, func(t *testing.T) {
			c := mustDial(t, start(t), Options{})
			status := func(off, n int64, reqOne bool) []nbd.Extent {
				t.Helper()
				m, err := c.BlockStatus(t.Context(), off, n, reqOne)
				require.NoError(t, err)
				require.Len(t, m, 1)
				var sum int64
				for _, e := range m[nbd.ContextBaseAllocation] {
					sum += e.Length
				}
				require.LessOrEqual(t, sum, n, "extents past the range")
				return m[nbd.ContextBaseAllocation]
			}
			// merged joins runs with the same flags: servers may split them.
			merged := func(ext []nbd.Extent) []nbd.Extent {
				var out []nbd.Extent
				for _, e := range ext {
					if len(out) > 0 && out[len(out)-1].Flags == e.Flags {
						out[len(out)-1].Length += e.Length
						continue
					}
					out = append(out, e)
				}
				return out
			}

			assert.Equal(t, []nbd.Extent{{Length: 2 << 20, Flags: holes}}, merged(status(0, 2<<20, false)), "a fresh export")

			rnd := rand.New(rand.NewPCG(3, 4))
			require.NoError(t, c.WriteAt(t.Context(), randomBytes(rnd, 1<<20), 0, false))
			assert.Equal(t, []nbd.Extent{{Length: 1 << 20, Flags: data}, {Length: 1 << 20, Flags: holes}},
				merged(status(0, 2<<20, false)), "after writing the first MiB")

			require.NoError(t, c.Trim(t.Context(), 256<<10, 256<<10, false))
			require.NoError(t, c.Zero(t.Context(), 512<<10, 256<<10, false, false, false))
			ext := merged(status(0, 2<<20, false))
			t.Logf("after trim [256K, 512K) and zero [512K, 768K): %v", ext)
			assert.Equal(t, []nbd.Extent{
				{Length: 256 << 10, Flags: data},
				{Length: 512 << 10, Flags: holes},
				{Length: 256 << 10, Flags: data},
				{Length: 1 << 20, Flags: holes},
			}, ext)

			one := status(300<<10, 1<<20, true)
			require.Len(t, one, 1, "NBD_CMD_FLAG_REQ_ONE")
			assert.Equal(t, uint32(holes), one[0].Flags)
			assert.LessOrEqual(t, one[0].Length, int64(468<<10))

			got := bytes.Repeat([]byte{0xee}, 512<<10)
			require.NoError(t, c.ReadAt(t.Context(), got, 256<<10))
			assert.Equal(t, make([]byte, 512<<10), got, "trimmed and zeroed ranges read as zeros")
		})
	}
}

func TestBlockStatusNeedsStructuredReplies(t *testing.T) {
	c := mustDial(t, startNbdkit(t, "--no-sr", "memory", "1M"), Options{})
	_, err := c.BlockStatus(t.Context(), 0, 4096, false)
	assert.ErrorIs(t, err, errors.ErrUnsupported)
}

// logged returns the requests of one kind in an nbdkit log filter file:
// their offset, count and fua flag.
func logged(t *testing.T, path, kind string) (reqs []struct {
	off, count int64
	fua        bool
}) {
	t.Helper()
	log, err := os.ReadFile(path)
	require.NoError(t, err)
	re := regexp.MustCompile(`connection=\d+ ` + kind + ` id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)(?: fua=(\d))?`)
	for _, m := range re.FindAllStringSubmatch(string(log), -1) {
		off, _ := strconv.ParseInt(m[1], 0, 64)
		count, _ := strconv.ParseInt(m[2], 0, 64)
		reqs = append(reqs, struct {
			off, count int64
			fua        bool
		}{off, count, m[3] == "1"})
	}
	return reqs
}

func TestSplitsToMaximumPayload(t *testing.T) {
	logPath := filepath.Join(t.TempDir(), "requests.log")
	addr := startNbdkit(t, "--filter=blocksize-policy", "--filter=log", "memory", strconv.Itoa(exportSize),
		"blocksize-minimum=512", "blocksize-preferred=4096", "blocksize-maximum=64K",
		"blocksize-error-policy=error", "logfile="+logPath)
	c := mustDial(t, addr, Options{})
	minimum, preferred, maximum := c.BlockSizes()
	require.Equal(t, []uint32{512, 4096, 64 << 10}, []uint32{minimum, preferred, maximum})

	rnd := rand.New(rand.NewPCG(5, 6))
	p := randomBytes(rnd, 1<<20+512)
	require.NoError(t, c.WriteAt(t.Context(), p, 512, true))
	got := make([]byte, len(p))
	require.NoError(t, c.ReadAt(t.Context(), got, 512))
	require.True(t, bytes.Equal(p, got))

	// Unaligned requests are refused before they are sent.
	assert.ErrorContains(t, c.WriteAt(t.Context(), p[:100], 512, false), "minimum block size 512")
	assert.ErrorContains(t, c.ReadAt(t.Context(), got[:512], 100), "minimum block size 512")
	require.NoError(t, c.Close())

	writes := logged(t, logPath, "Write")
	require.Len(t, writes, 17)
	var total int64
	for _, w := range writes {
		assert.LessOrEqual(t, w.count, int64(64<<10))
		assert.True(t, w.fua, "FUA on every piece")
		total += w.count
	}
	assert.Equal(t, int64(len(p)), total)
	assert.Len(t, logged(t, logPath, "Read"), 17)
}

func TestFUAWithoutServerFUA(t *testing.T) {
	logPath := filepath.Join(t.TempDir(), "requests.log")
	// The fua filter with its default mode hides FUA from the client.
	addr := startNbdkit(t, "--filter=log", "--filter=fua", "memory", "1M", "logfile="+logPath)
	c := mustDial(t, addr, Options{})
	require.Zero(t, c.TransmissionFlags()&nbd.FlagSendFUA)
	require.NoError(t, c.WriteAt(t.Context(), []byte("x"), 0, true))
	require.NoError(t, c.Close())

	log, err := os.ReadFile(logPath)
	require.NoError(t, err)
	assert.Regexp(t, `(?s) Write id=\d+ offset=0x0 count=0x1 fua=0 .* Flush id=`, string(log))
}

func TestRepliesOutOfOrder(t *testing.T) {
	// Reads take 2s, everything else is immediate.
	addr := startNbdkit(t, "--filter=delay", "memory", "1M", "delay-read=2")
	c := mustDial(t, addr, Options{})

	p := make([]byte, 512)
	read, err := c.send(t.Context(), nbd.CmdRead, 0, 0, 512, nil, p) // on the wire once send returns
	require.NoError(t, err)
	require.NoError(t, c.WriteAt(t.Context(), []byte("later"), 4096, false))
	require.NoError(t, c.Flush(t.Context()))
	select {
	case <-read.done:
		t.Fatal("the read finished before the write sent after it: the server did not reorder")
	default:
	}
	require.NoError(t, c.wait(t.Context(), read))
}

func TestCancelReturnsPromptly(t *testing.T) {
	addr := startNbdkit(t, "--filter=delay", "memory", "1M", "delay-read=3")
	c := mustDial(t, addr, Options{})

	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := c.ReadAt(ctx, make([]byte, 4096), 0)
	assert.Equal(t, context.DeadlineExceeded, err)
	assert.Less(t, time.Since(start), 2*time.Second, "waited for the server")

	// The connection stays usable while the abandoned read is in flight.
	require.NoError(t, c.WriteAt(t.Context(), []byte("after"), 0, false))
	require.NoError(t, c.Close()) // waits for the server to answer the read
}

func TestList(t *testing.T) {
	t.Run("qemu-nbd", func(t *testing.T) {
		addr := startQemuNBD(t, "--export-name=disk0", "--description=the first disk")
		exports, err := List(t.Context(), addr, Options{})
		require.NoError(t, err)
		assert.Equal(t, []ExportInfo{{Name: "disk0", Description: "the first disk"}}, exports)

		c := mustDial(t, addr, Options{Export: "disk0"})
		assert.Equal(t, int64(exportSize), c.Size())

		_, err = Dial(t.Context(), addr, Options{Export: "nope"})
		var oe *OptionError
		require.ErrorAs(t, err, &oe)
		assert.Equal(t, nbd.OptGo, oe.Option)
		assert.Equal(t, nbd.RepErrUnknown, oe.Reply)
		t.Logf("unknown export: %v", err)
	})
	t.Run("nbdkit", func(t *testing.T) {
		exports, err := List(t.Context(), startNbdkit(t, "memory", "1M"), Options{})
		require.NoError(t, err)
		assert.Equal(t, []ExportInfo{{Name: ""}}, exports)
	})
}

func TestTLS(t *testing.T) {
	dir := t.TempDir()
	cfg := testCA(t, dir)
	addr := startNbdkit(t, "--tls=require", "--tls-certificates="+dir, "memory", "1M")

	c := mustDial(t, addr, Options{TLS: cfg})
	assert.True(t, c.Structured())
	p := []byte("over TLS")
	require.NoError(t, c.WriteAt(t.Context(), p, 512, true))
	got := make([]byte, len(p))
	require.NoError(t, c.ReadAt(t.Context(), got, 512))
	assert.Equal(t, p, got)
	m, err := c.BlockStatus(t.Context(), 0, 4096, false)
	require.NoError(t, err)
	assert.Len(t, m[nbd.ContextBaseAllocation], 1)
	require.NoError(t, c.Close())

	exports, err := List(t.Context(), addr, Options{TLS: cfg})
	require.NoError(t, err)
	assert.Len(t, exports, 1)

	t.Run("without TLS", func(t *testing.T) {
		_, err := Dial(t.Context(), addr, Options{})
		var oe *OptionError
		require.ErrorAs(t, err, &oe)
		assert.Equal(t, nbd.RepErrTLSReqd, oe.Reply)
	})
	t.Run("untrusted certificate", func(t *testing.T) {
		_, err := Dial(t.Context(), addr, Options{TLS: testCA(t, t.TempDir())})
		assert.ErrorContains(t, err, "TLS handshake")
	})
	t.Run("server without TLS", func(t *testing.T) {
		_, err := Dial(t.Context(), startNbdkit(t, "--tls=off", "memory", "1M"), Options{TLS: cfg})
		var oe *OptionError
		require.ErrorAs(t, err, &oe)
		assert.Equal(t, nbd.OptStartTLS, oe.Option)
	})
}
