package main

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
	"lukechampine.com/blake3"

	"github.com/nbdvault/nbdvault/client"
	"github.com/nbdvault/nbdvault/internal/fsync"
	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

func restoreCommand() *cli.Command {
	return &cli.Command{
		Name:      "restore",
		Usage:     "write a snapshot to a file or a block device",
		ArgsUsage: "VOLUME@SNAPSHOT",
		Description: "Reads the snapshot (SNAPSHOT is an ID or a label, or an RFC 3339 time such as\n" +
			"2026-11-30T17:55:03Z for the volume as it was then: the newest checkpoint at or\n" +
			"before it, within the server's --journal-retention) over NBD, many chunks at a\n" +
			"time, and writes it to --to. The server verifies every chunk it reads; a\n" +
			"damaged one stops the restore.\n\n" +
			"A file is written as PATH.partial, sparse where the snapshot has holes, and\n" +
			"renamed to PATH once complete and synced: a failed or interrupted restore\n" +
			"never leaves a file that looks whole. An existing file is replaced only with\n" +
			"--force. A block device is written in place, holes as zeros (it may hold\n" +
			"old data), and must be at least the snapshot's size; it is opened\n" +
			"exclusively, so a mounted one is refused.\n\n" +
			"The last line ends with a digest of the bytes restored, holes included:\n" +
			"with --checksum blake3 (the default) their BLAKE3, which b3sum prints for\n" +
			"the file; with sha256 their SHA-256, which sha256sum prints (slower: it\n" +
			"takes more of the client's CPU than BLAKE3); with none, no digest.",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "to", Usage: "the `path` to write: a new file, or a block device (required)"},
			&cli.BoolFlag{Name: "force", Usage: "replace the file at --to if there is one"},
			&cli.StringFlag{Name: "checksum", Value: "blake3", Usage: "the `digest` of the restored bytes to print: blake3, sha256 or none"},
			nbdFlag,
		}, clientFlags...),
		Action: restore,
	}
}

func restore(c *cli.Context) error {
	if err := needArgs(c, 1, "VOLUME@SNAPSHOT"); err != nil {
		return err
	}
	vol, snap, err := splitSnapshot(c.Args().First())
	if err != nil {
		return err
	}
	to := c.String("to")
	if to == "" {
		return usageErrorf("restore: --to PATH is required: the file or block device to write")
	}
	sum, err := parseChecksum(c.String("checksum"))
	if err != nil {
		return err
	}
	device, err := checkRestorePath(to, c.Bool("force"))
	if err != nil {
		return err
	}
	cl, err := adminClient(c)
	if err != nil {
		return err
	}
	ctx := c.Context
	s, err := cl.Snapshot(ctx, vol, snap)
	if err != nil {
		return err
	}
	v, err := cl.Volume(ctx, vol)
	if err != nil {
		return err
	}
	addr, err := nbdAddressOf(c, cl)
	if err != nil {
		return err
	}
	export := vol + "@" + s.ID
	conn, err := dialExport(ctx, addr, export)
	if err != nil {
		return err
	}
	defer closeExport(conn)

	dst, err := openRestoreTarget(to, device, conn.Size())
	if err != nil {
		return err
	}
	p := newProgress("restoring "+export, conn.Size())
	r := &restorer{conn: conn, dst: dst, size: conn.Size(), request: requestSize(conn, v.ChunkSize), p: p, checksum: sum}
	err = r.run(ctx)
	if err == nil {
		err = dst.commit()
	}
	if err != nil {
		stopProgress(p)
		return dst.failed(export, err)
	}
	p.finish()

	elapsed := time.Since(p.start)
	name := export
	name += describePoint(s)
	holes := "holes not written"
	if device {
		holes = "holes written as zeros"
	}
	digest := ""
	if r.sum != nil {
		digest = fmt.Sprintf("; %s %x", sum.name, r.sum)
	}
	fmt.Printf("restored %s to %s: %s in %s (%s/s), %s of it %s%s\n",
		name, to, formatSize(r.size), elapsed.Round(10*time.Millisecond),
		formatSize(int64(float64(r.size)/max(elapsed.Seconds(), 1e-3))), formatSize(r.holes), holes, digest)
	return nil
}

