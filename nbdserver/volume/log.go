// Package volume is the volume engine: a durable write log, instant
// snapshots, and the upload of chunks and index pages to the repository.
// It knows nothing about NBD and must never import nbdserver/nbd (make
// lint checks). docs/architecture.md describes the design.
package volume

import (
	"bytes"
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
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdvault/nbdvault/internal/fsync"
)

// A log is a directory of segment files, each a run of records:
//
//	offset size  field
//	0      4     magic "NVLG"
//	4      1     type (RecordWrite, RecordZero, RecordMark)
//	5      1     flags: recordSealed (logseal.go), else zero
//	6      2     reserved, zero
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
	// RecordGrain is the most data a write record carries in logs written
	// now: a write is cut into records at multiples of RecordGrain of the
	// volume's offsets. Every read of log data checks the whole record's
	// CRC, so the grain bounds what a small read costs (one 64 KiB read
	// and CRC for a 4 KiB read), and a chunk (a multiple of the grain)
	// never shares a record with another chunk. Older logs may hold larger
	// records; they are read and checked the same way.
	RecordGrain = 64 << 10
	// reserveName is a file of reserveBytes the log keeps in its folder
	// and gives up when the disk is full, so that a mark can still be
	// appended and a new segment started: a full state disk can then
	// close its open layer, seal it and free it.
	reserveName  = "reserve"
	reserveBytes = 1 << 20
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

// Pos locates data in the log: where it lies, and the record that holds
// it, whose CRC every read checks.
type Pos struct {
	Segment uint64 // the segment's first sequence number
	Off     int64  // offset of the data in the segment file
	Rec     int64  // offset of the record's header in the segment file
	RecLen  int64  // the record's data length
}

// ErrLogCorrupt reports damage in a write log: a record that fails its
// CRC where it is read back, or a bad record on replay that is not a torn
// tail (good records follow it, or later segments exist).
var ErrLogCorrupt = errors.New("write log damaged")

