package transfer

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

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
	"lukechampine.com/blake3"

	"github.com/nbdvault/nbdvault/client"
	"github.com/nbdvault/nbdvault/internal/fsync"
	"github.com/nbdvault/nbdvault/internal/zeros"
	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// Checksum is a digest a restore can make of the bytes it restored.
type Checksum struct {
	Name string           // as nbdvault restore --checksum takes it, and prints it
	New  func() hash.Hash // nil: no digest
}

// Checksums are the digests a restore can make, the default first.
var Checksums = []Checksum{
	// BLAKE3 hashes a large write many chunks at a time (SIMD) and costs
	// the client less CPU than SHA-256; b3sum prints the same digest.
	{"blake3", func() hash.Hash { return blake3.New(32, nil) }},
	{"sha256", sha256.New},
	{"none", nil},
}

// ParseChecksum returns the checksum called name, or false.
func ParseChecksum(name string) (Checksum, bool) {
	for _, cs := range Checksums {
		if cs.Name == name {
			return cs, true
		}
	}
	return Checksum{}, false
}

// Errors of CheckPath.
var (
	// ErrExists: the file is there, and replacing it was not asked for.
	ErrExists = errors.New("the file exists")
	// ErrNotFileOrDevice: a directory, or anything else that is neither
	// a regular file nor a block device.
	ErrNotFileOrDevice = errors.New("neither a regular file nor a block device")
)

// CheckPath says whether path is a block device to write in place, and
// refuses what a restore must not write: an existing file unless replace
// (ErrExists), a directory or anything else that is not a regular file
// (ErrNotFileOrDevice).
func CheckPath(path string, replace bool) (device bool, err error) {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("cannot restore to %s: %w", path, err)
	case fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0:
		return true, nil
	case fi.Mode().IsRegular():
		if !replace {
			return false, fmt.Errorf("%s: %w", path, ErrExists)
		}
		return false, nil
	case fi.IsDir():
		return false, fmt.Errorf("%s is a directory: %w", path, ErrNotFileOrDevice)
	}
	return false, fmt.Errorf("%s: %w", path, ErrNotFileOrDevice)
}

// PartialPath is where a restore to the file at path is written until it
// is complete.
func PartialPath(path string) string { return path + ".partial" }

// Target is what a restore writes: a new file renamed into place at the
// end, or a block device written in place.
type Target struct {
	f    *os.File
	path string // where the restore goes
	tmp  string // the file being written, renamed to path by Commit; "" for a device
}

// OpenTarget opens what a restore of size bytes writes at path: for a
// file, PartialPath(path), a hole of that size; for a device (device),
// the device, opened exclusively, which must be at least size bytes.
func OpenTarget(path string, device bool, size int64) (*Target, error) {
	if device {
		return openDevice(path, size)
	}
	tmp := PartialPath(path)
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
		return nil, fmt.Errorf("cannot make %s %d bytes long: %w", tmp, size, err)
	}
	return &Target{f: f, path: path, tmp: tmp}, nil
}

func openDevice(path string, size int64) (*Target, error) {
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
		return nil, fmt.Errorf("%s is %d bytes, smaller than the snapshot's %d bytes: restore to a device at least that big, or to a file",
			path, devSize, size)
	}
	return &Target{f: f, path: path}, nil
}

// Device reports whether t is a block device written in place.
func (t *Target) Device() bool { return t.tmp == "" }

// written is the path being written.
func (t *Target) written() string {
	if t.Device() {
		return t.path
	}
	return t.tmp
}

