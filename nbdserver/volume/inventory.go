package volume

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"lukechampine.com/blake3"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/internal/fsync"
)

// The chunk inventory (docs/architecture.md, "Step 2: the inventory"):
// the IDs of the chunk objects the repository holds, each with its stored
// size, kept in the state folder so that a collection need not list
// chunks/. It only has to name every chunk object that exists (a
// superset): the sweep's safety does not depend on it, and an ID it names
// that is gone is deleted again.
//
// Files, in the state folder's gc/:
//
//	inventory   header, records sorted by ID with distinct IDs, trailer
//	written.N   header, records Store.Put wrote since (unsorted), trailer once closed
//	clean       the lease holder that stopped cleanly with all of it complete
//
// Every file of records is magic (8 bytes), 36-byte records, and a
// trailer: end magic, the count (8 bytes), and BLAKE3 of the records (32
// bytes). A record is a chunk's ID (32 bytes) then its object's stored
// length (uint32, little-endian; a chunk object is at most 16 MiB and its
// headers). Files of the format before sizes (magics NBDVINV1 and
// NBDVWRT1, 32-byte records) are not trusted, as damaged ones are not:
// the next collection lists chunks/ and writes the inventory anew.
type Inventory struct {
	dir      string
	holder   string        // this server's lease holder ID
	margin   time.Duration // how late a failed PUT may still land
	notUntil time.Time     // no listing before: the last holder's PUTs may land until then
	log      *slog.Logger

	mu      sync.Mutex
	trusted bool // inventory and closed written.* name every chunk object
	seq     int  // the open written.N
	cur     *recordFile
	closed  bool
}

const (
	invDirName    = "gc"
	invName       = "inventory"
	cleanName     = "clean"
	writtenPrefix = "written."

	recLen     = 32 + 4 // chunkRec: the ID, the size
	headerLen  = 8
	trailerLen = 8 + 8 + 32
)

var (
	invMagic     = []byte("NBDVINV2")
	writtenMagic = []byte("NBDVWRT2")
	endMagic     = []byte("NBDVEND1")
)

// chunkRec is one record: a chunk object's ID and its stored size.
type chunkRec struct {
	id   chunkstore.ID
	size uint32
}

// recSize is size as a record holds it. A chunk object is far below
// 4 GiB; anything larger (not written by a Store) is kept as the most a
// record holds.
func recSize(size int64) uint32 {
	return uint32(min(max(size, 0), 1<<32-1))
}

// put encodes r into b (recLen bytes).
func (r chunkRec) put(b []byte) {
	copy(b, r.id[:])
	binary.LittleEndian.PutUint32(b[32:], r.size)
}

// getRec decodes a record from b (recLen bytes).
func getRec(b []byte) chunkRec {
	var r chunkRec
	copy(r.id[:], b)
	r.size = binary.LittleEndian.Uint32(b[32:])
	return r
}

// compareRecs orders records by ID.
func compareRecs(a, b chunkRec) int { return a.id.Compare(b.id) }

// largerSize keeps, of two records of one ID, the larger size: a chunk
// recorded again has the same content, so the same size, and the larger
// is the safe side for the space accounting.
func largerSize(a *chunkRec, b chunkRec) { a.size = max(a.size, b.size) }

// InventoryOptions say whose the inventory is.
type InventoryOptions struct {
	// Holder is this server's lease holder ID, recorded at a clean stop;
	// Previous the ID of the lease record it replaced (lease.Previous).
	// The inventory is trusted only if Previous is the holder that last
	// stopped cleanly with it: no other server wrote since.
	Holder, Previous string
	// Margin is how much later than its failure a PUT may still land
	// (the lease's Margin).
	Margin time.Duration
	// ListAfter is when the last holder's PUTs have all landed
	// (lease.OpensAt): a listing waits until then to see them.
	ListAfter time.Time
	Logger    *slog.Logger
}