// Log is an append-only write log. Append may be called from many
// goroutines; appends are serialized, so sequence order is log order.
type Log struct {
	dir  string
	seal *logSeal // an encrypted repository's: every record's data sealed
	// stale: segments openLog kept for inspection, all covered by the
	// repository if the caller finds no fork (DropStale).
	stale []string

	mu       sync.Mutex // guards the fields below and appends
	segs     []*segment // open segments, oldest first; the last takes appends
	nextSeq  uint64
	appended uint64 // count of records appended, for group commit
	size     int64  // bytes in all segments
	broken   error  // set when the tail could not be repaired after a failed append, or a sync failed

	torn      *LogCut // what replay cut off as a torn tail
	recovered *LogCut // what a recovering open cut off at damage

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
// called for every record in order. A torn tail (a bad last record with no
// good record after it) is cut off and reported by TornTail; damage
// anywhere else is ErrLogCorrupt. Record data passed to fn is only valid
// during the call.
func OpenLog(dir string, fn func(Record, Pos) error) (*Log, error) {
	return openLog(dir, logOpen{first: 1}, fn)
}

// logOpen says how to open a log.
type logOpen struct {
	first uint64 // the sequence number an empty log starts at
	// recover cuts the log at its first damage, moving what follows into
	// a folder beside it, instead of failing with ErrLogCorrupt.
	recover bool
	// seal, if set, seals every record written and requires every record
	// read to be sealed.
	seal *logSeal
	// inspect, if set, is shown the good records of the segments whose
	// records all come before first. Those are kept until Log.DropStale,
	// not removed unread: until the caller has checked them against the
	// repository (fork.go) they may be writes the repository does not
	// have.
	inspect func(Record)
}

// LogCut describes where replay cut a log: a torn tail, or (when
// recovering) damage and everything after it.
type LogCut struct {
	Segment string // the segment file
	Offset  int64  // where the bad record starts in it
	Seq     uint64 // the sequence number that record should have had
	Why     string // what was wrong with it
	Bytes   int64  // bytes cut off, in this segment and any later ones
	// Recovery only: where the cut bytes were moved, and the good records
	// found among them (what the cut lost: at least these).
	MovedTo string
	Records int
	Marks   []Record // their data is the mark's payload
	// Forked: not damage, a log another server's history went on
	// without (ErrForkedLog); the whole log was moved.
	Forked bool
}

// openLog opens and replays the log in dir.
func openLog(dir string, o logOpen, fn func(Record, Pos) error) (*Log, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	l := &Log{dir: dir, nextSeq: o.first, seal: o.seal}
	l.syncC.L = &l.syncMu
	names, err := segmentNames(dir)
	if err != nil {
		return nil, err
	}
	for i, first := range names {
		if i+1 < len(names) && names[i+1] <= o.first {
			// Every record in it comes before o.first: the repository
			// holds them. A seal cut short by a crash leaves these.
			path := segmentPath(dir, first)
			if o.inspect != nil {
				if err := l.inspectSegment(path, o.inspect); err != nil {
					l.Close()
					return nil, err
				}
			}
			l.stale = append(l.stale, path)
			continue
		}
		seg, cut, err := l.replaySegment(first, names[i+1:], o.recover, fn)
		if err != nil {
			l.Close()
			return nil, err
		}
		if seg != nil {
			l.segs = append(l.segs, seg)
			l.size += seg.size
		}
		if cut != nil {
			if cut.MovedTo != "" {
				l.recovered = cut
			} else {
				l.torn = cut
			}
			break // a recovery cut moved the later segments away
		}
	}
	if len(l.segs) == 0 {
		if err := l.newSegment(); err != nil {
			l.Close()
			return nil, err
		}
	}
	l.keepReserve()
	return l, nil
}

// inspectSegment shows fn the good records of the segment at path, up to
// the first that is not (damage there is of no account: the repository
// holds what it held).
func (l *Log) inspectSegment(path string, fn func(Record)) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	var data []byte
	for off, size := int64(0), fi.Size(); off < size; {
		rec, dataLen, why, err := l.readRecord(f, off, size, &data)
		if err != nil || why != "" {
			return nil
		}
		fn(rec)
		off += recordHeaderLen + int64(dataLen)
	}
	return nil
}

