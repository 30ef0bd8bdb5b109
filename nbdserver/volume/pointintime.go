package volume

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// ErrNoPointInTime: the time asked for has no point kept for it.
var ErrNoPointInTime = errors.New("no point in time kept for it")

// cut is a checkpoint manifest of the volume in the repository: a point
// in time while it is kept (docs/architecture.md, "Step 2").
type cut struct {
	id   string
	seq  uint64
	time time.Time
	m    *Manifest // nil until a read needs it
	// lastRead is when a read last used it (UnixNano of Env.now): a cut
	// read within pinFor stays past the window.
	lastRead atomic.Int64
}

// pinFor is how long a read holds the point it reads past the retention
// window: a restore or a mount of a point near the window's edge goes on
// while it reads.
const pinFor = 10 * time.Minute

// maxExpirePerPass bounds the manifests one pass deletes (a seal waits for
// it): after the retention is shortened, the rest go in the next passes.
var maxExpirePerPass = 256 // a var for tests

// info describes the cut as a point in time; size is the volume's, used
// while its manifest is not in memory.
func (c *cut) info(size int64) SnapshotInfo {
	if c.m != nil {
		size = c.m.Size
	}
	return SnapshotInfo{ID: c.id, Kind: KindCheckpoint, Time: c.time, Size: size, Sealed: true}
}

// info describes a checkpoint mark not sealed yet as a point in time.
func (m *mark) info() SnapshotInfo {
	return SnapshotInfo{ID: m.ID, Kind: KindCheckpoint, Time: m.Time, Size: m.Size}
}

// cutOf makes the cut a checkpoint ID names; ok is false if it is not an
// ID.
func cutOf(id string) (*cut, bool) {
	seq, ok := seqOfID(id)
	if !ok {
		return nil, false
	}
	t, err := time.Parse("20060102T150405.000Z", id[:strings.IndexByte(id, '-')])
	if err != nil {
		return nil, false
	}
	return &cut{id: id, seq: seq, time: t}, true
}

func (e *Env) now() time.Time {
	if e.clock != nil {
		return e.clock()
	}
	return time.Now()
}

// journalRetention is how long checkpoints are kept; zero keeps none
// but the newest.
func (e *Env) journalRetention() time.Duration {
	switch {
	case e.JournalRetention < 0:
		return 0
	case e.JournalRetention == 0:
		return DefaultJournalRetention
	}
	return e.JournalRetention
}

// DefaultJournalRetention is how long checkpoints are kept as points in
// time unless the Env says otherwise.
const DefaultJournalRetention = time.Hour

// addCut records checkpoint manifest m, which a seal or a snapshot
// deletion has just written. Called with v.mu held.
func (v *Volume) addCut(m Manifest) {
	if c, ok := v.cutIDs[m.ID]; ok {
		v.remember(c, &m) // a damaged one, written again
		return
	}
	c := &cut{id: m.ID, seq: m.Seq, time: m.Time}
	v.remember(c, &m)
	i, _ := slices.BinarySearchFunc(v.checkpoints, c.seq, func(x *cut, seq uint64) int { return cmpUint(x.seq, seq) })
	v.checkpoints = slices.Insert(v.checkpoints, i, c)
	v.cutIDs[c.id] = c
}

// expireCheckpoints deletes the checkpoint manifests that left the
// retention window, oldest first: all older than the newest one that did
// (which every time in the window may need), and never the base m. It
// stops at the first delete that fails, so the cuts kept are always the
// newest ones without a gap, and a failed one is tried after the next
// seal. It reports whether it deleted any. Called with sealMu held.
func (v *Volume) expireCheckpoints(ctx context.Context, m Manifest) (deleted bool) {
	g := v.env.gc()
	if !g.marking.TryRLock() {
		return false // a collection is marking: no manifest goes; the next seal expires them
	}
	defer g.marking.RUnlock()
	ret := v.env.journalRetention()
	now := v.env.now()
	cutoff := now.Add(-ret)
	v.mu.RLock()
	older := 0 // the checkpoints before the base
	for older < len(v.checkpoints) && v.checkpoints[older].seq < m.Seq {
		older++
	}
	keepFrom := older
	if ret > 0 && !m.Time.Before(cutoff) {
		// The newest one older than the window stays.
		keepFrom = 0
		for i, c := range v.checkpoints[:older] {
			if c.time.Before(cutoff) {
				keepFrom = i
			}
		}
	}
	for i, c := range v.checkpoints[:keepFrom] {
		if now.UnixNano()-c.lastRead.Load() < int64(pinFor) {
			keepFrom = i // being read: it and those after it stay
			break
		}
	}
	old := slices.Clone(v.checkpoints[:min(keepFrom, maxExpirePerPass)])
	v.mu.RUnlock()
	for _, c := range old {
		err := v.repo.Delete(ctx, manifestKey(v.cfg.Name, KindCheckpoint, c.id))
		if err != nil && !errors.Is(err, chunkstore.ErrNotFound) {
			if l := v.env.Logger; l != nil {
				l.Warn("an old checkpoint manifest not deleted; tried again after the next seal", "volume", v.cfg.Name, "checkpoint", c.id, "error", err)
			}
			v.mu.Lock()
			v.expiryErr = fmt.Errorf("checkpoint %s left the retention window but could not be deleted (it and the journal it names stay until it is): %w", c.id, err)
			v.mu.Unlock()
			return deleted
		}
		v.mu.Lock()
		if len(v.checkpoints) > 0 && v.checkpoints[0] == c {
			v.checkpoints = v.checkpoints[1:] // the oldest, as always under sealMu
		} else {
			v.checkpoints = slices.DeleteFunc(v.checkpoints, func(x *cut) bool { return x == c })
		}
		delete(v.cutIDs, c.id)
		v.loaded = slices.DeleteFunc(v.loaded, func(x *cut) bool { return x == c })
		v.pitFrom = v.keptFrom()
		v.expiryErr = nil
		v.mu.Unlock()
		deleted = true
	}
	return deleted
}

