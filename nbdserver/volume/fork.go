package volume

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nbdvault/nbdvault/internal/fsync"
)

// ErrForkedLog: the volume's write log holds writes that no manifest of
// this state folder covers, and the volume's history in the repository
// went on without them: another server took the lease over while this
// folder's server was down, or the folder is older than the repository.
// They are never replayed over that history; Recover moves the log aside.
var ErrForkedLog = errors.New("its write log holds writes the repository's history of it does not have")

// A fork is told two ways (docs/architecture.md, "A server back after a
// takeover it never saw"):
//
//   - by the marks: every manifest's ID is the ID of the mark it seals,
//     at its Seq, so a manifest whose Seq falls among the log's records
//     must find there a mark with its ID; anything else is another
//     history numbered over the same records;
//   - by the writer: the newest manifest (or, with none, the volume
//     record) was written by a lease holder this folder never had, and
//     the folder has not adopted it as the state its log goes on from.
//
// Either way, the records above the newest manifest of this folder's
// history (own) are writes the repository does not have.
type fork struct {
	bySeq map[uint64]string // every manifest listed, good or damaged: Seq to ID

	foreign bool // the history's writer is not this folder's
	// mismatch is the first Seq whose manifest finds no mark of its ID
	// (0: none; records are numbered from 1). matched is the newest Seq
	// whose manifest finds its mark: own, the newest of this folder's
	// history that the log holds.
	mismatch uint64
	matched  uint64
	records  int
	first    uint64
	last     uint64
	marks    []Record
}

func newFork(snaps []Manifest, cuts []*cut, damaged []damagedManifest) *fork {
	fk := &fork{bySeq: make(map[uint64]string, len(snaps)+len(cuts)+len(damaged))}
	for _, m := range snaps {
		fk.bySeq[m.Seq] = m.ID
	}
	for _, c := range cuts {
		fk.bySeq[c.seq] = c.id
	}
	for _, d := range damaged {
		if d.seqOK {
			fk.bySeq[d.seq] = d.id
		}
	}
	return fk
}

// see checks one record of the log as it is replayed.
func (fk *fork) see(r Record) {
	if fk.records == 0 {
		fk.first = r.Seq
	}
	fk.records++
	fk.last = r.Seq
	if r.Type == RecordMark {
		fk.marks = append(fk.marks, Record{Type: r.Type, Seq: r.Seq, Data: append([]byte(nil), r.Data...)})
	}
	id, ok := fk.bySeq[r.Seq]
	if !ok {
		return
	}
	var m mark
	if r.Type == RecordMark && json.Unmarshal(r.Data, &m) == nil && m.ID == id {
		fk.matched = max(fk.matched, r.Seq)
		return
	}
	if fk.mismatch == 0 { // records come in order: the first is the lowest
		fk.mismatch = r.Seq
	}
}

// historyWriter is who wrote the volume's newest state in the repository:
// the newest manifest's writer, or the record's when there is none.
func (v *Volume) historyWriter() string {
	if v.base.ID != "" {
		if v.adopted() == v.base.ID {
			return "" // this folder's log goes on from it
		}
		return v.base.Writer
	}
	if v.adopted() == recordHistory(v.cfg) {
		return ""
	}
	return v.cfg.Writer
}

// historyFile, in a volume's state folder, names the state of another
// server's history that the volume's log goes on from: a manifest ID, or
// the record's creation when the volume had no manifest.
const historyFile = "history"

func recordHistory(cfg Config) string { return "record " + cfg.Created.UTC().Format(time.RFC3339Nano) }