// DropStale removes the segments openLog kept for its inspect function.
func (l *Log) DropStale() error {
	for _, path := range l.stale {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	l.stale = nil
	return nil
}

// keepReserve makes the reserve file if it is missing and the disk has
// room for it (see reserveName).
func (l *Log) keepReserve() {
	path := filepath.Join(l.dir, reserveName)
	if _, err := os.Stat(path); err == nil {
		return
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return
	}
	err = unix.Fallocate(int(f.Fd()), 0, 0, reserveBytes)
	if errors.Is(err, unix.EOPNOTSUPP) {
		_, err = f.WriteAt(make([]byte, reserveBytes), 0)
	}
	if err == nil {
		err = f.Sync()
	}
	f.Close()
	if err != nil {
		os.Remove(path)
	}
}

// useReserve frees the reserve's space, reporting whether there was any.
func (l *Log) useReserve() bool {
	return os.Remove(filepath.Join(l.dir, reserveName)) == nil
}

// TornTail reports the torn record replay cut off the end of the log, if
// any: a write that was never acknowledged as durable.
func (l *Log) TornTail() *LogCut { return l.torn }

// Recovered reports what a recovering open cut off at the log's first
// damage, if any.
func (l *Log) Recovered() *LogCut { return l.recovered }

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

// replaySegment reads one segment, calling fn for each record. later are
// the segments after it. A bad record with nothing good after it (no
// later segment, no good record further on in this one) is a torn tail:
// it is cut off and described by the returned LogCut. Any other bad record
// is damage: ErrLogCorrupt, or with recover the segment is cut there and
// the rest of the log moved aside (the LogCut says where).
func (l *Log) replaySegment(first uint64, later []uint64, recover bool, fn func(Record, Pos) error) (*segment, *LogCut, error) {
	path := segmentPath(l.dir, first)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, nil, err
	}
	seg := &segment{first: first, f: f}
	fail := func(err error) (*segment, *LogCut, error) {
		f.Close()
		return nil, nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		return fail(err)
	}
	size := fi.Size()
	off := int64(0)
	cut := func(why string) (*segment, *LogCut, error) {
		c := &LogCut{Segment: path, Offset: off, Seq: l.nextSeq, Why: why, Bytes: size - off}
		damaged := len(later) > 0
		if !damaged {
			// With its header intact, the bad record's own data is not
			// searched (it may hold anything, records included).
			from := off + 1
			var hdr [recordHeaderLen]byte
			if _, err := f.ReadAt(hdr[:], off); err == nil {
				if _, dataLen, err := parseHeader(hdr[:]); err == nil {
					from = off + recordHeaderLen + int64(dataLen)
				}
			}
			_, found, err := l.nextGoodRecord(f, from, size, l.nextSeq)
			if err != nil {
				return fail(err)
			}
			damaged = found
		}
		if damaged && !recover {
			more := ""
			if len(later) > 0 {
				more = fmt.Sprintf(" (%d later segments follow)", len(later))
			} else {
				more = " (good records follow it)"
			}
			return fail(fmt.Errorf("%w: %s at offset %d, record %d: %s%s", ErrLogCorrupt, path, off, l.nextSeq, why, more))
		}
		if damaged {
			if err := l.moveAside(c, f, later); err != nil {
				return fail(err)
			}
		}
		// Cut at the bad record: a torn write was never acknowledged as
		// durable, and a recovery keeps what comes before the damage.
		if err := f.Truncate(off); err != nil {
			return fail(err)
		}
		if err := f.Sync(); err != nil {
			return fail(err)
		}
		seg.size = off
		return seg, c, nil
	}
	if len(l.segs) > 0 && first != l.nextSeq {
		// A segment is missing: this one and the later ones are past a gap.
		why := fmt.Sprintf("segment starts at record %d, expected %d", first, l.nextSeq)
		if !recover {
			return fail(fmt.Errorf("%w: %s: %s", ErrLogCorrupt, path, why))
		}
		f.Close()
		c := &LogCut{Segment: path, Seq: l.nextSeq, Why: why}
		if err := l.moveAside(c, nil, append([]uint64{first}, later...)); err != nil {
			return nil, nil, err
		}
		return nil, c, nil
	}
	l.nextSeq = first
	var data []byte
	for off < size {
		rec, dataLen, why, err := l.readRecord(f, off, size, &data)
		if err != nil {
			return fail(err)
		}
		if why == "" && rec.Seq != l.nextSeq {
			why = fmt.Sprintf("record %d where %d was expected", rec.Seq, l.nextSeq)
		}
		if why != "" {
			return cut(why)
		}
		n := recordHeaderLen + int64(dataLen)
		if err := fn(rec, Pos{Segment: first, Off: off + recordHeaderLen, Rec: off, RecLen: int64(len(rec.Data))}); err != nil {
			return fail(err)
		}
		l.nextSeq++
		off += n
	}
	seg.size = off
	return seg, nil, nil
}

