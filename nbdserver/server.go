package nbdserver

import (
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/internal/fsync"
	"github.com/nbdvault/nbdvault/nbdserver/lease"
	"github.com/nbdvault/nbdvault/nbdserver/nbd"
	"github.com/nbdvault/nbdvault/nbdserver/volume"
)

// Options configure a Server. Data is the only one it needs.
type Options struct {
	// Data is the server's folder: the volumes' write logs (state/), the
	// admin token, and the repository (repo/) when Repo is empty.
	Data string
	// Repo is the repository's location (a path, file://… or s3://…).
	Repo string
	// Listen are the NBD addresses: host:port or unix:/path.
	Listen []string
	// Admin is the admin API's host:port; empty for none.
	Admin string
	// TLS turns on STARTTLS on every NBD listener, required on those off
	// loopback (and on all with TLSRequired). TLS.Cert empty: no TLS.
	TLS         TLSFiles
	TLSRequired bool
	// AdminTLS serves the admin API over HTTPS (Cert and Key; client
	// certificates are verified against TLS.ClientCA).
	AdminTLS TLSFiles
	// Access is the access rules file; empty for the defaults (the
	// server's user and root on this host, a client certificate the
	// volume of its name).
	Access string
	// SocketMode and SocketGroup are given to Unix socket listeners: mode
	// DefaultSocketMode when 0, the server's group when empty. Connecting
	// needs write permission; the access rules decide what a user who
	// connects may open.
	SocketMode  os.FileMode
	SocketGroup string
	// ScopedSnapshotEvery spaces the snapshots that callers other than
	// the admin token take of one volume; 0: no limit.
	ScopedSnapshotEvery time.Duration
	// Insecure serves a listener off loopback without TLS, or with TLS
	// but neither client certificates nor rules, and without rules lets
	// every client use every volume.
	Insecure bool
	// Encrypt makes the repository encrypted when this start creates it
	// (docs/architecture.md, "Encryption at rest, as built"). An existing
	// repository is opened as it is, encrypted or not.
	Encrypt bool
	// Password returns the password of an encrypted repository and says
	// where it came from; it is asked only when one is needed.
	// PasswordGiven says that the user gave one (a flag, the
	// environment): a repository that is not encrypted is then refused,
	// since a config stripped of its encryption would otherwise have the
	// server write plaintext.
	Password func() (pw []byte, from string, err error)
	// NewPassword, if set, gives the first key's password of a
	// repository this start makes (Encrypt): a prompt asks it twice.
	// Nil: Password.
	NewPassword   func() (pw []byte, from string, err error)
	PasswordGiven bool
	Logger        *slog.Logger
	// Passed to every volume; zero takes the engine's defaults.
	CheckpointInterval time.Duration
	LogLimit           int64
	// JournalRetention: how long checkpoints are kept as points in time
	// (VOL@TIME); negative keeps none.
	JournalRetention time.Duration
	// CacheBytes bounds the chunk cache: a quarter of MaxMemory when 0,
	// or chunkstore's default without MaxMemory.
	CacheBytes int64
	// RepoTimeout bounds an NBD read that needs the repository (default
	// 30 s): past it the client gets EIO, so an outage never hangs reads.
	RepoTimeout time.Duration
	// MaxMemory is the server's memory budget: half for the payload
	// buffers of all NBD connections (nbd.Server.MaxMemory), a quarter
	// for the chunk cache unless CacheBytes says otherwise, and a quarter
	// left to the uploaders and the runtime. 0 takes nbd's default.
	MaxMemory int64
	// ReplyTimeout is nbd.Server.ReplyTimeout: how long an NBD client
	// may leave its replies unread before it is cut off.
	ReplyTimeout time.Duration
	// LeaseTTL is how long the repository lease lasts unrenewed.
	LeaseTTL time.Duration
	// VerifyEvery, when > 0, runs a structure verify of the whole
	// repository on that schedule; VerifySubset ("N%") makes each run
	// read the next N% of the data too.
	VerifyEvery  time.Duration
	VerifySubset string
	// GCInterval: after automatic prunes (a volume's stored retention
	// policy) the server collects garbage at most this often, so that a
	// burst of deletes is one sweep. Default DefaultGCInterval.
	GCInterval time.Duration
	// AutoPruneMinAge: the automatic prune (a volume's stored policy)
	// leaves snapshots taken by scoped callers until they are this old,
	// so that a source host broken into cannot push its volume's history
	// out with snapshots. Zero: DefaultAutoPruneMinAge; negative: none.
	AutoPruneMinAge time.Duration
	Version         string
}

// Defaults of Options.RepoTimeout and Options.LeaseTTL.
const (
	DefaultRepoTimeout = 30 * time.Second
	DefaultLeaseTTL    = lease.DefaultTTL
)

// TokenFile is the admin token's file name in the data folder.
const TokenFile = "admin-token"

// Server is a running nbdvault server: one repository, its volumes, the
// NBD listeners that serve them and the admin API that manages them.
type Server struct {
	opts   Options
	log    *slog.Logger
	repo   chunkstore.Backend
	store  *chunkstore.Store
	keys   *chunkstore.Keys // an encrypted repository's; nil if it is not
	keyMu  sync.Mutex       // one key change at a time
	keyID  string           // the key that opened it at this start
	env    *volume.Env
	lease  *lease.Lease
	token  string
	tokens *tokens
	// snapLimit spaces scoped callers' snapshots (ScopedSnapshotEvery).
	snapLimit snapshotLimit
	// adminConns are the admin API's open TLS connections, checked again
	// after a reload.
	adminConns adminConns
	exports    *Exports
	nbd        *nbd.Server
	sec        *security
	metrics    *metrics
	health     *repoHealth

	nbdListeners []net.Listener
	adminL       net.Listener
	started      time.Time

	// mu guards vols, failed, busy and closing; it is never held across
	// I/O.
	mu   sync.Mutex
	vols map[string]*served
	// failed are the volumes that could not be opened (damage in a write
	// log, say), with why: not served, shown in listings, until a
	// recover opens them. The other volumes are served.
	failed map[string]error
	// busy names volumes being created or deleted: one change at a time
	// per name, while the rest of the API goes on.
	busy map[string]bool
	// closing is set once shutdown begins: no more volumes are made.
	closing bool
	// paused is set while the lease is not confirmed (uploads wait).
	paused bool
	// runCtx is what volume uploaders run under until shutdown.
	runCtx  context.Context
	stopRun context.CancelFunc
	// gcDue is set while a background collection is asked for or runs;
	// gcRuns counts those goroutines, waited for by closeAll.
	gcDue  atomic.Bool
	gcRuns sync.WaitGroup
	// verifies lets one verify run at a time (the schedule's and the
	// API's).
	verifies verifyRuns
	// pruning are the volumes whose automatic prune runs (autoprune.go),
	// true when another is asked for meanwhile; pruned is each volume's
	// last one. pruneRuns counts those goroutines, waited for by
	// closeAll. gcTimer is the collection due after automatic prunes,
	// lastAutoGC when the last such began. Guarded by mu.
	pruning    map[string]bool
	pruned     map[string]autoPrune
	pruneRuns  sync.WaitGroup
	gcTimer    *time.Timer
	lastAutoGC time.Time
}

