// Package lease keeps one server writing a repository at a time. The lease
// is an object (locks/server) naming its holder and when it expires,
// created with create-if-absent and renewed with compare-and-swap
// (chunkstore.Versioned: conditional PUTs on S3), so two servers can never
// both believe they hold it. A lease not renewed before it expires may be
// taken over; its old holder learns so at its next renewal.
package lease

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// Key is where the lease lives in the repository.
const Key = "locks/server"

// DefaultTTL is how long a lease lasts unless renewed. Keep renews it every
// third of that.
const DefaultTTL = 30 * time.Second

// Holder describes a lease's owner.
type Holder struct {
	ID   string `json:"id"` // random, one per Acquire
	Host string `json:"host"`
	// Machine (/etc/machine-id), Boot (the kernel's boot ID) and PIDNS
	// (the PID namespace) tell, with Host, whether PID names a process
	// this server can see: the same machine, boot and namespace.
	Machine string    `json:"machine,omitempty"`
	Boot    string    `json:"boot,omitempty"`
	PIDNS   string    `json:"pidns,omitempty"`
	PID     int       `json:"pid"`
	Started time.Time `json:"started"`
	Expires time.Time `json:"expires"`
}

// HeldError says who holds the lease. It matches ErrHeld.
type HeldError struct{ Holder Holder }

// ErrHeld: another server holds the repository's lease.
var ErrHeld = errors.New("the repository is in use by another server")

// ErrLost: the lease was taken over (it expired before a renewal).
var ErrLost = errors.New("the repository lease was lost to another server")

func (e *HeldError) Error() string {
	h := e.Holder
	return fmt.Sprintf("the repository is in use by the nbdvault server on %s (pid %d, since %s, lease until %s): stop that server, or wait for its lease to expire",
		h.Host, h.PID, h.Started.Format(time.RFC3339), h.Expires.Format(time.RFC3339))
}

func (e *HeldError) Is(target error) bool { return target == ErrHeld }

// ErrNotConfirmed: the lease has not been renewed in time (the
// repository does not answer), so this server does not write the
// repository until a renewal succeeds. It matches
// chunkstore.ErrUnavailable too: retry later.
var ErrNotConfirmed = errors.New("the repository lease is not confirmed")

// Lease is a held lease.
//
// While it holds the lease, a server may write the repository until
// Expires - Margin by its own clock (Margin is a third of the TTL), the
// window its last successful renewal opened; Fence enforces that on every
// write. Renewals that get no answer never end the lease: Keep retries
// them, and a renewal that succeeds after an expiry reopens the window,
// since its compare-and-swap proves nobody took the lease over meanwhile.
// Only evidence ends it: a lease record naming another holder (ErrLost).
// docs/architecture.md has the argument.
type Lease struct {
	backend chunkstore.Backend
	store   chunkstore.Versioned
	ttl     time.Duration

	// mu serializes renewals and the release, and guards me and version.
	mu      sync.Mutex
	me      Holder
	version string
	// previous is the holder whose record Acquire replaced (zero if it
	// made the first one).
	previous Holder

	// win guards the write window; it is never held across I/O, so a
	// renewal waiting on the store does not hold writers up.
	win sync.Mutex
	// The window in which this server may write the repository, and when
	// the record that opened it was written.
	openAt, safeUntil, renewedAt time.Time
	// ended: released or lost; the window never opens again.
	ended bool
	// inflight counts fenced writes under way; cutShort is set when one
	// was cancelled (by the window's end or its caller) midway: the store
	// may still apply it.
	inflight sync.WaitGroup
	cutShort bool
}

// ConfigKey is the repository's config object. A repository that has one
// has had a server, so a lease missing from it was removed by hand.
const ConfigKey = "config"

// confirm opens the window until Margin before the expiry of a lease
// record written at t0.
func (l *Lease) confirm(t0 time.Time) {
	l.win.Lock()
	defer l.win.Unlock()
	if !l.ended {
		l.safeUntil, l.renewedAt = t0.Add(l.ttl-l.margin()), t0
	}
}

