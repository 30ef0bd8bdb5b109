package volume

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// ErrNotSealed: the snapshot is still being uploaded.
var ErrNotSealed = errors.New("not sealed yet")

// ErrProtected: the snapshot is protected; unprotect it first.
var ErrProtected = errors.New("protected")

// DeleteSnapshot deletes a sealed snapshot (by ID or label): its manifest
// leaves the repository and it leaves the list; its label is free again.
// The chunks it alone used go at the next garbage collection. An
// unsealed snapshot is refused with ErrNotSealed: wait for its seal.
//
// The newest manifest is what a restart resumes from, and points in time
// are read from every cut in the retention window, so a checkpoint with
// the same root and sequence number is written first when the snapshot
// is the newest, or points in time are kept (it then leaves with the
// window).
func (v *Volume) DeleteSnapshot(ctx context.Context, id string) error {
	g := v.env.gc()
	g.marking.RLock() // no manifest goes while a collection marks
	defer g.marking.RUnlock()
	defer v.lockSeal()() // no seal may change the base meanwhile
	if err := v.deleteSnapshot(ctx, id); err != nil {
		return err
	}
	if v.sweepDue {
		v.sweepPacks(ctx)
	}
	return nil
}

// deleteSnapshot is DeleteSnapshot without the sweep of journal packs
// (it sets sweepDue when one is due). The caller holds sealMu.
func (v *Volume) deleteSnapshot(ctx context.Context, id string) error {
	return v.deleteSnapshots(ctx, []string{id})[0]
}

// deleteSnapshots deletes the snapshots ids (IDs or labels) as
// DeleteSnapshot does each, with one DeleteMany of their manifests (at
// most a few thousand: one request per 1,000 on S3), and returns each
// one's error, nil for those deleted. The caller holds sealMu (and the
// GC's marking lock, shared), so the base and the snapshots change
// only here meanwhile.
//
// Crash safety is each snapshot's, as when deleted alone: a checkpoint
// that must take a snapshot's place is written before the request that
// deletes its manifest, and a snapshot whose checkpoint failed is left
// out of it. A crash or a failed request leaves any of the manifests
// there or gone; a later prune deletes those still there again, and
// deleting one twice is not an error.
func (v *Volume) deleteSnapshots(ctx context.Context, ids []string) []error {
	errs := make([]error, len(ids))
	if v.isClosed() {
		for i := range errs {
			errs[i] = fmt.Errorf("volume %q: %w", v.cfg.Name, ErrVolumeClosed)
		}
		return errs
	}
	v.mu.RLock()
	byName := make(map[string]*snapshot, 2*len(v.snaps))
	for _, s := range v.snaps {
		byName[s.ID] = s
		if s.Label != "" {
			byName[s.Label] = s
		}
	}
	base := v.base
	v.mu.RUnlock()
	found := make([]*snapshot, len(ids))
	var keys []string
	var gone []int // indexes of ids whose manifest goes in the request
	for i, id := range ids {
		s := byName[id]
		if errs[i] = v.checkDelete(id, s); errs[i] != nil {
			continue
		}
		if errs[i] = v.keepPoint(ctx, s, base); errs[i] != nil {
			continue
		}
		found[i] = s
		keys = append(keys, manifestKey(v.cfg.Name, KindSnapshot, s.ID))
		gone = append(gone, i)
	}
	if len(keys) == 0 {
		return errs
	}
	if err := v.repo.DeleteMany(ctx, keys); err != nil && !errors.Is(err, chunkstore.ErrNotFound) {
		// Any of them may be gone: they stay listed until a prune or
		// delete that works (reads of one that is gone fail, never
		// with other bytes).
		for _, i := range gone {
			errs[i] = fmt.Errorf("delete snapshot %s: %w", found[i].ID, err)
		}
		return errs
	}
	deleted := make(map[*snapshot]bool, len(gone))
	for _, i := range gone {
		deleted[found[i]] = true
		if len(found[i].Deltas) > 0 {
			v.sweepDue = true
		}
	}
	v.mu.Lock()
	v.snaps = slices.DeleteFunc(v.snaps, func(x *snapshot) bool { return deleted[x] })
	v.mu.Unlock()
	return errs
}

