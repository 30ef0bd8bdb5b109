package nbdserver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nbdvault/nbdvault/internal/fsync"
	"github.com/nbdvault/nbdvault/nbdserver/api"
	"github.com/nbdvault/nbdvault/nbdserver/volume"
)

// Files in the state folder.
const (
	// verifyFile is the last verify's result: status shows it after a
	// restart too.
	verifyFile = "last-verify.json"
	// verifyNextFile is where the next N% subset starts in the chunk ID
	// space, so that repeated runs cover all of it.
	verifyNextFile = "verify-next.json"
)

// verifyRuns lets one verify run at a time; its zero value is ready.
type verifyRuns struct {
	once sync.Once
	sem  chan struct{}
}

// lock waits until no other verify runs, or ctx ends.
func (r *verifyRuns) lock(ctx context.Context) error {
	r.once.Do(func() { r.sem = make(chan struct{}, 1) })
	select {
	case r.sem <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (r *verifyRuns) unlock() { <-r.sem }

// verifySubset is a parsed --read-data-subset: n of m, or a percentage of
// the ID space after where the last such run stopped.
type verifySubset struct {
	n, m  int
	width uint64 // of the ID space, for N%; 0 with pct: all of it
	pct   string // "N%" as given, without the sign; "" for n/m
}

var percentRE = regexp.MustCompile(`^([0-9]{1,3}(\.[0-9]{1,6})?)%$`)

// parseVerifySubset reads "n/m" (1 <= n <= m) or "N%" (0 < N <= 100,
// decimals allowed: 0.5%).
func parseVerifySubset(s string) (verifySubset, error) {
	if m := percentRE.FindStringSubmatch(s); m != nil {
		r, ok := new(big.Rat).SetString(m[1])
		switch {
		case !ok:
		case r.Sign() <= 0:
			return verifySubset{}, fmt.Errorf("subset %s reads nothing: want more than 0%%, e.g. 10%%", s)
		case r.Cmp(big.NewRat(100, 1)) > 0:
			return verifySubset{}, fmt.Errorf("subset %s is more than all of it: want at most 100%%, or --read-data", s)
		default:
			// The width of N% of 2^64, rounded up: 100/N runs (rounded
			// up) cover every ID.
			num := new(big.Int).Lsh(r.Num(), 64)
			den := new(big.Int).Mul(r.Denom(), big.NewInt(100))
			w := num.Add(num, den).Sub(num, big.NewInt(1)).Div(num, den)
			sub := verifySubset{pct: m[1]}
			if w.IsUint64() {
				sub.width = w.Uint64()
			}
			return sub, nil
		}
	}
	a, b, found := strings.Cut(s, "/")
	n, err1 := strconv.Atoi(a)
	m, err2 := strconv.Atoi(b)
	if !found || err1 != nil || err2 != nil || n < 1 || n > m {
		return verifySubset{}, fmt.Errorf("subset %q: want N%% (the next N%% of the chunks after the last such run, e.g. 10%%) or n/m with 1 <= n <= m (e.g. 1/10)", s)
	}
	return verifySubset{n: n, m: m}, nil
}

// verifyNext is verifyNextFile's content.
type verifyNext struct {
	Next string `json:"next"` // 16 hex digits: the first 8 bytes of an ID
}

// nextSubset is where the next N% run starts: 0 the first time, or if
// the file is unreadable (it is only a position).
func (s *Server) nextSubset() uint64 {
	data, err := os.ReadFile(filepath.Join(s.env.StateDir, verifyNextFile))
	if err != nil {
		return 0
	}
	var vn verifyNext
	if err := json.Unmarshal(data, &vn); err != nil {
		s.log.Warn("the position of the next verify subset is unreadable; starting again from the first IDs", "file", verifyNextFile, "error", err)
		return 0
	}
	x, err := strconv.ParseUint(vn.Next, 16, 64)
	if err != nil {
		s.log.Warn("the position of the next verify subset is unreadable; starting again from the first IDs", "file", verifyNextFile, "error", err)
		return 0
	}
	return x
}

// Verify checks the repository (volume.Verify) and keeps the result in
// the state folder, where status and /metrics find it. One runs at a
// time: a second waits for the first. An N% subset reads the next N% of
// the chunk ID space after the last N% run, and moves the position on
// once it has finished.
func (s *Server) Verify(ctx context.Context, req api.Verify, scheduled bool) (api.VerifyReport, error) {
	opts := volume.VerifyOptions{Targets: req.Targets, ReadData: req.ReadData || req.Subset != ""}
	var sub verifySubset
	if req.Subset != "" {
		var err error
		if sub, err = parseVerifySubset(req.Subset); err != nil {
			return api.VerifyReport{}, fmt.Errorf("%w: %w", errInvalid, err)
		}
		opts.SubsetN, opts.SubsetM = sub.n, sub.m
	}
	if err := s.verifies.lock(ctx); err != nil {
		return api.VerifyReport{}, err
	}
	defer s.verifies.unlock()
	var rng *api.VerifyRange
	if sub.pct != "" {
		// Read under the lock: two N% runs one after the other read
		// consecutive ranges.
		opts.From, opts.Width = s.nextSubset(), sub.width
		rng = describeRange(opts.From, opts.Width)
	}
	rep, err := volume.Verify(ctx, s.env, opts)
	if err != nil {
		return api.VerifyReport{}, err
	}
	if sub.pct != "" {
		next := verifyNext{Next: fmt.Sprintf("%016x", opts.From+opts.Width)}
		data, _ := json.Marshal(next)
		if err := fsync.WriteFile(filepath.Join(s.env.StateDir, verifyNextFile), data); err != nil {
			s.log.Warn("could not keep where the next verify subset starts; the next one reads this range again", "error", err)
		}
	}
	out := api.VerifyReport{Time: time.Now().UTC(), Scheduled: scheduled, Targets: req.Targets, ReadData: opts.ReadData, Subset: req.Subset, Range: rng,
		Manifests: rep.Manifests, Pages: rep.Pages, Chunks: rep.Chunks, Read: rep.Read,
		Deltas: rep.Deltas, DeltaPages: rep.DeltaPages, Frames: rep.Frames, FramesRead: rep.FramesRead,
		Seconds: rep.Elapsed.Seconds(), Problems: []api.VerifyProblem{}}
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
		s.log.Error("verify found damage: restore the objects named from a copy of the repository, or delete the snapshots they hold and run nbdvault gc; `nbdvault status --json` lists them all (last_verify)",
			"problems", len(out.Problems), "first", out.Problems[0].Object, "why", out.Problems[0].Reason, "scheduled", scheduled)
	} else {
		s.log.Info("verify found no damage", "manifests", out.Manifests, "chunks", out.Chunks, "read", out.Read,
			"frames_read", out.FramesRead, "subset", req.Subset, "scheduled", scheduled, "seconds", out.Seconds)
	}
	return out, nil
}

// describeRange says which part of the ID space [from, from+width) is
// (all of it when width is 0).
func describeRange(from, width uint64) *api.VerifyRange {
	pct := func(x uint64) float64 {
		f, _ := new(big.Rat).SetFrac(new(big.Int).Mul(new(big.Int).SetUint64(x), big.NewInt(100)), new(big.Int).Lsh(big.NewInt(1), 64)).Float64()
		return f
	}
	return &api.VerifyRange{From: fmt.Sprintf("%016x", from), To: fmt.Sprintf("%016x", from+width),
		FromPercent: pct(from), ToPercent: pct(from + width)}
}

func (s *Server) verify(r *http.Request) (int, any, error) {
	var req api.Verify
	if r.ContentLength != 0 {
		if err := decode(r, &req); err != nil {
			return 0, nil, err
		}
	}
	out, err := s.Verify(r.Context(), req, false)
	if err != nil {
		return 0, nil, err
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

// scheduleVerify starts the scheduled verify (Options.VerifyEvery), if
// any: it stops with runCtx, and closeAll waits for it.
func (s *Server) scheduleVerify() {
	if s.opts.VerifyEvery <= 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return
	}
	s.gcRuns.Go(s.verifyLoop)
}

// firstVerifyAfter bounds how soon after start the first scheduled
// verify runs: the server replays its logs and catches up uploads then.
const firstVerifyAfter = time.Minute

// verifyLoop runs a verify of the whole repository every
// Options.VerifyEvery: the first one VerifyEvery after the last whole
// verify kept in the state folder (or after start without one), but not
// in the first minute; the next ones VerifyEvery after the previous one
// ended.
func (s *Server) verifyLoop() {
	every := s.opts.VerifyEvery
	now := time.Now()
	next := now.Add(every)
	if last := s.lastVerify(); last != nil && len(last.Targets) == 0 && last.Time.Add(every).Before(next) {
		next = last.Time.Add(every)
	}
	if soonest := now.Add(min(every, firstVerifyAfter)); next.Before(soonest) {
		next = soonest
	}
	req := api.Verify{Subset: s.opts.VerifySubset}
	for {
		s.log.Debug("next scheduled verify", "at", next)
		t := time.NewTimer(time.Until(next))
		select {
		case <-s.runCtx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		_, err := s.Verify(s.runCtx, req, true)
		if s.runCtx.Err() != nil {
			return
		}
		if err != nil {
			s.log.Warn("the scheduled verify could not check the repository; it runs again at its next time, or run nbdvault verify",
				"error", err, "next", time.Now().Add(every).Round(time.Second))
		}
		next = time.Now().Add(every)
	}
}

// CheckVerifySchedule says what is wrong with o's VerifyEvery and
// VerifySubset, if anything: a scheduled subset must be N% (n/m would
// read the same part every time) and needs a schedule.
func CheckVerifySchedule(o Options) error {
	switch {
	case o.VerifyEvery < 0:
		return fmt.Errorf("verify every %s: want a duration such as 24h, or 0 for never", o.VerifyEvery)
	case o.VerifySubset == "":
		return nil
	case o.VerifyEvery == 0:
		return errors.New("a verify subset without a schedule: give --verify-every too")
	}
	sub, err := parseVerifySubset(o.VerifySubset)
	if err != nil {
		return err
	}
	if sub.pct == "" {
		return fmt.Errorf("scheduled verify subset %q: want N%% (e.g. 5%%), which moves on run after run; n/m would read the same part every time", o.VerifySubset)
	}
	return nil
}