// served is an open volume and its uploader.
type served struct {
	v    *volume.Volume
	stop context.CancelFunc
	done chan struct{}
}

// Open readies a server: it takes the repository's lease (refusing if
// another server holds it), checks or writes the repository's config,
// opens every volume (replaying write logs), and opens the listeners.
// Serve then serves until its context ends.
func Open(ctx context.Context, opts Options) (_ *Server, err error) {
	if opts.Data == "" {
		return nil, errors.New("no data folder")
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if err := CheckVerifySchedule(opts); err != nil {
		return nil, err
	}
	stateDir := filepath.Join(opts.Data, "state")
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("data folder: %w", err)
	}
	if opts.Repo == "" {
		opts.Repo = filepath.Join(opts.Data, "repo")
	}
	// Wrong certificates or rules stop the start before the repository
	// is touched.
	sec, err := newSecurity(opts.Logger.With("part", "access"), opts.TLS, opts.AdminTLS, opts.Access, opts.Insecure)
	if err != nil {
		return nil, err
	}
	s := &Server{opts: opts, log: opts.Logger, sec: sec, vols: map[string]*served{}, failed: map[string]error{}, busy: map[string]bool{}, exports: NewExports(), started: time.Now(),
		pruning: map[string]bool{}, pruned: map[string]autoPrune{}}
	s.runCtx, s.stopRun = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			s.closeAll()
		}
	}()

	if s.repo, err = chunkstore.Open(opts.Repo); err != nil {
		return nil, fmt.Errorf("repository: %w", err)
	}
	local, isLocal := chunkstore.Under[*chunkstore.Local](s.repo) // before the wrappers, the fence above all
	bucket, isS3 := chunkstore.Under[*chunkstore.S3](s.repo)
	s.metrics = newMetrics(s)
	s.exports.m = s.metrics
	s.exports.ReadTimeout = cmp.Or(opts.RepoTimeout, DefaultRepoTimeout)
	s.health = &repoHealth{log: s.log}
	s.repo = s.metrics.countRequests(s.repo, s.health)
	s.log.Info("opening the repository", "repository", s.repo.Location())
	// The ID is this folder's before any lease record names it, so every
	// manifest a server on this folder writes names one of its holders.
	holders, err := volume.OpenHolders(stateDir)
	if err != nil {
		return nil, err
	}
	usedBefore, holderID := holders.Used(), lease.NewID()
	if err := holders.Add(holderID); err != nil {
		return nil, err
	}
	if s.lease, err = lease.AcquireAs(ctx, s.repo, opts.LeaseTTL, holderID); err != nil {
		if errors.Is(err, lease.ErrHeld) {
			// Read as another's: no lease record names this ID.
			if rerr := holders.Remove(holderID); rerr != nil {
				s.log.Warn("could not take back this start's lease holder ID", "error", rerr)
			}
		}
		return nil, leaseRefused(s.repo, err)
	}
	// From here on the repository is written only while the lease is
	// confirmed (docs/architecture.md, "Fencing through outages").
	s.repo = s.lease.Fence(s.repo)
	if p := s.lease.PreviousHolder(); p.ID != "" && usedBefore && !holders.Own(p.ID) {
		s.log.Warn("another server held the repository since this state folder was last used: volumes whose write logs hold writes it never saw are not served until `nbdvault volume recover` moves those logs aside",
			"other_host", p.Host, "other_pid", p.PID, "other_started", p.Started)
	}
	enc := &encryption{create: opts.Encrypt, password: opts.Password, newPassword: opts.NewPassword, passwordGiven: opts.PasswordGiven, firstKey: stateFile(stateDir, "key"),
		stateSays: stateFile(stateDir, "encryption")}
	rc, keys, err := checkRepoConfig(ctx, s.repo, s.log, enc)
	if err != nil {
		return nil, err
	}
	if err := bindState(stateDir, rc.ID, s.repo.Location()); err != nil {
		return nil, err
	}
	if err := bindKeys(stateDir, keys, s.repo.Location()); err != nil {
		return nil, err
	}
	if keys != nil && enc.opened != enc.firstKey {
		if err := fsync.WriteFile(filepath.Join(stateDir, "key"), []byte(enc.opened+"\n")); err != nil {
			return nil, fmt.Errorf("state folder: %w", err)
		}
	}
	if keys != nil {
		// Every object but those a store seals itself (chunks, packs)
		// and those read before the keys (config, keys, lease).
		s.repo = chunkstore.NewSealed(s.repo, keys)
		s.keys, s.keyID = keys, enc.opened
	}
	if err := checkLeaseLost(stateDir); err != nil {
		return nil, err
	}
	if s.token, err = loadToken(filepath.Join(opts.Data, TokenFile)); err != nil {
		return nil, err
	}
	if s.tokens, err = loadTokens(filepath.Join(opts.Data, TokensFile)); err != nil {
		return nil, err
	}
	cacheBytes := opts.CacheBytes
	if cacheBytes == 0 && opts.MaxMemory > 0 {
		cacheBytes = opts.MaxMemory / 4
	}
	// Before the first chunk is put; closed after the last (closeAll).
	inv, err := volume.OpenInventory(stateDir, volume.InventoryOptions{
		Holder: s.lease.Holder().ID, Previous: s.lease.Previous(), Margin: s.lease.Margin(), ListAfter: s.lease.OpensAt(),
		Logger: s.log.With("part", "gc")})
	if err != nil {
		return nil, err
	}
	if isLocal && !inv.Trusted() {
		s.removeTemporary(local)
	}
	if isS3 {
		if keeps, err := bucket.KeepsVersions(ctx); err == nil && keeps {
			s.log.Warn("the bucket keeps every version of every object: deleting snapshots and collecting garbage frees no space in it until a lifecycle rule expires noncurrent versions (docs/operations.md, \"Retention and garbage collection\")",
				"repository", s.repo.Location())
		}
	}
	if s.store, err = chunkstore.NewStore(s.repo, chunkstore.Options{CacheBytes: cacheBytes, Written: inv.Written, Keys: keys}); err != nil {
		return nil, err
	}
	s.env = &volume.Env{
		Repo: s.repo, RepoID: rc.ID, Store: s.store, StateDir: stateDir, Inventory: inv, Keys: keys,
		Writer: holderID, Holders: holders,
		CheckpointInterval: opts.CheckpointInterval, LogLimit: opts.LogLimit, JournalRetention: opts.JournalRetention,
		UploadMemory: opts.MaxMemory / 4,
		Logger:       s.log.With("part", "upload"),
		Sealed:       s.sealed,
	}
	names, err := volume.List(ctx, s.repo)
	if err != nil {
		return nil, fmt.Errorf("repository %s: list volumes: %w", s.repo.Location(), err)
	}
	for _, name := range names {
		v, err := volume.Open(ctx, s.env, name)
		if err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("open volume %q: %w", name, err)
			}
			// One volume that cannot open must not keep the others from
			// being served.
			s.failed[name] = err
			s.log.Error("volume not served: it could not be opened; the other volumes are served", "volume", name, "error", err, "next", nextStep(name, err))
			continue
		}
		s.serveLocked(v) // no lock yet: nothing else sees s
		st := v.Status()
		s.log.Info("volume opened", "volume", name, "size", v.Size(), "pending_bytes", st.LogBytes, "pending_snapshots", st.PendingLayers)
	}

	s.nbd = &nbd.Server{Exports: s.exports, Logger: s.log.With("part", "nbd"),
		MaxMemory: opts.MaxMemory / 2, ReplyTimeout: opts.ReplyTimeout,
		Identify: s.sec.identify, TLSConfig: s.sec.serverTLS()}
	for _, addr := range opts.Listen {
		l, err := nbd.Listen(addr)
		if err != nil {
			return nil, fmt.Errorf("NBD listener %s: %w", addr, err)
		}
		s.nbdListeners = append(s.nbdListeners, l)
		// An abstract socket (unix:@NAME) has no file to give a mode:
		// the access rules alone decide.
		if path, ok := strings.CutPrefix(addr, "unix:"); ok && !strings.HasPrefix(path, "@") {
			if err := socketAccess(path, opts.SocketMode, opts.SocketGroup); err != nil {
				return nil, fmt.Errorf("NBD listener %s: %w", addr, err)
			}
		}
	}
	if err := s.sec.checkListeners(s.nbdListeners, opts.Listen); err != nil {
		return nil, err
	}
	s.log.Info("NBD access", "rules", s.sec.rules.Load().source, "tls", s.sec.tlsOn(), "client_certificates", s.sec.current.ClientCA != "")
	if opts.Insecure && opts.Access == "" {
		s.log.Warn("--insecure without --access: any client that is neither a user of this host nor a certificate may open every volume")
	}
	if opts.Insecure {
		for _, l := range s.nbdListeners {
			if !localListener(l) && (!s.sec.tlsOn() || opts.Access == "") {
				s.log.Warn("--insecure: this NBD listener lets in whoever reaches it", "listener", l.Addr().String(), "tls", s.sec.tlsOn())
			}
		}
	}
	if opts.Admin != "" {
		if s.adminL, err = net.Listen("tcp", opts.Admin); err != nil {
			return nil, fmt.Errorf("admin listener %s: %w", opts.Admin, err)
		}
		if err := s.sec.checkAdmin(s.adminL, opts.Admin); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// writable refuses a change that writes the repository (create, grow or
// delete a volume, delete a snapshot) while it cannot be written, at once
// and saying why, rather than half-doing it or hanging. Snapshots need
// only the write log and are always taken.
func (s *Server) writable(ctx context.Context) error {
	// Just started, after a holder that may still have writes on the
	// way: a change waits for them (at most a lease's TTL).
	if err := s.lease.WaitOpen(ctx); err != nil {
		return err
	}
	leeway := cmp.Or(s.opts.LeaseTTL, DefaultLeaseTTL) / 6 // a change needs some of the window left
	until, ok := s.lease.Confirmed()
	if ok && time.Until(until) > leeway {
		if up, since, lastErr := s.health.state(); !up {
			return fmt.Errorf("the repository has not answered since %s (%v): %w; try again once `nbdvault status` shows it reachable",
				since.UTC().Format(time.RFC3339), lastErr, chunkstore.ErrUnavailable)
		}
		return nil
	}
	return fmt.Errorf("the repository cannot be written now: the lease was last confirmed until %s, and renewals get no answer (uploads are paused): %w; try again once `nbdvault status` shows it reachable",
		until.UTC().Format(time.RFC3339), chunkstore.ErrUnavailable)
}

// leaseRefused says why the lease of repo could not be taken, and what to
// do when the store did not answer.
func leaseRefused(repo chunkstore.Backend, err error) error {
	if errors.Is(err, chunkstore.ErrUnavailable) {
		return fmt.Errorf("repository %s: %w; check that the object store is up and reachable from here, then try again", repo.Location(), err)
	}
	return fmt.Errorf("repository %s: %w", repo.Location(), err)
}

// LeaseLostFile, in the state folder, says that this server lost the
// repository's lease to another: the write logs may hold writes the
// repository will never have, and must not be replayed over what the
// other server wrote.
const LeaseLostFile = "lease-lost"

func (s *Server) markLeaseLost(err error) {
	msg := fmt.Sprintf("%s: %v\n", time.Now().UTC().Format(time.RFC3339), err)
	if werr := fsync.WriteFile(filepath.Join(s.opts.Data, "state", LeaseLostFile), []byte(msg)); werr != nil {
		s.log.Error("could not mark the state folder as having lost the lease", "error", werr)
	}
}

// checkLeaseLost refuses a state folder whose server lost the lease.
func checkLeaseLost(dir string) error {
	b, err := os.ReadFile(filepath.Join(dir, LeaseLostFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("state folder: %w", err)
	}
	return fmt.Errorf("the state folder %s belongs to a server that lost the repository's lease to another (%s); "+
		"its write logs may hold writes the repository does not have, which cannot be replayed over what the other server wrote. "+
		"Move %s aside (its logs stay readable there) and start again: the volumes open at their newest uploaded state",
		dir, strings.TrimSpace(string(b)), dir)
}

// renewed hears the outcome of every lease renewal: it is a request to
// the repository like any other, and when renewals fail the uploads pause,
// which the log says once.
func (s *Server) renewed(err error) {
	s.health.observe(err)
	_, ok := s.lease.Confirmed()
	s.mu.Lock()
	was := s.paused
	s.paused = !ok
	s.mu.Unlock()
	switch {
	case !ok && !was:
		s.log.Warn("uploads paused: the repository lease could not be renewed in time, so nothing is written to the repository; NBD goes on, writes wait in the write logs, and uploads resume once a renewal succeeds", "error", err)
	case ok && was:
		s.log.Info("the repository lease is renewed: uploads resume")
		for _, v := range s.Volumes() {
			v.Nudge()
		}
	}
}

// serveLocked starts v's uploader and offers it over NBD. Called with
// s.mu held.
func (s *Server) serveLocked(v *volume.Volume) {
	ctx, stop := context.WithCancel(s.runCtx)
	sv := &served{v: v, stop: stop, done: make(chan struct{})}
	go func() {
		defer close(sv.done)
		v.Run(ctx)
	}()
	s.vols[v.Config().Name] = sv
	s.exports.Add(v)
}

// NBDAddrs are the addresses the NBD listeners got (a port 0 resolved).
func (s *Server) NBDAddrs() []string {
	var out []string
	for _, l := range s.nbdListeners {
		if l.Addr().Network() == "unix" {
			out = append(out, "unix:"+l.Addr().String())
		} else {
			out = append(out, l.Addr().String())
		}
	}
	return out
}

// AdminAddr is the admin API's address, or "" without one.
func (s *Server) AdminAddr() string {
	if s.adminL == nil {
		return ""
	}
	return s.adminL.Addr().String()
}

// Repository is the repository's location.
func (s *Server) Repository() string { return s.repo.Location() }

// Serve serves NBD and the admin API until ctx ends, then shuts down:
// requests in flight finish, write logs are synced, uploaders stop
// between objects and the lease is released. It returns early with an
// error if a listener fails or the repository lease is lost.
func (s *Server) Serve(ctx context.Context) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	fail := func(err error) { cancel(err) }
	for _, l := range s.nbdListeners {
		wg.Go(func() {
			forced := s.sec.tlsOn() && (!localListener(l) || s.opts.TLSRequired)
			if err := s.nbd.ServeWith(l, nbd.ListenerOptions{RequireTLS: forced}); err != nil && !errors.Is(err, nbd.ErrServerClosed) {
				fail(fmt.Errorf("NBD listener %s: %w", l.Addr(), err))
			}
		})
	}
	var hs *http.Server
	if s.adminL != nil {
		// IdleTimeout apart from ReadTimeout (which it would default to):
		// a client may keep a connection through a long wait (client
		// snapshot waits for a mirror to settle between two requests).
		hs = &http.Server{Handler: s.adminHandler(), ReadHeaderTimeout: 10 * time.Second,
			ReadTimeout: time.Minute, IdleTimeout: 10 * time.Minute,
			ErrorLog:  slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
			ConnState: s.adminConns.track}
		l := s.adminL
		if cfg := s.sec.adminTLS(); cfg != nil {
			l = tls.NewListener(l, cfg)
		}
		wg.Go(func() {
			if err := hs.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
				fail(fmt.Errorf("admin listener %s: %w", s.adminL.Addr(), err))
			}
		})
	}
	// The lease is kept until closeAll has stopped every write to the
	// repository, not just until shutdown begins.
	leaseCtx, stopLease := context.WithCancel(context.Background())
	leaseDone := make(chan struct{})
	go func() {
		defer close(leaseDone)
		if err := s.lease.Keep(leaseCtx, s.renewed); err != nil {
			// Another server writes the repository now: stop writing it
			// at once, before the drain, and take no more writes that
			// could never be uploaded.
			s.stopRun()
			s.exports.Refuse(fmt.Errorf("%w: this server stopped (another server took the repository over)", errStopping))
			s.markLeaseLost(err)
			fail(fmt.Errorf("%v; stopped uploading, and stopping so that only one server writes the repository (the write logs keep what was not uploaded)", err))
		}
	}()
	s.scheduleVerify()
	go s.pollSecurity(ctx)
	s.log.Info("serving", "nbd", s.NBDAddrs(), "admin", s.AdminAddr(), "repository", s.Repository(), "volumes", len(s.Volumes()))
	<-ctx.Done()
	err := context.Cause(ctx)
	if errors.Is(err, context.Canceled) {
		err = nil // asked to stop
	} else {
		s.log.Error("stopping", "error", err)
	}
	s.mu.Lock()
	s.closing = true
	s.mu.Unlock()
	s.log.Info("shutting down: finishing requests in flight")
	// The admin API and NBD drain side by side, each on its own budget.
	var drains sync.WaitGroup
	if hs != nil {
		drains.Go(func() {
			c, done := context.WithTimeout(context.Background(), 10*time.Second)
			defer done()
			_ = hs.Shutdown(c)
		})
	}
	drains.Go(func() {
		c, done := context.WithTimeout(context.Background(), 30*time.Second)
		defer done()
		if derr := s.nbd.Shutdown(c); derr != nil {
			s.log.Warn("NBD clients did not finish in time; their connections were closed", "error", derr)
		}
	})
	drains.Wait()
	wg.Wait()
	stopLease()
	<-leaseDone
	if cerr := s.closeAll(); err == nil {
		err = cerr
	}
	s.log.Info("stopped")
	return err
}

