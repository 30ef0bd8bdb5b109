package volume

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/nbdserver/retention"
)

// Errors of the volume API.
var (
	ErrExists       = errors.New("already exists")
	ErrNoVolume     = errors.New("no such volume")
	ErrNoSnapshot   = errors.New("no such snapshot")
	ErrOutOfRange   = errors.New("beyond the end of the volume")
	ErrLabelTaken   = errors.New("label already used by another snapshot of this volume")
	ErrVolumeClosed = errors.New("volume closed")
	ErrShrink       = errors.New("volumes can grow but not shrink")
	ErrInvalid      = errors.New("invalid volume configuration")
)

// isClosed reports whether Close has begun.
func (v *Volume) isClosed() bool {
	select {
	case <-v.closed:
		return true
	default:
		return false
	}
}

// Volume is one volume's live state on the server: the newest sealed index
// in the repository (base) plus the layers of its write log. Its methods
// are safe for concurrent use.
type Volume struct {
	env   *Env
	cfg   Config // Size is stale after Grow: size has the current one
	size  atomic.Int64
	repo  chunkstore.Backend
	store *chunkstore.Store
	log   *Log

	// mu guards layers, base and snaps. Lock order: the log's lock, then
	// mu (apply runs under the log's append lock): never call into the
	// log while holding mu.
	mu     sync.RWMutex
	layers []*layer // closed layers oldest first, then the open one
	base   Manifest // newest sealed manifest; zero Root and Seq when none
	snaps  []*snapshot

	// gcMu is held shared by reads of log data and exclusively while
	// sealed segments are deleted.
	gcMu sync.RWMutex
	// sealMu makes seals run one at a time, oldest layer first.
	sealMu sync.Mutex
	// growMu makes Grows run one at a time.
	growMu sync.Mutex
	// markMu makes a label's uniqueness check and its mark one step, and
	// holds At back while a mark is made. lastMark is the newest mark's
	// time (guarded by the log's append lock, and set in Open).
	markMu   sync.Mutex
	lastMark time.Time
	// closed is closed by Close: writers waiting for room give up, and
	// Grow and DeleteSnapshot refuse (they hold growMu or sealMu, which
	// Close takes).
	closed chan struct{}
	// checkpoints are the checkpoint manifests in the repository, by
	// sequence number, and by ID in cutIDs: the points in time kept (a
	// seal deletes those that left the retention window). Guarded by mu;
	// changed with sealMu held too.
	checkpoints []*cut
	cutIDs      map[string]*cut
	loaded      []*cut // those whose manifest is in memory, oldest first
	expiryErr   error  // why the last checkpoint to leave the window is still there
	// pitFrom is the oldest time a point in time may be read at: zero
	// until checkpoints are deleted (or at Open, if any manifest is
	// sealed), since all deleted ones are older. Guarded by mu.
	pitFrom time.Time

	// The uploader: kick wakes Run; sealed is closed and replaced after
	// every seal, waking writers held back by a full log. Guarded by mu.
	kick     chan struct{}
	sealed   chan struct{}
	lastSeal time.Time
	sealErr  error // the last seal's failure, until one succeeds
	// diskFull is set while writes wait for room on a full state disk.
	diskFull atomic.Bool

	// packs are the journal packs of the volume in the repository, as
	// listed at Open and written since; sweepDue says some may be dead.
	// foldCredit is how many bytes of chunks the next folds may write:
	// twice the journal bytes shipped and not yet paid by a fold. Guarded
	// by sealMu.
	packs      map[string]struct{}
	dropped    map[string]uint64 // pack: the base's seq when first found unnamed
	sweepDue   bool
	foldCredit int64
	// For Status, which must not wait for a seal: the number of packs,
	// journal bytes shipped and chunks folded since Open.
	nPacks          atomic.Int64
	shipped, folded atomic.Int64
	repacked        atomic.Int64
}

// layer is the log records between two marks: what they wrote, as an
// extent map, and the mark that closed it (nil while open).
type layer struct {
	extents *extentMap
	mark    *mark
	since   time.Time // when its first record was applied; zero while empty
	written int64     // bytes of the write records applied to it
}

// mark is the payload of a RecordMark.
type mark struct {
	ID    string    `json:"id"`
	Kind  Kind      `json:"kind"`
	Label string    `json:"label,omitempty"`
	Time  time.Time `json:"time"`
	// By is who took a snapshot, when not the admin or the server
	// (Manifest.By).
	By string `json:"by,omitempty"`
	// Size is the volume's size when the mark was made; a volume can grow
	// after it. Zero in marks of older logs: then the volume's size.
	Size int64 `json:"size,omitempty"`
	seq  uint64
}

