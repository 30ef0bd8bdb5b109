package volume

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// VerifyOptions say what Verify checks.
type VerifyOptions struct {
	// Targets are VOL or VOL@SNAP (an ID or a label); none: every
	// snapshot and checkpoint of every volume.
	Targets []string
	// ReadData fetches, decodes and hashes the chunks and the journal
	// frames referenced, not only their index pages, delta pages and
	// presence.
	ReadData bool
	// SubsetN of SubsetM, when SubsetM > 0, reads only the chunks and
	// frames whose ID's first 8 bytes modulo SubsetM are SubsetN-1: M runs
	// with N from 1 to M read everything once.
	SubsetN, SubsetM int
	// From and Width, when Width > 0, read only the chunks and frames
	// whose ID's first 8 bytes x lie in [From, From+Width) modulo 2^64:
	// a range of the ID space, which a caller moves on run after run so
	// that the runs cover it all (the server's N% subsets).
	From, Width uint64
}

// picks says whether a ReadData run reads the chunk or frame with ID id.
func (o VerifyOptions) picks(id chunkstore.ID) bool {
	x := binary.BigEndian.Uint64(id[:8])
	switch {
	case !o.ReadData:
		return false
	case o.SubsetM > 0:
		return int(x%uint64(o.SubsetM)) == o.SubsetN-1
	case o.Width > 0:
		return x-o.From < o.Width // wraps past 2^64 as the range does
	}
	return true
}

// VerifyReport is what Verify found.
type VerifyReport struct {
	Manifests int // snapshots and checkpoints checked
	Pages     int // distinct index pages read and checked
	Chunks    int // distinct data chunks referenced
	Read      int // of those, fetched and hashed (ReadData)
	// Deltas and DeltaPages are the distinct delta tops and pages read
	// and checked; Frames the distinct journal frames they reference,
	// FramesRead those fetched and hashed (ReadData).
	Deltas, DeltaPages, Frames, FramesRead int
	// Problems are the damaged or missing objects, each with what
	// references it; empty when all is well.
	Problems []VerifyProblem
	Elapsed  time.Duration
}

// VerifyProblem is one damaged or missing object.
type VerifyProblem struct {
	// Object is the key of a damaged manifest or a missing journal pack,
	// the chunk key of a damaged or missing index page or data chunk, or
	// PACK#OFFSET for a damaged frame of a journal pack (a delta top or
	// page, or journal data).
	Object string
	Kind   string // "missing" or "damaged"
	Reason string
	// Affects are the snapshots and checkpoints that reference it, with
	// the bytes of the volume they read from it (for an index page, all
	// it covers; for a delta, what no newer delta of theirs covers).
	Affects []VerifyRef
}

// VerifyRef is a snapshot or checkpoint and a byte range of it.
type VerifyRef struct {
	Volume, Snapshot string
	Kind             Kind
	Offset, Length   int64
}

// verifyManifest is a manifest to check, and where it is.
type verifyManifest struct {
	key string
	m   Manifest
}

// frameAt is a frame of a journal pack.
type frameAt struct {
	pack string
	ref  chunkstore.FrameRef
}

// object is how a problem names the frame.
func (f frameAt) object() string { return fmt.Sprintf("%s#%d", f.pack, f.ref.Off) }

// pageAt is a delta page to read, with its top's packs (its frames
// name them by index) and what its top says of it.
type pageAt struct {
	frameAt
	pr    pageRef
	packs []string
}