// OpenInventory opens the inventory kept in stateDir. It trusts what the
// folder holds only if the last server to stop cleanly with it holds the
// lease before this one; else the next collection lists the chunks once.
// Only a failure of the state folder is an error. Open it before the
// first Put, and Close it after the last.
func OpenInventory(stateDir string, opts InventoryOptions) (*Inventory, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	inv := &Inventory{dir: filepath.Join(stateDir, invDirName), margin: opts.Margin, notUntil: opts.ListAfter, log: log}
	if err := os.MkdirAll(inv.dir, 0o700); err != nil {
		return nil, fmt.Errorf("chunk inventory: %w", err)
	}
	_ = os.Remove(inv.path(invName + ".tmp")) // a rewrite a crash cut short
	why := inv.check(opts.Previous)
	// Until the next clean stop, what the folder holds is trusted by no
	// start: a crash, whatever the file system kept, means a listing.
	if err := os.Remove(inv.path(cleanName)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("chunk inventory: %w", err)
	}
	if err := fsync.Dir(inv.dir); err != nil {
		return nil, fmt.Errorf("chunk inventory: %w", err)
	}
	inv.holder = opts.Holder
	if why == "" {
		inv.trusted = true
	} else {
		log.Info("the next garbage collection lists the repository's chunks once", "why", why)
	}
	seqs, err := inv.segments()
	if err != nil {
		return nil, err
	}
	if len(seqs) > 0 {
		inv.seq = seqs[len(seqs)-1]
	}
	inv.mu.Lock()
	defer inv.mu.Unlock()
	if err := inv.openNext(); err != nil {
		return nil, err
	}
	return inv, nil
}

// check says why the folder's inventory may not name every chunk
// object, or "" if it does.
func (inv *Inventory) check(previous string) string {
	clean, err := os.ReadFile(inv.path(cleanName))
	switch {
	case err != nil:
		return "no inventory of chunks was kept, or the server did not stop cleanly"
	case previous == "" || string(clean) != previous:
		return "another server held the repository since this one stopped"
	}
	if _, err := openRecords(inv.path(invName), invMagic); err != nil {
		return err.Error()
	}
	seqs, err := inv.segments()
	if err != nil {
		return err.Error()
	}
	for _, n := range seqs {
		if _, err := readRecords(inv.writtenPath(n)); err != nil {
			return err.Error()
		}
	}
	return ""
}

func (inv *Inventory) path(name string) string { return filepath.Join(inv.dir, name) }

func (inv *Inventory) writtenPath(n int) string {
	return inv.path(writtenPrefix + strconv.Itoa(n))
}

// segments lists the numbers of the written.N files, in order.
func (inv *Inventory) segments() ([]int, error) {
	des, err := os.ReadDir(inv.dir)
	if err != nil {
		return nil, fmt.Errorf("chunk inventory: %w", err)
	}
	var seqs []int
	for _, de := range des {
		if n, err := strconv.Atoi(strings.TrimPrefix(de.Name(), writtenPrefix)); err == nil && strings.HasPrefix(de.Name(), writtenPrefix) {
			seqs = append(seqs, n)
		}
	}
	slices.Sort(seqs)
	return seqs, nil
}

// openNext starts written.N+1. Under mu.
func (inv *Inventory) openNext() error {
	inv.seq++
	f, err := createRecords(inv.writtenPath(inv.seq), writtenMagic)
	if err != nil {
		inv.cur = nil
		inv.trusted = false
		return fmt.Errorf("chunk inventory: %w", err)
	}
	inv.cur = f
	return nil
}

// Trusted says whether the inventory names every chunk object, so that
// the next collection needs no listing.
func (inv *Inventory) Trusted() bool {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	return inv.trusted
}

// Written records that a chunk object of size bytes is about to be
// written, or (failed) that its PUT failed, so it may still land: it is
// recorded again once that can no longer happen, for a collection may
// have deleted it meanwhile (chunkstore.Options.Written). It never fails
// a Put: a record that cannot be written makes the next collection list
// the chunks.
func (inv *Inventory) Written(id chunkstore.ID, size int64, failed bool) {
	if failed {
		time.AfterFunc(inv.margin, func() { inv.Written(id, size, false) })
		return
	}
	inv.mu.Lock()
	defer inv.mu.Unlock()
	if inv.closed {
		// After Close: the next start must not trust what it wrote.
		if err := os.Remove(inv.path(cleanName)); err == nil {
			inv.log.Warn("a chunk was stored after the inventory was closed; the next garbage collection lists the repository's chunks")
		}
		return
	}
	if inv.cur == nil {
		return // not trusted already
	}
	if err := inv.cur.add(chunkRec{id, recSize(size)}); err != nil && inv.trusted {
		inv.trusted = false
		inv.log.Warn("could not record a chunk in the inventory; the next garbage collection lists the repository's chunks", "error", err)
	}
}

