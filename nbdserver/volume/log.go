// Package volume is the volume engine: a durable write log, instant
// snapshots, and the upload of chunks and index pages to the repository.
// It knows nothing about NBD and must never import nbdserver/nbd (make
// lint checks). docs/architecture.md describes the design.
package volume

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/nbdvault/nbdvault/internal/fsync"
)

// A log is a directory of segment files, each a run of records:
//
//	offset size  field
//	0      4     magic "NVLG"
//	4      1     type (RecordWrite, RecordZero, RecordMark)
//	5      3     reserved, zero
//	8      8     sequence number, one more than the record before
//	16     8     offset in the volume
//	24     8     length in the volume (a zero record's may be huge)
//	32     4     data length (a write's: its length; a mark's: its payload)
//	36     4     CRC-32C of bytes 0..36 and the data
//	40     ...   data
//
// A segment is named after the sequence number of its first record
// (16 hex digits + ".log").
const (
	recordHeaderLen = 40
	recordMagic     = 0x4e564c47 // "NVLG"
	segmentSuffix   = ".log"
	// maxRecordData bounds one record's data, so a corrupt length cannot
	// make replay allocate without limit.
	maxRecordData = 64 << 20
)

// RecordType says what a record does.
type RecordType uint8

const (
	// RecordWrite carries data for [Offset, Offset+Length).
	RecordWrite RecordType = 1
	// RecordZero zeroes [Offset, Offset+Length) (TRIM, WRITE_ZEROES).
	RecordZero RecordType = 2
	// RecordMark ends a layer: a snapshot or checkpoint, described by its
	// data.
	RecordMark RecordType = 3
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// Record is one entry of the log.
type Record struct {
	Type   RecordType
	Seq    uint64
	Offset int64
	Length int64
	Data   []byte // a write's bytes or a mark's payload
}

// Pos locates a record's data in the log.
type Pos struct {
	Segment uint64 // the segment's first sequence number
	Off     int64  // offset of the data in the segment file
}

// ErrLogCorrupt reports a log whose content cannot be trusted beyond a
// torn last record.
var ErrLogCorrupt = errors.New("write log corrupt")

// Log is an append-only write log. Append may be called from many
// goroutines; appends are serialized, so sequence order is log order.
type Log struct {
	dir string

	mu       sync.Mutex // guards the fields below and appends
	segs     []*segment // open segments, oldest first; the last takes appends
	nextSeq  uint64
	appended uint64 // count of records appended, for group commit
	size     int64  // bytes in all segments
	broken   error  // set when the tail could not be repaired after a failed append

	syncMu  sync.Mutex
	syncC   sync.Cond
	syncing bool
	synced  uint64 // count of records known durable
}

type segment struct {
	first uint64
	f     *os.File
	size  int64
	dirty bool // appended to since its last fdatasync
}

// OpenLog opens (creating if needed) the log in dir and replays it: fn is
// called for every record in order. A torn last record (short, or failing
// its CRC) is cut off; damage anywhere else is ErrLogCorrupt. Record data
// passed to fn is only valid during the call.
func OpenLog(dir string, fn func(Record, Pos) error) (*Log, error) {
	return openLog(dir, 1, fn)
}

// openLog is OpenLog where an empty log starts at sequence number first.
func openLog(dir string, first uint64, fn func(Record, Pos) error) (*Log, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	l := &Log{dir: dir, nextSeq: first}
	l.syncC.L = &l.syncMu
	names, err := segmentNames(dir)
	if err != nil {
		return nil, err
	}
	for i, first := range names {
		last := i == len(names)-1
		seg, err := l.replaySegment(first, last, fn)
		if err != nil {
			l.Close()
			return nil, err
		}
		l.segs = append(l.segs, seg)
		l.size += seg.size
	}
	if len(l.segs) == 0 {
		if err := l.newSegment(); err != nil {
			return nil, err
		}
	}
	return l, nil
}

func segmentNames(dir string) ([]uint64, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var firsts []uint64
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), segmentSuffix)
		if !ok || !e.Type().IsRegular() {
			continue
		}
		first, err := strconv.ParseUint(name, 16, 64)
		if err != nil {
			return nil, fmt.Errorf("%w: unexpected file %s in %s", ErrLogCorrupt, e.Name(), dir)
		}
		firsts = append(firsts, first)
	}
	slices.Sort(firsts)
	return firsts, nil
}

