package main

import (
	"cmp"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/nbdserver"
	"github.com/nbdvault/nbdvault/nbdserver/volume"
)

func serveCommand() *cli.Command {
	return &cli.Command{
		Name:  "serve",
		Usage: "run the server: NBD for the volumes, the admin API for the CLI",
		Description: "With no flags it keeps everything in ./" + defaultData + ", serves NBD on " + defaultListen + "\n" +
			"and the admin API on " + defaultAdmin + ". Stop it with Ctrl-C or SIGTERM: requests in\n" +
			"flight finish and the write logs are synced; nothing acknowledged is lost.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "data", Value: defaultData, EnvVars: []string{"NBDVAULT_DATA"},
				Usage: "data `folder`: write logs, the admin token, and the repository unless --repo says otherwise"},
			&cli.StringFlag{Name: "repo", EnvVars: []string{"NBDVAULT_REPO"},
				Usage: "repository `location`: a path, or s3://BUCKET[/PREFIX]?endpoint=HOST:PORT (default: DATA/repo)"},
			&cli.StringSliceFlag{Name: "listen", Value: cli.NewStringSlice(defaultListen), EnvVars: []string{"NBDVAULT_LISTEN"},
				Usage: "NBD `address`: HOST:PORT or unix:/PATH; repeat for more"},
			&cli.StringFlag{Name: "admin", Value: defaultAdmin, EnvVars: []string{"NBDVAULT_ADMIN"},
				Usage: "admin API and /metrics `address` (HOST:PORT)"},
			&cli.StringFlag{Name: "log-level", Value: "info", EnvVars: []string{"NBDVAULT_LOG_LEVEL"},
				Usage: "`level` of the log on stderr: debug, info, warn or error"},
			&cli.DurationFlag{Name: "checkpoint-interval", Value: 10 * time.Second, EnvVars: []string{"NBDVAULT_CHECKPOINT_INTERVAL"},
				Usage: "upload a checkpoint at most this `long` after a write: how far the repository may lag"},
			&cli.DurationFlag{Name: "journal-retention", Value: volume.DefaultJournalRetention, EnvVars: []string{"NBDVAULT_JOURNAL_RETENTION"},
				Usage: "keep checkpoints this `long` as points in time that VOL@TIME reads (an RFC 3339 time, e.g. vol@2026-11-30T17:55:03Z); " +
					"they keep what was written meanwhile in the repository; 0 keeps none"},
			&cli.DurationFlag{Name: "gc-interval", Value: nbdserver.DefaultGCInterval, EnvVars: []string{"NBDVAULT_GC_INTERVAL"},
				Usage: "after volumes' stored retention policies remove snapshots, collect garbage at most once this `long`, so that a burst of deletes is one sweep"},
			&cli.DurationFlag{Name: "auto-prune-min-age", Value: nbdserver.DefaultAutoPruneMinAge, EnvVars: []string{"NBDVAULT_AUTO_PRUNE_MIN_AGE"},
				Usage: "volumes' stored retention policies leave snapshots taken by scoped tokens and certificates until they are this `old`, so that a source host broken into cannot push history out with snapshots; 0: no minimum"},
			&cli.StringFlag{Name: "log-limit", Value: "8G", EnvVars: []string{"NBDVAULT_LOG_LIMIT"},
				Usage: "write log `size` per volume past which writes wait for the uploader"},
			&cli.StringFlag{Name: "cache", EnvVars: []string{"NBDVAULT_CACHE"},
				Usage: "`size` of the cache of chunks read from the repository (default: a quarter of --max-memory)"},
			&cli.StringFlag{Name: "max-memory", EnvVars: []string{"NBDVAULT_MAX_MEMORY"},
				Usage: "memory `size` the server may use: half for NBD clients' buffers, a quarter for the chunk cache, a quarter for uploads " +
					"(default: an eighth of the machine's memory, at least 256M, at most 2G)"},
			&cli.DurationFlag{Name: "reply-timeout", Value: 30 * time.Second, EnvVars: []string{"NBDVAULT_REPLY_TIMEOUT"},
				Usage: "cut off an NBD client that leaves its replies unread this `long`, freeing the memory they hold"},
			&cli.DurationFlag{Name: "repo-timeout", Value: nbdserver.DefaultRepoTimeout, EnvVars: []string{"NBDVAULT_REPO_TIMEOUT"},
				Usage: "an NBD read that needs the repository fails with EIO after this `long` without an answer"},
			&cli.DurationFlag{Name: "lease-ttl", Value: nbdserver.DefaultLeaseTTL, EnvVars: []string{"NBDVAULT_LEASE_TTL"},
				Usage: "how `long` the repository lease lasts unrenewed; uploads pause a third of it before it runs out, and another server may take the repository over once it has"},
			&cli.DurationFlag{Name: "verify-every", EnvVars: []string{"NBDVAULT_VERIFY_EVERY"},
				Usage: "verify the repository's structure this `often` (e.g. 24h), as nbdvault verify does; status and /metrics show the result (default: never)"},
			&cli.StringFlag{Name: "verify-read-data-subset", EnvVars: []string{"NBDVAULT_VERIFY_READ_DATA_SUBSET"},
				Usage: "with --verify-every, each run also reads and hashes the next `N%` of the data, so 100/N runs read it all"},
			&cli.StringFlag{Name: "tls-certificates", EnvVars: []string{"NBDVAULT_TLS_CERTIFICATES"},
				Usage: "`folder` of TLS files named as nbdkit and qemu name them: server-cert.pem, server-key.pem, and if there ca-cert.pem (the client CA) and ca-crl.pem"},
			&cli.StringFlag{Name: "tls-cert", EnvVars: []string{"NBDVAULT_TLS_CERT"},
				Usage: "the NBD server's TLS certificate `file` (PEM, with its chain): NBD clients may use TLS, and must off loopback"},
			&cli.StringFlag{Name: "tls-key", EnvVars: []string{"NBDVAULT_TLS_KEY"}, Usage: "the private key `file` of --tls-cert (PEM)"},
			&cli.StringFlag{Name: "tls-client-ca", EnvVars: []string{"NBDVAULT_TLS_CLIENT_CA"},
				Usage: "CA certificate `file` (PEM) that signs client certificates; a client's identity is its certificate's name (first URI or DNS SAN, else CN)"},
			&cli.StringFlag{Name: "tls-crl", EnvVars: []string{"NBDVAULT_TLS_CRL"},
				Usage: "revocation list `file` (PEM) of --tls-client-ca: its certificates are refused"},
			&cli.BoolFlag{Name: "tls-required", EnvVars: []string{"NBDVAULT_TLS_REQUIRED"},
				Usage: "require TLS on loopback and Unix socket listeners too (off loopback it always is)"},
			&cli.StringFlag{Name: "access", EnvVars: []string{"NBDVAULT_ACCESS"},
				Usage: "access rules `file`: who may open which volumes over NBD (docs/operations.md, \"Security\"); reloaded on SIGHUP and when it changes. " +
					"Default: the server's user and root on this host may open all, a client certificate the volume of its name"},
			&cli.StringFlag{Name: "socket-mode", Value: "0660", EnvVars: []string{"NBDVAULT_SOCKET_MODE"},
				Usage: "`mode` (octal) of unix: listeners: who may connect; --access decides what they may open"},
			&cli.StringFlag{Name: "socket-group", EnvVars: []string{"NBDVAULT_SOCKET_GROUP"},
				Usage: "`group` (name or number) of unix: listeners (default: the server's)"},
			&cli.BoolFlag{Name: "insecure", EnvVars: []string{"NBDVAULT_INSECURE"},
				Usage: "serve NBD off loopback without TLS (or with TLS but neither client certificates nor rules), and without --access let everyone open every volume"},
			&cli.StringFlag{Name: "admin-tls-cert", EnvVars: []string{"NBDVAULT_ADMIN_TLS_CERT"},
				Usage: "serve the admin API over HTTPS with this certificate `file` (PEM); client certificates are checked against --tls-client-ca"},
			&cli.StringFlag{Name: "admin-tls-key", EnvVars: []string{"NBDVAULT_ADMIN_TLS_KEY"}, Usage: "the private key `file` of --admin-tls-cert"},
			&cli.DurationFlag{Name: "scoped-snapshot-interval", Value: 10 * time.Minute, EnvVars: []string{"NBDVAULT_SCOPED_SNAPSHOT_INTERVAL"},
				Usage: "callers other than the admin token (scoped tokens, client certificates) may take a snapshot of a volume at most once this `long`; 0: no limit"},
			&cli.BoolFlag{Name: "encrypt", EnvVars: []string{"NBDVAULT_ENCRYPT"},
				Usage: "make the repository encrypted when this start creates it (an existing one opens as it is); the password comes as for an encrypted repository"},
			&cli.StringFlag{Name: "password-file", EnvVars: []string{"NBDVAULT_PASSWORD_FILE"},
				Usage: "read an encrypted repository's password from this `file` (else NBDVAULT_PASSWORD, --password-command, the systemd credential nbdvault-password, or a prompt on a terminal)"},
			&cli.StringFlag{Name: "password-command", EnvVars: []string{"NBDVAULT_PASSWORD_COMMAND"},
				Usage: "run this `command` (sh -c) for an encrypted repository's password: it prints it on stdout"},
			&cli.StringFlag{Name: "check-access", Usage: "check a rules `file` and print what it gives, then exit (nothing starts)"},
		},
		Action: serve,
	}
}