type snapshot struct {
	Manifest       // Root and Seq are set once sealed
	sealed   bool  // its manifest is in the repository
	damage   error // its manifest is damaged: not readable
}

// SnapshotInfo describes a snapshot for listing.
type SnapshotInfo struct {
	ID string
	// Kind is KindCheckpoint for a point in time (At, Find).
	Kind   Kind
	Label  string
	Time   time.Time
	Size   int64
	Sealed bool
	// Protected: delete and prune leave it (Volume.Protect).
	Protected bool
	// By is who took it, when not the admin or the server (Manifest.By).
	By string
	// Damaged is why the snapshot's manifest cannot be trusted; such a
	// snapshot is listed but not readable.
	Damaged error
}

// Is reports whether name is the snapshot's ID or its label: the one way
// a snapshot is looked up by name.
func (s SnapshotInfo) Is(name string) bool { return isNamed(s.ID, s.Label, name) }

func isNamed(id, label, name string) bool { return name != "" && (id == name || label == name) }

// is reports whether name is the snapshot's ID or label (SnapshotInfo.Is).
func (s *snapshot) is(name string) bool { return isNamed(s.ID, s.Label, name) }

// Env is where volumes live: the repository, the chunk store over it, the
// server's state folder, and the limits the engine keeps.
type Env struct {
	Repo chunkstore.Backend
	// RepoID is the repository's ID (its config's): the checksums of
	// volume records and manifests are bound to it.
	RepoID   string
	Store    *chunkstore.Store
	StateDir string
	// Keys are an encrypted repository's (nil for a plain one): each
	// volume's write log seals its records with their state key
	// (logseal.go).
	Keys *chunkstore.Keys
	// Inventory, if set, names the chunk objects the repository holds,
	// with their stored sizes (OpenInventory), so that CollectGarbage lists them only when it
	// cannot be trusted. Store must report its Puts to it
	// (chunkstore.Options.Written). Without it every collection lists.
	Inventory *Inventory
	// Writer is this server's lease holder ID: every manifest and volume
	// record it writes names it. Holders are the state folder's (this
	// one included, before the lease is taken): a volume whose newest
	// manifest another writer made does not replay the log records no
	// manifest of this folder's covers (ErrForkedLog). Nil: every writer
	// counts as this folder's.
	Writer  string
	Holders *Holders
	// CheckpointInterval: after a write, Run makes a checkpoint at most
	// this long after it, bounding how far the repository lags the
	// volume. Default 10s.
	CheckpointInterval time.Duration
	// LogLimit: past this many bytes of write log, writes wait for the
	// uploader. Default 8 GiB.
	LogLimit int64
	// SealAhead: Run also makes a checkpoint once the open layer has taken
	// this many bytes of writes, so that a large write (an import, a
	// restore onto the volume) is sealed while it goes on instead of
	// after it. Default DefaultSealAhead; negative: only by time.
	SealAhead int64
	// JournalRetention is how long checkpoints are kept as points in time
	// (VOL@TIME). Zero: DefaultJournalRetention; negative: none are kept.
	JournalRetention time.Duration
	// UploadMemory bounds what the seals of all volumes hold at once: a
	// seal takes about SealMemory for 1 MiB chunks (its journal pack,
	// chunks being built; more for larger chunks), and waits until it
	// fits beside those running (one always runs). Zero: no bound.
	UploadMemory int64
	// Logger, if set, hears of upload failures and recoveries.
	Logger *slog.Logger
	// Sealed, if set, is called after each seal with the volume's name
	// and the kind of manifest the seal wrote, from the volume's
	// uploader while it holds the volume's seal lock: it must not block
	// or call the volume (the server starts the volume's retention
	// policy from it, in a goroutine of its own).
	Sealed func(volume string, kind Kind)

	deltaOnce  sync.Once
	deltaCache *deltaCache // decoded delta tops and pages of all volumes

	slotsOnce sync.Once
	slots     *semaphore.Weighted // memory of the seals running; nil: no bound

	gcOnce sync.Once
	gcs    *gcState // what the volumes share with the collector (gc.go)

	clock func() time.Time // tests; nil: time.Now
}