// closeAll stops the uploaders, closes the volumes (syncing their logs)
// and releases the lease. Unsealed snapshots stay in the logs and are
// uploaded after the next start.
func (s *Server) closeAll() error {
	s.stopRun()
	s.mu.Lock()
	s.closing = true
	vols := s.vols
	s.vols = map[string]*served{}
	if s.gcTimer != nil {
		s.gcTimer.Stop() // one that fired finds closing set
	}
	s.mu.Unlock()
	s.pruneRuns.Wait() // a prune stops at its next batch once runCtx is done
	s.gcRuns.Wait()    // a collection stops at its next step once runCtx is done
	var errs []error
	for name, sv := range vols {
		<-sv.done
		if err := sv.v.Close(); err != nil {
			errs = append(errs, fmt.Errorf("volume %q: %w", name, err))
		}
	}
	// After the last seal: the inventory is complete at the next start.
	if s.env == nil {
		// Open failed before the volumes' Env was made.
	} else if err := s.env.Inventory.Close(); err != nil {
		s.log.Warn("could not close the chunk inventory", "error", err)
	}
	for _, l := range s.nbdListeners {
		l.Close()
	}
	if s.adminL != nil {
		s.adminL.Close()
	}
	if s.lease != nil {
		ctx, done := context.WithTimeout(context.Background(), 10*time.Second)
		defer done()
		if err := s.lease.Release(ctx); errors.Is(err, lease.ErrLost) {
			// Taken over while this server stopped: its logs must not be
			// replayed over what the other server wrote.
			s.markLeaseLost(err)
			errs = append(errs, err)
		} else if err != nil {
			s.log.Warn("could not release the repository lease; the next server waits until it expires", "error", err)
		}
	}
	return errors.Join(errs...)
}

