package main

import (
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/nbdserver"
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
			&cli.DurationFlag{Name: "checkpoint-interval", Value: 30 * time.Second, EnvVars: []string{"NBDVAULT_CHECKPOINT_INTERVAL"},
				Usage: "upload a checkpoint at most this `long` after a write: how far the repository may lag"},
			&cli.StringFlag{Name: "log-limit", Value: "8G", EnvVars: []string{"NBDVAULT_LOG_LIMIT"},
				Usage: "write log `size` per volume past which writes wait for the uploader"},
			&cli.StringFlag{Name: "cache", Value: "256M", EnvVars: []string{"NBDVAULT_CACHE"},
				Usage: "`size` of the cache of chunks read from the repository"},
			&cli.DurationFlag{Name: "repo-timeout", Value: nbdserver.DefaultRepoTimeout, EnvVars: []string{"NBDVAULT_REPO_TIMEOUT"},
				Usage: "an NBD read that needs the repository fails with EIO after this `long` without an answer"},
			&cli.DurationFlag{Name: "lease-ttl", Value: nbdserver.DefaultLeaseTTL, EnvVars: []string{"NBDVAULT_LEASE_TTL"},
				Usage: "how `long` the repository lease lasts unrenewed; uploads pause a third of it before it runs out, and another server may take the repository over once it has"},
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
	cache, err := parseSize(c.String("cache"))
	if err != nil {
		return usageErrorf("--cache: %v", err)
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
	srv, err := nbdserver.Open(c.Context, nbdserver.Options{
		Data:               c.String("data"),
		Repo:               c.String("repo"),
		Listen:             listen,
		Admin:              c.String("admin"),
		Logger:             logger,
		CheckpointInterval: c.Duration("checkpoint-interval"),
		LogLimit:           logLimit,
		CacheBytes:         cache,
		RepoTimeout:        c.Duration("repo-timeout"),
		LeaseTTL:           c.Duration("lease-ttl"),
		Version:            version,
	})
	if err != nil {
		return fmt.Errorf("cannot start: %w", err)
	}
	return srv.Serve(c.Context)
}