// Close closes the open written.N and, if everything the inventory holds
// is complete, says so for the next start. Call it after the last Put.
func (inv *Inventory) Close() error {
	if inv == nil {
		return nil
	}
	inv.mu.Lock()
	defer inv.mu.Unlock()
	if inv.closed {
		return nil
	}
	inv.closed = true
	if inv.cur != nil {
		if err := inv.cur.finish(); err != nil {
			inv.trusted = false
		}
		inv.cur = nil
	}
	if !inv.trusted {
		return nil // the next start lists
	}
	if err := fsync.Dir(inv.dir); err != nil {
		return fmt.Errorf("chunk inventory: %w (the next garbage collection lists the repository's chunks)", err)
	}
	if err := fsync.WriteFile(inv.path(cleanName), []byte(inv.holder)); err != nil {
		return fmt.Errorf("chunk inventory: %w (the next garbage collection lists the repository's chunks)", err)
	}
	return nil
}

// rotate closes the open written.N and starts the next one. It returns
// the numbers of every closed written.N and whether, with the
// inventory, they name every chunk object.
func (inv *Inventory) rotate() (closed []int, trusted bool) {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	if inv.cur != nil {
		if err := inv.cur.finish(); err != nil {
			inv.trusted = false
		}
	}
	if err := inv.openNext(); err != nil {
		inv.log.Warn("could not start recording chunks for the inventory; garbage collections list the repository's chunks", "error", err)
	}
	seqs, err := inv.segments()
	if err != nil {
		inv.trusted = false
	}
	for _, n := range seqs {
		if n < inv.seq {
			closed = append(closed, n)
		}
	}
	return closed, inv.trusted
}

// prepare brings the inventory up to date at the start of a collection,
// which has started tracking and passed the epoch barrier: it folds the
// closed written.N into it or, when it is not trusted (or list is set),
// rebuilds it from a listing of chunks/, with the sizes the listing
// gives. It says whether it listed.
func (inv *Inventory) prepare(ctx context.Context, repo chunkstore.Backend, closed []int, trusted, list bool) (listed bool, err error) {
	var recs []chunkRec
	for _, n := range closed {
		got, err := readRecords(inv.writtenPath(n))
		if err != nil && trusted {
			trusted = false
			inv.log.Warn("a file of the chunk inventory is damaged or of an older format; listing the repository's chunks", "error", err)
		}
		recs = append(recs, got...) // what a crash left is added to a listing all the same
	}
	if trusted && !list {
		if len(recs) == 0 {
			return false, inv.removeSegments(closed) // nothing to fold: the files go all the same
		}
		err := inv.write(recs, true)
		if err == nil {
			return false, inv.removeSegments(closed)
		}
		if !errors.Is(err, errInventoryRead) {
			return false, err
		}
		inv.log.Warn("the chunk inventory could not be read; listing the repository's chunks", "error", err)
	}
	// The PUTs of the last holder, if it died holding the lease, may land
	// until the lease's window opens; the listing must see them.
	select {
	case <-time.After(time.Until(inv.notUntil)):
	case <-ctx.Done():
		return true, ctx.Err()
	}
	if err := repo.ListSizes(ctx, "chunks/", func(k string, size int64) error {
		if id, ok := chunkOfKey(k); ok {
			recs = append(recs, chunkRec{id, recSize(size)})
		}
		return nil
	}); err != nil {
		return true, fmt.Errorf("list the chunks: %w", err)
	}
	if err := inv.write(recs, false); err != nil {
		return true, err
	}
	inv.mu.Lock()
	// Trusted from now on unless recording what is put since fails.
	inv.trusted = inv.cur != nil && inv.cur.err == nil
	inv.mu.Unlock()
	return true, inv.removeSegments(closed)
}

var errInventoryRead = errors.New("the inventory cannot be read")