// delayFrom keeps the window shut until one TTL after t0: a lease created
// where one was removed by hand may have had a holder that still writes
// until its own window ends (a lock-delay).
func (l *Lease) delayFrom(t0 time.Time) {
	l.win.Lock()
	defer l.win.Unlock()
	l.openAt = t0.Add(l.ttl)
}

// shrinkTo ends the window no later than t.
func (l *Lease) shrinkTo(t time.Time) {
	l.win.Lock()
	defer l.win.Unlock()
	if t.Before(l.safeUntil) {
		l.safeUntil = t
	}
}

// end shuts the window for good (the lease is lost or released).
func (l *Lease) end() {
	l.win.Lock()
	defer l.win.Unlock()
	l.ended = true
}

// margin is how long before its lease expires a server stops writing.
func (l *Lease) margin() time.Duration { return l.ttl / 3 }

// Previous is the ID of the holder whose lease record this one replaced
// when it was acquired, released or expired ("" when there was none): a
// server that finds its own ID there from its last clean stop knows no
// other server held the repository since.
func (l *Lease) Previous() string { return l.previous.ID }

// PreviousHolder is the whole record Previous names (zero when none).
func (l *Lease) PreviousHolder() Holder { return l.previous }

// Margin is how much later than its cancellation the store may still
// apply a write (the lease's assumption): a third of the TTL.
func (l *Lease) Margin() time.Duration { return l.margin() }

// NewID returns a new random holder ID, for AcquireAs.
func NewID() string {
	id := make([]byte, 8)
	_, _ = rand.Read(id)
	return hex.EncodeToString(id)
}

// Acquire takes the repository's lease for ttl (DefaultTTL if zero), or
// returns a *HeldError naming the server that holds it.
func Acquire(ctx context.Context, b chunkstore.Backend, ttl time.Duration) (*Lease, error) {
	return AcquireAs(ctx, b, ttl, NewID())
}

// AcquireAs is Acquire with the holder ID id (NewID), which the caller
// may have recorded before any lease record names it.
func AcquireAs(ctx context.Context, b chunkstore.Backend, ttl time.Duration, id string) (*Lease, error) {
	store, ok := chunkstore.AsVersioned(b)
	if !ok {
		return nil, fmt.Errorf("repository %s takes no conditional writes, so it cannot hold a lease", b.Location())
	}
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	if id == "" {
		return nil, errors.New("take the repository lease: no holder ID")
	}
	host, _ := os.Hostname()
	now := time.Now().UTC()
	l := &Lease{backend: b, store: store, ttl: ttl, me: Holder{ID: id, Host: host, Machine: machineID(), Boot: bootID(), PIDNS: pidNamespace(), PID: os.Getpid(), Started: now}}

	for range 5 { // each round loses only to another server that moved first
		t0 := time.Now()
		l.me.Expires = t0.UTC().Add(ttl)
		ver, err := store.PutIf(ctx, Key, l.encode(), "")
		if err == nil {
			l.version = ver
			l.confirm(t0)
			// A repository with a config but no lease had its lease
			// removed by hand: its holder may write for a while yet.
			if has, err := b.Has(ctx, ConfigKey); err != nil {
				return nil, fmt.Errorf("take the repository lease: %w", err)
			} else if has {
				l.delayFrom(t0)
			}
			return l, l.checkConditions(ctx)
		}
		if !errors.Is(err, chunkstore.ErrPrecondition) {
			return nil, fmt.Errorf("take the repository lease: %w", err)
		}
		data, cur, err := store.GetVersion(ctx, Key)
		if errors.Is(err, chunkstore.ErrNotFound) {
			continue // released meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("read the repository lease: %w", err)
		}
		var h Holder
		if err := json.Unmarshal(data, &h); err != nil {
			return nil, fmt.Errorf("the repository lease %s is unreadable (%v): remove it if no server runs", Key, err)
		}
		live := time.Now().Before(h.Expires)
		if live && !l.me.outlived(h) {
			return nil, &HeldError{Holder: h}
		}
		// Expired, or its holder died on this machine (a restart after a
		// crash need not wait for the lease to run out): take it over,
		// unless someone else already did.
		t0 = time.Now()
		l.me.Expires = t0.UTC().Add(ttl)
		ver, err = store.PutIf(ctx, Key, l.encode(), cur)
		if err == nil {
			l.version, l.previous = ver, h
			l.confirm(t0)
			if live {
				// The dead holder's last requests may still be applied
				// for Margin (a delete it sent, after this server found
				// the chunk present): write nothing until then.
				l.win.Lock()
				l.openAt = t0.Add(l.margin())
				l.win.Unlock()
			}
			return l, l.checkConditions(ctx)
		}
		if !errors.Is(err, chunkstore.ErrPrecondition) {
			return nil, fmt.Errorf("take over the expired repository lease: %w", err)
		}
	}
	return nil, fmt.Errorf("take the repository lease: %w (it keeps changing hands)", ErrHeld)
}

