package volume

import (
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
	// ReadData fetches, decodes and hashes the chunks referenced, not
	// only their index pages and their presence.
	ReadData bool
	// SubsetN of SubsetM, when SubsetM > 0, reads only the chunks whose
	// ID's first 8 bytes modulo SubsetM are SubsetN-1: M runs with N from
	// 1 to M read everything once.
	SubsetN, SubsetM int
}

// VerifyReport is what Verify found.
type VerifyReport struct {
	Manifests int // snapshots and checkpoints checked
	Pages     int // distinct index pages read and checked
	Chunks    int // distinct data chunks referenced
	Read      int // of those, fetched and hashed (ReadData)
	// Problems are the damaged or missing objects, each with what
	// references it; empty when all is well.
	Problems []VerifyProblem
	Elapsed  time.Duration
}

// VerifyProblem is one damaged or missing object.
type VerifyProblem struct {
	// Object is the key of a damaged manifest or journal pack, or the
	// chunk key of a damaged or missing index page or data chunk.
	Object string
	Kind   string // "missing" or "damaged"
	Reason string
	// Affects are the snapshots and checkpoints that reference it, with
	// the bytes of the volume it holds (for an index page, all it
	// covers).
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

// Verify checks the repository's snapshots and checkpoints (or those of
// opts.Targets): every manifest decodes and passes its check, every
// index page reachable decodes and hashes to its ID, every data chunk
// referenced is in the repository (one listing of chunks/), every
// journal pack a delta names is there; with ReadData every chunk
// referenced (or a subset) is fetched, decoded and hashed. Reads go
// around the chunk cache. Each problem names what it affects. An error
// is a failure to check (the repository does not answer), not damage.
func Verify(ctx context.Context, env *Env, opts VerifyOptions) (VerifyReport, error) {
	start := time.Now()
	var rep VerifyReport
	store := env.Store.Uncached()
	problems := map[string]*VerifyProblem{}
	problem := func(object, kind, reason string) {
		if problems[object] == nil {
			problems[object] = &VerifyProblem{Object: object, Kind: kind, Reason: reason}
		}
	}
	// What the repository holds: chunks, and every other key.
	manifestKeys, keys, err := listVolumesKeys(ctx, env.Repo)
	if err != nil {
		return rep, fmt.Errorf("verify: %w", err)
	}
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
		for _, d := range m.Deltas {
			if !keys[d.Pack] {
				problem(d.Pack, "missing", "a journal pack named by "+k)
			}
		}
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
		if opts.ReadData && (opts.SubsetM == 0 || int(binary.BigEndian.Uint64(id[:8])%uint64(opts.SubsetM)) == opts.SubsetN-1) {
			toRead = append(toRead, id)
		}
	}

	// The data itself.
	var mu sync.Mutex
	var g errgroup.Group
	g.SetLimit(16)
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
	if err := g.Wait(); err != nil {
		return rep, err
	}

	// What each problem affects: the trees again, for those IDs only.
	if len(problems) > 0 {
		for _, vm := range ms {
			locateProblems(ctx, env.Store, vm, problems)
		}
		for _, p := range problems {
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
	name := vm.key[strings.LastIndexByte(vm.key, '/')+1:]
	ref := func(first, count uint64) VerifyRef {
		off := int64(first) * vm.m.ChunkSize
		n := min(int64(count)*vm.m.ChunkSize, max(vm.m.Size-off, 0))
		return VerifyRef{Volume: vm.m.Volume, Snapshot: name, Kind: vm.m.Kind, Offset: off, Length: n}
	}
	for _, d := range vm.m.Deltas {
		if p := problems[d.Pack]; p != nil {
			p.Affects = append(p.Affects, ref(0, uint64((vm.m.Size+vm.m.ChunkSize-1)/vm.m.ChunkSize)))
		}
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
