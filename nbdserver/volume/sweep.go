package volume

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/internal/fsync"
)

// packSeq is the log sequence number a journal pack of volume name is
// named after: the mark of the seal that wrote it.
func packSeq(name, key string) (uint64, bool) {
	rest, ok := strings.CutPrefix(key, journalPrefix(name))
	if !ok || len(rest) < 17 || rest[16] != '-' {
		return 0, false
	}
	seq, err := strconv.ParseUint(rest[:16], 16, 64)
	return seq, err == nil
}

// sweepPacks deletes the volume's journal packs that no manifest names:
// those that merges, folds and deleted snapshots left behind, and those of
// seals cut short. Called with sealMu held, after a seal or a snapshot
// deletion has written its manifests.
//
// It deletes nothing while a snapshot's manifest is damaged (its packs
// are what a repair needs), or when a delta's top cannot be read. A pack
// named after a mark newer than the base belongs to a seal that has not
// finished: its manifest may be in the repository already, so it is kept
// until a seal of that mark succeeds (which writes the same manifest key,
// naming other packs). A pack the base stopped naming is kept while a
// checkpoint older than that base is (a point in time may read it): the
// base's chain only ever drops packs, so the manifests older than the
// first base that did not name it are the only ones that may
// (docs/architecture.md, "Step 2").
func (v *Volume) sweepPacks(ctx context.Context) {
	if !v.sweepDue || len(v.packs) == 0 {
		return
	}
	v.mu.RLock()
	base := v.base
	named := []Manifest{base}
	damaged := false
	for _, s := range v.snaps {
		switch {
		case s.damage != nil:
			damaged = true
		case s.sealed:
			named = append(named, s.Manifest)
		}
	}
	oldest := base.Seq // every checkpoint manifest is at least this
	if len(v.checkpoints) > 0 {
		oldest = min(oldest, v.checkpoints[0].seq)
	}
	v.mu.RUnlock()
	if damaged {
		return
	}
	live := map[string]bool{}
	for _, m := range named {
		for _, d := range m.Deltas {
			t, err := v.loadTop(ctx, d)
			if err != nil {
				if l := v.env.Logger; l != nil {
					l.Warn("journal packs not swept: a delta of a manifest cannot be read", "volume", v.cfg.Name, "manifest", m.ID, "error", err)
				}
				return
			}
			for _, p := range t.packs {
				live[p] = true
			}
		}
	}
	var dead []string
	kept := false // packs of a seal not finished: swept after it is
	changed := false
	for k := range v.packs {
		seq, ok := packSeq(v.cfg.Name, k)
		switch {
		case !ok || live[k]:
			if _, ok := v.dropped[k]; ok {
				// Named again: the volume resumed from an older manifest.
				delete(v.dropped, k)
				changed = true
			}
		case seq > base.Seq:
			kept = true
		default:
			dropped, ok := v.dropped[k]
			if !ok {
				// At least the point it was dropped at: conservative
				// after a restart, when the map starts empty.
				dropped = base.Seq
				v.dropped[k] = dropped
				changed = true
			}
			if oldest >= dropped {
				dead = append(dead, k)
			} else {
				kept = true
			}
		}
	}
	if changed {
		v.saveDropped()
	}
	if len(dead) > 0 {
		// Every read planned against a view that named these packs holds
		// gcMu shared until it is done; views made from now on do not
		// name them.
		v.gcMu.Lock()
		//lint:ignore SA2001 an empty critical section is the barrier
		v.gcMu.Unlock()
	}
	for _, k := range dead {
		if err := v.store.DeletePack(ctx, k); err != nil {
			if l := v.env.Logger; l != nil {
				l.Warn("journal pack not deleted; tried again after the next seal", "volume", v.cfg.Name, "pack", k, "error", err)
			}
			return
		}
		delete(v.packs, k)
		delete(v.dropped, k)
		v.nPacks.Store(int64(len(v.packs)))
	}
	if len(dead) > 0 {
		v.saveDropped()
	}
	v.sweepDue = kept
}

// droppedFile keeps v.dropped across restarts: without it, a restart
// gives every unnamed pack the base's sequence number again, and a server
// restarted more often than the retention window would never free one.
// A value may only be too high (the pack is kept longer), never too low:
// it is written from the map, whose values never decrease, checked by a
// checksum, and a file that fails it is ignored.
func (v *Volume) droppedFile() string { return filepath.Join(v.env.stateDir(v.cfg.Name), "dropped") }

const droppedKey = "state/dropped"

// saveDropped writes v.dropped to the state folder; a failure is logged,
// and costs only a wait after the next restart.
func (v *Volume) saveDropped() {
	data, err := json.Marshal(v.dropped)
	if err == nil {
		err = fsync.WriteFile(v.droppedFile(), chunkstore.Checked(v.env.RepoID, droppedKey, data))
	}
	if err != nil {
		// An old file could say a pack was dropped earlier than it now
		// was (the volume resumed from an older manifest since): none
		// is safe, and removing works on a full disk.
		_ = os.Remove(v.droppedFile())
		if l := v.env.Logger; l != nil {
			l.Warn("could not keep which journal packs wait for the retention window; after a restart they wait one window more", "volume", v.cfg.Name, "error", err)
		}
	}
}

// loadDropped reads what saveDropped wrote, for the packs the volume has.
func (v *Volume) loadDropped() {
	obj, err := os.ReadFile(v.droppedFile())
	if err != nil {
		return
	}
	doc, _, err := chunkstore.Unchecked(v.env.RepoID, droppedKey, obj, true)
	var m map[string]uint64
	if err == nil {
		err = json.Unmarshal(doc, &m)
	}
	if err != nil {
		if l := v.env.Logger; l != nil {
			l.Warn("ignored a damaged list of journal packs waiting for the retention window; they wait one window more", "volume", v.cfg.Name, "file", v.droppedFile(), "error", err)
		}
		return
	}
	for k, seq := range m {
		if _, ok := v.packs[k]; ok {
			v.dropped[k] = seq
		}
	}
}

// listPacks lists the volume's journal packs in the repository.
func (v *Volume) listPacks(ctx context.Context) error {
	v.packs = map[string]struct{}{}
	err := v.repo.List(ctx, journalPrefix(v.cfg.Name), func(k string) error {
		v.packs[k] = struct{}{}
		return nil
	})
	v.nPacks.Store(int64(len(v.packs)))
	if err == nil {
		v.loadDropped()
	}
	return err
}