func serve(c *cli.Context) error {
	if c.NArg() > 0 {
		return usageErrorf("serve takes no arguments, got %q (see nbdvault serve --help)", c.Args().Slice())
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return usageErrorf("--log-level %q: want debug, info, warn or error", c.String("log-level"))
	}
	logLimit, err := parseSize(c.String("log-limit"))
	if err != nil {
		return usageErrorf("--log-limit: %v", err)
	}
	journalRetention := c.Duration("journal-retention")
	switch {
	case journalRetention < 0:
		return usageErrorf("--journal-retention %s: want a duration such as 30m, 1h or 168h, or 0 to keep no points in time", journalRetention)
	case journalRetention == 0:
		journalRetention = -1 // the engine's "none"
	}
	maxMemory := defaultMaxMemory(physicalMemory())
	if v := c.String("max-memory"); v != "" {
		if maxMemory, err = parseSize(v); err != nil {
			return usageErrorf("--max-memory: %v", err)
		}
		if maxMemory < minMaxMemory {
			return usageErrorf("--max-memory %s is too small: the server needs at least %s", v, formatSize(minMaxMemory))
		}
	}
	var cache int64 // 0: a quarter of maxMemory
	if v := c.String("cache"); v != "" {
		if cache, err = parseSize(v); err != nil {
			return usageErrorf("--cache: %v", err)
		}
	}
	if err := nbdserver.CheckVerifySchedule(nbdserver.Options{VerifyEvery: c.Duration("verify-every"), VerifySubset: c.String("verify-read-data-subset")}); err != nil {
		return usageErrorf("--verify-every, --verify-read-data-subset: %v", err)
	}
	if f := c.String("check-access"); f != "" {
		out, err := nbdserver.CheckAccess(f)
		if err != nil {
			return usageErrorf("--check-access: %v", err)
		}
		fmt.Fprint(c.App.Writer, out)
		return nil
	}
	tlsFiles, err := tlsFlags(c)
	if err != nil {
		return err
	}
	if (c.String("admin-tls-cert") == "") != (c.String("admin-tls-key") == "") {
		return usageErrorf("--admin-tls-cert and --admin-tls-key go together: give both")
	}
	if c.Duration("scoped-snapshot-interval") < 0 {
		return usageErrorf("--scoped-snapshot-interval: want a duration such as 10m, or 0 for no limit")
	}
	socketMode, err := strconv.ParseUint(c.String("socket-mode"), 8, 32)
	if err != nil || socketMode == 0 || socketMode > 0o777 {
		return usageErrorf("--socket-mode %q: want an octal mode such as 0660 or 0600", c.String("socket-mode"))
	}
	var listen []string
	for _, l := range c.StringSlice("listen") {
		for part := range strings.SplitSeq(l, ",") { // NBDVAULT_LISTEN=a,b
			if part = strings.TrimSpace(part); part != "" {
				listen = append(listen, part)
			}
		}
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	// The budgets bound what is live; the Go memory limit makes the
	// collector return what is not before the process grows past them.
	goLimit := memoryLimit(maxMemory, cache)
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(goLimit)
	}
	logger.Info("memory budget", "max_memory", formatSize(maxMemory), "nbd_buffers", formatSize(maxMemory/2),
		"cache", formatSize(cmp.Or(cache, maxMemory/4)), "go_memory_limit", formatSize(debug.SetMemoryLimit(-1)))
	// SIGHUP reloads; one during the start (which may take a while on
	// S3) must not end the process, and is served once it is up.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	srv, err := nbdserver.Open(c.Context, nbdserver.Options{
		Data:                c.String("data"),
		Repo:                c.String("repo"),
		Listen:              listen,
		Admin:               c.String("admin"),
		Logger:              logger,
		CheckpointInterval:  c.Duration("checkpoint-interval"),
		LogLimit:            logLimit,
		JournalRetention:    journalRetention,
		CacheBytes:          cache,
		RepoTimeout:         c.Duration("repo-timeout"),
		LeaseTTL:            c.Duration("lease-ttl"),
		GCInterval:          c.Duration("gc-interval"),
		AutoPruneMinAge:     autoPruneMinAge(c),
		MaxMemory:           maxMemory,
		ReplyTimeout:        c.Duration("reply-timeout"),
		VerifyEvery:         c.Duration("verify-every"),
		VerifySubset:        c.String("verify-read-data-subset"),
		TLS:                 tlsFiles,
		TLSRequired:         c.Bool("tls-required"),
		Access:              c.String("access"),
		Insecure:            c.Bool("insecure"),
		Encrypt:             c.Bool("encrypt"),
		Password:            passwordOf(c, "the password of the repository", false),
		NewPassword:         passwordOf(c, "the password of the new repository", true),
		PasswordGiven:       passwordGiven(c),
		SocketMode:          os.FileMode(socketMode),
		AdminTLS:            nbdserver.TLSFiles{Cert: c.String("admin-tls-cert"), Key: c.String("admin-tls-key")},
		ScopedSnapshotEvery: c.Duration("scoped-snapshot-interval"),
		SocketGroup:         c.String("socket-group"),
		Version:             version,
	})
	if err != nil {
		return fmt.Errorf("cannot start: %w", err)
	}
	go func() {
		for range hup {
			_, _ = srv.Reload() // it logs what it did
		}
	}()
	return srv.Serve(c.Context)
}

