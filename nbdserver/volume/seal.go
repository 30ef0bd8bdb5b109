package volume

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"time"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// uploadWorkers is how many chunks a seal builds and stores at once: more
// than the cores, since a Put waits on fsync or the network.
var uploadWorkers = 4 * runtime.GOMAXPROCS(0)

// SealNext stores the oldest closed layer in the repository: every chunk it
// touched, the index pages that changed, then the manifest; then it drops
// the layer and frees the log segments nothing else needs. It reports
// whether there was a layer to seal.
func (v *Volume) SealNext(ctx context.Context) (bool, error) {
	v.mu.RLock()
	closed := v.layers[0].mark != nil
	v.mu.RUnlock()
	if !closed {
		return false, nil // nothing to seal: no share of memory needed
	}
	// A share of the upload memory first, so that a volume waiting for
	// one does not hold sealMu (which its admin calls take) meanwhile.
	release, err := v.env.sealSlot(ctx, v.cfg.ChunkSize)
	if err != nil {
		return false, err
	}
	defer release()
	defer v.lockSeal()()
	v.mu.RLock()
	l := v.layers[0]
	base := v.base
	closed = l.mark != nil // the open layer gets its mark under mu
	v.mu.RUnlock()
	if !closed {
		return false, nil
	}

	// A closed layer never changes, so it is read without v.mu.
	m, err := v.storeLayer(ctx, base, l)
	if err != nil {
		v.mu.Lock()
		v.sealErr = err
		v.mu.Unlock()
		return false, err
	}

	v.mu.Lock()
	v.base = m
	v.layers = v.layers[1:]
	for _, s := range v.snaps {
		if s.ID == m.ID {
			s.Manifest, s.sealed = m, true
		}
	}
	if m.Kind == KindCheckpoint {
		v.addCut(m) // in the same step as its layer leaves: reads of it find one or the other
	}
	v.lastSeal, v.sealErr = time.Now(), nil
	v.mu.Unlock()

	v.gcMu.Lock()
	err = v.log.RemoveBefore(m.Seq + 1)
	v.gcMu.Unlock()
	v.expireCheckpoints(ctx, m)
	v.sweepPacks(ctx)
	// Wake writers waiting for room only now that the room exists: woken
	// earlier, one could look, find the log still full, and wait for a
	// seal that never comes.
	v.mu.Lock()
	close(v.sealed)
	v.sealed = make(chan struct{})
	v.mu.Unlock()
	if f := v.env.Sealed; f != nil {
		f(v.cfg.Name, m.Kind)
	}
	return true, err
}

// storeLayer writes layer l over base to the repository and returns the
// manifest it wrote. Its packs are in v.packs whether it succeeds or not.
func (v *Volume) storeLayer(ctx context.Context, base Manifest, l *layer) (Manifest, error) {
	res, err := v.shipLayer(ctx, base, l)
	for _, k := range res.packs {
		v.packs[k] = struct{}{}
	}
	v.nPacks.Store(int64(len(v.packs)))
	if err != nil {
		return Manifest{}, err
	}
	if res.merged {
		v.sweepDue = true
	}
	v.repacked.Add(res.repacked)
	v.shipped.Add(res.shipped)
	v.folded.Add(int64(res.folded))
	v.foldCredit = min(maxFoldCredit, max(0, v.foldCredit+2*res.shipped-int64(res.folded)*v.cfg.ChunkSize))
	m := Manifest{
		ID: l.mark.ID, Kind: l.mark.Kind, Volume: v.cfg.Name, Label: l.mark.Label, Time: l.mark.Time,
		Size: l.mark.Size, ChunkSize: v.cfg.ChunkSize, Root: res.root, Seq: l.mark.seq, Parent: base.ID,
		Deltas: res.deltas, By: l.mark.By, Writer: v.env.Writer,
	}
	key := manifestKey(v.cfg.Name, m.Kind, m.ID)
	if err := putJSON(ctx, v.repo, v.env.RepoID, key, m); err != nil {
		return Manifest{}, fmt.Errorf("volume %q: write manifest: %w", v.cfg.Name, err)
	}
	// Read it back before the log it covers is freed: once it is, a
	// manifest damaged on its way would cost the writes it sealed.
	var back Manifest
	if err := getJSON(ctx, v.repo, v.env.RepoID, key, &back); err != nil {
		return Manifest{}, fmt.Errorf("volume %q: read back the manifest just written: %w", v.cfg.Name, err)
	}
	if back.Seq != m.Seq || back.Root != m.Root || back.Size != m.Size || !slices.Equal(back.Deltas, m.Deltas) {
		return Manifest{}, fmt.Errorf("volume %q: manifest %s: %w: it reads back other than written", v.cfg.Name, key, chunkstore.ErrCorrupt)
	}
	return m, nil
}