// checkDelete says why snapshot s, found by name (nil: none), may not be
// deleted, or nil.
func (v *Volume) checkDelete(name string, s *snapshot) error {
	switch {
	case s == nil:
		return fmt.Errorf("snapshot %q of volume %q: %w", name, v.cfg.Name, ErrNoSnapshot)
	case !s.sealed:
		return fmt.Errorf("snapshot %s of volume %q: %w: wait until it is, then delete it", s.ID, v.cfg.Name, ErrNotSealed)
	case s.Protected:
		return fmt.Errorf("snapshot %s of volume %q is %w: nbdvault snapshot unprotect %s@%s first", s.ID, v.cfg.Name, ErrProtected, v.cfg.Name, s.ID)
	}
	return nil
}

// keepPoint writes the checkpoint that takes snapshot s's place when s
// is about to be deleted, if one must, or says why s may not go. The
// caller holds sealMu; base is the volume's.
//
// A point in time stays one: the newest manifest is what a restart
// resumes from, and a snapshot in the retention window is what the
// times after it read. A checkpoint of the same root and sequence
// number takes its place (and leaves with the window), unless one is
// there already (a kept point). Not for a snapshot older than the
// window: a checkpoint older than the kept ones would move the window's
// start back at the next restart, over deleted points.
func (v *Volume) keepPoint(ctx context.Context, s *snapshot, base Manifest) error {
	v.mu.RLock()
	inWindow := v.env.journalRetention() > 0 && !s.Time.Before(v.oldestPoint())
	_, haveCut := v.cutIDs[s.ID]
	v.mu.RUnlock()
	if s.damage != nil && inWindow {
		// Its times would read the point before it: other bytes.
		return fmt.Errorf("snapshot %s of volume %q is damaged and inside the point-in-time window (--journal-retention): deleting it would make the times after it read an older point; restore its manifest from a copy of the repository, or delete it once the window has passed it", s.ID, v.cfg.Name)
	}
	if (s.Seq == base.Seq || inWindow) && !haveCut && s.damage == nil {
		keep := s.Manifest
		keep.Kind, keep.Label, keep.Protected = KindCheckpoint, "", false
		// Known before it is written: a put that fails may still have
		// stored it, and the sweep must count what it names.
		v.mu.Lock()
		v.addCut(keep)
		v.mu.Unlock()
		if err := putJSON(ctx, v.repo, v.env.RepoID, manifestKey(v.cfg.Name, KindCheckpoint, keep.ID), keep); err != nil {
			return fmt.Errorf("delete snapshot %s: keep its checkpoint: %w", s.ID, err)
		}
	}
	return nil
}