func segmentPath(dir string, first uint64) string {
	return filepath.Join(dir, fmt.Sprintf("%016x%s", first, segmentSuffix))
}

// replaySegment reads one segment, calling fn for each record.
func (l *Log) replaySegment(first uint64, last bool, fn func(Record, Pos) error) (*segment, error) {
	path := segmentPath(l.dir, first)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	seg := &segment{first: first, f: f}
	if first != l.nextSeq && len(l.segs) > 0 {
		f.Close()
		return nil, fmt.Errorf("%w: segment %s starts at record %d, expected %d", ErrLogCorrupt, path, first, l.nextSeq)
	}
	l.nextSeq = first
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	var hdr [recordHeaderLen]byte
	var data []byte
	off := int64(0)
	for off < fi.Size() {
		bad := func(why string) (*segment, error) {
			if !last {
				f.Close()
				return nil, fmt.Errorf("%w: %s at offset %d: %s", ErrLogCorrupt, path, off, why)
			}
			// A torn write at the tail: the record was never acknowledged
			// as durable. Cut it off.
			if err := f.Truncate(off); err != nil {
				f.Close()
				return nil, err
			}
			if err := f.Sync(); err != nil {
				f.Close()
				return nil, err
			}
			seg.size = off
			return seg, nil
		}
		if _, err := f.ReadAt(hdr[:], off); err != nil {
			return bad("short record header")
		}
		rec, dataLen, err := parseHeader(hdr[:])
		if err != nil {
			return bad(err.Error())
		}
		if rec.Seq != l.nextSeq {
			return bad(fmt.Sprintf("record %d where %d was expected", rec.Seq, l.nextSeq))
		}
		if cap(data) < int(dataLen) {
			data = make([]byte, dataLen)
		}
		data = data[:dataLen]
		if _, err := f.ReadAt(data, off+recordHeaderLen); err != nil {
			return bad("short record data")
		}
		crc := crc32.Update(crc32.Checksum(hdr[:36], crcTable), crcTable, data)
		if crc != binary.LittleEndian.Uint32(hdr[36:]) {
			return bad("CRC mismatch")
		}
		rec.Data = data
		if err := fn(rec, Pos{Segment: first, Off: off + recordHeaderLen}); err != nil {
			f.Close()
			return nil, err
		}
		l.nextSeq++
		off += recordHeaderLen + int64(dataLen)
	}
	seg.size = off
	return seg, nil
}

func parseHeader(h []byte) (Record, uint32, error) {
	if binary.LittleEndian.Uint32(h) != recordMagic {
		return Record{}, 0, errors.New("bad record magic")
	}
	rec := Record{
		Type:   RecordType(h[4]),
		Seq:    binary.LittleEndian.Uint64(h[8:]),
		Offset: int64(binary.LittleEndian.Uint64(h[16:])),
		Length: int64(binary.LittleEndian.Uint64(h[24:])),
	}
	dataLen := binary.LittleEndian.Uint32(h[32:])
	switch {
	case rec.Type < RecordWrite || rec.Type > RecordMark:
		return Record{}, 0, fmt.Errorf("unknown record type %d", rec.Type)
	case dataLen > maxRecordData:
		return Record{}, 0, fmt.Errorf("record data length %d too large", dataLen)
	case rec.Offset < 0 || rec.Length < 0:
		return Record{}, 0, errors.New("negative offset or length")
	case rec.Type == RecordWrite && int64(dataLen) != rec.Length:
		return Record{}, 0, fmt.Errorf("write of %d bytes carries %d", rec.Length, dataLen)
	}
	return rec, dataLen, nil
}

// newSegment starts a segment for the next record and makes its
// directory entry durable. Called with l.mu held (or before l is shared).
func (l *Log) newSegment() error {
	path := segmentPath(l.dir, l.nextSeq)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if err := fsync.Dir(l.dir); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	l.segs = append(l.segs, &segment{first: l.nextSeq, f: f})
	return nil
}

