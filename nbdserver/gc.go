package nbdserver

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/nbdvault/nbdvault/internal/fsync"
	"github.com/nbdvault/nbdvault/nbdserver/api"

	"github.com/nbdvault/nbdvault/nbdserver/volume"
)

// CollectGarbage deletes the chunks no manifest references, now, while
// the volumes go on (volume.CollectGarbage); with dryRun it only counts.
// One runs at a time: a second waits for the first.
func (s *Server) CollectGarbage(ctx context.Context, dryRun, list bool) (volume.GCReport, error) {
	if !dryRun {
		if err := s.writable(); err != nil {
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

// verifyFile is where the last verify's result is kept, in the state
// folder: status shows it after a restart too.
const verifyFile = "last-verify.json"

func (s *Server) verify(r *http.Request) (int, any, error) {
	var req api.Verify
	if r.ContentLength != 0 {
		if err := decode(r, &req); err != nil {
			return 0, nil, err
		}
	}
	opts := volume.VerifyOptions{Targets: req.Targets, ReadData: req.ReadData || req.Subset != ""}
	if req.Subset != "" {
		n, m, ok := parseSubset(req.Subset)
		if !ok {
			return 0, nil, fmt.Errorf("%w: subset %q: want n/m with 1 <= n <= m, e.g. 1/10", errInvalid, req.Subset)
		}
		opts.SubsetN, opts.SubsetM = n, m
	}
	rep, err := volume.Verify(r.Context(), s.env, opts)
	if err != nil {
		return 0, nil, err
	}
	out := api.VerifyReport{Time: time.Now().UTC(), Targets: req.Targets, ReadData: opts.ReadData, Subset: req.Subset,
		Manifests: rep.Manifests, Pages: rep.Pages, Chunks: rep.Chunks, Read: rep.Read, Seconds: rep.Elapsed.Seconds(),
		Problems: []api.VerifyProblem{}}
	for _, p := range rep.Problems {
		ap := api.VerifyProblem{Object: p.Object, Kind: p.Kind, Reason: p.Reason, Affects: []api.VerifyRef{}}
		for _, a := range p.Affects {
			ap.Affects = append(ap.Affects, api.VerifyRef{Volume: a.Volume, Snapshot: a.Snapshot, Kind: string(a.Kind), Offset: a.Offset, Length: a.Length})
		}
		out.Problems = append(out.Problems, ap)
	}
	if data, err := json.MarshalIndent(out, "", "  "); err == nil {
		if err := fsync.WriteFile(filepath.Join(s.env.StateDir, verifyFile), data); err != nil {
			s.log.Warn("could not keep the verify result in the state folder", "error", err)
		}
	}
	if len(out.Problems) > 0 {
		s.log.Error("verify found damage", "problems", len(out.Problems), "first", out.Problems[0].Object, "why", out.Problems[0].Reason)
	} else {
		s.log.Info("verify found no damage", "manifests", out.Manifests, "chunks", out.Chunks, "read", out.Read)
	}
	return http.StatusOK, out, nil
}

// lastVerify is the last verify's result, if any is kept.
func (s *Server) lastVerify() *api.VerifyReport {
	data, err := os.ReadFile(filepath.Join(s.env.StateDir, verifyFile))
	if err != nil {
		return nil
	}
	var rep api.VerifyReport
	if json.Unmarshal(data, &rep) != nil {
		return nil
	}
	return &rep
}

// parseSubset reads "n/m".
func parseSubset(s string) (n, m int, ok bool) {
	a, b, found := strings.Cut(s, "/")
	n, err1 := strconv.Atoi(a)
	m, err2 := strconv.Atoi(b)
	return n, m, found && err1 == nil && err2 == nil && n >= 1 && n <= m
}