// Protect protects a sealed snapshot (by ID or label) from delete and
// prune, or with on false lets them remove it again: its manifest is
// written again with the flag. An unsealed snapshot is refused with
// ErrNotSealed, a damaged one with ErrDamagedManifest.
func (v *Volume) Protect(ctx context.Context, id string, on bool) (SnapshotInfo, error) {
	defer v.lockSeal()() // one manifest write at a time; DeleteSnapshot waits
	if v.isClosed() {
		return SnapshotInfo{}, fmt.Errorf("volume %q: %w", v.cfg.Name, ErrVolumeClosed)
	}
	v.mu.RLock()
	i := slices.IndexFunc(v.snaps, func(s *snapshot) bool { return s.is(id) })
	var s *snapshot
	var m Manifest
	if i >= 0 {
		s, m = v.snaps[i], v.snaps[i].Manifest
	}
	v.mu.RUnlock()
	switch {
	case s == nil:
		return SnapshotInfo{}, fmt.Errorf("snapshot %q of volume %q: %w", id, v.cfg.Name, ErrNoSnapshot)
	case !s.sealed:
		return SnapshotInfo{}, fmt.Errorf("snapshot %s of volume %q: %w: wait until it is", s.ID, v.cfg.Name, ErrNotSealed)
	case s.damage != nil:
		return SnapshotInfo{}, fmt.Errorf("snapshot %s of volume %q: %w", s.ID, v.cfg.Name, s.damage)
	}
	info := SnapshotInfo{ID: m.ID, Kind: KindSnapshot, Label: m.Label, Time: m.Time, Size: m.Size, Sealed: true, Protected: on}
	if m.Protected == on {
		return info, nil
	}
	m.Protected = on
	if err := putJSON(ctx, v.repo, v.env.RepoID, manifestKey(v.cfg.Name, KindSnapshot, m.ID), m); err != nil {
		// The put may have landed: the manifest says one or the other,
		// and both are valid; a restart reads whichever it is.
		return SnapshotInfo{}, fmt.Errorf("protect snapshot %s of volume %q: %w", m.ID, v.cfg.Name, err)
	}
	v.mu.Lock()
	s.Protected = on
	v.mu.Unlock()
	return info, nil
}

// Delete deletes volume name, which must not be open: its write log, its
// record, then its snapshots and checkpoints. Its chunks go at the next
// garbage collection (the server runs one after a delete). Each step is safe to repeat, so a delete cut short
// by a crash or an unreachable repository is finished by running it again;
// until then the name cannot be used for a new volume.
//
// The log goes first: once the record is gone nothing may replay it into
// a new volume of the same name.
func Delete(ctx context.Context, env *Env, name string) error {
	if err := ValidName(name); err != nil {
		return err
	}
	has, err := env.Repo.Has(ctx, volumeKey(name))
	if err != nil {
		return fmt.Errorf("delete volume %q: %w", name, err)
	}
	if !has {
		left, err := leftovers(ctx, env, name)
		if err != nil {
			return fmt.Errorf("delete volume %q: %w", name, err)
		}
		if left == "" {
			return fmt.Errorf("volume %q: %w", name, ErrNoVolume)
		}
	}
	g := env.gc()
	g.marking.RLock() // no manifest goes while a collection marks
	defer g.marking.RUnlock()
	if err := os.RemoveAll(env.stateDir(name)); err != nil {
		return fmt.Errorf("delete volume %q: remove its write log: %w", name, err)
	}
	if err := env.Repo.Delete(ctx, volumeKey(name)); err != nil {
		return fmt.Errorf("delete volume %q: %w", name, err)
	}
	var keys []string
	if err := env.Repo.List(ctx, volumePrefix(name), func(k string) error {
		keys = append(keys, k)
		return nil
	}); err != nil {
		return fmt.Errorf("delete volume %q: list its snapshots: %w", name, err)
	}
	for _, k := range keys {
		if err := env.Repo.Delete(ctx, k); err != nil {
			return fmt.Errorf("delete volume %q: %s: %w", name, k, err)
		}
	}
	return nil
}

// leftovers names something that volume name left in the repository or
// the state folder, or returns "" when there is nothing.
func leftovers(ctx context.Context, env *Env, name string) (string, error) {
	var found string
	err := env.Repo.List(ctx, volumePrefix(name), func(k string) error {
		found = k
		return errStopList
	})
	if err != nil && !errors.Is(err, errStopList) {
		return "", err
	}
	if found != "" {
		return "repository object " + found, nil
	}
	switch _, err := os.Stat(env.stateDir(name)); {
	case err == nil:
		return "state folder " + env.stateDir(name), nil
	case !errors.Is(err, fs.ErrNotExist):
		return "", err
	}
	return "", nil
}

var errStopList = errors.New("stop listing")