// write rewrites the inventory as recs (any order), with the old one
// merged in if merge is set; of an ID recorded more than once it keeps
// the largest size. An old inventory that cannot be read is an error
// matching errInventoryRead, and leaves it as it was.
func (inv *Inventory) write(recs []chunkRec, merge bool) error {
	recs, _ = mergeSorted(nil, recs, compareRecs, largerSize)
	out, err := createRecords(inv.path(invName+".tmp"), invMagic)
	if err != nil {
		return fmt.Errorf("chunk inventory: %w", err)
	}
	defer out.abort()
	var in *recordReader
	var readErr error
	if merge {
		in, readErr = openRecords(inv.path(invName), invMagic)
		if errors.Is(readErr, os.ErrNotExist) {
			in, readErr = nil, nil // the first run: nothing to merge
		}
	}
	i := 0
	if in != nil && readErr == nil {
		defer in.close()
		for {
			rec, ok, err := in.next()
			if err != nil {
				readErr = err
				break
			}
			if !ok {
				break
			}
			for ; i < len(recs) && recs[i].id.Compare(rec.id) < 0; i++ {
				if err := out.add(recs[i]); err != nil {
					return err
				}
			}
			if i < len(recs) && recs[i].id == rec.id {
				largerSize(&rec, recs[i])
				i++
			}
			if err := out.add(rec); err != nil {
				return err
			}
		}
	}
	if readErr != nil {
		// Not a superset of what exists: only a listing is.
		return fmt.Errorf("%w: %w", errInventoryRead, readErr)
	}
	for ; i < len(recs); i++ {
		if err := out.add(recs[i]); err != nil {
			return err
		}
	}
	return out.replace(inv.path(invName))
}

func (inv *Inventory) removeSegments(seqs []int) error {
	for _, n := range seqs {
		if err := os.Remove(inv.writtenPath(n)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("chunk inventory: %w", err)
		}
	}
	return fsync.Dir(inv.dir)
}

// recordFile writes a file of records: magic, records, trailer.
type recordFile struct {
	f   *os.File
	w   *bufio.Writer
	h   *blake3.Hasher
	n   uint64
	err error
}

func createRecords(path string, magic []byte) (*recordFile, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	r := &recordFile{f: f, w: bufio.NewWriterSize(f, 64<<10), h: blake3.New(32, nil)}
	_, r.err = r.w.Write(magic)
	return r, r.err
}

func (r *recordFile) add(rec chunkRec) error {
	if r.err != nil {
		return r.err
	}
	var b [recLen]byte
	rec.put(b[:])
	r.h.Write(b[:])
	r.n++
	_, r.err = r.w.Write(b[:])
	return r.err
}

// finish writes the trailer, flushes, syncs and closes the file.
func (r *recordFile) finish() error {
	if r.err == nil {
		var t [trailerLen]byte
		copy(t[:], endMagic)
		binary.LittleEndian.PutUint64(t[8:], r.n)
		r.h.Sum(t[16:16])
		_, r.err = r.w.Write(t[:])
	}
	if r.err == nil {
		r.err = r.w.Flush()
	}
	if r.err == nil {
		r.err = r.f.Sync()
	}
	if err := r.f.Close(); r.err == nil {
		r.err = err
	}
	if r.err == nil {
		r.err = os.ErrClosed // no more records
		return nil
	}
	return r.err
}

