package volume

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/internal/fsync"
)

// Space accounting (docs/architecture.md, "Space accounting"): each
// collection counts, beside its marking, what every manifest, volume and
// the repository hold, and keeps the result in the state folder
// (gc/space.json) for snapshot list, status and /metrics.

// Space is what the last collection counted.
type Space struct {
	// Time is when the collection listed the manifests: the figures
	// describe the repository then, and age from there.
	Time time.Time `json:"time"`
	// Manifests are keyed by manifest key
	// (volumes/VOL/snapshots/ID, volumes/VOL/checkpoints/ID).
	Manifests map[string]ManifestSpace `json:"manifests"`
	// Volumes are keyed by name.
	Volumes    map[string]SpaceTotals `json:"volumes"`
	Repository SpaceTotals            `json:"repository"`
}

// ManifestSpace is one snapshot's or checkpoint's figures.
type ManifestSpace struct {
	// Used is the stored bytes of the chunks and index pages this
	// manifest references and nothing else does (no other manifest, no
	// other volume, not the volume's head): what deleting it alone would
	// free at the time of the count, once the point-in-time window no
	// longer keeps its state. Journal packs are not in it: they go with
	// the window (SpaceTotals.Journal).
	Used int64 `json:"used"`
	// LogicalReferenced (LREFER) is the bytes the manifest reads as
	// data: not holes, not zeroed extents. It never changes.
	LogicalReferenced int64 `json:"logical_referenced"`
}

// SpaceTotals are a volume's or the repository's figures. A volume's
// count the objects only its manifests reference (what deleting the
// volume frees, as ZFS counts a clone's), and its journal packs; the
// repository's count every object referenced, once.
type SpaceTotals struct {
	// Logical is the LREFER of the head (the newest sealed state); for
	// the repository, the sum over volumes.
	Logical int64 `json:"logical"`
	// Written is the LREFER summed over the snapshots and the head: the
	// data every kept version reads (checkpoints not counted).
	Written int64 `json:"written"`
	// Chunks and Pages are the distinct data chunks and index pages
	// referenced.
	Chunks int64 `json:"chunks"`
	Pages  int64 `json:"pages"`
	// Referenced is the plaintext bytes of the distinct data chunks
	// referenced.
	Referenced int64 `json:"referenced"`
	// DataStored and PageStored are the stored bytes of those chunks and
	// pages; Journal is the stored bytes of journal packs.
	DataStored int64 `json:"data_stored"`
	PageStored int64 `json:"page_stored"`
	Journal    int64 `json:"journal"`
	// Stored is DataStored + PageStored + Journal: for a volume, what
	// deleting it frees.
	Stored int64 `json:"stored"`
	// Shared is, for the repository, the stored bytes of the objects
	// more than one volume references (in no volume's figures).
	Shared int64 `json:"shared,omitempty"`
	// SharesWithOthers: the volume references objects another volume
	// references too; they are not in its figures, so its dedup ratio
	// is not known (DedupRatio is 0).
	SharesWithOthers bool `json:"shares_with_other_volumes,omitempty"`
}

// DedupRatio is Written / Referenced: how many times over the kept
// versions read the distinct data stored (1 with a single version; 0
// when nothing is referenced, or the volume shares objects with others).
func (t SpaceTotals) DedupRatio() float64 {
	if t.Referenced == 0 || t.SharesWithOthers {
		return 0
	}
	return float64(t.Written) / float64(t.Referenced)
}

// CompressionRatio is Referenced / DataStored (0 when nothing is stored).
func (t SpaceTotals) CompressionRatio() float64 {
	if t.DataStored == 0 {
		return 0
	}
	return float64(t.Referenced) / float64(t.DataStored)
}

// ManifestKey is the repository key of volume vol's manifest id of kind
// kind: how Space.Manifests names it.
func ManifestKey(vol string, kind Kind, id string) string { return manifestKey(vol, kind, id) }

// spaceName is Space's file in the state folder's gc/.
const spaceName = "space.json"

func spacePath(stateDir string) string { return filepath.Join(stateDir, invDirName, spaceName) }