func (e *Env) checkpointInterval() time.Duration {
	if e.CheckpointInterval > 0 {
		return e.CheckpointInterval
	}
	return 10 * time.Second
}

// stateDir is where volume name keeps its write log.
func (e *Env) stateDir(name string) string {
	return filepath.Join(e.StateDir, "volumes", name)
}

// DefaultSealAhead is Env.SealAhead's default.
const DefaultSealAhead = 256 << 20

func (e *Env) sealAhead() int64 {
	switch {
	case e.SealAhead > 0:
		return e.SealAhead
	case e.SealAhead < 0:
		return math.MaxInt64
	}
	return DefaultSealAhead
}

func (e *Env) logLimit() int64 {
	if e.LogLimit > 0 {
		return e.LogLimit
	}
	return 8 << 30
}

// Create writes a new volume's record to the repository and opens it.
func Create(ctx context.Context, env *Env, cfg Config) (*Volume, error) {
	repo := env.Repo
	cfg.ChunkSize = cmp.Or(cfg.ChunkSize, DefaultChunkSize)
	cfg.Writer = env.Writer
	if cfg.Created.IsZero() {
		cfg.Created = time.Now().UTC()
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	has, err := repo.Has(ctx, volumeKey(cfg.Name))
	if err != nil {
		return nil, err
	}
	if has {
		return nil, fmt.Errorf("volume %q: %w", cfg.Name, ErrExists)
	}
	// Without its record, anything left under the name is from a delete
	// that did not finish; a new volume must not pick it up.
	if left, err := leftovers(ctx, env, cfg.Name); err != nil {
		return nil, err
	} else if left != "" {
		return nil, fmt.Errorf("volume %q: %w: %s is left from a delete that did not finish; delete the volume again to remove it", cfg.Name, ErrExists, left)
	}
	if err := putJSON(ctx, repo, env.RepoID, volumeKey(cfg.Name), cfg); err != nil {
		return nil, fmt.Errorf("create volume %q: %w", cfg.Name, err)
	}
	v, err := Open(ctx, env, cfg.Name)
	if err != nil {
		// Take the record back: a volume that never opened must not stop
		// the next server start, nor hold the name.
		_ = repo.Delete(context.WithoutCancel(ctx), volumeKey(cfg.Name))
		return nil, err
	}
	return v, nil
}

// Open opens volume name: its record and manifests from the repository,
// then its write log in stateDir, replaying what the newest manifest does
// not cover. With no log (a lost state folder) the volume opens at its
// newest manifest.
//
// Damage in the log (a bad record that is not a torn tail) fails Open
// with ErrLogCorrupt; Recover opens such a volume at its newest good
// state. A torn tail is cut, and logged.
func Open(ctx context.Context, env *Env, name string) (*Volume, error) {
	return openVolume(ctx, env, name, false)
}

// Recover opens volume name like Open, but cuts its write log at the
// first damaged record instead of failing: the volume keeps every record
// before it. What was cut is moved to a folder beside the log, and the
// returned LogCut says where and what it held (nil when the log had no
// damage).
func Recover(ctx context.Context, env *Env, name string) (*Volume, *LogCut, error) {
	v, err := openVolume(ctx, env, name, true)
	var fe *forkError
	if errors.As(err, &fe) {
		// The whole log is another history's fork: moved aside, the
		// volume opens as the repository holds it.
		cut, merr := fe.moveAside()
		if merr != nil {
			return nil, nil, fmt.Errorf("volume %q: move its write log aside: %w", name, merr)
		}
		if v, err = openVolume(ctx, env, name, true); err != nil {
			return nil, nil, err
		}
		return v, cut, nil
	}
	if err != nil {
		return nil, nil, err
	}
	return v, v.log.Recovered(), nil
}

// LostSnapshots are the snapshots whose marks a recovery cut off: they
// are gone from the volume (their records are in the folder MovedTo).
func (c *LogCut) LostSnapshots() []SnapshotInfo {
	var out []SnapshotInfo
	for _, r := range c.Marks {
		var m mark
		if json.Unmarshal(r.Data, &m) == nil && m.Kind == KindSnapshot {
			out = append(out, SnapshotInfo{ID: m.ID, Label: m.Label, Time: m.Time, Size: m.Size})
		}
	}
	return out
}

func openVolume(ctx context.Context, env *Env, name string, recover bool) (*Volume, error) {
	if err := ValidName(name); err != nil {
		return nil, err
	}
	repo := env.Repo
	v := &Volume{env: env, repo: repo, store: env.Store, kick: make(chan struct{}, 1), sealed: make(chan struct{}), closed: make(chan struct{}), cutIDs: map[string]*cut{}, dropped: map[string]uint64{}}
	if err := getJSON(ctx, repo, env.RepoID, volumeKey(name), &v.cfg); err != nil {
		if errors.Is(err, chunkstore.ErrNotFound) {
			return nil, fmt.Errorf("volume %q: %w", name, ErrNoVolume)
		}
		return nil, err
	}
	if err := v.cfg.Validate(); err != nil {
		return nil, fmt.Errorf("volume record %s: %w: %w", volumeKey(name), chunkstore.ErrCorrupt, err)
	}
	if v.cfg.Name != name {
		return nil, fmt.Errorf("volume record %s: %w: it says it is of volume %q", volumeKey(name), chunkstore.ErrCorrupt, v.cfg.Name)
	}
	v.size.Store(v.cfg.Size)
	snaps, damaged, err := listManifests(ctx, repo, env.RepoID, name, KindSnapshot, v.cfg.ChunkSize)
	if err != nil {
		return nil, err
	}
	for _, m := range snaps {
		if m.Seq > v.base.Seq {
			v.base = m
		}
		v.snaps = append(v.snaps, &snapshot{Manifest: m, sealed: true})
	}
	newest, cuts, bad, err := listCheckpoints(ctx, repo, env.RepoID, name, v.cfg.ChunkSize)
	if err != nil {
		return nil, err
	}
	damaged = append(damaged, bad...)
	fk := newFork(snaps, cuts, damaged)
	for _, c := range cuts {
		v.checkpoints = append(v.checkpoints, c)
		v.cutIDs[c.id] = c
	}
	if newest != nil && newest.Seq > v.base.Seq {
		v.base = *newest
	}
	for _, c := range v.checkpoints {
		v.lastMark = maxTime(v.lastMark, c.time)
	}
	for _, s := range v.snaps {
		v.lastMark = maxTime(v.lastMark, s.Time)
	}
	if err := v.listPacks(ctx); err != nil {
		return nil, err
	}
	v.sweepDue = len(v.packs) > 0
	mustReach, err := v.placeDamaged(damaged)
	if err != nil {
		return nil, err
	}
	// Checkpoints newer than the base are damaged ones the log replays
	// (placeDamaged): until sealed again, their marks are read from it.
	for len(v.checkpoints) > 0 && v.checkpoints[len(v.checkpoints)-1].seq > v.base.Seq {
		delete(v.cutIDs, v.checkpoints[len(v.checkpoints)-1].id)
		v.checkpoints = v.checkpoints[:len(v.checkpoints)-1]
	}
	if v.base.ID != "" {
		v.pitFrom = v.keptFrom() // older checkpoints may have been deleted
	}
	for _, s := range v.snaps {
		if s.damage == nil && s.Size > v.cfg.Size {
			return nil, fmt.Errorf("volume record %s: %w: it says the volume is %d bytes, but snapshot %s is %d: an old or foreign copy of the record",
				volumeKey(name), chunkstore.ErrCorrupt, v.cfg.Size, s.ID, s.Size)
		}
	}
	if v.base.Size > v.cfg.Size {
		return nil, fmt.Errorf("volume record %s: %w: it says the volume is %d bytes, but its newest manifest %s is %d: an old or foreign copy of the record",
			volumeKey(name), chunkstore.ErrCorrupt, v.cfg.Size, v.base.ID, v.base.Size)
	}
	dir := filepath.Join(env.stateDir(name), "log")
	// Written by a server of another state folder: the log's records
	// are checked against that history, never replayed over it (fork.go).
	fk.foreign = !env.Holders.Own(v.historyWriter())
	if firsts, err := segmentNames(dir); err == nil && len(firsts) > 0 && firsts[0] > v.base.Seq+1 && !fk.foreign {
		// The log starts after what the newest manifest covers: the
		// manifest that covered the records between is gone or damaged.
		// Replaying would put later writes on an older state.
		when := "none"
		if v.base.ID != "" {
			when = v.base.ID
		}
		return nil, fmt.Errorf("volume %q: %w: its write log starts at record %d, but the newest good manifest (%s) covers only up to %d: the manifest of what lies between is missing or damaged; restore it from a copy of the repository, or move %s aside to open the volume at %s (what was written since is then lost)",
			name, ErrDamagedManifest, firsts[0], when, v.base.Seq, dir, when)
	}
	v.layers = []*layer{{extents: newExtentMap()}}
	replay := func(r Record, pos Pos) error {
		fk.see(r)
		if r.Seq <= v.base.Seq || fk.foreign {
			return nil // in the repository already, or a fork
		}
		return v.apply(r, pos)
	}
	lo := logOpen{first: v.base.Seq + 1, recover: recover, inspect: fk.see}
	if env.Keys != nil {
		lo.seal = newLogSeal(env.Keys.StateKey(), name)
	}
	log, err := openLog(dir, lo, replay)
	if err != nil {
		return nil, fmt.Errorf("volume %q: write log: %w", name, err)
	}
	if err := v.checkFork(fk, dir); err != nil {
		var fe *forkError
		if errors.As(err, &fe) {
			fe.damaged = log.Recovered() // moved aside already: Recover reports both
		}
		log.Close()
		return nil, err
	}
	if err := log.DropStale(); err != nil {
		log.Close()
		return nil, err
	}
	v.log = log
	if mustReach > 0 && log.NextSeq() <= mustReach {
		// The log does not hold all a damaged newer manifest covered (a
		// state folder restored from an older copy, say).
		log.Close()
		return nil, fmt.Errorf("volume %q: %w: its write log ends at record %d, before record %d that a damaged manifest covers; restore the manifest from a copy of the repository",
			name, ErrDamagedManifest, log.NextSeq()-1, mustReach)
	}
	if c := log.TornTail(); c != nil && env.Logger != nil {
		env.Logger.Warn("write log: cut a torn record at its end; it was never acknowledged as durable",
			"volume", name, "segment", c.Segment, "offset", c.Offset, "record", c.Seq, "bytes", c.Bytes, "why", c.Why)
	}
	if c := log.Recovered(); c != nil && env.Logger != nil {
		env.Logger.Warn("write log: recovered: cut at its first damaged record",
			"volume", name, "segment", c.Segment, "offset", c.Offset, "record", c.Seq, "why", c.Why,
			"bytes_cut", c.Bytes, "good_records_cut", c.Records, "marks_cut", len(c.Marks), "moved_to", c.MovedTo)
	}
	if log.NextSeq() <= v.base.Seq {
		// The log is older than the repository (a state folder restored
		// from backup): everything in it is covered.
		if err := log.Reset(v.base.Seq + 1); err != nil {
			log.Close()
			return nil, err
		}
	} else if err := log.RemoveBefore(v.base.Seq + 1); err != nil {
		log.Close()
		return nil, err
	}
	v.sortSnaps()
	return v, nil
}

// ErrDamagedManifest: the volume's newest manifest is damaged and its
// write log no longer holds what the manifest covered.
var ErrDamagedManifest = errors.New("its newest manifest is damaged")

// placeDamaged decides what damaged manifests mean for the volume, which
// has chosen its base among the good ones. One older than the base is an
// old snapshot (listed as damaged, not readable) or an old checkpoint
// (ignored: only the newest is used). One that may be newer than the base
// is the point the write log starts from: the volume opens only if the
// log still holds every record after the base (a seal cut short before
// it freed them), and it will seal them again.
//
// It returns the highest sequence number a damaged manifest it let pass
// covers: the replayed log must reach it.
func (v *Volume) placeDamaged(damaged []damagedManifest) (uint64, error) {
	var mustReach uint64
	logFirst := uint64(0)
	if firsts, err := segmentNames(filepath.Join(v.env.stateDir(v.cfg.Name), "log")); err == nil && len(firsts) > 0 {
		logFirst = firsts[0]
	}
	// Newest first: if one stops the volume, the message names the newest.
	slices.SortFunc(damaged, func(a, b damagedManifest) int { return cmpUint(b.seq, a.seq) })
	for _, d := range damaged {
		l := v.env.Logger
		switch {
		case !d.seqOK:
			// Not a name nbdvault gives (an S3 folder marker, a stray
			// file): not ours to judge.
			if l != nil {
				l.Warn("an object that is not a manifest lies among the manifests; ignored", "volume", v.cfg.Name, "object", d.key)
			}
			continue
		case d.seq <= v.base.Seq && d.kind == KindSnapshot:
			taken, _ := time.Parse("20060102T150405.000Z", d.id[:min(len(d.id), 20)])
			v.snaps = append(v.snaps, &snapshot{Manifest: Manifest{ID: d.id, Kind: d.kind, Volume: v.cfg.Name, Seq: d.seq, Time: taken}, sealed: true, damage: d.err})
		case d.seq <= v.base.Seq:
			// An old checkpoint: a read of its time fails, and it leaves
			// with the retention window.
		case logFirst > 0 && logFirst <= v.base.Seq+1:
			mustReach = max(mustReach, d.seq)
			if l != nil {
				l.Warn("a manifest newer than the last good one is damaged; the write log still holds what it covered, which is sealed again",
					"volume", v.cfg.Name, "manifest", d.key, "error", d.err)
			}
			continue
		default:
			return 0, fmt.Errorf("volume %q: %w: %v; restore %s from a copy of the repository, or delete it to open the volume at the manifest before it (writes made since that one are then lost)",
				v.cfg.Name, ErrDamagedManifest, d.err, d.key)
		}
		if l != nil {
			l.Warn("a manifest is damaged: what it describes is not served", "volume", v.cfg.Name, "manifest", d.key, "error", d.err)
		}
	}
	return mustReach, nil
}

func (v *Volume) sortSnaps() {
	slices.SortFunc(v.snaps, func(a, b *snapshot) int { return cmpUint(a.Seq, b.Seq) })
}

// apply records r in the open layer. It runs under the log's append lock
// (or during replay), so layers see records in log order.
func (v *Volume) apply(r Record, pos Pos) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	open := v.layers[len(v.layers)-1]
	if r.Type != RecordMark && open.since.IsZero() {
		open.since = time.Now()
	}
	switch r.Type {
	case RecordWrite:
		open.extents.insert(extent{off: r.Offset, length: r.Length, pos: pos})
		if ahead := v.env.sealAhead(); open.written < ahead && open.written+r.Length >= ahead {
			v.nudge() // Run makes the checkpoint
		}
		open.written += r.Length
	case RecordZero:
		open.extents.insert(extent{off: r.Offset, length: r.Length, zero: true})
	case RecordMark:
		var m mark
		if err := json.Unmarshal(r.Data, &m); err != nil {
			return fmt.Errorf("%w: mark record %d: %v", ErrLogCorrupt, r.Seq, err)
		}
		m.seq = r.Seq
		if m.Time.After(v.lastMark) {
			v.lastMark = m.Time
		}
		if m.Size == 0 {
			m.Size = v.size.Load()
		}
		open.mark = &m
		v.layers = append(v.layers, &layer{extents: newExtentMap()})
		if m.Kind == KindSnapshot {
			v.snaps = append(v.snaps, &snapshot{Manifest: Manifest{
				ID: m.ID, Kind: m.Kind, Volume: v.cfg.Name, Label: m.Label, Time: m.Time,
				Size: m.Size, ChunkSize: v.cfg.ChunkSize, Seq: m.seq, By: m.By,
			}})
		}
	}
	return nil
}

