package nbdserver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/nbdserver/lease"
)

// InitOptions say what InitRepository makes.
type InitOptions struct {
	Repo    string // the repository's location, as serve --repo takes it
	Encrypt bool
	// Password gives the first key's password (Encrypt); PasswordGiven
	// says one was given without Encrypt, which is refused.
	Password      func() ([]byte, string, error)
	PasswordGiven bool
	LeaseTTL      time.Duration
	Logger        *slog.Logger
}

// Initialized describes a repository InitRepository made.
type Initialized struct {
	Location  string `json:"location"`
	ID        string `json:"id"`
	Format    int    `json:"format"`
	Encrypted bool   `json:"encrypted"`
	Cipher    string `json:"cipher,omitempty"`
	Key       string `json:"key,omitempty"` // the first key's ID (Encrypted)
}

// ErrInitialized: the location holds a repository already.
var ErrInitialized = errors.New("already an nbdvault repository")

// InitRepository makes a new repository at opts.Repo, plain or
// encrypted, as serve does on its first start there, without a server:
// under the repository's lease (a server running on it refuses), it
// writes the config and, encrypted, the first key. A location that holds
// a config already is refused with ErrInitialized; one that holds other
// objects is refused as serve refuses it.
func InitRepository(ctx context.Context, opts InitOptions) (Initialized, error) {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	repo, err := chunkstore.Open(opts.Repo)
	if err != nil {
		return Initialized{}, fmt.Errorf("repository: %w", err)
	}
	l, err := lease.Acquire(ctx, repo, opts.LeaseTTL)
	if err != nil {
		return Initialized{}, leaseRefused(repo, err)
	}
	defer func() {
		if err := l.Release(context.WithoutCancel(ctx)); err != nil {
			log.Warn("could not release the repository lease; a server started on it waits until it expires", "error", err)
		}
	}()
	if err := l.WaitOpen(ctx); err != nil { // a lease taken from a holder that may still write
		return Initialized{}, err
	}
	fenced := l.Fence(repo)
	if has, err := repo.Has(ctx, lease.ConfigKey); err != nil {
		return Initialized{}, fmt.Errorf("repository %s: %w", repo.Location(), err)
	} else if has {
		c, err := readConfigOnly(ctx, repo)
		if err != nil {
			return Initialized{}, fmt.Errorf("%s is %w, but its config does not read (%v): nothing was changed; nbdvault serve --repo %s says more", repo.Location(), ErrInitialized, err, repo.Location())
		}
		what := "plain"
		if c.Encryption != nil {
			what = "encrypted"
		}
		return Initialized{}, fmt.Errorf("%s is %w (format %d, %s, made %s): nothing was changed; serve it with nbdvault serve --repo %s",
			repo.Location(), ErrInitialized, c.Format, what, c.Created.Format(time.RFC3339), repo.Location())
	}
	enc := &encryption{create: opts.Encrypt, password: opts.Password, passwordGiven: opts.PasswordGiven, label: "made by repo init"}
	c, err := readRepoConfig(ctx, fenced, log, enc)
	if err != nil {
		return Initialized{}, err
	}
	out := Initialized{Location: repo.Location(), ID: c.ID, Format: c.Format, Encrypted: c.Encryption != nil}
	if c.Encryption != nil {
		out.Cipher = c.Encryption.Cipher
		out.Key = enc.opened
	}
	return out, nil
}

// readConfigOnly reads a repository's config for a message, unchecked.
func readConfigOnly(ctx context.Context, repo chunkstore.Backend) (repoConfig, error) {
	var c repoConfig
	data, err := repo.Get(ctx, lease.ConfigKey)
	if err != nil {
		return c, err
	}
	return c, json.Unmarshal(data, &c)
}