// zero makes the n bytes at off of a device read as zeros. The kernel
// zeroes a range of whole pages itself where it can (fallocate: the
// device may do it without data crossing the bus); otherwise zeros are
// written. Partial pages are always written, as a neighbouring piece may
// be writing the rest of the page through the page cache.
func (t *Target) zero(off, n int64) error {
	const page = 4096
	if off%page == 0 && n%page == 0 &&
		unix.Fallocate(int(t.f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n) == nil {
		return nil
	}
	for n > 0 {
		k := min(n, int64(len(zeros.Block)))
		if _, err := t.f.WriteAt(zeros.Block[:k], off); err != nil {
			return fmt.Errorf("writing zeros to %s at offset %d: %w", t.path, off, err)
		}
		off, n = off+k, n-k
	}
	return nil
}

// Commit makes the restore durable and, for a file, puts it in place.
func (t *Target) Commit() error {
	if err := t.f.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", t.written(), err)
	}
	if err := t.f.Close(); err != nil {
		return fmt.Errorf("closing %s: %w", t.written(), err)
	}
	if t.Device() {
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

// Abort cleans up after a failed restore of export and returns err as the
// one line to show, saying what is left behind. It keeps err's chain (an
// interrupt stays context.Canceled).
func (t *Target) Abort(export string, err error) error {
	_ = t.f.Close() // Commit may have closed it already: that error is moot
	what := "restore of " + export + " failed"
	if errors.Is(err, context.Canceled) {
		what = "restore of " + export + " interrupted"
	}
	if t.Device() {
		return fmt.Errorf("%s: %w; %s now holds part of the snapshot over its old data: do not use it until a restore completes", what, err, t.path)
	}
	if rmErr := os.Remove(t.tmp); rmErr != nil && !errors.Is(rmErr, os.ErrNotExist) {
		return fmt.Errorf("%s: %w; %s is incomplete and could not be removed (%v): delete it", what, err, t.tmp, rmErr)
	}
	return fmt.Errorf("%s: %w; %s was not written", what, err, t.path)
}

// RestoreOptions tune a Restore.
type RestoreOptions struct {
	// Request is the most one NBD request reads (RequestSize).
	Request int64
	// Checksum is the digest to make of the restored bytes; its New nil
	// for none.
	Checksum Checksum
	// Progress, if set, is told of the bytes restored, in order.
	Progress func(n int64)
}

// RestoreResult says what a Restore did.
type RestoreResult struct {
	Size  int64  // bytes restored
	Holes int64  // of them, bytes the allocation map said read as zeros
	Sum   []byte // the checksum of the restored bytes; nil for none
}

// Restore copies the export conn is connected to into dst: the data the
// export's allocation map (base:allocation) shows, with many requests in
// flight; holes are left as holes in a new file and zeroed on a device.
// It does not Commit dst.
func Restore(ctx context.Context, conn *client.Conn, dst *Target, o RestoreOptions) (RestoreResult, error) {
	r := &restorer{conn: conn, dst: dst, size: conn.Size(), request: o.Request, progress: o.Progress, checksum: o.Checksum}
	if r.progress == nil {
		r.progress = func(int64) {}
	}
	if err := r.run(ctx); err != nil {
		return RestoreResult{}, err
	}
	return RestoreResult{Size: r.size, Holes: r.holes, Sum: r.sum}, nil
}

// restorer copies a snapshot export to a Target.
//
// One goroutine walks the export's allocation map in order and cuts it
// into pieces at the chunk grid; workers read the data pieces (and, for a
// device, zero the hole pieces) with many requests in flight, writing each
// where it belongs; one goroutine takes the pieces in order as they
// complete, hashes them and hands their buffers back. The buffer pool
// bounds both the reads in flight and how far the hash may fall behind.
type restorer struct {
	conn     *client.Conn
	dst      *Target
	size     int64
	request  int64 // the most one piece covers
	progress func(n int64)
	pool     *BufPool
	checksum Checksum // of the restored bytes, for sum

	// Set by the hashing goroutine, read once run returns nil.
	holes int64  // bytes the map says read as zeros
	sum   []byte // the checksum of the restored bytes; nil for none
}

// piece is a part of the export being restored.
type piece struct {
	off, n int64
	zero   bool          // restore: reads as zeros, not read from the server
	buf    []byte        // the data (len n), from the pool
	done   chan struct{} // restore: closed once err is set
	err    error
}

func (r *restorer) run(ctx context.Context) error {
	workers := InFlight(r.request)
	// Twice the reads in flight lets reads go on while the hash waits for
	// a slow one, within about 256 MiB with the largest chunks.
	r.pool = NewBufPool(max(workers+1, min(2*workers, int((256<<20)/r.request))), r.request)
	g, gctx := errgroup.WithContext(ctx)
	work := make(chan *piece)
	order := make(chan *piece, r.pool.Max)
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
	if zero && !r.dst.Device() {
		close(pc.done)
	} else {
		if !zero {
			buf, err := r.pool.Get(ctx)
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
	if r.checksum.New != nil {
		h = r.checksum.New()
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
			r.pool.Put(pc.buf)
		}
		r.progress(pc.n)
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
		k := min(n, int64(len(zeros.Block)))
		h.Write(zeros.Block[:k])
		n -= k
	}
}