// buildChunks makes the new content of each touched chunk (the old chunk
// overlaid with the layer) and stores it, on several workers. Chunks that
// end up all zeros become holes.
func (v *Volume) buildChunks(ctx context.Context, root chunkstore.ID, l *layer, touched []uint64) ([]pointUpdate, error) {
	points := make([]pointUpdate, len(touched))
	wk := startWorkers(ctx, min(uploadWorkers, len(touched)), v.cfg.ChunkSize)
	for i, c := range touched {
		err := wk.do(func(ctx context.Context, buf []byte) error {
			id, err := v.buildChunk(ctx, root, l, c, buf)
			points[i] = pointUpdate{c: c, id: id}
			return err
		})
		if err != nil {
			break // finish says why
		}
	}
	if err := wk.finish(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return points, nil
}

func (v *Volume) buildChunk(ctx context.Context, root chunkstore.ID, l *layer, c uint64, buf []byte) (chunkstore.ID, error) {
	cs := v.cfg.ChunkSize
	start := int64(c) * cs
	// A chunk the layer rewrites whole needs nothing of the old one:
	// reading it (from S3, say) would be wasted.
	covered := int64(0)
	l.extents.visit(start, cs, func(x extent) bool { covered += x.length; return true })
	if covered < cs {
		if err := v.readIndex(ctx, root, buf, start); err != nil {
			return chunkstore.ZeroID, err
		}
	}
	var err error
	l.extents.visit(start, cs, func(x extent) bool {
		dst := buf[x.off-start : x.end()-start]
		if x.zero {
			clear(dst)
			return true
		}
		err = v.log.ReadAt(dst, x.pos)
		return err == nil
	})
	if err != nil {
		return chunkstore.ZeroID, fmt.Errorf("volume %q chunk %d: read log: %w", v.cfg.Name, c, err)
	}
	id, err := v.store.Put(ctx, buf)
	if err != nil {
		return chunkstore.ZeroID, fmt.Errorf("volume %q chunk %d: %w", v.cfg.Name, c, err)
	}
	return id, nil
}

// SealAll seals every closed layer, oldest first.
func (v *Volume) SealAll(ctx context.Context) error {
	for {
		ok, err := v.SealNext(ctx)
		if err != nil || !ok {
			return err
		}
	}
}

// LogSize is the bytes of write log the volume holds.
func (v *Volume) LogSize() int64 { return v.log.Size() }

// Close syncs and closes the write log. Unsealed layers stay in it and are
// replayed by the next Open.
func (v *Volume) Close() error {
	v.growMu.Lock()
	defer v.growMu.Unlock()
	v.sealMu.Lock()
	defer v.sealMu.Unlock()
	if v.isClosed() {
		return nil
	}
	close(v.closed)
	err := v.log.Sync()
	v.gcMu.Lock() // reads of log data in flight finish first
	cerr := v.log.Close()
	v.gcMu.Unlock()
	if err == nil {
		err = cerr
	}
	if errors.Is(err, ErrVolumeClosed) {
		return nil
	}
	return err
}
