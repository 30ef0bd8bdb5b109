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
// counts what any of its manifests references; the repository's counts
// each object once.
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
	// Stored is DataStored + PageStored + Journal.
	Stored int64 `json:"stored"`
	// Unique is the stored bytes no other volume references: what
	// deleting the volume frees (for the repository: Stored less what
	// volumes share).
	Unique int64 `json:"unique"`
}

// DedupRatio is Written / Referenced: how many times over the kept
// versions read the distinct data stored (1 with a single version; 0
// when nothing is referenced).
func (t SpaceTotals) DedupRatio() float64 {
	if t.Referenced == 0 {
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
	vols []SpaceTotals // by volume index
	used [][]int64     // by volume index, then manifest index within it
	repo SpaceTotals
}

func newSpaceCount(ms []spaceManifest, nvols int) *spaceCount {
	c := &spaceCount{vols: make([]SpaceTotals, nvols), used: make([][]int64, nvols)}
	for _, sm := range ms {
		c.used[sm.vol] = append(c.used[sm.vol], 0) // local indexes are in order
	}
	return c
}

// add counts an object of size stored bytes that run, its entries in the
// mark set (one per volume that references it), names.
func (c *spaceCount) add(run []owned, size int64) {
	one := len(run) == 1
	count := func(t *SpaceTotals, o owned) {
		if o.isPage() {
			t.Pages++
			t.PageStored += size
		} else {
			t.Chunks++
			t.Referenced += o.plain()
			t.DataStored += size
		}
		t.Stored += size
		if one {
			t.Unique += size
		}
	}
	count(&c.repo, run[0])
	for _, o := range run {
		count(&c.vols[o.vol], o)
		if one && o.owner() != sharedOwner {
			c.used[o.vol][o.owner()] += size
		}
	}
}

// journal counts a volume's journal pack of size stored bytes.
func (c *spaceCount) journal(vol uint32, size int64) {
	for _, t := range []*SpaceTotals{&c.vols[vol], &c.repo} {
		t.Journal += size
		t.Stored += size
		t.Unique += size
	}
}

// space completes a collection's count (c, from the sweep) and keeps it
// in the state folder: each manifest's LREFER (taken from the last count
// when it had it: it never changes), its USED, and the totals. listed is
// when the manifests were listed. A LREFER that cannot be computed (a
// delta that cannot be read) is -1, and left out of the totals.
func (e *Env) space(ctx context.Context, listed time.Time, ms []spaceManifest, volumes []string, heads map[uint32]int, roots map[chunkstore.ID]*pageNode, c *spaceCount) *Space {
	var prev *Space
	if e.StateDir != "" {
		prev, _ = LoadSpace(e.StateDir) // unreadable: everything is computed again
	}
	s := &Space{Time: listed, Manifests: make(map[string]ManifestSpace, len(ms)), Volumes: make(map[string]SpaceTotals, len(volumes))}
	for i, sm := range ms {
		lr := int64(-1)
		if p, ok := prev.manifest(sm.key); ok && p.LogicalReferenced >= 0 {
			lr = p.LogicalReferenced
		} else if n, err := logicalReferenced(ctx, e, sm.m, roots[sm.m.Root]); err == nil {
			lr = n
		} else if e.Logger != nil && ctx.Err() == nil {
			e.Logger.Warn("space accounting: cannot count what a manifest references", "manifest", sm.key, "error", err)
		}
		s.Manifests[sm.key] = ManifestSpace{Used: c.used[sm.vol][sm.local], LogicalReferenced: lr}
		if lr < 0 {
			continue
		}
		t, head := &c.vols[sm.vol], heads[sm.vol] == i
		if head {
			t.Logical = lr
		}
		if head || sm.m.Kind == KindSnapshot {
			t.Written += lr
		}
	}
	for v, name := range volumes {
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
	return s
}

// manifest is the last count's figures for the manifest at key.
func (s *Space) manifest(key string) (ManifestSpace, bool) {
	if s == nil {
		return ManifestSpace{}, false
	}
	m, ok := s.Manifests[key]
	return m, ok
}