// readRecord reads the record at off of a file of the given size into
// *buf (grown as needed), and opens its data in a log that seals them.
// dataLen is what the data takes in the file. A record that is not whole
// and good gets why, saying what is wrong; err is for I/O errors, and for
// a whole record (its CRC good) that is sealed where the log is not, or
// the other way round, or that does not open: an error matching
// ErrLogCorrupt, never a why, since it is no torn write, and a log read
// with the wrong key (or none) must not be cut as if it were.
func (l *Log) readRecord(f *os.File, off, size int64, buf *[]byte) (rec Record, dataLen uint32, why string, err error) {
	var hdr [recordHeaderLen]byte
	if size-off < recordHeaderLen {
		return rec, 0, "short record header", nil
	}
	if _, err := f.ReadAt(hdr[:], off); err != nil {
		return rec, 0, "", err
	}
	rec, dataLen, perr := parseHeader(hdr[:])
	if perr != nil {
		return rec, 0, perr.Error(), nil
	}
	if size-off-recordHeaderLen < int64(dataLen) {
		return rec, 0, "short record data", nil
	}
	if cap(*buf) < int(dataLen) {
		*buf = make([]byte, dataLen)
	}
	data := (*buf)[:dataLen]
	if _, err := f.ReadAt(data, off+recordHeaderLen); err != nil {
		return rec, 0, "", err
	}
	if recordCRC(hdr[:], data) != binary.LittleEndian.Uint32(hdr[36:]) {
		return rec, 0, "CRC mismatch", nil
	}
	rec.Data = data
	bad := func(why string) (Record, uint32, string, error) {
		return rec, 0, "", fmt.Errorf("%w: %s at offset %d, record %d: %s", ErrLogCorrupt, f.Name(), off, rec.Seq, why)
	}
	switch sealed := hdr[5] == recordSealed; {
	case sealed && l.seal == nil:
		return bad("a sealed record, in the log of a volume opened without its repository's key")
	case !sealed && l.seal != nil:
		return bad("a record that is not sealed, in an encrypted repository's log: written by someone without its key")
	case sealed:
		plain, err := l.seal.open(hdr[:], data)
		if err != nil {
			return bad(err.Error())
		}
		rec.Data = plain
		if len(plain) == 0 {
			rec.Data = nil // as a plain log's empty data
		}
	}
	return rec, dataLen, "", nil
}

func recordCRC(hdr, data []byte) uint32 {
	return crc32.Update(crc32.Checksum(hdr[:36], crcTable), crcTable, data)
}

// magicBytes is the record magic as it lies in a file.
var magicBytes = binary.LittleEndian.AppendUint32(nil, recordMagic)

// nextGoodRecord looks in [from, size) of f for a good record numbered
// minSeq or later, by its magic. It tells damage (good records after a bad
// one) from a torn tail (nothing good after it).
func (l *Log) nextGoodRecord(f *os.File, from, size int64, minSeq uint64) (int64, bool, error) {
	const window = 1 << 20
	buf := make([]byte, window+len(magicBytes)-1)
	var data []byte
	for at := from; at < size; at += window {
		n, err := f.ReadAt(buf[:min(int64(len(buf)), size-at)], at)
		if err != nil && !errors.Is(err, io.EOF) {
			return 0, false, err
		}
		for i := 0; ; {
			k := bytes.Index(buf[i:n], magicBytes)
			if k < 0 {
				break
			}
			cand := at + int64(i+k)
			rec, _, why, err := l.readRecord(f, cand, size, &data)
			if err != nil {
				return 0, false, err
			}
			if why == "" && rec.Seq >= minSeq {
				return cand, true, nil
			}
			i += k + 1
		}
	}
	return 0, false, nil
}