// tlsFlags reads --tls-certificates, --tls-cert, --tls-key,
// --tls-client-ca and --tls-crl into the files to load; a file named
// alone wins over the folder's.
func tlsFlags(c *cli.Context) (nbdserver.TLSFiles, error) {
	var f nbdserver.TLSFiles
	if dir := c.String("tls-certificates"); dir != "" {
		if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
			return f, usageErrorf("--tls-certificates %s: not a folder", dir)
		}
		f.Cert, f.Key = filepath.Join(dir, "server-cert.pem"), filepath.Join(dir, "server-key.pem")
		for _, p := range []*string{&f.Cert, &f.Key} {
			if _, err := os.Stat(*p); err != nil {
				return f, usageErrorf("--tls-certificates %s: %v (the folder needs server-cert.pem and server-key.pem)", dir, err)
			}
		}
		f.Dir = dir // ca-cert.pem and ca-crl.pem are looked for at every reload
	}
	f.Cert = cmp.Or(c.String("tls-cert"), f.Cert)
	f.Key = cmp.Or(c.String("tls-key"), f.Key)
	f.ClientCA = cmp.Or(c.String("tls-client-ca"), f.ClientCA)
	f.CRL = cmp.Or(c.String("tls-crl"), f.CRL)
	switch {
	case (f.Cert == "") != (f.Key == ""):
		return f, usageErrorf("--tls-cert and --tls-key go together: give both, or --tls-certificates DIR")
	case f.Cert == "" && (f.ClientCA != "" || f.CRL != "" || c.Bool("tls-required")):
		return f, usageErrorf("--tls-client-ca, --tls-crl and --tls-required need TLS: give --tls-cert and --tls-key, or --tls-certificates DIR")
	case f.CRL != "" && f.ClientCA == "" && f.Dir == "":
		return f, usageErrorf("--tls-crl revokes client certificates: give --tls-client-ca too")
	}
	return f, nil
}