// Config returns the volume's configuration.
func (v *Volume) Config() Config {
	v.mu.RLock() // SetRetention changes cfg.Retention
	c := v.cfg
	v.mu.RUnlock()
	c.Size = v.size.Load()
	return c
}

// SetRetention stores p as the volume's retention policy in its record
// (Config.Retention); the zero policy removes it. A policy with no rule
// would remove every snapshot, so only the zero policy clears: any
// other is validated, and refused with ErrInvalid saying why.
func (v *Volume) SetRetention(ctx context.Context, p retention.Policy) error {
	if !p.Empty() {
		if err := p.Validate(); err != nil {
			return fmt.Errorf("%w: %v", ErrInvalid, err)
		}
	}
	v.growMu.Lock() // one write of the record at a time (Grow)
	defer v.growMu.Unlock()
	if v.isClosed() {
		return fmt.Errorf("volume %q: %w", v.cfg.Name, ErrVolumeClosed)
	}
	cfg := v.cfg
	cfg.Size = v.size.Load()
	cfg.Retention = p
	if err := putJSON(ctx, v.repo, v.env.RepoID, volumeKey(cfg.Name), cfg); err != nil {
		// The put may have landed: the record then holds p, which the
		// next Open reads; a retry writes it again.
		return fmt.Errorf("set the retention of volume %q: %w", cfg.Name, err)
	}
	v.mu.Lock()
	v.cfg.Retention = p
	v.mu.Unlock()
	return nil
}