// moveAside moves what a recovery cuts off into a folder beside the log:
// the bytes of f from c.Offset on, and the later segments, whole. It
// counts the good records among them, and keeps their marks, into c.
func (l *Log) moveAside(c *LogCut, f *os.File, later []uint64) error {
	dest, err := os.MkdirTemp(filepath.Dir(l.dir), "damaged-"+time.Now().UTC().Format("20060102T150405Z")+"-")
	if err != nil {
		return err
	}
	c.MovedTo = dest
	countGood := func(f *os.File, from, size int64) error {
		var data []byte
		for at := from; at < size; {
			cand, ok, err := l.nextGoodRecord(f, at, size, 0)
			if err != nil || !ok {
				return err
			}
			rec, dataLen, _, err := l.readRecord(f, cand, size, &data)
			if err != nil {
				return err
			}
			c.Records++
			if rec.Type == RecordMark {
				rec.Data = bytes.Clone(rec.Data)
				c.Marks = append(c.Marks, rec)
			}
			at = cand + recordHeaderLen + int64(dataLen)
		}
		return nil
	}
	if f != nil { // the rest of this segment is copied; it is cut after
		size, err := f.Seek(0, io.SeekEnd)
		if err != nil {
			return err
		}
		if err := countGood(f, c.Offset, size); err != nil {
			return err
		}
		out, err := os.OpenFile(filepath.Join(dest, filepath.Base(f.Name())+".tail"), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return err
		}
		_, err = io.Copy(out, io.NewSectionReader(f, c.Offset, size-c.Offset))
		if err == nil {
			err = out.Sync()
		}
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	for _, first := range later {
		p := segmentPath(l.dir, first)
		lf, err := os.Open(p)
		if err != nil {
			return err
		}
		fi, err := lf.Stat()
		if err == nil {
			c.Bytes += fi.Size()
			err = countGood(lf, 0, fi.Size())
		}
		lf.Close()
		if err != nil {
			return err
		}
		if err := os.Rename(p, filepath.Join(dest, filepath.Base(p))); err != nil {
			return err
		}
	}
	if err := fsync.Dir(dest); err != nil {
		return err
	}
	return fsync.Dir(l.dir)
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
	plainLen := int64(dataLen)
	if h[5] == recordSealed {
		plainLen -= logSealOverhead
	}
	switch {
	case h[5] > recordSealed || h[6] != 0 || h[7] != 0:
		return Record{}, 0, errors.New("reserved header bytes are not zero")
	case plainLen < 0:
		return Record{}, 0, fmt.Errorf("sealed record data of %d bytes", dataLen)
	case rec.Type < RecordWrite || rec.Type > RecordMark:
		return Record{}, 0, fmt.Errorf("unknown record type %d", rec.Type)
	case dataLen > maxRecordData:
		return Record{}, 0, fmt.Errorf("record data length %d too large", dataLen)
	case rec.Offset < 0 || rec.Length < 0:
		return Record{}, 0, errors.New("negative offset or length")
	case rec.Type == RecordWrite && plainLen != rec.Length:
		return Record{}, 0, fmt.Errorf("write of %d bytes carries %d", rec.Length, plainLen)
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
	if data != nil {
		rec.Data = data(l.nextSeq)
	}
	var pos Pos
	err := l.appendBatchLocked([]Record{rec}, func(_ int, seq uint64, p Pos) {
		rec.Seq, pos = seq, p
		if apply != nil {
			apply(seq, p)
		}
	})
	if err != nil {
		return 0, Pos{}, err
	}
	return rec.Seq, pos, nil
}

// AppendBatch appends records in one write: all of them, or none. apply,
// if not nil, runs for each under the append lock, in order, once all are
// written.
func (l *Log) AppendBatch(recs []Record, apply func(i int, seq uint64, pos Pos)) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.appendBatchLocked(recs, apply)
}

func (l *Log) appendBatchLocked(recs []Record, apply func(i int, seq uint64, pos Pos)) error {
	if l.broken != nil {
		return l.broken
	}
	seg := l.segs[len(l.segs)-1]
	hdrs := make([]byte, recordHeaderLen*len(recs))
	iov := make([][]byte, 0, 2*len(recs))
	stored := make([]int64, len(recs)) // each record's data in the file (pwriteAll consumes iov)
	total := int64(0)
	for i, rec := range recs {
		if len(rec.Data) > maxRecordData-logSealOverhead {
			return fmt.Errorf("record of %d bytes exceeds %d", len(rec.Data), maxRecordData-logSealOverhead)
		}
		hdr := hdrs[i*recordHeaderLen : (i+1)*recordHeaderLen]
		binary.LittleEndian.PutUint32(hdr[0:], recordMagic)
		hdr[4] = byte(rec.Type)
		binary.LittleEndian.PutUint64(hdr[8:], l.nextSeq+uint64(i))
		binary.LittleEndian.PutUint64(hdr[16:], uint64(rec.Offset))
		binary.LittleEndian.PutUint64(hdr[24:], uint64(rec.Length))
		data := rec.Data
		if l.seal != nil {
			hdr[5] = recordSealed
			binary.LittleEndian.PutUint32(hdr[32:], uint32(len(rec.Data)+logSealOverhead))
			data = l.seal.seal(hdr, rec.Data)
		}
		binary.LittleEndian.PutUint32(hdr[32:], uint32(len(data)))
		binary.LittleEndian.PutUint32(hdr[36:], recordCRC(hdr, data))
		iov = append(iov, hdr, data)
		stored[i] = int64(len(data))
		total += recordHeaderLen + stored[i]
	}
	if err := pwriteAll(seg.f, iov, seg.size); err != nil {
		// Leave no partial record behind: the next append goes where
		// this one started.
		if terr := seg.f.Truncate(seg.size); terr != nil {
			l.broken = fmt.Errorf("write log %s: cannot repair its tail after %v: %w", seg.f.Name(), err, terr)
		}
		return &fs.PathError{Op: "append", Path: seg.f.Name(), Err: err}
	}
	at := seg.size
	seg.size += total
	seg.dirty = true
	l.size += total
	for i, rec := range recs {
		seq := l.nextSeq
		n := int64(len(rec.Data))
		pos := Pos{Segment: seg.first, Off: at + recordHeaderLen, Rec: at, RecLen: n}
		l.nextSeq++
		l.appended++
		at += recordHeaderLen + stored[i]
		if apply != nil {
			apply(i, seq, pos)
		}
	}
	return nil
}

// Sync makes every record appended before the call durable. Concurrent
// callers share fdatasync calls: one sync serves every caller waiting on
// it (group commit). A failed fdatasync breaks the log for good: the
// kernel may have dropped the dirty pages, so that Sync, every caller
// waiting on it and every later Sync and append get the error.
func (l *Log) Sync() error {
	l.mu.Lock()
	target, broken := l.appended, l.broken
	l.mu.Unlock()
	if broken != nil {
		return broken
	}

	l.syncMu.Lock()
	defer l.syncMu.Unlock()
	for l.synced < target {
		if l.syncing {
			l.syncC.Wait()
			continue
		}
		l.mu.Lock()
		if l.broken != nil { // the sync this caller waited on failed
			err := l.broken
			l.mu.Unlock()
			return err
		}
		l.syncing = true
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
			if e := fdatasync(f); e != nil && err == nil {
				err = &fs.PathError{Op: "fdatasync", Path: f.Name(), Err: e}
			}
		}
		l.syncMu.Lock()
		l.syncing = false
		l.syncC.Broadcast()
		if err != nil {
			l.mu.Lock()
			l.broken = fmt.Errorf("write log: %w (the kernel may have dropped unsynced writes; the volume takes no more writes until the server restarts)", err)
			err = l.broken
			l.mu.Unlock()
			return err
		}
		l.synced = max(l.synced, cover)
	}
	return nil
}