// errDamaged marks a volume that is not served because it could not be
// opened.
var errDamaged = errors.New("not served")

// nextStep says what to do about a volume that failed with err.
func nextStep(name string, err error) string {
	if errors.Is(err, volume.ErrForkedLog) {
		return fmt.Sprintf("run `nbdvault volume recover %s` to open it as the repository holds it; its write log is moved aside, with the writes another server never had", name)
	}
	if errors.Is(err, volume.ErrLogCorrupt) {
		return fmt.Sprintf("run `nbdvault volume recover %s` to open it at its newest good state; it reports what is lost", name)
	}
	if errors.Is(err, volume.ErrDamagedManifest) || errors.Is(err, chunkstore.ErrCorrupt) {
		return "the message names the damaged object: restore it from a copy of the repository, then restart the server"
	}
	return "fix the cause, then restart the server (or run `nbdvault volume recover " + name + "`)"
}

// volumeOf returns the served volume name, or ErrNoVolume naming those
// that exist, or errDamaged for one that could not be opened.
func (s *Server) volumeOf(name string) (*volume.Volume, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if sv, ok := s.vols[name]; ok {
		return sv.v, nil
	}
	if err, ok := s.failed[name]; ok {
		return nil, fmt.Errorf("volume %q is %w: %v; %s", name, errDamaged, err, nextStep(name, err))
	}
	names := make([]string, 0, len(s.vols))
	for n := range s.vols {
		names = append(names, n)
	}
	slices.Sort(names)
	have := "there are no volumes"
	if len(names) > 0 {
		have = "volumes: " + strings.Join(names, ", ")
	}
	return nil, fmt.Errorf("volume %q: %w (%s)", name, volume.ErrNoVolume, have)
}

