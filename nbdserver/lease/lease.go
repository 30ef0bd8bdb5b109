// Package lease keeps one server writing a repository at a time. The lease
// is an object (locks/server) naming its holder and when it expires,
// created with create-if-absent and renewed with compare-and-swap
// (chunkstore.Versioned: conditional PUTs on S3), so two servers can never
// both believe they hold it. A lease not renewed before it expires may be
// taken over; its old holder learns so at its next renewal.
package lease

import (
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

// Lease is a held lease.
type Lease struct {
	backend chunkstore.Backend
	store   chunkstore.Versioned
	ttl     time.Duration

	mu      sync.Mutex
	me      Holder
	version string
}

// Acquire takes the repository's lease for ttl (DefaultTTL if zero), or
// returns a *HeldError naming the server that holds it.
func Acquire(ctx context.Context, b chunkstore.Backend, ttl time.Duration) (*Lease, error) {
	store, ok := chunkstore.AsVersioned(b)
	if !ok {
		return nil, fmt.Errorf("repository %s takes no conditional writes, so it cannot hold a lease", b.Location())
	}
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	host, _ := os.Hostname()
	id := make([]byte, 8)
	_, _ = rand.Read(id)
	now := time.Now().UTC()
	l := &Lease{backend: b, store: store, ttl: ttl, me: Holder{ID: hex.EncodeToString(id), Host: host, Machine: machineID(), Boot: bootID(), PIDNS: pidNamespace(), PID: os.Getpid(), Started: now}}

	for range 5 { // each round loses only to another server that moved first
		l.me.Expires = time.Now().UTC().Add(ttl)
		ver, err := store.PutIf(ctx, Key, l.encode(), "")
		if err == nil {
			l.version = ver
			return l, nil
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
		if time.Now().Before(h.Expires) && !l.me.outlived(h) {
			return nil, &HeldError{Holder: h}
		}
		// Expired, or its holder died on this machine (a restart after a
		// crash need not wait for the lease to run out): take it over,
		// unless someone else already did.
		ver, err = store.PutIf(ctx, Key, l.encode(), cur)
		if err == nil {
			l.version = ver
			return l, nil
		}
		if !errors.Is(err, chunkstore.ErrPrecondition) {
			return nil, fmt.Errorf("take over the expired repository lease: %w", err)
		}
	}
	return nil, fmt.Errorf("take the repository lease: %w (it keeps changing hands)", ErrHeld)
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

// Renew extends the lease by its TTL. ErrLost means another server took it
// over: this one must stop writing the repository.
func (l *Lease) Renew(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	prev := l.me.Expires
	l.me.Expires = time.Now().UTC().Add(l.ttl)
	ver, err := l.store.PutIf(ctx, Key, l.encode(), l.version)
	if err != nil {
		l.me.Expires = prev
		if errors.Is(err, chunkstore.ErrPrecondition) {
			return ErrLost
		}
		return fmt.Errorf("renew the repository lease: %w", err)
	}
	l.version = ver
	return nil
}

// Keep renews the lease every third of its TTL until ctx ends (nil) or the
// lease is lost (ErrLost). Renewals that fail for other reasons are retried
// until the lease would expire, which counts as lost.
func (l *Lease) Keep(ctx context.Context) error {
	t := time.NewTicker(l.ttl / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		// A renewal that ends after the lease expired is worthless: give
		// it until then, so a hung store is noticed in time.
		rctx, cancel := context.WithDeadline(ctx, l.Holder().Expires)
		err := l.Renew(rctx)
		cancel()
		switch {
		case err == nil:
		case errors.Is(err, ErrLost):
			return err
		case ctx.Err() != nil:
			return nil
		case time.Now().After(l.Holder().Expires):
			return fmt.Errorf("%w: no renewal succeeded before it expired (last: %v)", ErrLost, err)
		}
	}
}

// Release gives the lease up, if this server still holds it.
func (l *Lease) Release(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	// Not a delete: between a read and a delete another server could take
	// the lease over, and the delete would drop its lease. An expired
	// lease written by compare-and-swap on our own version is free to the
	// next server at once, and cannot touch anyone else's.
	gone := l.me
	gone.Expires = time.Unix(0, 0).UTC()
	data, _ := json.Marshal(gone)
	ver, err := l.store.PutIf(ctx, Key, data, l.version)
	switch {
	case errors.Is(err, chunkstore.ErrPrecondition), errors.Is(err, chunkstore.ErrNotFound):
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
	return errors.Is(syscall.Kill(h.PID, 0), syscall.ESRCH)
}