// minMaxMemory is the least --max-memory: one 32 MiB request and a
// small cache.
const minMaxMemory = 64 << 20

// defaultMaxMemory is an eighth of the memory the server may use, at
// least 256 MiB and at most 2 GiB. An eighth, because the host's page
// cache keeps the write logs' recent records and the host usually runs
// more than nbdvault; 2 GiB, because its half for NBD buffers (1 GiB)
// already lets eight connections hold their full 128 MiB share; 256 MiB
// so that a small machine still takes a connection's 32 MiB requests
// four at a time and keeps a 64 MiB cache.
func defaultMaxMemory(physical int64) int64 {
	return min(max(physical/8, 256<<20), 2<<30)
}

// physicalMemory is the machine's memory, or its cgroup's (v2) limit when
// lower; 0 if neither can be read.
func physicalMemory() int64 {
	var total int64
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if v, ok := strings.CutPrefix(line, "MemTotal:"); ok {
				kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
				total = kb << 10
			}
		}
	}
	if b, err := os.ReadFile("/sys/fs/cgroup/memory.max"); err == nil { // "max" when unlimited
		if n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64); err == nil && n > 0 && (total == 0 || n < total) {
			total = n
		}
	}
	return total
}

// memoryLimit is the Go runtime's memory limit for a --max-memory of
// maxMemory: all of it, or more when --cache (cache, 0 if not given)
// takes more than its quarter.
func memoryLimit(maxMemory, cache int64) int64 {
	if cache == 0 {
		return maxMemory
	}
	return maxMemory - maxMemory/4 + cache
}

// autoPruneMinAge is --auto-prune-min-age as nbdserver.Options takes it:
// 0 there is the default, so "no minimum" is negative.
func autoPruneMinAge(c *cli.Context) time.Duration {
	if d := c.Duration("auto-prune-min-age"); d > 0 {
		return d
	}
	return -1
}