// checksum is a digest restore can print of the bytes it restored.
type checksum struct {
	name string           // as --checksum takes it and the summary prints it
	new  func() hash.Hash // nil: no digest
}

// checksums are the values --checksum takes, the default first.
var checksums = []checksum{
	// BLAKE3 hashes a large write many chunks at a time (SIMD) and costs
	// the client less CPU than SHA-256; b3sum prints the same digest.
	{"blake3", func() hash.Hash { return blake3.New(32, nil) }},
	{"sha256", sha256.New},
	{"none", nil},
}

// parseChecksum returns the checksum --checksum names.
func parseChecksum(name string) (checksum, error) {
	for _, cs := range checksums {
		if cs.name == name {
			return cs, nil
		}
	}
	return checksum{}, usageErrorf("--checksum %q: want blake3 (the default; b3sum prints the same), sha256 (as sha256sum prints) or none", name)
}

// checkRestorePath says whether path is a block device to write in place,
// and refuses what restore must not write: an existing file (without
// force), a directory, anything else that is not a regular file.
func checkRestorePath(path string, force bool) (device bool, err error) {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("cannot restore to %s: %w", path, err)
	case fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0:
		return true, nil
	case fi.Mode().IsRegular():
		if !force {
			return false, cli.Exit(fmt.Sprintf("%s exists: pass --force to replace it (the restore is written to %s and renamed over it once complete), or choose another --to",
				path, partialPath(path)), exitConflict)
		}
		return false, nil
	case fi.IsDir():
		return false, usageErrorf("--to %s is a directory: give the path of the file to create", path)
	}
	return false, usageErrorf("--to %s is neither a regular file nor a block device", path)
}

// partialPath is where a restore to the file at path is written until it
// is complete.
func partialPath(path string) string { return path + ".partial" }

// restoreTarget is what a restore writes: a new file renamed into place
// at the end, or a block device written in place.
type restoreTarget struct {
	f    *os.File
	path string // --to
	tmp  string // the file being written, renamed to path by commit; "" for a device
}

func openRestoreTarget(path string, device bool, size int64) (*restoreTarget, error) {
	if device {
		return openRestoreDevice(path, size)
	}
	tmp := partialPath(path)
	// O_TRUNC: a PATH.partial is what an interrupted restore left.
	// 0600: a disk image holds whatever its file systems hold.
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("cannot create %s: %w", tmp, err)
	}
	// One hole of the snapshot's size: what is never written reads as
	// zeros, so the snapshot's holes need no writes and stay holes.
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("cannot make %s %s long: %w", tmp, formatSize(size), err)
	}
	return &restoreTarget{f: f, path: path, tmp: tmp}, nil
}

func openRestoreDevice(path string, size int64) (*restoreTarget, error) {
	// O_EXCL on a block device fails with EBUSY while it is mounted or
	// held by another exclusive user: a restore must not overwrite a
	// disk in use.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_EXCL, 0)
	if errors.Is(err, syscall.EBUSY) {
		return nil, fmt.Errorf("cannot open %s: it is in use (mounted, or part of an array or volume group): release it first", path)
	}
	if err != nil {
		return nil, fmt.Errorf("cannot open %s for writing: %w", path, err)
	}
	devSize, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("cannot find the size of %s: %w", path, err)
	}
	if devSize < size {
		f.Close()
		return nil, fmt.Errorf("%s is %s (%d bytes), smaller than the snapshot's %s (%d bytes): restore to a device at least that big, or to a file",
			path, formatSize(devSize), devSize, formatSize(size), size)
	}
	return &restoreTarget{f: f, path: path}, nil
}

func (t *restoreTarget) device() bool { return t.tmp == "" }

// written is the path being written.
func (t *restoreTarget) written() string {
	if t.device() {
		return t.path
	}
	return t.tmp
}

