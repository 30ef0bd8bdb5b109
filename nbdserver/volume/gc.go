package volume

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// Garbage collection of chunks (docs/architecture.md, "Exact mark and
// sweep, online"). A run marks every chunk and index page reachable from
// a manifest in the repository and deletes the chunks nothing marks,
// while volumes write, seal and snapshot. What makes it safe:
//
//   - the store tracks every chunk Put from the run's start, and never
//     deletes one of those (chunkstore.Tracking);
//   - every operation that writes a manifest runs as a writer of the
//     current GC epoch (lockSeal); a run starts a new epoch and waits for
//     the writers of the old one before it lists the manifests, so a seal
//     that put chunks before the start has written its manifest by then;
//   - no manifest is deleted from the start until the marking is done
//     (deleters hold gcState.marking shared, or skip their turn), so
//     every manifest listed is still there when it is read.

// gcState is what the volumes of one Env share with its collector.
type gcState struct {
	run sync.Mutex // one collection at a time

	// marking is held exclusively by a collection from its start until
	// its marking is done, and shared by whatever deletes manifests.
	marking sync.RWMutex

	mu      sync.Mutex
	cond    *sync.Cond
	epoch   uint64
	writers map[uint64]int // manifest writers in flight, by epoch
}

func (e *Env) gc() *gcState {
	e.gcOnce.Do(func() {
		e.gcs = &gcState{writers: map[uint64]int{}}
		e.gcs.cond = sync.NewCond(&e.gcs.mu)
	})
	return e.gcs
}

// enter counts a manifest writer in the current epoch until done.
func (g *gcState) enter() (done func()) {
	g.mu.Lock()
	e := g.epoch
	g.writers[e]++
	g.mu.Unlock()
	return func() {
		g.mu.Lock()
		if g.writers[e]--; g.writers[e] == 0 {
			delete(g.writers, e)
			g.cond.Broadcast()
		}
		g.mu.Unlock()
	}
}

// barrier starts a new epoch and waits until no writer of an older one
// is in flight. New writers are not held up.
func (g *gcState) barrier() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.epoch++
	for {
		older := false
		for e := range g.writers {
			if e < g.epoch {
				older = true
			}
		}
		if !older {
			return
		}
		g.cond.Wait()
	}
}

// lockSeal takes sealMu, counted as a manifest writer of the current GC
// epoch until the returned func unlocks it.
func (v *Volume) lockSeal() (unlock func()) {
	v.sealMu.Lock()
	done := v.env.gc().enter()
	return func() {
		done()
		v.sealMu.Unlock()
	}
}

// GCOptions tune a collection.
type GCOptions struct {
	// DryRun marks and counts, and deletes nothing.
	DryRun bool
	// Hold is how long a deleted chunk's ID stays deleting after its
	// batch (chunkstore.Store.Track): the lease's Margin.
	Hold time.Duration
	// List lists chunks/ rather than trust the inventory, and rebuilds
	// it: for a repository written by hand.
	List bool
}

// GCReport is what a collection found and did.
type GCReport struct {
	Manifests int // manifests whose trees were marked
	// DamagedManifests are manifests whose checksum failed but whose
	// root was read and marked all the same.
	DamagedManifests []string
	Pages            int  // distinct index pages marked
	Referenced       int  // distinct chunks marked, pages included
	Listed           int  // chunk objects in the repository (listed, or in the inventory)
	Listing          bool // chunks/ was listed: no inventory, or it could not be trusted, or List
	Unreferenced     int  // of Listed, not marked
	Deleted          int  // deleted (0 on a dry run)
	PutDuring        int  // chunks put while it ran (never deleted)
	Elapsed          time.Duration
	// Space is what the run counted (also kept in gc/space.json); nil if
	// the run stopped before the count was complete.
	Space *Space
}

// gcBatch is how many chunks one delete request takes (S3's
// multi-object delete takes up to 1,000 keys).
var gcBatch = 1000 // a variable for tests

// ErrGCDamage stops a collection that cannot know what part of the
// repository references: deleting then could remove what a repair needs.
var ErrGCDamage = errors.New("garbage collection stopped: cannot tell what is referenced")