func (v *Volume) adopted() string {
	b, err := os.ReadFile(filepath.Join(v.env.stateDir(v.cfg.Name), historyFile))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// checkFork decides, once the log is replayed (and the segments it
// would have removed unread were inspected), whether it forks from the
// repository's history. If not, and the history is another server's,
// the folder adopts it (before the log takes any record) so that what
// this server writes on top of it is its own.
//
// own is the newest manifest whose mark the log holds: records up to it
// are in the repository's history; records after it were never sealed
// (a seal covers up to a mark), or were sealed into a manifest the other
// server has since expired, which then over-reports the fork and loses
// nothing. A manifest of this folder's without its mark in the log is
// older than the log's first record, so it cannot cover any of them.
func (v *Volume) checkFork(fk *fork, dir string) error {
	if !fk.foreign && fk.mismatch == 0 {
		return nil
	}
	if fk.records > 0 && (fk.last > fk.matched || (fk.foreign && fk.last > v.base.Seq)) {
		return &forkError{fk: fk, dir: dir, v: v}
	}
	if !fk.foreign {
		return nil
	}
	at := recordHistory(v.cfg)
	if v.base.ID != "" {
		at = v.base.ID
	}
	if err := fsync.WriteFile(filepath.Join(v.env.stateDir(v.cfg.Name), historyFile), []byte(at+"\n")); err != nil {
		return fmt.Errorf("volume %q: state folder: %w", v.cfg.Name, err)
	}
	return nil
}

// forkError is ErrForkedLog with what Recover needs to move the log aside.
type forkError struct {
	fk  *fork
	dir string
	v   *Volume
	// damaged: what a recovery cut from the same log at damage, moved
	// aside before the fork was found; it goes with the rest.
	damaged *LogCut
}

func (e *forkError) Unwrap() error { return ErrForkedLog }

// from is the first record the repository's history does not have.
func (e *forkError) from() uint64 { return max(e.fk.matched+1, e.fk.first) }

func (e *forkError) Error() string {
	return fmt.Sprintf("volume %q: %v: records %d to %d of its write log were acknowledged by a server on this state folder and never uploaded, "+
		"and %s: its history went on without them (another server took the repository over while this one was down, or this state folder is older than the repository), so they are not replayed over it",
		e.v.cfg.Name, ErrForkedLog, e.from(), e.fk.last, e.reason())
}

// reason says which history the repository holds instead.
func (e *forkError) reason() string {
	v, fk := e.v, e.fk
	switch w := v.historyWriter(); {
	case fk.foreign && v.base.ID != "":
		return fmt.Sprintf("its newest manifest %s was written by another server (lease holder %s)", v.base.ID, w)
	case fk.foreign:
		return fmt.Sprintf("its record was written by another server (lease holder %s), which created the volume again", w)
	}
	return fmt.Sprintf("the repository holds another history of it from record %d on", cmp.Or(fk.mismatch, e.from()))
}

// moveAside renames the log folder to state/forked/VOL-TIME-… and returns
// what it held. One rename: a crash leaves either the log (refused again)
// or no log (the volume opens as the repository holds it), and the moved
// folder keeps every record.
func (e *forkError) moveAside() (*LogCut, error) {
	root := filepath.Join(e.v.env.StateDir, "forked")
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, err
	}
	dest, err := os.MkdirTemp(root, e.v.cfg.Name+"-"+time.Now().UTC().Format("20060102T150405Z")+"-")
	if err != nil {
		return nil, err
	}
	dest = filepath.Join(dest, "log")
	if err := os.Rename(e.dir, dest); err != nil {
		return nil, err
	}
	for _, d := range []string{filepath.Dir(dest), root, filepath.Dir(e.dir)} {
		if err := fsync.Dir(d); err != nil {
			return nil, err
		}
	}
	if d := e.damaged; d != nil && d.MovedTo != "" {
		// The records after the damage are this fork's too.
		to := filepath.Join(filepath.Dir(dest), "damaged")
		if err := os.Rename(d.MovedTo, to); err != nil {
			return nil, err
		}
		for _, dir := range []string{filepath.Dir(dest), filepath.Dir(d.MovedTo)} {
			if err := fsync.Dir(dir); err != nil {
				return nil, err
			}
		}
	}
	var size int64
	_ = filepath.WalkDir(filepath.Dir(dest), func(_ string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if fi, err := d.Info(); err == nil {
				size += fi.Size()
			}
		}
		return nil
	})
	var lost []Record
	for _, r := range e.fk.marks {
		if r.Seq >= e.from() {
			lost = append(lost, r)
		}
	}
	cut := &LogCut{Seq: e.from(), Why: e.reason(),
		Bytes: size, MovedTo: filepath.Dir(dest), Records: int(e.fk.last - e.from() + 1), Marks: lost, Forked: true}
	if d := e.damaged; d != nil {
		cut.Records += d.Records
		cut.Marks = append(cut.Marks, d.Marks...)
		cut.Why += fmt.Sprintf("; the log was damaged at record %d (%s): what followed is in %s too", d.Seq, d.Why, filepath.Join(filepath.Dir(dest), "damaged"))
	}
	return cut, nil
}
