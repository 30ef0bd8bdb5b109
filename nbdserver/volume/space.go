package volume

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

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