// CollectGarbage deletes every chunk object of env's repository that no
// manifest references, while the volumes of env go on (see gcState). The
// chunks that exist come from env.Inventory, or a listing of chunks/
// when there is none or it cannot be trusted. A crash at any point loses
// nothing referenced; the next run deletes what this one did not.
func CollectGarbage(ctx context.Context, env *Env, opts GCOptions) (GCReport, error) {
	start := time.Now()
	var rep GCReport
	g := env.gc()
	g.run.Lock()
	defer g.run.Unlock()
	inv := env.Inventory
	var closed []int
	trusted := false
	if inv != nil {
		// Before the barrier: every chunk recorded in a closed file was
		// put by a manifest writer of an older epoch, so it has landed
		// by the time the barrier is passed.
		closed, trusted = inv.rotate()
	}
	g.marking.Lock()
	marking := true
	defer func() {
		if marking {
			g.marking.Unlock()
		}
	}()
	tr, err := env.Store.Track(opts.Hold)
	if err != nil {
		return rep, err
	}
	defer tr.Stop()
	g.barrier()

	// The chunks that exist: the inventory brought up to date (a dry run
	// too: it deletes nothing, but counts what is there), or a listing.
	rep.Listing = inv == nil
	if inv != nil {
		if rep.Listing, err = inv.prepare(ctx, env.Repo, closed, trusted, opts.List); err != nil {
			return rep, fmt.Errorf("garbage collection: %w", err)
		}
	}

	// Every manifest now in the repository, and each one's tree.
	listed := time.Now().UTC().Round(0) // as space.json keeps it
	keys, all, err := listVolumesKeys(ctx, env.Repo)
	if err != nil {
		return rep, fmt.Errorf("garbage collection: %w", err)
	}
	var (
		ms      []spaceManifest
		volumes []string
		volIdx  = map[string]uint32{}
		class   []uint32           // by volume: its data chunks' size class
		heads   = map[uint32]int{} // by volume: the index in ms of its head (spaceManifest.head)
	)
	volume := func(name string) uint32 {
		v, ok := volIdx[name]
		if !ok {
			v = uint32(len(volumes))
			volIdx[name], volumes, class = v, append(volumes, name), append(class, chunkClass(DefaultChunkSize))
		}
		return v
	}
	for _, k := range keys {
		mf, damaged, err := readManifestForGC(ctx, env, k)
		if err != nil {
			return rep, err
		}
		v := volume(volumeOfKey(k))
		ms = append(ms, spaceManifest{key: k, m: mf, vol: v, damaged: damaged})
		if damaged {
			// Its chunks are marked all the same; its figures (chunk
			// size, sequence number) are not believed.
			rep.DamagedManifests = append(rep.DamagedManifests, k)
			continue
		}
		class[v] = chunkClass(mf.ChunkSize)
		if h, ok := heads[v]; !ok || mf.Seq > ms[h].m.Seq || mf.Seq == ms[h].m.Seq && mf.Kind == KindSnapshot {
			heads[v] = len(ms) - 1
		}
	}
	for _, h := range heads {
		ms[h].head = true
	}
	for k := range all { // a volume whose packs no manifest names yet
		if isJournalKey(k) {
			volume(volumeOfKey(k))
		}
	}
	w := &owners{manifestVol: make([]uint32, len(ms)), shares: make([]bool, len(volumes))}
	for i, sm := range ms {
		w.manifestVol[i] = sm.vol
	}
	m := newOwnerMarker(env.Store.Uncached(), w) // pages around the cache: clients' reads stay in it
	roots, err := m.mark(ctx, ms, class)
	if err != nil {
		return rep, err
	}
	marked := m.set
	rep.Manifests, rep.Pages, rep.Referenced = len(ms), m.pages, len(marked)
	g.marking.Unlock() // manifests may go now: what they referenced is marked
	marking = false

	// What the repository holds; the unreferenced chunks are deleted
	// 1,000 at a time as they stream, and the referenced ones counted.
	count := newSpaceCount(w, len(ms), len(volumes))
	batch := make([]chunkstore.ID, 0, gcBatch)
	sizes := make([]int64, 0, gcBatch) // batch's stored sizes
	var deleteErr error
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		gone, err := tr.Delete(ctx, batch)
		rep.Deleted += len(gone)
		if inv != nil {
			// Those put since the start were kept: they exist, and
			// leave the inventory with the batch, so the next run
			// must know them. gone is in batch's order.
			for i, id := range batch {
				if len(gone) > 0 && gone[0] == id {
					gone = gone[1:]
				} else {
					inv.Written(id, sizes[i], false)
				}
			}
		}
		batch, sizes = batch[:0], sizes[:0]
		if err != nil {
			deleteErr = fmt.Errorf("garbage collection: %w (run it again: it deletes what is left)", err)
			return deleteErr
		}
		return nil
	}
	each := func(id chunkstore.ID, size int64) (drop bool, err error) {
		rep.Listed++
		if o, ok := findOwned(marked, id); ok {
			count.add(o, size)
			return false, nil
		}
		rep.Unreferenced++
		if opts.DryRun {
			return false, nil
		}
		sizes = append(sizes, size)
		if batch = append(batch, id); len(batch) == cap(batch) {
			return true, flush()
		}
		return true, nil
	}
	if inv != nil {
		err = inv.rewrite(each, opts.DryRun, flush)
	} else {
		err = env.Repo.ListSizes(ctx, "chunks/", func(k string, size int64) error {
			if id, ok := chunkOfKey(k); ok { // else not a chunk: not the collector's
				_, err := each(id, size)
				return err
			}
			return nil
		})
		if err == nil {
			err = flush()
		}
	}
	if err != nil {
		if deleteErr != nil {
			return rep, deleteErr
		}
		return rep, fmt.Errorf("garbage collection: %w", err)
	}
	for k, size := range all {
		if isJournalKey(k) {
			count.journal(volIdx[volumeOfKey(k)], size)
		}
	}
	if rep.Space, err = env.space(ctx, listed, ms, volumes, roots, count); err != nil {
		return rep, fmt.Errorf("garbage collection: count space: %w", err)
	}
	rep.PutDuring, rep.Elapsed = tr.Len(), time.Since(start)
	return rep, nil
}