// Size is the volume's size in bytes.
func (v *Volume) Size() int64 { return v.size.Load() }

// Grow makes the volume size bytes long; what it adds reads as zeros.
// The new size is in the repository before any write can reach past the
// old end. Snapshots keep the size they were taken at. Clients see the
// new size when they next connect. Growing to the current size does
// nothing; shrinking is refused with ErrShrink.
func (v *Volume) Grow(ctx context.Context, size int64) error {
	v.growMu.Lock()
	defer v.growMu.Unlock()
	if v.isClosed() {
		return fmt.Errorf("volume %q: %w", v.cfg.Name, ErrVolumeClosed)
	}
	old := v.size.Load()
	switch {
	case size == old:
		return nil
	case size < old:
		return fmt.Errorf("volume %q is %d bytes, asked for %d: %w (make a new volume and copy into it)", v.cfg.Name, old, size, ErrShrink)
	}
	cfg := v.cfg
	cfg.Size = size
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if err := putJSON(ctx, v.repo, v.env.RepoID, volumeKey(cfg.Name), cfg); err != nil {
		return fmt.Errorf("grow volume %q: %w", cfg.Name, err)
	}
	v.size.Store(size)
	return nil
}

// checkRange checks [off, off+n) against the head's size.
func (v *Volume) checkRange(off, n int64) error {
	return v.checkRangeOf("", v.size.Load(), off, n)
}