// checkConditions makes sure the store honours conditional writes, on
// the lease just taken: a PUT that must not match and one that must not
// find the object. A store that ignores them would let two servers both
// take the lease; what such a store overwrites is this server's own
// record, with the same bytes.
func (l *Lease) checkConditions(ctx context.Context) error {
	data := l.encode()
	for _, match := range []string{"nbdvault-no-such-version", ""} {
		ver, err := l.store.PutIf(ctx, Key, data, match)
		switch {
		case errors.Is(err, chunkstore.ErrPrecondition):
			continue
		case err != nil:
			return fmt.Errorf("check the repository's conditional writes: %w", err)
		}
		l.version = ver
		what := "If-Match"
		if match == "" {
			what = "If-None-Match"
		}
		return fmt.Errorf("repository %s ignores conditional writes (%s on PUT): nbdvault needs them so that only one server writes a repository; use a store that honours them (AWS S3, MinIO, SeaweedFS, Ceph RGW)", l.backend.Location(), what)
	}
	return nil
}

func (l *Lease) encode() []byte {
	data, _ := json.Marshal(l.me)
	return data
}

// Holder returns who the lease names (this server).
func (l *Lease) Holder() Holder {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.me
}

// Confirmed reports until when this server may write the repository, and
// whether that is still ahead.
func (l *Lease) Confirmed() (until time.Time, ok bool) {
	l.win.Lock()
	defer l.win.Unlock()
	return l.safeUntil, l.openLocked()
}

// OpensAt is when the window opens at the earliest after Acquire, when
// the previous holder's last writes may land until then (zero if none).
func (l *Lease) OpensAt() time.Time {
	l.win.Lock()
	defer l.win.Unlock()
	return l.openAt
}