// listVolumesKeys lists volumes/: the manifests' keys, sorted, and
// every key with its object's stored size.
func listVolumesKeys(ctx context.Context, repo chunkstore.Backend) (manifests []string, all map[string]int64, err error) {
	all = map[string]int64{}
	if err := repo.ListSizes(ctx, "volumes/", func(k string, size int64) error {
		all[k] = size
		if isManifestKey(k) {
			manifests = append(manifests, k)
		}
		return nil
	}); err != nil {
		return nil, nil, fmt.Errorf("list the manifests: %w", err)
	}
	slices.Sort(manifests)
	return manifests, all, nil
}

// isJournalKey says whether k is a journal pack's key.
func isJournalKey(k string) bool { return strings.HasPrefix(k, journalPrefix(volumeOfKey(k))) }

// isManifestKey says whether k is volumes/VOL/{snapshots,checkpoints}/ID.
func isManifestKey(k string) bool {
	parts := strings.Split(k, "/")
	return len(parts) == 4 && parts[0] == "volumes" &&
		(parts[2] == string(KindSnapshot)+"s" || parts[2] == string(KindCheckpoint)+"s") && parts[3] != ""
}

// chunkOfKey is the chunk a key under chunks/ names.
func chunkOfKey(k string) (chunkstore.ID, bool) {
	id, err := chunkstore.ParseID(k[strings.LastIndexByte(k, '/')+1:])
	return id, err == nil && chunkstore.Key(id) == k
}

// readManifestForGC reads the manifest at key. A manifest whose checksum
// fails but whose document still gives a root is marked from it all the
// same (damaged true): marking too much is safe. One that is gone, or
// gives no root, stops the collection: the listing came after every
// delete of a manifest was held back, so it was there.
func readManifestForGC(ctx context.Context, env *Env, key string) (m Manifest, damaged bool, err error) {
	data, err := env.Repo.Get(ctx, key)
	if err != nil && !errors.Is(err, chunkstore.ErrCorrupt) {
		return m, false, fmt.Errorf("%w: manifest %s: %w", ErrGCDamage, key, err)
	}
	if derr := decodeJSON(env.RepoID, key, data, &m); derr == nil && err == nil {
		return m, false, nil
	}
	// Damaged: the document without its checksum line, if it parses.
	m = Manifest{}
	if i := bytes.LastIndexByte(data, '}'); i >= 0 && json.Unmarshal(data[:i+1], &m) == nil {
		return m, true, nil
	}
	return m, false, fmt.Errorf("%w: manifest %s is damaged and names no index root that can be read: restore it from a copy of the repository, or delete its snapshot, then run gc again", ErrGCDamage, key)
}

// marker walks index trees and collects the IDs they reference, pages
// and data chunks, into a sorted set.
type marker struct {
	sortedSet[chunkstore.ID]
	s        *chunkstore.Store
	addPages bool                       // the set holds the pages too
	seen     map[chunkstore.ID]struct{} // pages walked
	pages    int                        // pages read
}

func newMarker(s *chunkstore.Store, addPages bool) *marker {
	return &marker{sortedSet: sortedSet[chunkstore.ID]{compare: chunkstore.ID.Compare},
		s: s, addPages: addPages, seen: map[chunkstore.ID]struct{}{}}
}

func (m *marker) done() []chunkstore.ID {
	m.merge()
	return m.set
}

// walk adds what the tree at id references (its pages too when addPages
// is set), walking a page already walked only once (pages are shared).
// A page that cannot be read goes to bad, whose error stops the walk.
func (m *marker) walk(ctx context.Context, id chunkstore.ID, level int, bad func(chunkstore.ID, error) error) error {
	if id.IsZero() {
		return nil
	}
	if _, ok := m.seen[id]; ok {
		return nil
	}
	m.seen[id] = struct{}{}
	page, err := m.s.Get(ctx, id)
	if err == nil && len(page) != pageLen {
		err = fmt.Errorf("%d bytes, want %d: %w", len(page), pageLen, chunkstore.ErrCorrupt)
	}
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return bad(id, err)
	}
	m.pages++
	if m.addPages {
		m.add(id)
	}
	for off := 0; off < pageLen; off += idLen {
		var child chunkstore.ID
		copy(child[:], page[off:off+idLen])
		if child.IsZero() {
			continue
		}
		if level == 0 {
			m.add(child)
		} else if err := m.walk(ctx, child, level-1, bad); err != nil {
			return err
		}
	}
	return nil
}

// has says whether sorted holds id.
func has(sorted []chunkstore.ID, id chunkstore.ID) bool {
	_, ok := slices.BinarySearchFunc(sorted, id, chunkstore.ID.Compare)
	return ok
}
