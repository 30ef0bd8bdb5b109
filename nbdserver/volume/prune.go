package volume

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nbdvault/nbdvault/nbdserver/retention"
)

// PruneDecision is what Prune does with one snapshot.
type PruneDecision struct {
	SnapshotInfo
	Keep    bool
	Reasons []string // why it is kept
	// Err is why a snapshot to remove is still there; nil otherwise.
	Err error
}

// Prune applies the retention policy p to the volume's snapshots (not to
// its checkpoints, which leave with the journal retention window) and,
// unless dryRun, deletes those it does not keep, as DeleteSnapshot does,
// one at a time so that seals go on between them. Days, weeks, months
// and years are loc's. Protected snapshots are kept, and so are
// snapshots not sealed yet and damaged ones (delete those by hand), none
// of which the rules count. The decisions come newest first; a failed
// delete is the decision's Err, and Prune goes on with the others and
// returns an error that says how many failed.
func (v *Volume) Prune(ctx context.Context, p retention.Policy, loc *time.Location, dryRun bool) ([]PruneDecision, error) {
	all := v.Snapshots()
	var subject []retention.Snapshot
	byID := make(map[string]SnapshotInfo, len(all))
	var out []PruneDecision
	for _, si := range all {
		switch {
		case !si.Sealed:
			out = append(out, PruneDecision{SnapshotInfo: si, Keep: true, Reasons: []string{"not sealed yet"}})
		case si.Damaged != nil:
			out = append(out, PruneDecision{SnapshotInfo: si, Keep: true, Reasons: []string{"damaged"}})
		default:
			byID[si.ID] = si
			subject = append(subject, retention.Snapshot{ID: si.ID, Time: si.Time, Protected: si.Protected})
		}
	}
	ds, err := p.Apply(subject, loc)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	for _, d := range ds {
		out = append(out, PruneDecision{SnapshotInfo: byID[d.ID], Keep: d.Keep, Reasons: d.Reasons})
	}
	sortDecisions(out)
	if dryRun {
		return out, nil
	}
	g := v.env.gc()
	g.marking.RLock() // no manifest goes while a collection marks
	defer g.marking.RUnlock()
	failed := 0
	for i := range out {
		if out[i].Keep {
			continue
		}
		if err := ctx.Err(); err != nil {
			out[i].Err = err
		} else {
			unlock := v.lockSeal()
			out[i].Err = v.deleteSnapshot(ctx, out[i].ID)
			unlock()
		}
		if out[i].Err != nil {
			failed++
		}
	}
	unlock := v.lockSeal()
	if v.sweepDue && !v.isClosed() {
		v.sweepPacks(ctx)
	}
	unlock()
	if failed > 0 {
		i := slices.IndexFunc(out, func(d PruneDecision) bool { return d.Err != nil })
		return out, fmt.Errorf("prune volume %q: %d of the snapshots to remove are still there (%s: %w); run prune again", v.cfg.Name, failed, out[i].ID, out[i].Err)
	}
	return out, nil
}

// sortDecisions puts decisions newest first, by time then ID.
func sortDecisions(ds []PruneDecision) {
	slices.SortStableFunc(ds, func(a, b PruneDecision) int {
		if c := b.Time.Compare(a.Time); c != 0 {
			return c
		}
		return strings.Compare(b.ID, a.ID)
	})
}