// replace finishes the file and renames it to path.
func (r *recordFile) replace(path string) error {
	tmp := r.f.Name()
	if err := r.finish(); err != nil {
		return fmt.Errorf("chunk inventory: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("chunk inventory: %w", err)
	}
	return fsync.Dir(filepath.Dir(path))
}

// abort removes a file not finished.
func (r *recordFile) abort() {
	if r.err != os.ErrClosed {
		r.f.Close()
		os.Remove(r.f.Name())
	}
}

// recordReader reads a file of records, checking its trailer at the end.
type recordReader struct {
	f    *os.File
	r    *bufio.Reader
	h    *blake3.Hasher
	n, i uint64
}

func openRecords(path string, magic []byte) (*recordReader, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	body := fi.Size() - headerLen - trailerLen
	r := &recordReader{f: f, r: bufio.NewReaderSize(f, 64<<10), h: blake3.New(32, nil), n: uint64(body / recLen)}
	var m [headerLen]byte
	if _, err := io.ReadFull(r.r, m[:]); err != nil || string(m[:]) != string(magic) || body < 0 || body%recLen != 0 {
		f.Close()
		return nil, fmt.Errorf("%s: not a closed file of chunk records, or one of an older format (%d bytes)", path, fi.Size())
	}
	return r, nil
}

// next returns the next record, or ok false after the last one, once
// the trailer checks.
func (r *recordReader) next() (rec chunkRec, ok bool, err error) {
	if r.i == r.n {
		var t [trailerLen]byte
		if _, err := io.ReadFull(r.r, t[:]); err != nil {
			return rec, false, fmt.Errorf("%s: %w", r.f.Name(), err)
		}
		if string(t[:8]) != string(endMagic) || binary.LittleEndian.Uint64(t[8:]) != r.n || string(r.h.Sum(nil)) != string(t[16:]) {
			return rec, false, fmt.Errorf("%s: %w: its trailer does not match its records", r.f.Name(), chunkstore.ErrCorrupt)
		}
		return rec, false, nil
	}
	var b [recLen]byte
	if _, err := io.ReadFull(r.r, b[:]); err != nil {
		return rec, false, fmt.Errorf("%s: %w", r.f.Name(), err)
	}
	r.h.Write(b[:])
	r.i++
	return getRec(b[:]), true, nil
}

func (r *recordReader) close() { r.f.Close() }

// readRecords reads a whole written.N. A file without its trailer (a
// crash) returns its whole records and an error; one of another magic
// (an older format) returns none and an error.
func readRecords(path string) ([]chunkRec, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(data) < headerLen || string(data[:headerLen]) != string(writtenMagic) {
		return nil, fmt.Errorf("%s: not a file of chunk records, or one of an older format", path)
	}
	body := data[headerLen:]
	whole := func(b []byte) []chunkRec {
		recs := make([]chunkRec, len(b)/recLen)
		for i := range recs {
			recs[i] = getRec(b[i*recLen:])
		}
		return recs
	}
	if len(body) < trailerLen || (len(body)-trailerLen)%recLen != 0 {
		return whole(body), fmt.Errorf("%s: not closed (the server stopped without closing it)", path)
	}
	recs, t := body[:len(body)-trailerLen], body[len(body)-trailerLen:]
	sum := blake3.Sum256(recs)
	if string(t[:8]) != string(endMagic) || binary.LittleEndian.Uint64(t[8:]) != uint64(len(recs)/recLen) || string(sum[:]) != string(t[16:]) {
		return whole(body), fmt.Errorf("%s: not closed, or damaged", path)
	}
	return whole(recs), nil
}

// rewrite streams the inventory's records, each ID with its stored size,
// to fn and writes it again without the IDs fn drops, once done (called
// after the last ID) returns. On any error it replaces nothing: the old
// inventory still names everything that exists. With dryRun it only
// streams.
func (inv *Inventory) rewrite(fn func(id chunkstore.ID, size int64) (drop bool, err error), dryRun bool, done func() error) error {
	in, err := openRecords(inv.path(invName), invMagic)
	if err != nil {
		inv.mu.Lock()
		inv.trusted = false
		inv.mu.Unlock()
		return fmt.Errorf("chunk inventory: %w (the next collection lists the repository's chunks)", err)
	}
	defer in.close()
	var out *recordFile
	dropped := false
	if !dryRun {
		if out, err = createRecords(inv.path(invName+".tmp"), invMagic); err != nil {
			return fmt.Errorf("chunk inventory: %w", err)
		}
		defer out.abort()
	}
	for {
		rec, ok, err := in.next()
		if err != nil {
			inv.mu.Lock()
			inv.trusted = false // the next run lists
			inv.mu.Unlock()
			return fmt.Errorf("chunk inventory: %w (the next collection lists the repository's chunks)", err)
		}
		if !ok {
			break
		}
		drop, err := fn(rec.id, int64(rec.size))
		if err != nil {
			return err
		}
		dropped = dropped || drop
		if out != nil && !drop {
			if err := out.add(rec); err != nil {
				return fmt.Errorf("chunk inventory: %w", err)
			}
		}
	}
	if err := done(); err != nil || out == nil || !dropped {
		return err // unchanged: the file stays as it was
	}
	return out.replace(inv.path(invName))
}
