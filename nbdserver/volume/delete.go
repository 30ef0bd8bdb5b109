package volume

import (
	"context"
	"errors"
	"fmt"
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
// The newest manifest is what a restart resumes from, so when the snapshot
// is the newest, a checkpoint with the same root and sequence number is
// written first.
func (v *Volume) DeleteSnapshot(ctx context.Context, id string) error {
	v.sealMu.Lock() // no seal may change the base meanwhile
	defer v.sealMu.Unlock()
	v.mu.RLock()
	i := slices.IndexFunc(v.snaps, func(s *snapshot) bool { return s.ID == id || (s.Label != "" && s.Label == id) })
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
	if s.Seq == base.Seq {
		keep := s.Manifest
		keep.Kind, keep.Label = KindCheckpoint, ""
		if err := putJSON(ctx, v.repo, manifestKey(v.cfg.Name, KindCheckpoint, keep.ID), keep); err != nil {
			return fmt.Errorf("delete snapshot %s: keep its checkpoint: %w", s.ID, err)
		}
	}
	if err := v.repo.Delete(ctx, manifestKey(v.cfg.Name, KindSnapshot, s.ID)); err != nil && !errors.Is(err, chunkstore.ErrNotFound) {
		return fmt.Errorf("delete snapshot %s: %w", s.ID, err)
	}
	v.mu.Lock()
	v.snaps = slices.DeleteFunc(v.snaps, func(x *snapshot) bool { return x == s })
	v.mu.Unlock()
	return nil
}
