package nbdserver

import (
	"cmp"
	"errors"
	"fmt"
	"time"

	"github.com/nbdvault/nbdvault/nbdserver/volume"
)

// clockSkew is how far in the future the newest snapshot may be dated
// before automatic prunes stop: the rules count back from the newest
// snapshot, and one dated ahead of the clock by much (a clock that was
// ahead, or stepped back since) would make them remove what is taken
// now. Marks never go back in time, so after a step back of the clock
// the new snapshots are dated just after the last one.
const clockSkew = 5 * time.Minute

// DefaultAutoPruneMinAge is Options.AutoPruneMinAge's default: a week,
// the window in which an attack on a source host cannot undo history.
const DefaultAutoPruneMinAge = 7 * 24 * time.Hour

// DefaultGCInterval is Options.GCInterval's default.
const DefaultGCInterval = 10 * time.Minute

// autoPrune is the last automatic prune of a volume, for status and
// /metrics.
type autoPrune struct {
	time    time.Time
	removed int
	kept    int
	err     error
}

// sealed hears of every seal (volume.Env.Sealed): a seal that made a
// snapshot sealed starts the volume's retention policy, if it has one.
func (s *Server) sealed(name string, kind volume.Kind) {
	if kind == volume.KindSnapshot {
		s.pruneSoon(name)
	}
}

// pruneSoon applies volume name's stored policy in the background. One
// prune runs per volume at a time; one asked for while it runs runs
// once after it.
func (s *Server) pruneSoon(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return
	}
	if _, running := s.pruning[name]; running {
		s.pruning[name] = true
		return
	}
	s.pruning[name] = false
	s.pruneRuns.Go(func() { // under mu, with closing unset: before closeAll waits
		for {
			s.applyRetention(name)
			s.mu.Lock()
			again := s.pruning[name] && !s.closing
			if again {
				s.pruning[name] = false
			} else {
				delete(s.pruning, name)
			}
			s.mu.Unlock()
			if !again {
				return
			}
		}
	})
}

// applyRetention prunes volume name by its stored policy, now. What it
// did, or why it failed, is kept for status and /metrics and logged; a
// failure is tried again after the next seal of a snapshot.
func (s *Server) applyRetention(name string) {
	v, err := s.volumeOf(name)
	if err != nil || s.runCtx.Err() != nil {
		return // deleted or closed meanwhile, or the server stops
	}
	p := v.Config().Retention
	if p.Empty() {
		return
	}
	res := autoPrune{time: time.Now()}
	var ds []volume.PruneDecision
	if res.err = s.writable(s.runCtx); res.err == nil {
		minAge := cmp.Or(s.opts.AutoPruneMinAge, DefaultAutoPruneMinAge)
		if minAge < 0 {
			minAge = 0
		}
		now := time.Now()
		ds, res.err = v.Prune(s.runCtx, p, volume.PruneOptions{Loc: time.Local, InUse: s.inUse(name), NotAfter: now.Add(clockSkew),
			YoungBy: minAge, Now: now})
	}
	for _, d := range ds {
		switch {
		case d.Keep:
			res.kept++
		case d.Err == nil:
			res.removed++
			s.metrics.forget(name + "@" + d.ID)
		}
	}
	if errors.Is(res.err, volume.ErrFutureSnapshot) {
		res.err = fmt.Errorf("%w; automatic prunes stop until the server's clock passes it: check the clock (NTP), and if the snapshot's time is wrong, delete it (nbdvault snapshot delete) or prune by hand after a --dry-run", res.err)
	}
	s.mu.Lock()
	last := s.pruned[name]
	s.pruned[name] = res
	s.mu.Unlock()
	switch {
	case res.err != nil && s.runCtx.Err() != nil:
	case res.err != nil && (last.err == nil || last.err.Error() != res.err.Error()):
		// Said once, not after every seal while it lasts.
		s.log.Error("automatic prune failed; nothing else is affected, and it is tried again after the next snapshot is sealed",
			"volume", name, "policy", p.String(), "removed", res.removed, "error", res.err)
	case res.err != nil:
		s.log.Debug("automatic prune failed again", "volume", name, "error", res.err)
	case res.removed > 0:
		s.log.Info("pruned by the volume's policy", "volume", name, "policy", p.String(), "removed", res.removed, "kept", res.kept)
	}
	if res.removed > 0 {
		s.collectLater("retention of volume " + name)
	}
}

// inUse says which snapshots of volume name an NBD client has open.
func (s *Server) inUse(name string) func(id string) string {
	return func(id string) string {
		if n := s.exports.Attached(name, id); n > 0 {
			return fmt.Sprintf("exported (%d NBD connection(s))", n)
		}
		return ""
	}
}

// collectLater asks for a collection after an automatic prune, at most
// one every GCInterval: a burst of prunes (a policy set on many
// volumes, snapshots sealed one after another) is one sweep.
func (s *Server) collectLater(why string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing || s.gcTimer != nil {
		return // one is due already
	}
	wait := time.Until(s.lastAutoGC.Add(s.gcInterval()))
	s.gcTimer = time.AfterFunc(max(wait, 0), func() {
		s.mu.Lock()
		s.gcTimer, s.lastAutoGC = nil, time.Now()
		s.mu.Unlock()
		s.collectSoon(why)
	})
}

func (s *Server) gcInterval() time.Duration {
	if s.opts.GCInterval > 0 {
		return s.opts.GCInterval
	}
	return DefaultGCInterval
}

// lastPrune is volume name's last automatic prune, and whether one ran.
func (s *Server) lastPrune(name string) (autoPrune, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.pruned[name]
	return r, ok
}