// checkRangeOf checks [off, off+n) against size, the size of snapshot snap
// (or of the head when snap is empty).
func (v *Volume) checkRangeOf(snap string, size, off, n int64) error {
	if off >= 0 && n >= 0 && off <= size && n <= size-off {
		return nil
	}
	what := fmt.Sprintf("volume %q", v.cfg.Name)
	if snap != "" {
		what = fmt.Sprintf("snapshot %s of volume %q", snap, v.cfg.Name)
	}
	return fmt.Errorf("%d+%d of %s (%d bytes): %w", off, n, what, size, ErrOutOfRange)
}

// WriteAt writes p at off. With fua it returns once p is durable.
func (v *Volume) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := v.checkRange(off, int64(len(p))); err != nil {
		return err
	}
	// A write becomes records cut at multiples of RecordGrain, appended
	// in batches of one write call each.
	const batchBytes = 64 * RecordGrain
	var recs []Record
	for len(p) > 0 {
		if err := v.waitForRoom(ctx); err != nil {
			return err
		}
		recs = recs[:0]
		for batch := 0; len(p) > 0 && batch < batchBytes; {
			n := int(min(int64(len(p)), RecordGrain-off%RecordGrain))
			recs = append(recs, Record{Type: RecordWrite, Offset: off, Length: int64(n), Data: p[:n]})
			p, off, batch = p[n:], off+int64(n), batch+n
		}
		if err := v.whenRoom(ctx, func() error { return v.appendBatch(recs) }); err != nil {
			return err
		}
	}
	if fua {
		return v.log.Sync()
	}
	return nil
}