// changeTimeout bounds a volume create or delete. Once begun, a change
// goes on when the client that asked for it goes away: cut short, it
// would leave half a volume.
const changeTimeout = 5 * time.Minute

// reserve marks name busy for a create or delete, refusing when another
// change of it is under way or the server is stopping.
func (s *Server) reserve(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.closing:
		return fmt.Errorf("volume %q: %w: the server is stopping", name, errStopping)
	case s.busy[name]:
		return fmt.Errorf("volume %q: %w: another create or delete of it is under way", name, errBusy)
	}
	s.busy[name] = true
	return nil
}

func (s *Server) release(name string) {
	s.mu.Lock()
	delete(s.busy, name)
	s.mu.Unlock()
}

var (
	errStopping = errors.New("unavailable")
	errBusy     = errors.New("busy")
)

// CreateVolume creates a volume and serves it.
func (s *Server) CreateVolume(ctx context.Context, cfg volume.Config) (*volume.Volume, error) {
	if err := volume.ValidName(cfg.Name); err != nil {
		return nil, err
	}
	if err := s.reserve(cfg.Name); err != nil {
		return nil, err
	}
	defer s.release(cfg.Name)
	if _, err := s.volumeOf(cfg.Name); err == nil {
		return nil, fmt.Errorf("volume %q: %w", cfg.Name, volume.ErrExists)
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), changeTimeout)
	defer cancel()
	v, err := volume.Create(ctx, s.env, cfg)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing { // shutdown began meanwhile: closeAll will not see it
		v.Close()
		return nil, fmt.Errorf("volume %q: %w: created, but the server is stopping; it is served after the next start", cfg.Name, errStopping)
	}
	s.serveLocked(v)
	s.log.Info("volume created", "volume", cfg.Name, "size", v.Size(), "chunk_size", v.Config().ChunkSize)
	return v, nil
}

// DeleteVolume stops serving a volume and deletes it with its snapshots.
// Clients still attached get errors for anything but reads of data
// already uploaded.
func (s *Server) DeleteVolume(ctx context.Context, name string) error {
	if err := volume.ValidName(name); err != nil {
		return err
	}
	if err := s.reserve(name); err != nil {
		return err
	}
	defer s.release(name)
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), changeTimeout)
	defer cancel()
	// Ask the repository first: if it cannot answer, the volume stays
	// served as it was.
	if _, err := s.repo.Has(ctx, "config"); err != nil {
		return fmt.Errorf("delete volume %q: %w", name, err)
	}
	s.mu.Lock()
	sv, ok := s.vols[name]
	delete(s.vols, name)
	delete(s.failed, name) // a volume that could not open can be deleted
	s.mu.Unlock()
	if ok {
		for _, si := range sv.v.Snapshots() {
			s.metrics.forget(name + "@" + si.ID)
		}
		s.exports.Remove(name)
		sv.stop()
		<-sv.done
		if err := sv.v.Close(); err != nil {
			s.log.Warn("closing a volume being deleted", "volume", name, "error", err)
		}
	}
	if err := volume.Delete(ctx, s.env, name); err != nil {
		return err
	}
	s.log.Info("volume deleted", "volume", name)
	s.collectSoon("volume " + name + " deleted")
	return nil
}

// Failed returns the volumes that could not be opened, with why.
func (s *Server) Failed() map[string]error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.failed)
}

// RecoverVolume opens volume name at its newest good state: its write log
// is cut at the first damaged record, what follows moved aside (see
// volume.Recover). A served volume (damage found while it ran) is closed
// and opened again; one that could not be opened is served once
// recovered. It returns what was cut, nil when there was no damage.
func (s *Server) RecoverVolume(ctx context.Context, name string) (*volume.LogCut, error) {
	if err := volume.ValidName(name); err != nil {
		return nil, err
	}
	if err := s.reserve(name); err != nil {
		return nil, err
	}
	defer s.release(name)
	s.mu.Lock()
	sv, served := s.vols[name]
	_, failed := s.failed[name]
	delete(s.vols, name)
	s.mu.Unlock()
	if !served && !failed {
		_, err := s.volumeOf(name)
		return nil, err
	}
	if served {
		s.exports.Remove(name)
		sv.stop()
		<-sv.done
		if err := sv.v.Close(); err != nil {
			s.log.Warn("closing a volume to recover it", "volume", name, "error", err)
		}
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), changeTimeout)
	defer cancel()
	v, cut, err := volume.Recover(ctx, s.env, name)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.failed[name] = err
		return nil, fmt.Errorf("recover volume %q: %w", name, err)
	}
	delete(s.failed, name)
	if s.closing {
		v.Close()
		return cut, fmt.Errorf("volume %q: %w: recovered, but the server is stopping; it is served after the next start", name, errStopping)
	}
	s.serveLocked(v)
	if cut != nil {
		s.log.Warn("volume recovered: its write log was cut at the first damaged record", "volume", name,
			"record", cut.Seq, "why", cut.Why, "bytes_cut", cut.Bytes, "records_cut", cut.Records,
			"snapshots_lost", len(cut.LostSnapshots()), "moved_to", cut.MovedTo)
	} else {
		s.log.Info("volume recovered: its write log had no damage", "volume", name)
	}
	return cut, nil
}

