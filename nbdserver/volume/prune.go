package volume

import (
	"cmp"
	"context"
	"errors"
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

// PruneOptions are how Prune applies a policy.
type PruneOptions struct {
	// Loc is the time zone of the hours, days, weeks, months and years;
	// nil: UTC.
	Loc    *time.Location
	DryRun bool
	// InUse, if set, says why a snapshot is in use ("exported over
	// NBD", say), or "" when it is not: one the policy would remove is
	// kept instead, with that reason, and goes at a later prune. It
	// takes part in the rules as any other, so what else is kept does
	// not depend on it.
	InUse func(id string) (why string)
	// NotAfter, if set, refuses the prune (ErrFutureSnapshot, nothing
	// removed) when a snapshot is dated after it: the rules count back
	// from the newest snapshot, and one dated in the future (a clock
	// that was ahead, or stepped back since) would make them remove the
	// snapshots taken now.
	NotAfter time.Time
	// YoungBy, if set, keeps the snapshots taken by a caller other than
	// the admin (SnapshotInfo.By) until they are this old, counting from
	// Now: the server's automatic prune (serve --auto-prune-min-age).
	YoungBy time.Duration
	Now     time.Time
}

// ErrFutureSnapshot: a snapshot is dated after PruneOptions.NotAfter.
var ErrFutureSnapshot = errors.New("a snapshot is dated in the future")

// pruneBatch is how many manifests one request deletes (S3's
// multi-object delete takes up to 1,000 keys).
var pruneBatch = 1000 // a variable for tests

// Prune applies the retention policy p to the volume's snapshots (not to
// its checkpoints, which leave with the journal retention window) and,
// unless DryRun, deletes those it does not keep, as DeleteSnapshot does,
// up to pruneBatch manifests per request, so that seals go on between
// batches. Protected snapshots are kept, and so are snapshots not sealed
// yet and damaged ones (delete those by hand), none of which the rules
// count. The decisions come newest first; a failed delete is the
// decision's Err, and Prune goes on with the others and returns an
// error that says how many failed.
func (v *Volume) Prune(ctx context.Context, p retention.Policy, opts PruneOptions) ([]PruneDecision, error) {
	all := v.Snapshots()
	var subject []retention.Snapshot
	byID := make(map[string]SnapshotInfo, len(all))
	var out []PruneDecision
	for _, si := range all {
		if !opts.NotAfter.IsZero() && si.Time.After(opts.NotAfter) {
			return nil, fmt.Errorf("volume %q: snapshot %s: %w (%s, after %s)", v.cfg.Name, si.ID, ErrFutureSnapshot,
				si.Time.UTC().Format(time.RFC3339), opts.NotAfter.UTC().Format(time.RFC3339))
		}
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
	ds, err := p.Apply(subject, cmp.Or(opts.Loc, time.UTC))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	for _, d := range ds {
		pd := PruneDecision{SnapshotInfo: byID[d.ID], Keep: d.Keep, Reasons: d.Reasons}
		if !pd.Keep && opts.InUse != nil {
			if why := opts.InUse(d.ID); why != "" {
				pd.Keep, pd.Reasons = true, []string{why}
			}
		}
		if si := pd.SnapshotInfo; !pd.Keep && opts.YoungBy > 0 && si.By != "" && si.Time.After(opts.Now.Add(-opts.YoungBy)) {
			pd.Keep, pd.Reasons = true, []string{fmt.Sprintf("taken by %s less than %s ago", si.By, opts.YoungBy)}
		}
		out = append(out, pd)
	}
	sortDecisions(out)
	if opts.DryRun {
		return out, nil
	}
	var remove []*PruneDecision
	for i := range out {
		if !out[i].Keep {
			remove = append(remove, &out[i])
		}
	}
	g := v.env.gc()
	g.marking.RLock() // no manifest goes while a collection marks
	defer g.marking.RUnlock()
	failed := 0
	for batch := range slices.Chunk(remove, pruneBatch) {
		ids := make([]string, len(batch))
		for i, d := range batch {
			ids[i] = d.ID
		}
		var errs []error
		if err := ctx.Err(); err != nil {
			errs = slices.Repeat([]error{err}, len(ids))
		} else {
			unlock := v.lockSeal()
			errs = v.deleteSnapshots(ctx, ids)
			unlock()
		}
		for i, d := range batch {
			if d.Err = errs[i]; d.Err != nil {
				failed++
			}
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