// Append adds a record (its Seq is assigned) and returns its sequence
// number and where its data lies. It is not durable until Sync. apply, if
// not nil, runs under the append lock after the record is written, so
// what it records (an extent map) follows log order.
func (l *Log) Append(rec Record, apply func(seq uint64, pos Pos)) (uint64, Pos, error) {
	return l.AppendFunc(rec, nil, apply)
}

// AppendFunc is Append where data, if not nil, makes the record's data
// from its sequence number (a mark whose ID includes it).
func (l *Log) AppendFunc(rec Record, data func(seq uint64) []byte, apply func(seq uint64, pos Pos)) (uint64, Pos, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.appendLocked(rec, data, apply)
}

func (l *Log) appendLocked(rec Record, data func(seq uint64) []byte, apply func(seq uint64, pos Pos)) (uint64, Pos, error) {
	if l.broken != nil {
		return 0, Pos{}, l.broken
	}
	if data != nil {
		rec.Data = data(l.nextSeq)
	}
	if len(rec.Data) > maxRecordData {
		return 0, Pos{}, fmt.Errorf("record of %d bytes exceeds %d", len(rec.Data), maxRecordData)
	}
	seg := l.segs[len(l.segs)-1]
	rec.Seq = l.nextSeq
	var hdr [recordHeaderLen]byte
	binary.LittleEndian.PutUint32(hdr[0:], recordMagic)
	hdr[4] = byte(rec.Type)
	binary.LittleEndian.PutUint64(hdr[8:], rec.Seq)
	binary.LittleEndian.PutUint64(hdr[16:], uint64(rec.Offset))
	binary.LittleEndian.PutUint64(hdr[24:], uint64(rec.Length))
	binary.LittleEndian.PutUint32(hdr[32:], uint32(len(rec.Data)))
	crc := crc32.Update(crc32.Checksum(hdr[:36], crcTable), crcTable, rec.Data)
	binary.LittleEndian.PutUint32(hdr[36:], crc)

	total := recordHeaderLen + len(rec.Data)
	err := pwriteAll(seg.f, [][]byte{hdr[:], rec.Data}, seg.size)
	if err != nil {
		// Leave no partial record behind: the next append goes where
		// this one started.
		if terr := seg.f.Truncate(seg.size); terr != nil {
			l.broken = fmt.Errorf("write log %s: cannot repair its tail after %v: %w", seg.f.Name(), err, terr)
		}
		return 0, Pos{}, &fs.PathError{Op: "append", Path: seg.f.Name(), Err: err}
	}
	pos := Pos{Segment: seg.first, Off: seg.size + recordHeaderLen}
	seg.size += int64(total)
	seg.dirty = true
	l.size += int64(total)
	l.nextSeq++
	l.appended++
	if apply != nil {
		apply(rec.Seq, pos)
	}
	return rec.Seq, pos, nil
}

// Sync makes every record appended before the call durable. Concurrent
// callers share fdatasync calls: one sync serves every caller waiting on
// it (group commit).
func (l *Log) Sync() error {
	l.mu.Lock()
	target, broken := l.appended, l.broken
	l.mu.Unlock()
	if errors.Is(broken, ErrVolumeClosed) {
		return broken // nothing after Close is made durable
	}

	l.syncMu.Lock()
	defer l.syncMu.Unlock()
	for l.synced < target {
		if l.syncing {
			l.syncC.Wait()
			continue
		}
		l.syncing = true
		l.mu.Lock()
		cover := l.appended
		var files []*os.File
		for _, s := range l.segs {
			if s.dirty {
				files = append(files, s.f)
				s.dirty = false
			}
		}
		l.mu.Unlock()
		l.syncMu.Unlock()
		var err error
		for _, f := range files {
			if e := unix.Fdatasync(int(f.Fd())); e != nil && err == nil {
				err = &fs.PathError{Op: "fdatasync", Path: f.Name(), Err: e}
			}
		}
		l.syncMu.Lock()
		l.syncing = false
		l.syncC.Broadcast()
		if err != nil {
			// The kernel may have dropped the dirty pages: nothing in
			// this log can be promised durable any more.
			l.mu.Lock()
			l.broken = fmt.Errorf("write log: %w", err)
			l.mu.Unlock()
			return err
		}
		l.synced = max(l.synced, cover)
	}
	return nil
}