// fdatasync is unix.Fdatasync of f; a closed f is an error.
func fdatasync(f *os.File) error {
	sc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := sc.Control(func(fd uintptr) { serr = unix.Fdatasync(int(fd)) }); err != nil {
		return err
	}
	return serr
}

// Err is why the log takes no more appends, or nil.
func (l *Log) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if errors.Is(l.broken, ErrVolumeClosed) {
		return nil
	}
	return l.broken
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
		if errors.Is(err, unix.ENOSPC) && l.useReserve() {
			// The disk is full: the reserve makes room for the mark, so
			// the layer can be sealed and its space freed.
			seq, _, err = l.appendLocked(Record{Type: RecordMark}, data, apply)
		}
		if err != nil {
			return
		}
		for _, s := range l.segs {
			if s.dirty {
				if e := fdatasync(s.f); e != nil {
					l.broken = fmt.Errorf("write log: %w (the kernel may have dropped unsynced writes; the volume takes no more writes until the server restarts)", &fs.PathError{Op: "fdatasync", Path: s.f.Name(), Err: e})
					err = l.broken
					return
				}
				s.dirty = false
			}
		}
		err = l.newSegment()
		if errors.Is(err, unix.ENOSPC) && l.useReserve() {
			err = l.newSegment()
		}
		if err != nil {
			// The mark is in the log but the next layer has no segment of
			// its own: appending on would mix two layers in one segment.
			l.broken = fmt.Errorf("write log: cannot start a segment after a mark: %w", err)
		}
	})
	return seq, err
}

func (l *Log) withAppendLock(fn func()) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fn()
}

