// Package nbdserver is the backup server: it serves volumes over NBD (a
// volume's head as VOL, each snapshot or point in time read-only as
// VOL@SNAP), and holds the listeners, the admin API and the metrics. It is
// where nbdserver/nbd and nbdserver/volume meet; neither imports the
// other.
package nbdserver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
	"github.com/nbdvault/nbdvault/nbdserver/volume"
)

// Exports offers volumes to an nbd.Server: "VOL" is the writable head,
// "VOL@SNAP" a snapshot (by ID or label), read-only, and "VOL@TIME" (RFC
// 3339) the volume at that time, read-only.
type Exports struct {
	m *metrics // nil: not counted
	// ReadTimeout bounds a read or block-status request (what the
	// repository may take to answer it): past it the client gets EIO
	// instead of waiting through a repository outage. Zero: no bound.
	// Set before Add.
	ReadTimeout time.Duration

	mu    sync.RWMutex
	heads map[string]*nbd.Export
	vols  map[string]*volume.Volume
	// attached counts the connections using each snapshot export, by
	// "VOL@ID": an automatic prune leaves those snapshots.
	attached map[string]int
	// refused, once set, fails every write to a head.
	refused atomic.Pointer[error]
}

// Refuse fails every later write, trim and zero of every head with err.
func (e *Exports) Refuse(err error) { e.refused.Store(&err) }

// NewExports returns an empty set of exports.
func NewExports() *Exports {
	return &Exports{heads: map[string]*nbd.Export{}, vols: map[string]*volume.Volume{}, attached: map[string]int{}}
}

// Attached is how many NBD connections use snapshot id of volume vol
// (or the checkpoint of that ID) now.
func (e *Exports) Attached(vol, id string) int {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.attached[vol+"@"+id]
}

func (e *Exports) attach(key string, n int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.attached[key] += n; e.attached[key] <= 0 {
		delete(e.attached, key)
	}
}

// Add offers v.
func (e *Exports) Add(v *volume.Volume) {
	name := v.Config().Name
	e.mu.Lock()
	defer e.mu.Unlock()
	e.vols[name] = v
	e.heads[name] = &nbd.Export{
		Name:           name,
		Description:    "nbdvault volume " + name,
		Backend:        head{v, e.m.export(name), e.ReadTimeout, &e.refused},
		PreferredBlock: 4096,
	}
}

// Remove stops offering volume name to new clients.
func (e *Exports) Remove(name string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.vols, name)
	delete(e.heads, name)
	e.m.forget(name)
	e.m.forget(name + "@point-in-time")
}

// Lookup implements nbd.Exports.
func (e *Exports) Lookup(name string) (*nbd.Export, bool) {
	volName, snap, isSnap := strings.Cut(name, "@")
	e.mu.RLock()
	h, ok := e.heads[volName]
	v := e.vols[volName]
	e.mu.RUnlock()
	if !ok || !isSnap {
		return h, ok
	}
	ctx, cancel := context.Background(), func() {}
	if e.ReadTimeout > 0 {
		ctx, cancel = context.WithTimeout(ctx, e.ReadTimeout)
	}
	defer cancel()
	// A snapshot's ID or label, a kept checkpoint's ID, or a time.
	s, err := v.Find(ctx, snap)
	if err != nil || s.Damaged != nil {
		return nil, false
	}
	return e.snapshotExport(v, s, true), true
}

// snapshotExport makes snapshot s of v an export; served ones count in
// the metrics, listed ones do not (a listing would make series for every
// snapshot).
func (e *Exports) snapshotExport(v *volume.Volume, s volume.SnapshotInfo, served bool) *nbd.Export {
	name := v.Config().Name + "@" + s.ID
	var m *exportMetrics
	switch {
	case served && s.Kind == volume.KindCheckpoint:
		// One series for all points in time: one per point would grow
		// without end.
		m = e.m.export(v.Config().Name + "@point-in-time")
	case served:
		m = e.m.export(name)
	}
	desc := "snapshot " + s.ID + " of " + v.Config().Name
	if s.Kind == volume.KindCheckpoint {
		desc = "volume " + v.Config().Name + " at " + s.Time.UTC().Format(time.RFC3339Nano) + " (checkpoint " + s.ID + ")"
	}
	if s.Label != "" {
		desc += " (" + s.Label + ")"
	}
	return &nbd.Export{Name: name, Description: desc, Backend: snapshot{v, s.ID, s.Size, m, e.ReadTimeout, e, s.Kind == volume.KindCheckpoint}, ReadOnly: true, PreferredBlock: 4096}
}