// LoadSpace reads what the last collection counted, from the state
// folder stateDir: nil (and no error) when no collection has run there.
func LoadSpace(stateDir string) (*Space, error) {
	data, err := os.ReadFile(spacePath(stateDir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var s Space
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("%s: %w (the next gc writes it again)", spacePath(stateDir), err)
	}
	return &s, nil
}

// saveSpace replaces the state folder's space.json with s.
func saveSpace(stateDir string, s *Space) error {
	data, err := json.Marshal(s)
	if err != nil {
		return err
	}
	return fsync.WriteFile(spacePath(stateDir), data)
}

// spaceCount adds up, as the sweep streams the objects the repository
// holds, what each manifest, volume and the repository store.
type spaceCount struct {
	w    *owners
	vols []SpaceTotals // by volume index
	used []int64       // by manifest index
	repo SpaceTotals
}

func newSpaceCount(w *owners, manifests, volumes int) *spaceCount {
	return &spaceCount{w: w, vols: make([]SpaceTotals, volumes), used: make([]int64, manifests)}
}

// add counts object o, of size stored bytes.
func (c *spaceCount) add(o owned, size int64) {
	count := func(t *SpaceTotals) {
		if o.isPage() {
			t.Pages++
			t.PageStored += size
		} else {
			t.Chunks++
			t.Referenced += o.plain()
			t.DataStored += size
		}
		t.Stored += size
	}
	count(&c.repo)
	owner := o.owner()
	v, ok := c.w.vol(owner)
	if !ok {
		c.repo.Shared += size
		return
	}
	count(&c.vols[v])
	if owner&sharedIn == 0 {
		c.used[owner] += size
	}
}

// journal counts a volume's journal pack of size stored bytes.
func (c *spaceCount) journal(vol uint32, size int64) {
	for _, t := range []*SpaceTotals{&c.vols[vol], &c.repo} {
		t.Journal += size
		t.Stored += size
	}
}

// space completes a collection's count (c, from the sweep) and keeps it
// in the state folder: each manifest's LREFER (taken from the last count
// when it had it: it never changes), its USED, and the totals. listed is
// when the manifests were listed. A LREFER that cannot be computed (a
// delta that cannot be read, a damaged manifest) is -1, and left out of
// the totals; it is tried again by the next run.
func (e *Env) space(ctx context.Context, listed time.Time, ms []spaceManifest, volumes []string, roots map[chunkstore.ID]*pageNode, c *spaceCount) (*Space, error) {
	var prev *Space
	if e.StateDir != "" {
		prev, _ = LoadSpace(e.StateDir) // unreadable: everything is computed again
	}
	s := &Space{Time: listed, Manifests: make(map[string]ManifestSpace, len(ms)), Volumes: make(map[string]SpaceTotals, len(volumes))}
	for i, sm := range ms {
		lr := int64(-1)
		switch p, ok := prev.manifest(sm.key); {
		case sm.damaged:
			// Not believed, not kept: counted once it is repaired.
		case ok && p.LogicalReferenced >= 0:
			lr = p.LogicalReferenced
		default:
			n, err := logicalReferenced(ctx, e, sm.m, roots[sm.m.Root])
			if err != nil {
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				if e.Logger != nil {
					e.Logger.Warn("space accounting: cannot count what a manifest references", "manifest", sm.key, "error", err)
				}
				break
			}
			lr = n
		}
		s.Manifests[sm.key] = ManifestSpace{Used: c.used[i], LogicalReferenced: lr}
		if lr < 0 {
			continue
		}
		t := &c.vols[sm.vol]
		if sm.head {
			t.Logical = lr
		}
		if sm.head || sm.m.Kind == KindSnapshot {
			t.Written += lr
		}
	}
	for v, name := range volumes {
		c.vols[v].SharesWithOthers = c.w.shares[v]
		s.Volumes[name] = c.vols[v]
		c.repo.Logical += c.vols[v].Logical
		c.repo.Written += c.vols[v].Written
	}
	s.Repository = c.repo
	if e.StateDir != "" {
		if err := saveSpace(e.StateDir, s); err != nil && e.Logger != nil {
			e.Logger.Warn("space accounting: cannot keep the count", "error", err)
		}
	}
	return s, nil
}

// manifest is the last count's figures for the manifest at key.
func (s *Space) manifest(key string) (ManifestSpace, bool) {
	if s == nil {
		return ManifestSpace{}, false
	}
	m, ok := s.Manifests[key]
	return m, ok
}