// Volumes returns the served volumes, by name.
func (s *Server) Volumes() []*volume.Volume {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*volume.Volume, 0, len(s.vols))
	for _, sv := range s.vols {
		out = append(out, sv.v)
	}
	slices.SortFunc(out, func(a, b *volume.Volume) int { return strings.Compare(a.Config().Name, b.Config().Name) })
	return out
}

// repoConfig is the repository's "config" object.
type repoConfig struct {
	Format  int       `json:"format"`
	ChunkID string    `json:"chunk_id"`
	ID      string    `json:"id"` // random: ties a state folder to its repository
	Created time.Time `json:"created"`
	// Upgrading: an upgrade from format 1 began and has not finished.
	Upgrading bool `json:"upgrading,omitempty"`
	// Encryption: the repository is encrypted (its chunk IDs are then
	// repoChunkIDMAC).
	Encryption *repoEncryption `json:"encryption,omitempty"`
	// Sum is the config's checksum (chunkstore.CheckConfig); it must be
	// the last member.
	Sum string `json:"sum,omitempty"`
}

const (
	// repoFormat 2: descriptive objects carry a checksum line (format 1
	// repositories are upgraded in place at start). 3: manifests may
	// name journal deltas (format 2 is raised to 3 at start: its
	// manifests have none, so nothing is rewritten; an older nbdvault
	// then refuses the repository instead of ignoring the deltas). 4:
	// chunk objects may be framed (chunkstore/framed.go; raised from 3
	// at start, nothing rewritten, so that an older nbdvault refuses the
	// repository rather than fail on reads of framed chunks).
	repoFormat     = 4
	repoChunkID    = "blake3-256"
	repoChunkIDMAC = "blake3-256-mac"
	repoCipher     = "xchacha20-poly1305"
)

// repoEncryption is the config's account of an encrypted repository. Its
// MAC, with a key derived from the master key, covers the security
// parameters: whoever can write the bucket can change the config, but
// not these without the key.
type repoEncryption struct {
	Cipher string `json:"cipher"`
	Keyset string `json:"keyset"`
	MAC    string `json:"mac"`
}

// params are what the MAC covers: the repository, its ID scheme, the
// cipher and the keyset.
func (c repoConfig) params() string {
	e := c.Encryption
	return "id=" + c.ID + "\x00chunk_id=" + c.ChunkID + "\x00cipher=" + e.Cipher + "\x00keyset=" + e.Keyset
}

// checkMAC checks the config's MAC with keys.
func (c repoConfig) checkMAC(k *chunkstore.Keys) error {
	if c.Encryption.Keyset != hex.EncodeToString(ksOf(k)) {
		return errors.New("its keyset is not the config's")
	}
	if !hmac.Equal([]byte(k.ConfigMAC(c.params())), []byte(c.Encryption.MAC)) {
		return errors.New("it unwraps, but the config's MAC does not check with it: the config was changed, or the key was planted")
	}
	return nil
}

func ksOf(k *chunkstore.Keys) []byte {
	ks := k.Keyset()
	return ks[:]
}

// encryption is what checkRepoConfig needs of Options to open or create
// an encrypted repository.
type encryption struct {
	create        bool // Options.Encrypt
	password      func() ([]byte, string, error)
	newPassword   func() ([]byte, string, error) // a new repository's first (nil: password)
	passwordGiven bool
	firstKey      string           // the key that opened it last time (state folder)
	opened        string           // set by checkRepoConfig: the key that opened it
	made          *chunkstore.Keys // set by newEncryption: the new repository's keys
	stateSays     string           // the state folder's "encryption" file, if any
	label         string           // the first key's label ("": made by serve --encrypt)
}

// someObject is the key of an object of a repository's volumes or
// chunks, if it holds any ("" if not).
func someObject(ctx context.Context, repo chunkstore.Backend) (string, error) {
	errFound := errors.New("found")
	var found string
	for _, prefix := range []string{"volumes/", "chunks/", chunkstore.KeysPrefix} {
		err := repo.List(ctx, prefix, func(k string) error {
			found = k
			return errFound
		})
		if errors.Is(err, errFound) {
			return found, nil
		}
		if err != nil {
			return "", err
		}
	}
	return "", nil
}

// checkRepoConfig writes a new repository's config, or checks that an
// existing one is a format this server reads. Called with the lease held.
//
// An encrypted repository's keys are opened with the password and
// checked against the config's MAC before anything else is read; a
// repository that is not encrypted is refused when a password was given
// or when it holds keys (its config lost its encryption).
func checkRepoConfig(ctx context.Context, repo chunkstore.Backend, log *slog.Logger, enc *encryption) (repoConfig, *chunkstore.Keys, error) {
	c, err := readRepoConfig(ctx, repo, log, enc)
	if err != nil {
		return c, nil, err
	}
	if c.Encryption == nil {
		return c, nil, nil // checkPlain passed
	}
	if enc.stateSays == "none" {
		return c, nil, fmt.Errorf("repository %s says it is encrypted, but the state folder belongs to a repository that is not: its config or keys were replaced; restore them from a copy of the repository", repo.Location())
	}
	if c.ChunkID != repoChunkIDMAC || c.Encryption.Cipher != repoCipher {
		return c, nil, fmt.Errorf("repository %s is encrypted with %s and %s chunk IDs; this nbdvault knows %s and %s: use the nbdvault release that wrote it",
			repo.Location(), c.Encryption.Cipher, c.ChunkID, repoCipher, repoChunkIDMAC)
	}
	if enc.made != nil { // this start made it
		return c, enc.made, nil
	}
	if enc.password == nil {
		return c, nil, fmt.Errorf("repository %s is encrypted: give its password (NBDVAULT_PASSWORD, --password-file, --password-command, or a systemd credential nbdvault-password)", repo.Location())
	}
	pw, from, err := enc.password()
	if err != nil {
		return c, nil, fmt.Errorf("repository %s is encrypted: %w", repo.Location(), err)
	}
	log.Info("opening the repository's keys", "password_from", from)
	keys, id, err := chunkstore.OpenKeys(ctx, repo, pw, enc.firstKey, c.checkMAC)
	clear(pw)
	if err != nil {
		if errors.Is(err, chunkstore.ErrWrongPassword) {
			return c, nil, fmt.Errorf("%w; check the password (it came from %s), or use another key's password (nbdvault key list)", err, from)
		}
		return c, nil, fmt.Errorf("repository %s: %w", repo.Location(), err)
	}
	log.Info("repository keys opened", "key", id, "fingerprint", keys.Fingerprint())
	enc.opened = id
	return c, keys, nil
}