// List implements nbd.Exports: every head, then every snapshot.
func (e *Exports) List() []*nbd.Export {
	e.mu.RLock()
	var out []*nbd.Export
	var vols []*volume.Volume
	for name, h := range e.heads {
		out = append(out, h)
		vols = append(vols, e.vols[name])
	}
	e.mu.RUnlock()
	for _, v := range vols {
		for _, s := range v.Snapshots() {
			if s.Damaged == nil {
				out = append(out, e.snapshotExport(v, s, false))
			}
		}
	}
	slices.SortFunc(out, func(a, b *nbd.Export) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// head serves a volume's head.
type head struct {
	v       *volume.Volume
	m       *exportMetrics
	timeout time.Duration
	refused *atomic.Pointer[error]
}

// refusal is the error writes get, or nil.
func (h head) refusal() error {
	if p := h.refused.Load(); p != nil {
		return *p
	}
	return nil
}

// bounded runs read under ctx with a deadline timeout from now (none if
// zero), and says so in the error when the deadline cut it short.
func bounded(ctx context.Context, timeout time.Duration, read func(context.Context) error) error {
	if timeout <= 0 {
		return read(ctx)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	err := read(ctx)
	if err != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("%w (the repository did not answer within %s)", err, timeout)
	}
	return err
}

func (h head) Size() int64 { return h.v.Size() }
func (h head) ReadAt(ctx context.Context, p []byte, off int64) error {
	start := time.Now()
	err := bounded(ctx, h.timeout, func(ctx context.Context) error { return h.v.ReadAt(ctx, p, off) })
	h.m.done(opRead, len(p), start, err)
	return nbdErr(err)
}
func (h head) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	start := time.Now()
	err := h.refusal()
	if err == nil {
		err = h.v.WriteAt(ctx, p, off, fua)
	}
	h.m.done(opWrite, len(p), start, err)
	return nbdErr(err)
}
func (h head) Flush(ctx context.Context) error {
	start := time.Now()
	err := h.v.Flush(ctx)
	h.m.done(opFlush, 0, start, err)
	return nbdErr(err)
}
func (h head) Trim(ctx context.Context, off, n int64) error {
	start := time.Now()
	err := h.refusal()
	if err == nil {
		err = h.v.Zero(ctx, off, n)
	}
	h.m.done(opTrim, 0, start, err)
	return nbdErr(err)
}

// Zero writes one zero record whatever the range; the volume never
// allocates, so noHole cannot be honoured and the range stays a hole that
// reads as zeros (what NBD asks of a server without NO_HOLE support).
func (h head) Zero(ctx context.Context, off, n int64, _ bool) error {
	start := time.Now()
	err := h.refusal()
	if err == nil {
		err = h.v.Zero(ctx, off, n)
	}
	h.m.done(opZero, 0, start, err)
	return nbdErr(err)
}
func (h head) Extents(ctx context.Context, off, n int64) ([]nbd.Extent, error) {
	start := time.Now()
	var ext []volume.Extent
	err := bounded(ctx, h.timeout, func(ctx context.Context) (err error) {
		ext, err = h.v.Extents(ctx, "", off, n)
		return err
	})
	h.m.done(opBlockStatus, 0, start, err)
	return extents(ext, err)
}

// snapshot serves one snapshot, read-only.
type snapshot struct {
	v       *volume.Volume
	id      string
	size    int64 // the volume's when the snapshot was taken
	m       *exportMetrics
	timeout time.Duration
	e       *Exports
	// checkpoint: a point in time (VOL@TIME), not a snapshot.
	checkpoint bool
}

// Attach implements nbd.Attacher: the snapshot counts as attached while
// a connection uses it.
func (s snapshot) Attach() func() {
	key := s.v.Config().Name + "@" + s.id
	s.e.attach(key, 1)
	return func() { s.e.attach(key, -1) }
}

func (s snapshot) Size() int64 { return s.size }
func (s snapshot) ReadAt(ctx context.Context, p []byte, off int64) error {
	start := time.Now()
	err := bounded(ctx, s.timeout, func(ctx context.Context) error { return s.v.ReadSnapshotAt(ctx, s.id, p, off) })
	s.m.done(opRead, len(p), start, err)
	return nbdErr(err)
}
func (s snapshot) WriteAt(context.Context, []byte, int64, bool) error { return nbd.ErrReadOnly }
func (s snapshot) Flush(context.Context) error                        { return nil }
func (s snapshot) Extents(ctx context.Context, off, n int64) ([]nbd.Extent, error) {
	start := time.Now()
	var ext []volume.Extent
	err := bounded(ctx, s.timeout, func(ctx context.Context) (err error) {
		ext, err = s.v.Extents(ctx, s.id, off, n)
		return err
	})
	s.m.done(opBlockStatus, 0, start, err)
	return extents(ext, err)
}

func extents(in []volume.Extent, err error) ([]nbd.Extent, error) {
	if err != nil {
		return nil, nbdErr(err)
	}
	out := make([]nbd.Extent, len(in))
	for i, e := range in {
		out[i].Length = e.Length
		if e.Zero {
			out[i].Flags = nbd.StateHole | nbd.StateZero
		}
	}
	return out, nil
}

// nbdErr maps the volume's errors to the ones nbd turns into error codes.
func nbdErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, volume.ErrOutOfRange):
		return errors.Join(nbd.ErrInvalid, err)
	case errors.Is(err, volume.ErrNoSnapshot):
		return errors.Join(nbd.ErrInvalid, err)
	}
	return err
}
