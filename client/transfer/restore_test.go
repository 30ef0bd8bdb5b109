package transfer

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"lukechampine.com/blake3"

	"github.com/nbdvault/nbdvault/client"
	"github.com/nbdvault/nbdvault/internal/zeros"
	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// TestHashZeros checks that hashZeros, which feeds a hole to the hash in
// blocks of zeros, gives the digest of a real buffer of zeros, for every
// checksum restore prints: from the start and after data that leaves the
// hash in the middle of a block or chunk, for runs shorter and longer
// than its block of zeros and not a whole number of them.
func TestHashZeros(t *testing.T) {
	sizes := []int64{0, 1, 63, 64, 1023, 1024, 1025, 4096, int64(len(zeros.Block)) - 1, int64(len(zeros.Block)),
		int64(len(zeros.Block)) + 1, 3*int64(len(zeros.Block)) + 12345}
	for _, cs := range Checksums {
		if cs.New == nil {
			continue
		}
		for _, prefix := range [][]byte{nil, []byte("x"), bytes.Repeat([]byte{0xa5}, 1500)} {
			for _, n := range sizes {
				name := fmt.Sprintf("%s/after %d bytes/%d zeros", cs.Name, len(prefix), n)
				h := cs.New()
				h.Write(prefix)
				hashZeros(h, n)
				want := cs.New()
				want.Write(prefix)
				want.Write(make([]byte, n))
				assert.Equal(t, hex.EncodeToString(want.Sum(nil)), hex.EncodeToString(h.Sum(nil)), name)
			}
		}
	}
}

// TestChecksums checks the digests restore makes against the published
// test vectors (b3sum and sha256sum print the same), and that the names
// are blake3, sha256 and none, and nothing else.
func TestChecksums(t *testing.T) {
	for _, c := range []struct{ name, in, want string }{
		{"blake3", "", "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"},
		{"blake3", "abc", "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"},
		{"sha256", "", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
		{"sha256", "abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
	} {
		cs, ok := ParseChecksum(c.name)
		require.True(t, ok)
		require.Equal(t, c.name, cs.Name)
		h := cs.New()
		h.Write([]byte(c.in))
		assert.Equal(t, c.want, hex.EncodeToString(h.Sum(nil)), "%s of %q", c.name, c.in)
	}
	// A large input, hashed over many 1 KiB chunks at once: the digest
	// b3sum 1.2.0 prints for 3 MiB + 1 bytes of 0..250 repeated.
	large := make([]byte, 3<<20+1)
	for i := range large {
		large[i] = byte(i % 251)
	}
	cs, ok := ParseChecksum("blake3")
	require.True(t, ok)
	h := cs.New()
	h.Write(large)
	assert.Equal(t, largeBLAKE3, hex.EncodeToString(h.Sum(nil)), "blake3 of 3 MiB + 1")

	none, ok := ParseChecksum("none")
	require.True(t, ok)
	assert.Nil(t, none.New, "none hashes nothing")
	assert.Equal(t, "blake3", Checksums[0].Name, "the default is first")
	for _, bad := range []string{"", "md5", "BLAKE3", "sha-256", "blake3 "} {
		_, ok := ParseChecksum(bad)
		assert.False(t, ok, "%q", bad)
	}
}

// largeBLAKE3 is what b3sum 1.2.0 prints for the 3 MiB + 1 bytes that
// TestChecksums hashes.
const largeBLAKE3 = "fd984eaa20053d346cc7c79a175338f91556e68b871d877b23568a4587d9875b"

// serve serves b as the default export of nbdvault's NBD server in this
// process and returns a connection to it.
func serve(t *testing.T, b nbd.Backend) *client.Conn {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := nbd.Listen("unix:" + sock)
	require.NoError(t, err)
	srv := &nbd.Server{Exports: nbd.NewExportMap(&nbd.Export{Name: "", Backend: b}), Logger: slog.New(slog.DiscardHandler)}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		<-done
	})
	conn, err := client.Dial(context.Background(), "unix:"+sock, client.Options{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// A restore to a file writes the export's bytes, leaves its holes as
// holes, and makes the checksum of all of it; the file appears only once
// the restore is committed.
func TestRestoreToFile(t *testing.T) {
	ctx := context.Background()
	const size = 8<<20 + 4096
	mem := nbd.NewMem(size)
	want := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	for _, at := range []int64{0, 3<<20 + 100, 8 << 20} {
		p := make([]byte, 70000)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		p = p[:min(int64(len(p)), size-at)]
		copy(want[at:], p)
		require.NoError(t, mem.WriteAt(ctx, p, at, false))
	}
	conn := serve(t, mem)

	path := filepath.Join(t.TempDir(), "out.img")
	device, err := CheckPath(path, false)
	require.NoError(t, err)
	require.False(t, device)
	dst, err := OpenTarget(path, false, conn.Size())
	require.NoError(t, err)
	var progress int64
	res, err := Restore(ctx, conn, dst, RestoreOptions{Request: RequestSize(conn, 1<<20), Checksum: Checksums[0], Progress: func(n int64) { progress += n }})
	require.NoError(t, err)
	_, err = os.Stat(path)
	require.ErrorIs(t, err, os.ErrNotExist, "not in place before Commit")
	require.NoError(t, dst.Commit())

	got, err := os.ReadFile(path)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got), "the restored bytes")
	sum := blake3.Sum256(want)
	assert.Equal(t, sum[:], res.Sum)
	assert.EqualValues(t, size, res.Size)
	assert.EqualValues(t, size, progress)
	assert.Greater(t, res.Holes, int64(4<<20), "the holes are not read")
	var st syscall.Stat_t
	require.NoError(t, syscall.Stat(path, &st))
	assert.Less(t, st.Blocks*512, int64(2<<20), "the holes stay holes in the file")

	// The file now exists: refused unless replaced; a directory never.
	_, err = CheckPath(path, false)
	require.ErrorIs(t, err, ErrExists)
	_, err = CheckPath(path, true)
	require.NoError(t, err)
	_, err = CheckPath(t.TempDir(), true)
	require.ErrorIs(t, err, ErrNotFileOrDevice)
}

// A failed restore leaves no file: neither the partial one nor one in
// place, and its error says so and keeps its cause.
func TestRestoreAbort(t *testing.T) {
	mem := nbd.NewMem(4 << 20)
	conn := serve(t, mem)
	path := filepath.Join(t.TempDir(), "out.img")
	dst, err := OpenTarget(path, false, conn.Size())
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = Restore(ctx, conn, dst, RestoreOptions{Request: 1 << 20})
	require.Error(t, err)
	err = dst.Abort("vol@snap", err)
	require.ErrorIs(t, err, context.Canceled)
	assert.Contains(t, err.Error(), "restore of vol@snap interrupted")
	for _, p := range []string{path, PartialPath(path)} {
		_, err := os.Stat(p)
		assert.ErrorIs(t, err, os.ErrNotExist, p)
	}
}