// Verify checks the repository's snapshots and checkpoints (or those of
// opts.Targets): every manifest decodes and passes its check, every
// index page reachable decodes and hashes to its ID, every data chunk
// referenced is in the repository (one listing of chunks/), every delta
// top and page decodes and hashes to its reference, every journal pack
// they name is there; with ReadData every chunk and journal frame
// referenced (or a subset) is fetched, decoded and hashed. Reads go
// around the chunk cache. Each problem names what it affects. An error
// is a failure to check (the repository does not answer), not damage.
func Verify(ctx context.Context, env *Env, opts VerifyOptions) (VerifyReport, error) {
	start := time.Now()
	var rep VerifyReport
	store := env.Store.Uncached()
	var mu sync.Mutex // guards problems and rep while reads run
	problems := map[string]*VerifyProblem{}
	problem := func(object, kind, reason string) {
		if problems[object] == nil {
			problems[object] = &VerifyProblem{Object: object, Kind: kind, Reason: reason}
		}
	}
	// What the repository holds: chunks, and every other key.
	manifestKeys, all, err := listVolumesKeys(ctx, env.Repo)
	if err != nil {
		return rep, fmt.Errorf("verify: %w", err)
	}
	inRepo := func(k string) bool { _, ok := all[k]; return ok }
	var present []chunkstore.ID
	if err := env.Repo.List(ctx, "chunks/", func(k string) error {
		if id, ok := chunkOfKey(k); ok {
			present = append(present, id)
		}
		return nil
	}); err != nil {
		return rep, fmt.Errorf("verify: list the chunks: %w", err)
	}
	slices.SortFunc(present, chunkstore.ID.Compare)

	// The manifests to check.
	var ms []verifyManifest
	matched := make([]bool, len(opts.Targets))
	for _, k := range manifestKeys {
		parts := strings.Split(k, "/") // volumes/VOL/KINDs/ID
		vol, id := parts[1], parts[3]
		var m Manifest
		var derr error
		data, err := env.Repo.Get(ctx, k)
		switch {
		case errors.Is(err, chunkstore.ErrNotFound):
			continue // deleted since the listing
		case err != nil && !errors.Is(err, chunkstore.ErrCorrupt):
			return rep, fmt.Errorf("verify: %s: %w", k, err)
		case err == nil:
			derr = decodeJSON(env.RepoID, k, data, &m)
		default:
			derr = err
		}
		want := len(opts.Targets) == 0
		for j, t := range opts.Targets {
			tv, ts, hasSnap := strings.Cut(t, "@")
			if tv == vol && (!hasSnap || ts == id || (derr == nil && ts == m.Label && m.Label != "")) {
				want, matched[j] = true, true
			}
		}
		if !want {
			continue
		}
		rep.Manifests++
		if derr != nil {
			problem(k, "damaged", derr.Error())
			continue
		}
		ms = append(ms, verifyManifest{key: k, m: m})
	}
	for j, ok := range matched {
		if !ok {
			return rep, fmt.Errorf("verify %s: %w: no snapshot or volume of that name in the repository", opts.Targets[j], ErrNoSnapshot)
		}
	}

	// Every page, read and checked once; the data chunks they name.
	mk := newMarker(store, false)
	var pageErr error
	for _, vm := range ms {
		if err := mk.walk(ctx, vm.m.Root, indexLevels-1, func(page chunkstore.ID, err error) error {
			kind := "damaged"
			if errors.Is(err, chunkstore.ErrNotFound) {
				kind = "missing"
			} else if !errors.Is(err, chunkstore.ErrCorrupt) {
				pageErr = err // no answer: not damage
			}
			problem(chunkstore.Key(page), kind, "index page: "+err.Error())
			return nil
		}); err != nil {
			return rep, err
		}
	}
	if pageErr != nil {
		return rep, fmt.Errorf("verify: %w", pageErr)
	}
	data := mk.done()
	rep.Pages = mk.pages
	rep.Chunks = len(data)
	var toRead []chunkstore.ID
	for _, id := range data {
		if !has(present, id) {
			problem(chunkstore.Key(id), "missing", "not in the repository")
			continue
		}
		if opts.picks(id) {
			toRead = append(toRead, id)
		}
	}

	// getFrame reads a frame of a journal pack that is listed, and says
	// whether it is good; damage is a problem, no answer an error.
	getFrame := func(f frameAt, what string) ([]byte, bool, error) {
		b, err := store.GetFrame(ctx, f.pack, f.ref)
		mu.Lock()
		defer mu.Unlock()
		switch {
		case err == nil:
			return b, true, nil
		case errors.Is(err, chunkstore.ErrNotFound):
			problem(f.pack, "missing", "a journal pack, gone since the listing")
		case errors.Is(err, chunkstore.ErrCorrupt):
			problem(f.object(), "damaged", what+": "+err.Error())
		default:
			return nil, false, fmt.Errorf("verify: read a %s: %w", what, err)
		}
		return nil, false, nil
	}
	// listed says whether journal pack p is in the repository, and makes
	// it a problem if not.
	listed := func(p, by string) bool {
		mu.Lock()
		defer mu.Unlock()
		if !inRepo(p) {
			problem(p, "missing", "a journal pack named by "+by)
		}
		return inRepo(p)
	}

	// Delta tops, each read and checked once.
	tops := map[frameAt]*deltaTop{}
	var topAts []frameAt
	for _, vm := range ms {
		for _, d := range vm.m.Deltas {
			f := frameAt{pack: d.Pack, ref: d.Top}
			if _, ok := tops[f]; !ok && listed(d.Pack, vm.key) {
				tops[f] = nil
				topAts = append(topAts, f)
			}
		}
	}
	rep.Deltas = len(topAts)
	var g errgroup.Group
	g.SetLimit(16)
	for _, f := range topAts {
		g.Go(func() error {
			b, ok, err := getFrame(f, "delta top")
			if !ok {
				return err
			}
			t, err := decodeTop(b)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				problem(f.object(), "damaged", "delta top: "+err.Error())
				return nil
			}
			tops[f] = &t
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return rep, err
	}

	// Their pages, each read and checked once; the journal frames they
	// name.
	var pages []pageAt
	seenPage := map[frameAt]bool{}
	for _, f := range topAts {
		t := tops[f]
		if t == nil {
			continue
		}
		for _, p := range t.packs {
			listed(p, "the delta top "+f.object())
		}
		for _, pr := range t.pages {
			pf := frameAt{pack: t.packs[pr.pack], ref: pr.ref}
			if !seenPage[pf] && inRepo(pf.pack) {
				seenPage[pf] = true
				pages = append(pages, pageAt{frameAt: pf, pr: pr, packs: t.packs})
			}
		}
	}
	rep.DeltaPages = len(pages)
	frames := map[frameAt]bool{}
	for _, pa := range pages {
		g.Go(func() error {
			b, ok, err := getFrame(pa.frameAt, "delta page")
			if !ok {
				return err
			}
			p, err := decodePage(b, pa.pr, len(pa.packs))
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				problem(pa.object(), "damaged", "delta page: "+err.Error())
				return nil
			}
			for _, fl := range p.frames {
				frames[frameAt{pack: pa.packs[fl.pack], ref: fl.ref}] = true
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return rep, err
	}
	rep.Frames = len(frames)
	var framesToRead []frameAt
	for f := range frames {
		if inRepo(f.pack) && opts.picks(f.ref.Sum) {
			framesToRead = append(framesToRead, f)
		}
	}

	// The data itself: chunks, then journal frames.
	for i, id := range toRead {
		g.Go(func() error {
			_, err := store.Get(ctx, id)
			mu.Lock()
			defer mu.Unlock()
			rep.Read++
			switch {
			case err == nil:
			case errors.Is(err, chunkstore.ErrNotFound):
				problem(chunkstore.Key(id), "missing", "not in the repository")
			case errors.Is(err, chunkstore.ErrCorrupt):
				problem(chunkstore.Key(id), "damaged", err.Error())
			default:
				return fmt.Errorf("verify: read chunk %d of %d: %w", i, len(toRead), err)
			}
			return nil
		})
	}
	for _, f := range framesToRead {
		g.Go(func() error {
			_, _, err := getFrame(f, "journal frame")
			mu.Lock()
			defer mu.Unlock()
			rep.FramesRead++
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return rep, err
	}

	// What each problem affects: the trees and deltas again, for those
	// objects only.
	if len(problems) > 0 {
		for _, vm := range ms {
			locateProblems(ctx, env.Store, vm, problems)
			locateDeltaProblems(ctx, env, vm, tops, problems)
		}
		for _, p := range problems {
			p.Affects = mergeRefs(p.Affects)
			rep.Problems = append(rep.Problems, *p)
		}
		slices.SortFunc(rep.Problems, func(a, b VerifyProblem) int { return strings.Compare(a.Object, b.Object) })
	}
	rep.Elapsed = time.Since(start)
	return rep, nil
}

// locateProblems adds to each problem the ranges of vm that reference
// it: the chunks whose IDs it names, or all a damaged page covers.
func locateProblems(ctx context.Context, s *chunkstore.Store, vm verifyManifest, problems map[string]*VerifyProblem) {
	ref := func(first, count uint64) VerifyRef {
		off := int64(first) * vm.m.ChunkSize
		return vm.ref(off, off+int64(count)*vm.m.ChunkSize)
	}
	var visit func(id chunkstore.ID, level int, base uint64)
	visit = func(id chunkstore.ID, level int, base uint64) {
		if id.IsZero() {
			return
		}
		if p := problems[chunkstore.Key(id)]; p != nil {
			p.Affects = append(p.Affects, ref(base, span(level+1)))
			return
		}
		page, err := s.Get(ctx, id)
		if err != nil || len(page) != pageLen {
			return
		}
		for slot := range uint64(indexFanout) {
			var child chunkstore.ID
			copy(child[:], page[slot*uint64(idLen):])
			c := base + slot*span(level)
			if level == 0 {
				if p := problems[chunkstore.Key(child)]; p != nil && !child.IsZero() {
					p.Affects = append(p.Affects, ref(c, 1))
				}
			} else {
				visit(child, level-1, c)
			}
		}
	}
	visit(vm.m.Root, indexLevels-1, 0)
}

// ref is the bytes [off, end) of vm, cut at its size.
func (vm verifyManifest) ref(off, end int64) VerifyRef {
	end = min(end, vm.m.Size)
	return VerifyRef{Volume: vm.m.Volume, Snapshot: vm.key[strings.LastIndexByte(vm.key, '/')+1:], Kind: vm.m.Kind,
		Offset: off, Length: max(end-off, 0)}
}

// locateDeltaProblems adds to each problem in vm's deltas the bytes vm
// reads from it: all a damaged top (or a missing pack of one) could say
// something of, the range of a damaged page, the extents of a damaged
// frame; each less what a newer delta of vm covers (it masks the
// older). tops are the tops Verify decoded.
func locateDeltaProblems(ctx context.Context, env *Env, vm verifyManifest, tops map[frameAt]*deltaTop, problems map[string]*VerifyProblem) {
	// What it reads was checked above: through the cache.
	lv := env.deltaReader(vm.m.Volume)
	at := func(p *VerifyProblem, newer []DeltaRef, off, end int64) {
		for _, r := range uncovered(ctx, lv, newer, off, end) {
			p.Affects = append(p.Affects, vm.ref(r[0], r[1]))
		}
	}
	of := func(f frameAt) *VerifyProblem { return cmp.Or(problems[f.pack], problems[f.object()]) }
	for i, d := range vm.m.Deltas {
		newer := vm.m.Deltas[i+1:]
		tf := frameAt{pack: d.Pack, ref: d.Top}
		if p := of(tf); p != nil {
			at(p, newer, 0, vm.m.Size)
			continue
		}
		t := tops[tf]
		if t == nil {
			continue // not read: nothing more can be known
		}
		for j, pr := range t.pages {
			pf := frameAt{pack: t.packs[pr.pack], ref: pr.ref}
			if p := of(pf); p != nil {
				at(p, newer, pr.first, pr.end)
				continue
			}
			page, err := lv.loadPage(ctx, t, j)
			if err != nil {
				continue
			}
			for _, x := range page.ext {
				if x.kind != dxData {
					continue
				}
				fl := page.frames[x.frame]
				if p := of(frameAt{pack: t.packs[fl.pack], ref: fl.ref}); p != nil {
					at(p, newer, x.off, x.end())
				}
			}
		}
	}
}

// uncovered returns the parts of [off, end) that no delta of newer has an
// extent over, in order; [off, end) whole if a newer delta cannot be
// read (saying too much beats saying too little).
func uncovered(ctx context.Context, v *Volume, newer []DeltaRef, off, end int64) [][2]int64 {
	rs := [][2]int64{{off, end}}
	for _, d := range newer {
		var out [][2]int64
		for _, r := range rs {
			at := r[0]
			err := v.visitDelta(ctx, d, r[0], r[1]-r[0], func(x xext) error {
				if x.off > at {
					out = append(out, [2]int64{at, x.off})
				}
				at = x.end()
				return nil
			})
			if err != nil {
				return [][2]int64{{off, end}}
			}
			if at < r[1] {
				out = append(out, [2]int64{at, r[1]})
			}
		}
		rs = out
	}
	return rs
}

// mergeRefs sorts refs and joins those of one snapshot that touch.
func mergeRefs(refs []VerifyRef) []VerifyRef {
	slices.SortFunc(refs, func(a, b VerifyRef) int {
		return cmp.Or(strings.Compare(a.Volume, b.Volume), strings.Compare(a.Snapshot, b.Snapshot), cmp.Compare(a.Offset, b.Offset))
	})
	var out []VerifyRef
	for _, r := range refs {
		if r.Length == 0 {
			continue
		}
		if n := len(out); n > 0 && out[n-1].Volume == r.Volume && out[n-1].Snapshot == r.Snapshot && out[n-1].Offset+out[n-1].Length >= r.Offset {
			out[n-1].Length = max(out[n-1].Length, r.Offset+r.Length-out[n-1].Offset)
			continue
		}
		out = append(out, r)
	}
	return out
}