// zero makes the n bytes at off of a device read as zeros. The kernel
// zeroes a range of whole pages itself where it can (fallocate: the
// device may do it without data crossing the bus); otherwise zeros are
// written. Partial pages are always written, as a neighbouring piece may
// be writing the rest of the page through the page cache.
func (t *restoreTarget) zero(off, n int64) error {
	const page = 4096
	if off%page == 0 && n%page == 0 &&
		unix.Fallocate(int(t.f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n) == nil {
		return nil
	}
	for n > 0 {
		k := min(n, int64(len(zeros)))
		if _, err := t.f.WriteAt(zeros[:k], off); err != nil {
			return fmt.Errorf("writing zeros to %s at offset %d: %w", t.path, off, err)
		}
		off, n = off+k, n-k
	}
	return nil
}

// commit makes the restore durable and, for a file, puts it in place.
func (t *restoreTarget) commit() error {
	if err := t.f.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", t.written(), err)
	}
	if err := t.f.Close(); err != nil {
		return fmt.Errorf("closing %s: %w", t.written(), err)
	}
	if t.device() {
		return nil
	}
	if err := os.Rename(t.tmp, t.path); err != nil {
		return fmt.Errorf("renaming %s to %s: %w", t.tmp, t.path, err)
	}
	if err := fsync.Dir(filepath.Dir(t.path)); err != nil {
		return fmt.Errorf("syncing the directory of %s: %w", t.path, err)
	}
	return nil
}

// failed cleans up after a failed restore and returns err as the one line
// to show, saying what is left behind. It keeps err's chain (an interrupt
// stays context.Canceled for the exit code).
func (t *restoreTarget) failed(export string, err error) error {
	_ = t.f.Close() // commit may have closed it already: that error is moot
	what := "restore of " + export + " failed"
	if errors.Is(err, context.Canceled) {
		what = "restore of " + export + " interrupted"
	}
	if t.device() {
		return fmt.Errorf("%s: %w; %s now holds part of the snapshot over its old data: do not use it until a restore completes", what, err, t.path)
	}
	if rmErr := os.Remove(t.tmp); rmErr != nil && !errors.Is(rmErr, os.ErrNotExist) {
		return fmt.Errorf("%s: %w; %s is incomplete and could not be removed (%v): delete it", what, err, t.tmp, rmErr)
	}
	return fmt.Errorf("%s: %w; %s was not written", what, err, t.path)
}

// restorer copies a snapshot export to a restoreTarget.
//
// One goroutine walks the export's allocation map in order and cuts it
// into pieces at the chunk grid; workers read the data pieces (and, for a
// device, zero the hole pieces) with many requests in flight, writing each
// where it belongs; one goroutine takes the pieces in order as they
// complete, hashes them and hands their buffers back. The buffer pool
// bounds both the reads in flight and how far the hash may fall behind.
type restorer struct {
	conn     *client.Conn
	dst      *restoreTarget
	size     int64
	request  int64 // the most one piece covers
	p        *progress
	pool     *bufPool
	checksum checksum // of the restored bytes, for sum

	// Set by the hashing goroutine, read once run returns nil.
	holes int64  // bytes the map says read as zeros
	sum   []byte // the checksum of the restored bytes; nil for none
}

// piece is a part of the export being restored, or of a source being
// imported.
type piece struct {
	off, n int64
	zero   bool          // restore: reads as zeros, not read from the server
	buf    []byte        // the data (len n), from the pool
	done   chan struct{} // restore: closed once err is set
	err    error
}

func (r *restorer) run(ctx context.Context) error {
	workers := inFlight(r.request)
	// Twice the reads in flight lets reads go on while the hash waits for
	// a slow one, within about 256 MiB with the largest chunks.
	r.pool = newBufPool(max(workers+1, min(2*workers, int((256<<20)/r.request))), r.request)
	g, gctx := errgroup.WithContext(ctx)
	work := make(chan *piece)
	order := make(chan *piece, r.pool.max)
	g.Go(func() error {
		defer close(order)
		defer close(work)
		return r.plan(gctx, func(off, n int64, zero bool) error { return r.dispatch(gctx, work, order, off, n, zero) })
	})
	for range workers {
		g.Go(func() error { return r.work(gctx, work) })
	}
	g.Go(func() error { return r.hash(gctx, order) })
	return g.Wait()
}