// checkPlain checks that a repository whose config says it is not
// encrypted is not one whose config lost its encryption: one that holds
// keys, or sealed objects (someone deleted the keys too), or whose state
// folder remembers a master key, is refused; so is a password given for
// it.
func checkPlain(ctx context.Context, repo chunkstore.Backend, enc *encryption) error {
	ids, err := chunkstore.KeyIDs(ctx, repo)
	switch {
	case err != nil:
		return fmt.Errorf("repository %s: list its keys: %w", repo.Location(), err)
	case len(ids) > 0:
		return fmt.Errorf("repository %s holds keys (%s%s) but its config says it is not encrypted: the config was changed or replaced; restore it from a copy of the repository (nbdvault does not write plaintext into an encrypted repository)",
			repo.Location(), chunkstore.KeysPrefix, ids[0])
	case strings.HasPrefix(enc.stateSays, "fingerprint "):
		return fmt.Errorf("repository %s says it is not encrypted, but the state folder belongs to an encrypted one (%s): its config lost its encryption; restore the config and keys from a copy of the repository",
			repo.Location(), enc.stateSays)
	}
	if k, err := sealedObject(ctx, repo); err != nil {
		return fmt.Errorf("repository %s: look for encrypted objects: %w", repo.Location(), err)
	} else if k != "" {
		return fmt.Errorf("repository %s holds encrypted objects (%s) but its config says it is not encrypted and it has no keys: its config and keys were changed or deleted; restore them from a copy of the repository (nbdvault does not write plaintext into an encrypted repository)",
			repo.Location(), k)
	}
	if enc.create || enc.passwordGiven {
		return fmt.Errorf("repository %s is not encrypted, yet a password or --encrypt was given: start without them to use it as it is (an existing repository cannot be encrypted; make a new one with --encrypt)",
			repo.Location())
	}
	return nil
}

// sealedObject returns the key of a sealed object among the first volume
// record and the first chunk of repo, or "": two reads tell an encrypted
// repository from a plain one, since every object of one is sealed.
func sealedObject(ctx context.Context, repo chunkstore.Backend) (string, error) {
	errFound := errors.New("found")
	for _, prefix := range []string{"volumes/", "chunks/"} {
		var first string
		err := repo.List(ctx, prefix, func(k string) error {
			if prefix == "chunks/" || strings.HasSuffix(k, "/volume") {
				first = k
				return errFound
			}
			return nil
		})
		if err != nil && !errors.Is(err, errFound) {
			return "", err
		}
		if first == "" {
			continue
		}
		obj, err := repo.Get(ctx, first)
		if errors.Is(err, chunkstore.ErrNotFound) {
			continue
		}
		if err != nil {
			return "", err
		}
		if chunkstore.LooksSealed(obj) {
			return first, nil
		}
	}
	return "", nil
}

// readRepoConfig writes a new repository's config (and its first key, if
// it is encrypted), or checks that an existing one is a format this server
// reads.
func readRepoConfig(ctx context.Context, repo chunkstore.Backend, log *slog.Logger, enc *encryption) (repoConfig, error) {
	var c repoConfig
	data, err := repo.Get(ctx, lease.ConfigKey)
	switch {
	case errors.Is(err, chunkstore.ErrNotFound):
		// A new repository, but never over objects: a repository whose
		// config was lost would get a new ID, under which none of its
		// checked objects reads.
		k, err := someObject(ctx, repo)
		if err != nil {
			return c, fmt.Errorf("repository %s: look for objects before making it a repository: %w", repo.Location(), err)
		}
		if strings.HasPrefix(k, chunkstore.KeysPrefix) {
			if !enc.create {
				return c, fmt.Errorf("repository %s holds a key (%s) but no config: a serve --encrypt was cut short; start again with --encrypt (the key is passed over), or delete %s%s to start it plain",
					repo.Location(), k, repo.Location()+"/", chunkstore.KeysPrefix)
			}
			k = "" // an orphan key of a cut --encrypt: passed over
		}
		if k != "" {
			return c, fmt.Errorf("repository %s has no config but holds objects (%s): its config was lost, or this is not an nbdvault repository; restore config from a copy of the repository (nbdvault does not start a new repository over existing objects)",
				repo.Location(), k)
		}
		if enc.passwordGiven && !enc.create {
			return c, fmt.Errorf("repository %s is new, and a password was given without --encrypt: give --encrypt to make it encrypted, or no password to make it plain", repo.Location())
		}
		c = repoConfig{Format: repoFormat, ChunkID: repoChunkID, Created: time.Now().UTC(), ID: randomHex(16)}
		if enc.create {
			if err := newEncryption(ctx, repo, log, &c, enc); err != nil {
				return c, err
			}
		}
		return c, writeRepoConfig(ctx, repo, c)
	case err != nil:
		return c, fmt.Errorf("repository %s: read its config: %w", repo.Location(), err)
	}
	summed, err := chunkstore.CheckConfig(lease.ConfigKey, data)
	if err != nil {
		return c, fmt.Errorf("repository %s: its config is damaged (%w): restore it from a copy of the repository", repo.Location(), err)
	}
	if err := json.Unmarshal(data, &c); err != nil {
		return c, fmt.Errorf("repository %s: its config is unreadable (%v): damaged, or not an nbdvault repository; restore it from a copy of the repository",
			repo.Location(), err)
	}
	if (c.ChunkID != repoChunkID && (c.ChunkID != repoChunkIDMAC || c.Encryption == nil)) || c.Format < 1 || c.Format > repoFormat {
		return c, fmt.Errorf("repository %s has format %d with %s chunk IDs; this nbdvault reads formats 1 to %d with %s: use the nbdvault release that wrote it",
			repo.Location(), c.Format, c.ChunkID, repoFormat, repoChunkID)
	}
	// Before anything is written (an upgrade, a raised format): a config
	// that says plain must be one.
	if c.Encryption == nil {
		if err := checkPlain(ctx, repo, enc); err != nil {
			return c, err
		}
	}
	switch {
	case c.Encryption != nil && (c.Format != repoFormat || c.Upgrading):
		return c, fmt.Errorf("repository %s: an encrypted repository of format %d: its config was changed; restore it from a copy of the repository", repo.Location(), c.Format)
	case c.Format >= 2 && !summed:
		return c, fmt.Errorf("repository %s: its config has no checksum (%w): damaged, or changed by hand; restore it from a copy of the repository",
			repo.Location(), chunkstore.ErrCorrupt)
	case c.Format == repoFormat && !c.Upgrading && c.ID != "":
		return c, nil
	}
	if c.ID == "" {
		c.ID = randomHex(16) // a repository from before IDs
	}
	if c.Format < 2 || c.Upgrading {
		// Format 1: first say format 2, upgrading (an older nbdvault then
		// refuses the repository rather than misread it), then give every
		// descriptive object its checksum, then clear the flag. A crash
		// midway leaves the flag, and the next start goes on.
		c.Format, c.Upgrading = repoFormat, true
		if err := writeRepoConfig(ctx, repo, c); err != nil {
			return c, err
		}
		log.Info("upgrading the repository: volume records and manifests get checksums", "to_format", repoFormat)
		n, damaged, err := volume.UpgradeObjects(ctx, repo, c.ID, func(done int) {
			log.Info("upgrading the repository", "objects", done)
		})
		if err != nil {
			return c, fmt.Errorf("repository %s: upgrade to format %d: %w; start again to go on", repo.Location(), repoFormat, err)
		}
		for _, k := range damaged {
			log.Error("repository upgrade: an object does not read as it should and is left as it is; what it describes is reported damaged", "object", k)
		}
		log.Info("repository upgraded", "format", repoFormat, "objects", n, "damaged", len(damaged))
		c.Upgrading = false
	} else if c.Format < repoFormat {
		log.Info("repository raised to the format of this nbdvault; an older nbdvault no longer opens it", "from_format", c.Format, "to_format", repoFormat)
	}
	c.Format = repoFormat
	return c, writeRepoConfig(ctx, repo, c)
}