// expireIdle runs expireCheckpoints and the sweep on their own, for a
// volume that is not written: seals run them otherwise.
func (v *Volume) expireIdle(ctx context.Context) {
	defer v.lockSeal()()
	if v.isClosed() {
		return
	}
	v.mu.RLock()
	base := v.base
	v.mu.RUnlock()
	if base.ID != "" && v.expireCheckpoints(ctx, base) {
		v.sweepDue = true
	}
	v.sweepPacks(ctx)
}

// At finds the point in time a read of the volume at t serves: the
// newest cut (a checkpoint or a snapshot, sealed or still in the write
// log) made at or before t. It is an error if t is in the future, or
// older than the oldest checkpoint kept (the points before it are gone),
// or if the server keeps no points in time.
func (v *Volume) At(t time.Time) (SnapshotInfo, error) {
	if v.env.journalRetention() == 0 {
		return SnapshotInfo{}, fmt.Errorf("volume %q at %s: %w: the server keeps no points in time (--journal-retention is 0)", v.cfg.Name, t.Format(time.RFC3339), ErrNoPointInTime)
	}
	// Not while a mark is being made: its time is taken before it is
	// applied, and it is handed out only once durable.
	v.markMu.Lock()
	defer v.markMu.Unlock()
	now := v.env.now()
	if t.After(now) {
		return SnapshotInfo{}, fmt.Errorf("volume %q at %s: %w: it is in the future (the server's clock says %s)", v.cfg.Name, t.Format(time.RFC3339Nano), ErrNoPointInTime, now.UTC().Format(time.RFC3339))
	}
	if v.lastMark.After(now.Add(time.Second)) {
		// The clock went back: the newest points carry times after it,
		// and a time before them could read a point older than it.
		return SnapshotInfo{}, fmt.Errorf("volume %q at %s: %w: the server's clock (%s) is behind its newest point in time (%s), so times are ambiguous until it passes it; set the clock right (NTP)",
			v.cfg.Name, t.Format(time.RFC3339Nano), ErrNoPointInTime, now.UTC().Format(time.RFC3339), v.lastMark.Format(time.RFC3339Nano))
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	from := v.oldestPoint()
	var best SnapshotInfo
	var bestSeq uint64
	found := false
	consider := func(seq uint64, si SnapshotInfo) {
		if !si.Time.After(t) && (!found || seq > bestSeq) {
			best, bestSeq, found = si, seq, true
		}
	}
	// Snapshots first: a kept point is a snapshot and a checkpoint of
	// the same ID, and the snapshot (with its label) is the answer.
	for _, s := range v.snaps {
		// A damaged one too: the time it covers reads nothing else.
		consider(s.Seq, SnapshotInfo{ID: s.ID, Kind: KindSnapshot, Label: s.Label, Time: s.Time, Size: s.Size, Sealed: s.sealed, Damaged: s.damage})
	}
	for _, c := range v.checkpoints {
		consider(c.seq, c.info(v.cfg.Size))
	}
	for _, l := range v.layers {
		if m := l.mark; m != nil && m.Kind == KindCheckpoint {
			consider(m.seq, m.info())
		}
	}
	if !found || t.Before(from) {
		oldest := "none is kept yet"
		if !from.IsZero() {
			oldest = "the oldest kept is " + from.UTC().Format(time.RFC3339Nano)
		}
		return SnapshotInfo{}, fmt.Errorf("volume %q at %s: %w: %s (the server keeps checkpoints for --journal-retention)", v.cfg.Name, t.Format(time.RFC3339Nano), ErrNoPointInTime, oldest)
	}
	if best.Damaged != nil {
		return SnapshotInfo{}, fmt.Errorf("volume %q at %s: the newest point at or before it, snapshot %s, is damaged: %w", v.cfg.Name, t.Format(time.RFC3339Nano), best.ID, best.Damaged)
	}
	return best, nil
}

// PointsInTime is the time of the oldest point in time kept, or zero if
// none is.
func (v *Volume) PointsInTime() time.Time {
	if v.env.journalRetention() == 0 {
		return time.Time{}
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.oldestPoint()
}

// oldestPoint is the time of the oldest point in time a read may use.
// Checkpoints are deleted oldest first, so every one deleted is older
// than the oldest kept, or, with none kept, than the base: pitFrom says
// so since the last deletion (or since Open, which cannot know whether
// any was). Zero pitFrom: none was, and every cut is a point. Called with
// v.mu held.
func (v *Volume) oldestPoint() time.Time {
	if !v.pitFrom.IsZero() {
		return v.pitFrom
	}
	var oldest time.Time
	older := func(t time.Time) {
		if oldest.IsZero() || t.Before(oldest) {
			oldest = t
		}
	}
	for _, c := range v.checkpoints {
		older(c.time)
	}
	for _, s := range v.snaps {
		older(s.Time)
	}
	for _, l := range v.layers {
		if m := l.mark; m != nil {
			older(m.Time)
		}
	}
	return oldest
}

// keptFrom is the bound oldestPoint keeps after checkpoints were deleted
// (or at Open): the oldest kept, else the base's time. Called with v.mu
// held.
func (v *Volume) keptFrom() time.Time {
	if len(v.checkpoints) > 0 {
		return v.checkpoints[0].time
	}
	return v.base.Time
}

// Find finds what name means among the volume's points: a snapshot's ID
// or label, a kept checkpoint's ID, or an RFC 3339 time (At), in that
// order. A checkpoint's manifest is read here if it was not yet, so a
// damaged one is an error now rather than at the first read.
func (v *Volume) Find(ctx context.Context, name string) (SnapshotInfo, error) {
	for _, s := range v.Snapshots() {
		if s.Is(name) {
			return s, nil
		}
	}
	var si SnapshotInfo
	if t, err := time.Parse(time.RFC3339Nano, name); err == nil {
		if si, err = v.At(t); err != nil {
			return SnapshotInfo{}, err
		}
	} else {
		v.mu.RLock()
		if c := v.cutIDs[name]; c != nil {
			si = c.info(v.cfg.Size)
		}
		for _, l := range v.layers {
			if m := l.mark; m != nil && m.Kind == KindCheckpoint && m.ID == name {
				si = m.info()
			}
		}
		v.mu.RUnlock()
		if si.ID == "" {
			return SnapshotInfo{}, fmt.Errorf("snapshot %q of volume %q: %w", name, v.cfg.Name, ErrNoSnapshot)
		}
	}
	if si.Kind == KindCheckpoint && si.Sealed {
		m, err := v.loadCut(ctx, si.ID)
		if err != nil {
			return SnapshotInfo{}, err
		}
		if m != nil {
			si.Size = m.Size
		}
	}
	return si, nil
}

// loadCut reads the manifest of kept checkpoint id if no read has yet,
// and returns it (nil if id is not a kept checkpoint).
func (v *Volume) loadCut(ctx context.Context, id string) (*Manifest, error) {
	v.mu.RLock()
	c := v.cutIDs[id]
	if c != nil && slices.ContainsFunc(v.snaps, func(s *snapshot) bool { return s.ID == id }) {
		c = nil // a kept point: read as the snapshot it is, which needs no GET
	}
	var m *Manifest
	if c != nil {
		m = c.m
	}
	v.mu.RUnlock()
	if c != nil {
		c.lastRead.Store(v.env.now().UnixNano())
	}
	if c == nil || m != nil {
		return m, nil
	}
	key := manifestKey(v.cfg.Name, KindCheckpoint, id)
	data, err := v.repo.Get(ctx, key)
	if err == nil {
		var got Manifest
		got, err = decodeManifest(v.env.RepoID, key, v.cfg.Name, KindCheckpoint, v.cfg.ChunkSize, data)
		m = &got
	}
	if errors.Is(err, chunkstore.ErrNotFound) {
		return nil, fmt.Errorf("checkpoint %s of volume %q: %w: it left the retention window", id, v.cfg.Name, ErrNoSnapshot)
	}
	if err != nil {
		return nil, fmt.Errorf("checkpoint %s of volume %q: %w", id, v.cfg.Name, err)
	}
	v.mu.Lock()
	v.remember(c, m)
	v.mu.Unlock()
	return m, nil
}

// maxLoadedCuts is how many checkpoint manifests the volume keeps in
// memory (about 1 KB each): a day of 10 s checkpoints would be 8,640.
const maxLoadedCuts = 64

// remember keeps m as c's manifest, forgetting the one kept longest once
// more than maxLoadedCuts are. Called with v.mu held.
func (v *Volume) remember(c *cut, m *Manifest) {
	if c.m == nil {
		v.loaded = append(v.loaded, c)
	}
	c.m = m
	if len(v.loaded) > maxLoadedCuts {
		v.loaded[0].m = nil
		v.loaded = slices.Delete(v.loaded, 0, 1)
	}
}

// KeepPoint makes the point in time from names (a time or a kept
// checkpoint's ID, as Find takes them) a snapshot, with label if not
// empty: it then stays after the retention window, like any snapshot. No
// data is copied: the snapshot's manifest is the checkpoint's, under the
// same ID. A point still in the write log is refused with ErrNotSealed.
func (v *Volume) KeepPoint(ctx context.Context, from, label string) (SnapshotInfo, error) {
	return v.KeepPointBy(ctx, from, label, "")
}

// KeepPointBy is KeepPoint for a caller other than the admin, by
// (Manifest.By).
func (v *Volume) KeepPointBy(ctx context.Context, from, label, by string) (SnapshotInfo, error) {
	g := v.env.gc()
	g.marking.RLock() // a failed put deletes what it may have stored
	defer g.marking.RUnlock()
	defer v.lockSeal()() // no expiry meanwhile
	if v.isClosed() {
		return SnapshotInfo{}, fmt.Errorf("volume %q: %w", v.cfg.Name, ErrVolumeClosed)
	}
	si, err := v.Find(ctx, from)
	switch {
	case err != nil:
		return SnapshotInfo{}, err
	case si.Kind != KindCheckpoint:
		return SnapshotInfo{}, fmt.Errorf("%q of volume %q is snapshot %s already: %w", from, v.cfg.Name, si.ID, ErrExists)
	case !si.Sealed:
		return SnapshotInfo{}, fmt.Errorf("the point %s of volume %q is not uploaded yet: %w: try again in a moment", si.ID, v.cfg.Name, ErrNotSealed)
	}
	m, err := v.loadCut(ctx, si.ID)
	if err != nil {
		return SnapshotInfo{}, err
	}
	if m == nil {
		return SnapshotInfo{}, fmt.Errorf("checkpoint %s of volume %q: %w: it left the retention window", si.ID, v.cfg.Name, ErrNoSnapshot)
	}
	keep := *m
	keep.Kind, keep.Label, keep.By = KindSnapshot, label, by
	key := manifestKey(v.cfg.Name, KindSnapshot, keep.ID)
	// Listed before it is written: a put that fails may still have
	// stored it, and the sweep must count what it names. Listing it also
	// takes its label, so markMu (which a label's check and its use hold,
	// as in mark) is not held across the put.
	s := &snapshot{Manifest: keep, sealed: true}
	v.markMu.Lock()
	if err := v.checkLabel(label); err != nil {
		v.markMu.Unlock()
		return SnapshotInfo{}, err
	}
	v.mu.Lock()
	v.snaps = append(v.snaps, s)
	v.sortSnaps()
	v.mu.Unlock()
	v.markMu.Unlock()
	if err := putJSON(ctx, v.repo, v.env.RepoID, key, keep); err != nil {
		if derr := v.repo.Delete(ctx, key); derr != nil && !errors.Is(derr, chunkstore.ErrNotFound) {
			return SnapshotInfo{}, fmt.Errorf("keep %s of volume %q as a snapshot: %w (it may have been stored: snapshot list shows it if so)", si.ID, v.cfg.Name, err)
		}
		v.mu.Lock()
		v.snaps = slices.DeleteFunc(v.snaps, func(x *snapshot) bool { return x == s })
		v.mu.Unlock()
		return SnapshotInfo{}, fmt.Errorf("keep %s of volume %q as a snapshot: %w", si.ID, v.cfg.Name, err)
	}
	return SnapshotInfo{ID: keep.ID, Kind: KindSnapshot, Label: label, Time: keep.Time, Size: keep.Size, Sealed: true, By: by}, nil
}