// Zero makes [off, off+n) read as zeros, at the cost of one record
// whatever n is (TRIM and WRITE_ZEROES).
func (v *Volume) Zero(ctx context.Context, off, n int64) error {
	if err := v.checkRange(off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	return v.whenRoom(ctx, func() error { return v.append(Record{Type: RecordZero, Offset: off, Length: n}) })
}

func (v *Volume) appendBatch(recs []Record) error {
	var applyErr error
	err := v.log.AppendBatch(recs, func(i int, seq uint64, pos Pos) {
		r := recs[i]
		r.Seq = seq
		if err := v.apply(r, pos); err != nil && applyErr == nil {
			applyErr = err
		}
	})
	if err != nil {
		return err
	}
	return applyErr
}

func (v *Volume) append(r Record) error {
	var applyErr error
	_, _, err := v.log.Append(r, func(seq uint64, pos Pos) {
		r.Seq = seq
		applyErr = v.apply(r, pos)
	})
	if err != nil {
		return err
	}
	return applyErr
}

// Flush returns once every write that completed before it is durable.
func (v *Volume) Flush(ctx context.Context) error { return v.log.Sync() }

// Snapshot marks the head: the snapshot holds every write completed before
// the call and none after. It is readable at once and sealed once the
// uploader has stored it. The label, if any, must be unique in the volume.
func (v *Volume) Snapshot(ctx context.Context, label string) (SnapshotInfo, error) {
	return v.mark(KindSnapshot, label, "")
}

// SnapshotBy is Snapshot for a caller other than the admin (a scoped
// token, a certificate), by, which its manifest records: the server's
// automatic prune leaves such snapshots alone for a while (PruneOptions).
func (v *Volume) SnapshotBy(ctx context.Context, label, by string) (SnapshotInfo, error) {
	return v.mark(KindSnapshot, label, by)
}

// Checkpoint closes the open layer so the uploader can store it, if it has
// any writes. It returns whether it did.
func (v *Volume) Checkpoint(ctx context.Context) (bool, error) {
	v.mu.RLock()
	empty := v.layers[len(v.layers)-1].extents.len() == 0
	v.mu.RUnlock()
	if empty {
		return false, nil
	}
	_, err := v.mark(KindCheckpoint, "", "")
	return err == nil, err
}

// checkLabel says what is wrong with label for a new snapshot: its form,
// or another snapshot has it. Called with markMu held, which the new
// snapshot is made under.
func (v *Volume) checkLabel(label string) error {
	if label == "" {
		return nil
	}
	if err := ValidLabel(label); err != nil {
		return err
	}
	v.mu.RLock()
	taken := slices.ContainsFunc(v.snaps, func(s *snapshot) bool { return s.is(label) })
	v.mu.RUnlock()
	if taken {
		return fmt.Errorf("snapshot label %q: %w", label, ErrLabelTaken)
	}
	return nil
}

func (v *Volume) mark(kind Kind, label, by string) (SnapshotInfo, error) {
	v.markMu.Lock()
	defer v.markMu.Unlock()
	if err := v.checkLabel(label); err != nil {
		return SnapshotInfo{}, err
	}
	m := mark{Kind: kind, Label: label, By: by}
	var applyErr error
	_, err := v.log.AppendMark(func(seq uint64) []byte {
		// The time, too, under the append lock: every write acknowledged
		// before it is in the log before the mark (a point in time at
		// this time holds it), and none appended after. Kept to the
		// millisecond (as its ID says), and never before the previous
		// mark's, so times order marks as sequence numbers do even if the
		// clock steps back.
		m.Time = v.env.now().UTC().Truncate(time.Millisecond)
		if !m.Time.After(v.lastMark) {
			if l := v.env.Logger; l != nil && v.lastMark.Sub(m.Time) > time.Second {
				l.Warn("the clock is behind the volume's last mark; marks keep their order", "volume", v.cfg.Name, "clock", m.Time, "last_mark", v.lastMark)
			}
			m.Time = v.lastMark.Add(time.Millisecond)
		}
		m.ID = snapshotID(m.Time, seq) // apply makes it lastMark
		// Under the log's append lock: a write past the old end of a
		// volume that grew is in the log after Grow, so this sees the size
		// it fits in.
		m.Size = v.size.Load()
		data, _ := json.Marshal(m)
		return data
	}, func(seq uint64, pos Pos) {
		data, _ := json.Marshal(m)
		applyErr = v.apply(Record{Type: RecordMark, Seq: seq, Data: data}, pos)
	})
	if err == nil {
		err = applyErr
	}
	if err != nil {
		return SnapshotInfo{}, err
	}
	// AppendMark made the mark durable before its ID is handed out, and
	// started the next layer in a segment of its own.
	v.nudge()
	return SnapshotInfo{ID: m.ID, Label: label, Time: m.Time, Size: m.Size, By: by}, nil
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// sealMemory is about what a seal of a volume of chunkSize holds at its
// peak: its journal pack (up to 32 MiB) and the chunks its workers build
// and compress.
func sealMemory(chunkSize int64) int64 {
	return int64(packTarget) + 2*int64(uploadWorkers)*chunkSize
}

// SealMemory is sealMemory for the default chunk size.
var SealMemory = sealMemory(DefaultChunkSize)

// sealSlot waits until a seal of a volume of chunkSize fits in
// UploadMemory beside those running (one always runs, however large),
// and returns the function that gives its share back.
func (e *Env) sealSlot(ctx context.Context, chunkSize int64) (func(), error) {
	e.slotsOnce.Do(func() {
		if e.UploadMemory > 0 {
			e.slots = semaphore.NewWeighted(e.UploadMemory)
		}
	})
	if e.slots == nil {
		return func() {}, nil
	}
	n := min(sealMemory(chunkSize), e.UploadMemory)
	if err := e.slots.Acquire(ctx, n); err != nil {
		return nil, err
	}
	return func() { e.slots.Release(n) }, nil
}
