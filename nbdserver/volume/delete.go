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

// DeleteSnapshot deletes a sealed snapshot (by ID or label): its manifest
// leaves the repository and it leaves the list; its label is free again.
// The chunks it alone used stay until garbage collection exists. An
// unsealed snapshot is refused with ErrNotSealed: wait for its seal.
//
// The newest manifest is what a restart resumes from, and points in time
// are read from every cut in the retention window, so a checkpoint with
// the same root and sequence number is written first when the snapshot
// is the newest, or points in time are kept (it then leaves with the
// window).
func (v *Volume) DeleteSnapshot(ctx context.Context, id string) error {
	v.sealMu.Lock() // no seal may change the base meanwhile
	defer v.sealMu.Unlock()
	if v.isClosed() {
		return fmt.Errorf("volume %q: %w", v.cfg.Name, ErrVolumeClosed)
	}
	v.mu.RLock()
	i := slices.IndexFunc(v.snaps, func(s *snapshot) bool { return s.is(id) })
	var s *snapshot
	if i >= 0 {
		s = v.snaps[i]
	}
	base := v.base
	v.mu.RUnlock()
	switch {
	case s == nil:
		return fmt.Errorf("snapshot %q of volume %q: %w", id, v.cfg.Name, ErrNoSnapshot)
	case !s.sealed:
		return fmt.Errorf("snapshot %s of volume %q: %w: wait until it is, then delete it", s.ID, v.cfg.Name, ErrNotSealed)
	}
	// A point in time stays one: the newest manifest is what a restart
	// resumes from, and a snapshot in the retention window is what the
	// times after it read. A checkpoint of the same root and sequence
	// number takes its place (and leaves with the window), unless one is
	// there already (a kept point). Not for a snapshot older than the
	// window: a checkpoint older than the kept ones would move the
	// window's start back at the next restart, over deleted points.
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
		keep.Kind, keep.Label = KindCheckpoint, ""
		// Known before it is written: a put that fails may still have
		// stored it, and the sweep must count what it names.
		v.mu.Lock()
		v.addCut(keep)
		v.mu.Unlock()
		if err := putJSON(ctx, v.repo, v.env.RepoID, manifestKey(v.cfg.Name, KindCheckpoint, keep.ID), keep); err != nil {
			return fmt.Errorf("delete snapshot %s: keep its checkpoint: %w", s.ID, err)
		}
	}
	if err := v.repo.Delete(ctx, manifestKey(v.cfg.Name, KindSnapshot, s.ID)); err != nil && !errors.Is(err, chunkstore.ErrNotFound) {
		return fmt.Errorf("delete snapshot %s: %w", s.ID, err)
	}
	v.mu.Lock()
	v.snaps = slices.DeleteFunc(v.snaps, func(x *snapshot) bool { return x == s })
	v.mu.Unlock()
	if len(s.Deltas) > 0 {
		v.sweepDue = true
		v.sweepPacks(ctx)
	}
	return nil
}

// Delete deletes volume name, which must not be open: its write log, its
// record, then its snapshots and checkpoints. Chunks stay until garbage
// collection exists. Each step is safe to repeat, so a delete cut short
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