// ReadAt fills p with log data at pos, checking the CRC of the whole
// record that holds it: a record that fails it is ErrLogCorrupt, and p
// must then not be used.
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
	at := pos.Off - pos.Rec - recordHeaderLen // where p starts in the record's data
	if at < 0 || pos.RecLen < 0 || int64(len(p)) > pos.RecLen-at {
		return fmt.Errorf("write log: %d bytes at %+v lie outside their record", len(p), pos)
	}
	if len(p) == 0 {
		return nil
	}
	var hdr [recordHeaderLen]byte
	data := p
	stored := pos.RecLen // the record's data in the file
	if l.seal != nil {
		stored += logSealOverhead
	}
	if int64(len(p)) != stored {
		// Part of a record, or a sealed one: read all of it, to check it.
		bp := recordBuf(stored)
		defer putRecordBuf(bp)
		data = (*bp)[:stored]
	}
	if err := preadAll(f, [][]byte{hdr[:], data}, pos.Rec); err != nil {
		return fmt.Errorf("write log %s: read record at offset %d: %w", f.Name(), pos.Rec, err)
	}
	rec, dataLen, err := parseHeader(hdr[:])
	switch {
	case err != nil:
	case int64(dataLen) != stored:
		err = fmt.Errorf("record of %d bytes where %d were written", dataLen, stored)
	case recordCRC(hdr[:], data) != binary.LittleEndian.Uint32(hdr[36:]):
		err = errors.New("CRC mismatch")
	case (hdr[5] == recordSealed) != (l.seal != nil):
		err = errors.New("sealed where the log is not, or the other way round")
	case l.seal != nil:
		// Opened in place: the buffer is the whole record's, not p.
		data, err = l.seal.open(hdr[:], data)
	}
	if err != nil {
		return fmt.Errorf("%w: %s at offset %d (record %d): %v", ErrLogCorrupt, f.Name(), pos.Rec, rec.Seq, err)
	}
	if &data[0] != &p[0] {
		copy(p, data[at:])
	}
	return nil
}

// recordBufs holds buffers for whole records read to check a part of
// them: up to RecordGrain, the size of records written now, sealed or not.
var recordBufs = sync.Pool{New: func() any { b := make([]byte, recordBufLen); return &b }}

const recordBufLen = RecordGrain + logSealOverhead

func recordBuf(n int64) *[]byte {
	if n > recordBufLen {
		b := make([]byte, n)
		return &b
	}
	return recordBufs.Get().(*[]byte)
}

func putRecordBuf(b *[]byte) {
	if cap(*b) == recordBufLen {
		recordBufs.Put(b)
	}
}

// preadAll fills bufs from f at off with preadv; a short file is
// io.ErrUnexpectedEOF.
func preadAll(f *os.File, bufs [][]byte, off int64) error {
	// Through the file's raw connection, which holds a reference: a
	// concurrent Close waits for the read instead of freeing the fd
	// number for another file.
	sc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	for {
		for len(bufs) > 0 && len(bufs[0]) == 0 {
			bufs = bufs[1:]
		}
		if len(bufs) == 0 {
			return nil
		}
		var n int
		var rerr error
		if err := sc.Read(func(fd uintptr) bool {
			n, rerr = unix.Preadv(int(fd), bufs, off)
			return true
		}); err != nil {
			return err
		}
		if rerr != nil {
			return rerr
		}
		if n == 0 {
			return io.ErrUnexpectedEOF
		}
		off += int64(n)
		bufs = consumed(bufs, n)
	}
}

// consumed drops the first n bytes of bufs.
func consumed(bufs [][]byte, n int) [][]byte {
	for n > 0 {
		k := min(n, len(bufs[0]))
		bufs[0] = bufs[0][k:]
		n -= k
		if len(bufs[0]) == 0 {
			bufs = bufs[1:]
		}
	}
	return bufs
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
	if err := fsync.Dir(l.dir); err != nil {
		return err
	}
	l.keepReserve() // room was freed: take the reserve back if it was used
	return nil
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
		bufs = consumed(bufs, n)
	}
}
