package nbdserver

import (
	"time"

	"github.com/nbdvault/nbdvault/nbdserver/api"
	"github.com/nbdvault/nbdvault/nbdserver/volume"
)

// Space accounting is counted by each garbage collection, which keeps it
// in the state folder (volume.LoadSpace); here it is joined to what the
// API shows. It is read again for every request that shows it: the file
// is small, and a collection replaces it whole.

// space is what the last collection counted, or nil when none has (or
// its file cannot be read: said in the log, and the next one writes it
// again).
func (s *Server) space() *volume.Space {
	if s.env == nil {
		return nil
	}
	sp, err := volume.LoadSpace(s.env.StateDir)
	if err != nil {
		s.log.Warn("space accounting not shown", "error", err)
		return nil
	}
	return sp
}

// spaceTotals is t in the API's terms.
func spaceTotals(t volume.SpaceTotals, asOf time.Time) *api.SpaceTotals {
	return &api.SpaceTotals{
		AsOf: asOf.UTC(), Logical: t.Logical, Written: t.Written, Chunks: t.Chunks, Pages: t.Pages, Referenced: t.Referenced,
		Stored: t.Stored, DataStored: t.DataStored, PageStored: t.PageStored, Journal: t.Journal, Shared: t.Shared, SharesWithOthers: t.SharesWithOthers,
		DedupRatio: t.DedupRatio(), CompressionRatio: t.CompressionRatio(),
	}
}

// volumeSpace is volume name's totals in sp, if sp counted it: not when
// the volume was created after the count (the figures would be those of
// a deleted volume of the same name).
func volumeSpace(sp *volume.Space, name string, created time.Time) *api.SpaceTotals {
	if sp == nil {
		return nil
	}
	t, ok := sp.Volumes[name]
	if !ok || created.After(sp.Time) {
		return nil
	}
	return spaceTotals(t, sp.Time)
}

// repositorySpace is the repository's totals in sp, if any.
func repositorySpace(sp *volume.Space) *api.SpaceTotals {
	if sp == nil {
		return nil
	}
	return spaceTotals(sp.Repository, sp.Time)
}

// withSpace fills in snapshot out's figures from sp, if sp counted it.
func withSpace(out api.Snapshot, sp *volume.Space) api.Snapshot {
	if sp == nil {
		return out
	}
	kind := volume.KindSnapshot
	if out.Kind == string(volume.KindCheckpoint) {
		kind = volume.KindCheckpoint
	}
	m, ok := sp.Manifests[volume.ManifestKey(out.Volume, kind, out.ID)]
	if !ok {
		return out
	}
	asOf := sp.Time.UTC()
	out.Used, out.SpaceAsOf = &m.Used, &asOf
	if m.LogicalReferenced >= 0 { // -1: a delta could not be read to count it
		out.LogicalReferenced = &m.LogicalReferenced
	}
	return out
}
