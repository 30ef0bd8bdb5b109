package volume

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"syscall"
	"time"
)

// Nudge wakes the uploader (Run) without waiting: a snapshot to seal, or
// a repository that can be written again after an outage.
func (v *Volume) Nudge() { v.nudge() }

func (v *Volume) nudge() {
	select {
	case v.kick <- struct{}{}:
	default:
	}
}

// Run is the volume's uploader: it makes a checkpoint once the open layer
// has held writes for CheckpointInterval (or has taken SealAhead bytes,
// or the log passes half its limit), and seals closed layers as they
// come. A failed seal is retried
// with backoff; Status reports it. Run returns when ctx ends. Writes past
// LogLimit wait for it, so it must be running while the volume takes
// writes.
func (v *Volume) Run(ctx context.Context) {
	interval := v.env.checkpointInterval()
	tick := time.NewTicker(min(max(interval/4, 10*time.Millisecond), time.Second))
	defer tick.Stop()
	backoff := time.Duration(0)
	lastExpiry := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-v.kick:
		case <-tick.C:
		}
		logSize := v.log.Size() // not under mu: the lock order is log, then mu
		v.mu.RLock()
		open := v.layers[len(v.layers)-1]
		due := !open.since.IsZero() && (time.Since(open.since) >= interval || logSize >= v.env.logLimit()/2 ||
			open.written >= v.env.sealAhead())
		v.mu.RUnlock()
		if due {
			_, _ = v.Checkpoint(ctx) // a failure shows in the next seal's
		}
		if err := v.SealAll(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			if l := v.env.Logger; l != nil {
				// Said once per run of failures: an outage may last hours,
				// and the server says that it does on its own.
				level := slog.LevelWarn
				if backoff > 0 {
					level = slog.LevelDebug
				}
				l.Log(ctx, level, "upload failed; retrying until it works", "volume", v.cfg.Name, "error", err)
			}
			backoff = min(max(2*backoff, 100*time.Millisecond), 30*time.Second)
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			case <-v.kick: // the repository may be writable again
			}
			v.nudge()
			continue
		}
		if l := v.env.Logger; l != nil && backoff > 0 {
			l.Info("upload works again", "volume", v.cfg.Name)
		}
		backoff = 0
		if time.Since(lastExpiry) >= time.Minute {
			// Seals expire checkpoints; a volume not written needs this.
			v.expireIdle(ctx)
			lastExpiry = time.Now()
		}
	}
}

// waitForRoom holds a writer back while the log is at its limit, until a
// seal frees segments or ctx ends.
func (v *Volume) waitForRoom(ctx context.Context) error {
	for {
		// Take the channel before looking at the size: a seal that frees
		// room after the look closes this channel, so no wakeup is lost.
		sealed := v.nextSeal()
		if v.log.Size() < v.env.logLimit() {
			return nil
		}
		// Make sure there is a closed layer for the uploader to free.
		if _, err := v.Checkpoint(ctx); err != nil {
			return err
		}
		if err := v.awaitSeal(ctx, sealed, nil); err != nil {
			return err
		}
	}
}

// nextSeal is the channel the next seal closes. Taken before a writer
// looks for room, it cannot miss a seal that frees room after the look.
func (v *Volume) nextSeal() <-chan struct{} {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.sealed
}

// awaitSeal wakes the uploader and waits until the seal behind sealed has
// run, retry fires (if not nil), ctx ends or the volume closes (then no
// seal will come).
func (v *Volume) awaitSeal(ctx context.Context, sealed <-chan struct{}, retry <-chan time.Time) error {
	v.nudge()
	select {
	case <-retry:
	case <-sealed:
	case <-ctx.Done():
		return ctx.Err()
	case <-v.closed:
		return fmt.Errorf("volume %q: %w", v.cfg.Name, ErrVolumeClosed)
	}
	return nil
}

// whenRoom runs appendFn, and when the state disk is full (ENOSPC),
// makes room and runs it again: the open layer is closed (the log's
// reserve makes room for the mark), sealed by the uploader, and its
// segments freed. Writes so wait for a full disk as they wait at the
// log limit; they fail with ENOSPC only when this volume's log holds
// nothing to free, or when ctx ends first.
func (v *Volume) whenRoom(ctx context.Context, appendFn func() error) error {
	for {
		sealed := v.nextSeal() // before the try, as in waitForRoom
		err := appendFn()
		if !errors.Is(err, syscall.ENOSPC) {
			if err == nil && v.diskFull.Load() {
				v.diskFull.Store(false)
				if l := v.env.Logger; l != nil {
					l.Info("state disk has room again: writes go on", "volume", v.cfg.Name)
				}
			}
			return err
		}
		select {
		case <-sealed:
			continue // room was freed meanwhile: try again
		default:
		}
		v.mu.RLock()
		pending := len(v.layers) > 1 || v.layers[0].extents.len() > 0
		v.mu.RUnlock()
		if !pending {
			return err // nothing of this volume's to free
		}
		if !v.diskFull.Swap(true) {
			if l := v.env.Logger; l != nil {
				l.Warn("state disk full: writes wait until the uploader frees sealed log segments", "volume", v.cfg.Name, "error", err)
			}
		}
		// Without room even for the mark (the reserve taken by others),
		// no seal can come of this layer: try again after a while.
		var retry <-chan time.Time
		if _, cerr := v.Checkpoint(ctx); cerr != nil {
			if !errors.Is(cerr, syscall.ENOSPC) {
				return errors.Join(err, cerr)
			}
			retry = time.After(time.Second)
		}
		if werr := v.awaitSeal(ctx, sealed, retry); werr != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("%w (gave up waiting for the uploader to free the state disk: %v)", err, werr)
			}
			return werr
		}
	}
}

// Status is what the volume reports about its upload.
type Status struct {
	LogBytes      int64
	PendingLayers int // closed layers waiting to be sealed
	// Lag is how long the oldest write the repository does not hold yet
	// has waited; zero when the repository holds everything.
	Lag      time.Duration
	LastSeal time.Time
	// SealError is the last seal's failure, until a seal succeeds.
	SealError error
	// LogError is why the write log takes no more writes (a failed
	// fdatasync), or nil.
	LogError error
	// DiskFull: writes wait because the state disk is full, until the
	// uploader frees sealed log segments.
	DiskFull bool
	// Deltas is how many journal deltas the head reads through above its
	// index; JournalPacks how many journal packs the volume has in the
	// repository. Shipped is the journal bytes checkpoints stored since
	// the volume opened, Folded the chunks rebuilt from journal since.
	Deltas       int
	JournalPacks int64
	Shipped      int64
	Folded       int64
	// ExpiryError says why a checkpoint that left the retention window
	// is still in the repository (with the journal it names), until it
	// is deleted.
	ExpiryError error
}

// Status reports the volume's upload state.
func (v *Volume) Status() Status {
	st := Status{LogBytes: v.log.Size(), LogError: v.log.Err(), DiskFull: v.diskFull.Load()} // before mu: the lock order is log, then mu
	v.mu.RLock()
	defer v.mu.RUnlock()
	st.PendingLayers, st.LastSeal, st.SealError = len(v.layers)-1, v.lastSeal, v.sealErr
	st.Deltas, st.JournalPacks = len(v.base.Deltas), v.nPacks.Load()
	st.Shipped, st.Folded = v.shipped.Load(), v.folded.Load()
	st.ExpiryError = v.expiryErr
	for _, l := range v.layers {
		if !l.since.IsZero() {
			st.Lag = time.Since(l.since)
			break
		}
	}
	return st
}