// plan calls emit for consecutive pieces covering the export: each one
// extent of base:allocation, cut at the chunk grid so that reads line up
// with the server's chunks. Without the map everything is data.
func (r *restorer) plan(ctx context.Context, emit func(off, n int64, zero bool) error) error {
	hasMap := slices.Contains(r.conn.MetaContexts(), "base:allocation")
	for off := int64(0); off < r.size; {
		extents := []nbd.Extent{{Length: r.size - off}}
		if hasMap {
			m, err := r.conn.BlockStatus(ctx, off, r.size-off, false)
			if err != nil {
				return fmt.Errorf("reading the allocation map at offset %d: %w", off, err)
			}
			extents = m["base:allocation"]
		}
		start := off
		for _, e := range extents {
			zero := e.Flags&nbd.StateZero != 0
			for end := off + int64(e.Length); off < end; {
				n := min(end, (off/r.request+1)*r.request) - off
				if err := emit(off, n, zero); err != nil {
					return err
				}
				off += n
			}
		}
		if off == start {
			return fmt.Errorf("the server sent an empty allocation map at offset %d", off)
		}
	}
	return nil
}

// dispatch hands a piece to the workers (unless it needs no work: a hole
// in a new file is there already) and queues it for the hash, in order.
func (r *restorer) dispatch(ctx context.Context, work, order chan<- *piece, off, n int64, zero bool) error {
	pc := &piece{off: off, n: n, zero: zero, done: make(chan struct{})}
	if zero && !r.dst.device() {
		close(pc.done)
	} else {
		if !zero {
			buf, err := r.pool.get(ctx)
			if err != nil {
				return err
			}
			pc.buf = buf[:n]
		}
		select {
		case work <- pc:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	select {
	case order <- pc:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// work runs pieces until there are no more or one fails.
func (r *restorer) work(ctx context.Context, work <-chan *piece) error {
	for pc := range work {
		pc.err = ctx.Err()
		if pc.err == nil {
			pc.err = r.restorePiece(ctx, pc)
		}
		close(pc.done)
		if pc.err != nil {
			return pc.err
		}
	}
	return nil
}

func (r *restorer) restorePiece(ctx context.Context, pc *piece) error {
	if pc.zero {
		return r.dst.zero(pc.off, pc.n)
	}
	if err := r.conn.ReadAt(ctx, pc.buf, pc.off); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var ne *client.Error
		if errors.As(err, &ne) && ne.Errno == nbd.EIO {
			return fmt.Errorf("the server could not read offset %d (%w): a chunk in the repository is damaged or missing, or the repository is unreachable; see the server's log, and try an older snapshot",
				pc.off, err)
		}
		return fmt.Errorf("reading offset %d: %w", pc.off, err)
	}
	if _, err := r.dst.f.WriteAt(pc.buf, pc.off); err != nil {
		return fmt.Errorf("writing %s: %w", r.dst.written(), err)
	}
	return nil
}

// hash takes the pieces in order as they complete: it hashes them (unless
// the checksum is none), counts them on the progress display and returns
// their buffers to the pool. A piece is a whole request, up to a chunk:
// one large write, which BLAKE3 (lukechampine.com/blake3) hashes 16 of its
// 1 KiB chunks at a time with SIMD, its subtrees on several goroutines.
func (r *restorer) hash(ctx context.Context, order <-chan *piece) error {
	var h hash.Hash
	if r.checksum.new != nil {
		h = r.checksum.new()
	}
	for pc := range order {
		select {
		case <-pc.done:
		case <-ctx.Done():
			return ctx.Err()
		}
		if pc.err != nil {
			return pc.err
		}
		if pc.zero {
			if h != nil {
				hashZeros(h, pc.n)
			}
			r.holes += pc.n
		} else {
			if h != nil {
				h.Write(pc.buf)
			}
			r.pool.put(pc.buf)
		}
		r.p.add(pc.n)
	}
	if h != nil {
		r.sum = h.Sum(nil)
	}
	return nil
}

// hashZeros feeds n zero bytes to h, in blocks of 1 MiB (large writes, for
// BLAKE3's SIMD).
func hashZeros(h hash.Hash, n int64) {
	for n > 0 {
		k := min(n, int64(len(zeros)))
		h.Write(zeros[:k])
		n -= k
	}
}