// WaitOpen waits until OpensAt, when the window may open: a holder taken
// over may have writes on the way until then.
func (l *Lease) WaitOpen(ctx context.Context) error {
	wait := time.Until(l.OpensAt())
	if wait <= 0 {
		return nil
	}
	select {
	case <-time.After(wait):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// openLocked reports whether the window is open now. Both clocks must
// agree: Go's monotonic clock stops while the machine is suspended, the
// wall clock (what other servers judge expiry by) does not.
func (l *Lease) openLocked() bool {
	now := time.Now()
	return !l.ended && !now.Before(l.openAt) &&
		now.Before(l.safeUntil) && now.Round(0).Before(l.safeUntil.Round(0))
}

// Renew extends the lease by its TTL. ErrLost means another server took it
// over: this one must stop writing the repository. Any other error (no
// answer) leaves the lease as it was: try again.
func (l *Lease) Renew(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for range 3 { // each round follows a renewal of ours whose answer was lost
		next := l.me
		t0 := time.Now()
		next.Expires = t0.UTC().Add(l.ttl)
		data, _ := json.Marshal(next)
		ver, err := l.store.PutIf(ctx, Key, data, l.version)
		if err == nil {
			l.me, l.version = next, ver
			l.confirm(t0)
			return nil
		}
		if !errors.Is(err, chunkstore.ErrPrecondition) {
			return fmt.Errorf("renew the repository lease: %w", err)
		}
		// The lease is not the version we wrote last: read whose it is.
		cur, ver, err := l.store.GetVersion(ctx, Key)
		if errors.Is(err, chunkstore.ErrNotFound) {
			// Removed by hand: create it again, unless another server
			// already has.
			ver, err := l.store.PutIf(ctx, Key, data, "")
			if err == nil {
				l.me, l.version = next, ver
				l.delayFrom(t0) // whoever removed it may have started a server
				l.confirm(t0)
				return nil
			}
			if errors.Is(err, chunkstore.ErrPrecondition) {
				continue // read whose it is now
			}
			return fmt.Errorf("renew the repository lease (it was removed): %w", err)
		}
		if err != nil {
			return fmt.Errorf("read the repository lease: %w", err)
		}
		var h Holder
		if err := json.Unmarshal(cur, &h); err != nil {
			l.end()
			return fmt.Errorf("%w: the lease %s holds something this server did not write (%v)", ErrLost, Key, err)
		}
		if h.ID != l.me.ID {
			l.end()
			return fmt.Errorf("%w: it now names the nbdvault server on %s (pid %d, since %s)", ErrLost, h.Host, h.PID, h.Started.Format(time.RFC3339))
		}
		// Ours: a renewal whose answer was lost landed after all (or a
		// late duplicate of one). Take its version and the expiry it
		// holds, and renew on top of it.
		l.me, l.version = h, ver
		l.shrinkTo(h.Expires.Add(-l.margin()))
	}
	l.end()
	return fmt.Errorf("renew the repository lease: %w (it keeps changing)", ErrLost)
}

// Keep renews the lease every third of its TTL until ctx ends (nil) or
// another server is found holding it (ErrLost). A renewal that gets no
// answer is retried every tenth of the TTL, for as long as it takes:
// meanwhile Confirmed turns false once the window closes, and the
// repository is not written. report, if not nil, hears every renewal's
// outcome.
func (l *Lease) Keep(ctx context.Context, report func(error)) error {
	sinceRenewal := func() time.Duration {
		l.win.Lock()
		defer l.win.Unlock()
		return time.Since(l.renewedAt)
	}
	// The first renewal is due a third of a TTL after the last one, which
	// Acquire made some time ago.
	wait := max(l.ttl/3-sinceRenewal(), 0)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		rctx, cancel := context.WithTimeout(ctx, l.ttl/3)
		err := l.Renew(rctx)
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		if report != nil {
			report(err)
		}
		switch {
		case err == nil:
			wait = max(l.ttl/3-sinceRenewal(), 0) // from when it was sent, not answered
		case errors.Is(err, ErrLost):
			return err
		default:
			wait = l.ttl / 10
		}
	}
}

// Fence wraps b, the repository, so that it is written (Put, Delete) only
// while the lease is confirmed: a write is refused with ErrNotConfirmed
// once the window closes, and runs under a deadline no later than its
// end, so no request of this server is still in flight when another may
// take the lease over. Reads pass through.
func (l *Lease) Fence(b chunkstore.Backend) chunkstore.Backend { return &fence{Backend: b, l: l} }

type fence struct {
	chunkstore.Backend
	l *Lease
}

// The fence has no Unwrap: chunkstore.AsVersioned must not find the
// store's conditional writes through it.

// write runs op under a deadline at the end of the lease's window, or
// refuses with ErrNotConfirmed if it is not open.
func (f *fence) write(ctx context.Context, what string, op func(context.Context) error) error {
	l := f.l
	l.win.Lock()
	if !l.openLocked() {
		until, ended, openAt := l.safeUntil, l.ended, l.openAt
		l.win.Unlock()
		if ended {
			return fmt.Errorf("%s: %w: this server no longer holds the repository lease", what, ErrNotConfirmed)
		}
		if time.Now().Before(openAt) {
			return fmt.Errorf("%s: %w: writes start at %s, once the previous holder's last writes can no longer land: %w",
				what, ErrNotConfirmed, openAt.UTC().Format(time.RFC3339), chunkstore.ErrUnavailable)
		}
		return fmt.Errorf("%s: %w since %s (the repository did not answer its renewals); writes resume once a renewal succeeds: %w",
			what, ErrNotConfirmed, until.UTC().Format(time.RFC3339), chunkstore.ErrUnavailable)
	}
	until := l.safeUntil
	l.inflight.Add(1) // under win: Release ends the window, then waits
	l.win.Unlock()
	defer l.inflight.Done()
	ctx, cancel := context.WithDeadline(ctx, until)
	defer cancel()
	err := op(ctx)
	if err != nil && ctx.Err() != nil { // cut short: the store may still apply it
		l.win.Lock()
		l.cutShort = true
		l.win.Unlock()
	}
	return err
}

func (f *fence) Put(ctx context.Context, key string, data []byte) error {
	return f.write(ctx, "write "+key, func(ctx context.Context) error { return f.Backend.Put(ctx, key, data) })
}

func (f *fence) Delete(ctx context.Context, key string) error {
	return f.write(ctx, "delete "+key, func(ctx context.Context) error { return f.Backend.Delete(ctx, key) })
}

func (f *fence) DeleteMany(ctx context.Context, keys []string) error {
	return f.write(ctx, fmt.Sprintf("delete %d keys", len(keys)), func(ctx context.Context) error { return f.Backend.DeleteMany(ctx, keys) })
}

// Release gives the lease up, if this server still holds it.
//
// It first ends the write window and waits for the fenced writes under
// way (each ends by the window's end at the latest). If one was cut short
// midway, the store may still apply it, so the record expires a Margin
// from now; otherwise at once.
func (l *Lease) Release(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.end()
	l.inflight.Wait()
	l.win.Lock()
	expires := time.Unix(0, 0).UTC()
	if l.cutShort {
		expires = time.Now().UTC().Add(l.margin())
	}
	l.win.Unlock()
	// Not a delete: between a read and a delete another server could take
	// the lease over, and the delete would drop its lease. An expired
	// lease written by compare-and-swap on our own version is free to the
	// next server at once, and cannot touch anyone else's.
	gone := l.me
	gone.Expires = expires
	data, _ := json.Marshal(gone)
	ver, err := l.store.PutIf(ctx, Key, data, l.version)
	switch {
	case errors.Is(err, chunkstore.ErrPrecondition):
		// Not the version we wrote last: if another server holds it now,
		// say so (the caller marks its state folder).
		if cur, _, gerr := l.store.GetVersion(ctx, Key); gerr == nil {
			var h Holder
			if json.Unmarshal(cur, &h) != nil || h.ID != l.me.ID {
				return fmt.Errorf("release the repository lease: %w: it names the nbdvault server on %s (pid %d)", ErrLost, h.Host, h.PID)
			}
		}
		return nil
	case errors.Is(err, chunkstore.ErrNotFound):
		return nil // not ours any more
	case err != nil:
		return fmt.Errorf("release the repository lease: %w", err)
	}
	l.me, l.version = gone, ver
	return nil
}

// machineID is this machine's /etc/machine-id, or "" without one.
func machineID() string {
	for _, p := range []string{"/etc/machine-id", "/var/lib/dbus/machine-id"} {
		if b, err := os.ReadFile(p); err == nil {
			if id := strings.TrimSpace(string(b)); id != "" {
				return id
			}
		}
	}
	return ""
}

// bootID is the kernel's random ID of this boot, or "".
func bootID() string {
	b, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	return strings.TrimSpace(string(b))
}

// pidNamespace names this process's PID namespace (e.g.
// "pid:[4026531836]"), or "".
func pidNamespace() string {
	ns, _ := os.Readlink("/proc/self/ns/pid")
	return ns
}

// outlived reports whether h was a process, in the same machine, boot and
// PID namespace as me, that no longer exists. Anything uncertain (an ID
// missing or different, another host, a process that exists or cannot be
// checked) says no.
func (me Holder) outlived(h Holder) bool {
	if me.Machine == "" || me.Boot == "" || me.PIDNS == "" ||
		h.Machine != me.Machine || h.Boot != me.Boot || h.PIDNS != me.PIDNS ||
		h.Host != me.Host || h.PID <= 0 || h.PID == me.PID {
		return false
	}
	return errors.Is(syscall.Kill(h.PID, 0), syscall.ESRCH) || zombie(h.PID)
}

// zombie reports whether process pid has exited but not been reaped (a
// server killed with SIGKILL whose parent has not waited for it yet):
// kill(pid, 0) still finds it, but it will never write again.
func zombie(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// "pid (comm) S ...": the state follows the last ')', since comm may
	// hold anything.
	i := bytes.LastIndexByte(stat, ')')
	return i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z'
}
