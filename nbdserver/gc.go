package nbdserver

import (
	"cmp"
	"context"
	"time"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/nbdserver/volume"
)

// CollectGarbage deletes the chunks no manifest references, now, while
// the volumes go on (volume.CollectGarbage); with dryRun it only counts.
// One runs at a time: a second waits for the first.
func (s *Server) CollectGarbage(ctx context.Context, dryRun, list bool) (volume.GCReport, error) {
	if !dryRun {
		if err := s.writable(ctx); err != nil {
			return volume.GCReport{}, err
		}
	}
	rep, err := volume.CollectGarbage(ctx, s.env, volume.GCOptions{DryRun: dryRun, List: list, Hold: s.lease.Margin()})
	if err == nil && !dryRun {
		s.log.Info("garbage collected", "deleted", rep.Deleted, "referenced", rep.Referenced,
			"chunks", rep.Listed, "listing", rep.Listing, "manifests", rep.Manifests, "elapsed", rep.Elapsed.Round(1e6))
	}
	if len(rep.DamagedManifests) > 0 {
		s.log.Warn("garbage collection marked damaged manifests from their roots; verify and repair them", "manifests", rep.DamagedManifests)
	}
	return rep, err
}

// collectSoon starts a collection in the background after a change that
// leaves chunks unreferenced (a prune, a deleted volume), unless one is
// asked for already: a burst of changes is one collection.
func (s *Server) collectSoon(why string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing || !s.gcDue.CompareAndSwap(false, true) {
		return
	}
	s.gcRuns.Go(func() { // under mu, with closing unset: before closeAll waits
		s.gcDue.Store(false) // changes from now on ask for another run
		if s.runCtx.Err() != nil {
			return
		}
		s.log.Info("garbage collection", "after", why)
		if _, err := s.CollectGarbage(s.runCtx, false, false); err != nil && s.runCtx.Err() == nil {
			s.log.Warn("garbage collection failed; it runs again after the next prune or delete, or with nbdvault gc", "error", err)
		}
	})
}

// removeTemporary removes, in the background, the temporary files that
// Puts cut short by a crash left in a local repository: nothing else
// ever would (listings hide them). It runs at a start whose inventory is
// not trusted (a crash, or a first start), once the previous holder's
// writes can no longer land, and spares files younger than a lease.
func (s *Server) removeTemporary(l *chunkstore.Local) {
	s.gcRuns.Go(func() {
		select {
		case <-time.After(time.Until(s.lease.OpensAt())):
		case <-s.runCtx.Done():
			return
		}
		n, size, err := l.RemoveTemporary(s.runCtx, cmp.Or(s.opts.LeaseTTL, DefaultLeaseTTL))
		switch {
		case err != nil && s.runCtx.Err() == nil:
			s.log.Warn("could not remove the temporary files a crash left in the repository; they take space until the next start after a crash", "error", err)
		case n > 0:
			s.log.Info("removed the temporary files a crash left in the repository", "files", n, "bytes", size)
		}
	})
}