// AppendMark appends a mark record (see AppendFunc) and, still under the
// append lock, makes the log durable and starts a new segment: the
// records before the mark and those after never share a segment, so a
// sealed layer is freed by deleting whole files. The fdatasync holds other
// appends back; marks are rare.
func (l *Log) AppendMark(data func(seq uint64) []byte, apply func(seq uint64, pos Pos)) (uint64, error) {
	var seq uint64
	var err error
	l.withAppendLock(func() {
		seq, _, err = l.appendLocked(Record{Type: RecordMark}, data, apply)
		if err != nil {
			return
		}
		for _, s := range l.segs {
			if s.dirty {
				if e := unix.Fdatasync(int(s.f.Fd())); e != nil {
					l.broken = fmt.Errorf("write log: %w", &fs.PathError{Op: "fdatasync", Path: s.f.Name(), Err: e})
					err = l.broken
					return
				}
				s.dirty = false
			}
		}
		err = l.newSegment()
	})
	return seq, err
}

func (l *Log) withAppendLock(fn func()) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fn()
}

// ReadAt reads data of a record at pos (plus an offset into it).
func (l *Log) ReadAt(p []byte, pos Pos) error {
	l.mu.Lock()
	i, ok := slices.BinarySearchFunc(l.segs, pos.Segment, func(s *segment, first uint64) int {
		return cmpUint(s.first, first)
	})
	var f *os.File
	if ok {
		f = l.segs[i].f
	}
	l.mu.Unlock()
	if f == nil {
		return fmt.Errorf("write log: segment %016x is gone", pos.Segment)
	}
	_, err := f.ReadAt(p, pos.Off)
	return err
}

func cmpUint(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// RemoveBefore deletes the segments whose records all come before seq, the
// first sequence number of a segment. Readers must no longer need them.
func (l *Log) RemoveBefore(seq uint64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	keep := l.segs[:0]
	var err error
	for i, s := range l.segs {
		next := l.nextSeq
		if i+1 < len(l.segs) {
			next = l.segs[i+1].first
		}
		if next <= seq && i+1 < len(l.segs) {
			s.f.Close()
			if e := os.Remove(segmentPath(l.dir, s.first)); e != nil && err == nil {
				err = e
			}
			l.size -= s.size
			continue
		}
		keep = append(keep, s)
	}
	l.segs = keep
	if err != nil {
		return err
	}
	return fsync.Dir(l.dir)
}

// Reset deletes every segment and starts the log again at sequence
// number next. For a log whose every record the repository already holds.
func (l *Log) Reset(next uint64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, s := range l.segs {
		s.f.Close()
		if err := os.Remove(segmentPath(l.dir, s.first)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	l.segs, l.size, l.nextSeq = nil, 0, next
	return l.newSegment()
}

// Size is the bytes the log holds on disk.
func (l *Log) Size() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.size
}

// NextSeq is the sequence number the next record will get.
func (l *Log) NextSeq() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.nextSeq
}

// Close closes the segment files. It does not sync.
func (l *Log) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	var err error
	for _, s := range l.segs {
		if e := s.f.Close(); e != nil && err == nil {
			err = e
		}
	}
	l.segs = nil
	if l.broken == nil {
		l.broken = ErrVolumeClosed
	}
	return err
}

// pwriteAll writes bufs at off with pwritev, going on after short writes
// until everything is written or the kernel says why not (ENOSPC).
func pwriteAll(f *os.File, bufs [][]byte, off int64) error {
	for {
		for len(bufs) > 0 && len(bufs[0]) == 0 {
			bufs = bufs[1:]
		}
		if len(bufs) == 0 {
			return nil
		}
		n, err := unix.Pwritev(int(f.Fd()), bufs, off)
		if err != nil {
			return err
		}
		if n == 0 {
			return io.ErrShortWrite
		}
		off += int64(n)
		for n > 0 {
			k := min(n, len(bufs[0]))
			bufs[0] = bufs[0][k:]
			n -= k
			if len(bufs[0]) == 0 {
				bufs = bufs[1:]
			}
		}
	}
}