// newEncryption makes a new repository's master key, wraps it with the
// password in its first key object, and says so in c. The key is written
// (and read back) before the config: a crash between the two leaves a key
// that no config names, which the next start passes over.
func newEncryption(ctx context.Context, repo chunkstore.Backend, log *slog.Logger, c *repoConfig, enc *encryption) error {
	ask := enc.newPassword
	if ask == nil {
		ask = enc.password
	}
	if ask == nil {
		return fmt.Errorf("repository %s: --encrypt needs a password (NBDVAULT_PASSWORD, --password-file, --password-command, or a terminal)", repo.Location())
	}
	pw, from, err := ask()
	if err != nil {
		return fmt.Errorf("repository %s: --encrypt: %w", repo.Location(), err)
	}
	defer clear(pw)
	master, keyset := chunkstore.NewMasterKey()
	defer clear(master)
	kf, err := chunkstore.WrapKey(master, keyset, pw, chunkstore.DefaultKDF, cmp.Or(enc.label, "made by serve --encrypt"))
	if err != nil {
		return err
	}
	id := chunkstore.NewKeyID()
	if err := repo.Put(ctx, chunkstore.KeysPrefix+id, kf.Marshal()); err != nil {
		return fmt.Errorf("repository %s: write its first key: %w", repo.Location(), err)
	}
	data, err := repo.Get(ctx, chunkstore.KeysPrefix+id)
	if err == nil {
		_, err = chunkstore.ParseKeyFile(data)
	}
	if err != nil {
		return fmt.Errorf("repository %s: read its first key back: %w", repo.Location(), err)
	}
	keys, err := chunkstore.NewKeys(master, keyset)
	if err != nil {
		return err
	}
	c.ChunkID = repoChunkIDMAC
	c.Encryption = &repoEncryption{Cipher: repoCipher, Keyset: hex.EncodeToString(keyset[:])}
	c.Encryption.MAC = keys.ConfigMAC(c.params())
	enc.opened, enc.made = id, keys
	log.Warn("a new encrypted repository: its data cannot be read without a password that opens one of its keys; keep the password safe",
		"repository", repo.Location(), "key", id, "password_from", from)
	return nil
}

// writeRepoConfig writes the config with its checksum.
func writeRepoConfig(ctx context.Context, repo chunkstore.Backend, c repoConfig) error {
	c.Sum = chunkstore.SumConfigPlaceholder
	data, _ := json.MarshalIndent(c, "", "  ")
	data, err := chunkstore.SumConfig(append(data, '\n'))
	if err == nil {
		err = repo.Put(ctx, lease.ConfigKey, data)
	}
	if err != nil {
		return fmt.Errorf("repository %s: write its config: %w", repo.Location(), err)
	}
	return nil
}

// bindState ties the state folder to the repository with ID id: write
// logs replayed into another repository's volumes would corrupt them.
func bindState(dir, id, location string) error {
	path := filepath.Join(dir, "repository")
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fsync.WriteFile(path, []byte(id+"\n"))
	case err != nil:
		return fmt.Errorf("state folder: %w", err)
	}
	if have := strings.TrimSpace(string(data)); have != id {
		return fmt.Errorf("the state folder %s holds the write logs of repository %s, not of %s (repository %s): "+
			"start with the data folder (--data) that goes with this repository, or move %s away if its repository is gone for good",
			dir, have, location, id, dir)
	}
	return nil
}

// bindKeys ties the state folder to the repository's master key (by its
// fingerprint), or to its being unencrypted: a repository whose config
// lost its encryption, or whose keys were replaced by someone else's, is
// refused instead of written to.
func bindKeys(dir string, keys *chunkstore.Keys, location string) error {
	path := filepath.Join(dir, "encryption")
	want := "none"
	if keys != nil {
		want = "fingerprint " + keys.Fingerprint()
	}
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fsync.WriteFile(path, []byte(want+"\n"))
	case err != nil:
		return fmt.Errorf("state folder: %w", err)
	}
	have := strings.TrimSpace(string(data))
	if have == want {
		return nil
	}
	if want == "none" {
		return fmt.Errorf("repository %s is not encrypted, but the state folder %s belongs to an encrypted one (%s): its config lost its encryption; restore the config from a copy of the repository",
			location, dir, have)
	}
	return fmt.Errorf("repository %s opened with a master key (fingerprint %s) other than the one the state folder %s was written with (%s): its keys or config were replaced; restore them from a copy of the repository",
		location, keys.Fingerprint(), dir, strings.TrimPrefix(have, "fingerprint "))
}

// stateFile is the content of the state folder's small file name
// ("encryption", bindKeys; "key", the key that opened the repository last
// time), trimmed, or "" if there is none.
func stateFile(dir, name string) string {
	data, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(data))
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// loadToken reads the admin token, making one (mode 0600) on first start.
func loadToken(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err == nil {
		tok := strings.TrimSpace(string(data))
		if len(tok) < 16 {
			return "", fmt.Errorf("admin token %s is too short; delete it and a new one is made", path)
		}
		return tok, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("admin token: %w", err)
	}
	tok := randomHex(32)
	if err := fsync.WriteFile(path, []byte(tok+"\n")); err != nil {
		return "", fmt.Errorf("admin token: %w", err)
	}
	return tok, nil
}
