package nbdserver

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nbdvault/nbdvault/internal/fsync"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// TokensFile holds the scoped tokens' hashes, in the data folder.
const TokensFile = "tokens.json"

// Scopes of tokens, each allowing what the one before it does:
//   - status: read the volume's status and snapshots;
//   - snapshot: and take snapshots of it (rate-limited);
//   - push: and read its chunk IDs, as nbdvault client push does.
//
// The admin token (TokenFile) may do everything.
var tokenScopes = []string{api.ScopeStatus, api.ScopeSnapshot, api.ScopePush}

// tokenRecord is one scoped token as kept on disk: its SHA-256, never the
// token itself, so a copy of the data folder holds no usable token.
type tokenRecord struct {
	ID      string    `json:"id"`
	SHA256  string    `json:"sha256"`
	Scope   string    `json:"scope"`
	Volume  string    `json:"volume"`
	Created time.Time `json:"created"`
}

// tokens are the scoped tokens: loaded at start, written whole (fsync,
// rename) on every change.
type tokens struct {
	path string
	mu   sync.Mutex
	recs []tokenRecord
	used map[string]time.Time // last use by ID, since the server started
}

func loadTokens(path string) (*tokens, error) {
	t := &tokens{path: path, used: map[string]time.Time{}}
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return t, nil
	case err != nil:
		return nil, fmt.Errorf("tokens: %w", err)
	}
	if err := json.Unmarshal(b, &t.recs); err != nil {
		return nil, fmt.Errorf("tokens: %s is not the JSON the server writes (%v); restore it from a backup, or delete it to revoke every scoped token", path, err)
	}
	return t, nil
}

// tokenPrefix starts every scoped token: "nbdvault-ID-SECRET".
const tokenPrefix = "nbdvault-"

func hashToken(tok string) string {
	sum := sha256.Sum256([]byte(tok))
	return hex.EncodeToString(sum[:])
}

// create makes a token of scope for vol and returns it, with the only
// copy of its secret.
func (t *tokens) create(scope, vol string) (api.Token, error) {
	if !slices.Contains(tokenScopes, scope) {
		return api.Token{}, fmt.Errorf("%w: scope %q: want one of %s", errInvalid, scope, strings.Join(tokenScopes, ", "))
	}
	if vol == "" {
		return api.Token{}, fmt.Errorf("%w: a scoped token is for one volume: give it", errInvalid)
	}
	var id, secret [16]byte
	if _, err := rand.Read(id[:6]); err != nil {
		return api.Token{}, err
	}
	if _, err := rand.Read(secret[:]); err != nil {
		return api.Token{}, err
	}
	rec := tokenRecord{ID: hex.EncodeToString(id[:6]), Scope: scope, Volume: vol, Created: time.Now().UTC().Truncate(time.Second)}
	tok := tokenPrefix + rec.ID + "-" + hex.EncodeToString(secret[:])
	rec.SHA256 = hashToken(tok)
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := t.save(append(slices.Clone(t.recs), rec)); err != nil {
		return api.Token{}, err
	}
	t.recs = append(t.recs, rec)
	out := t.info(rec)
	out.Token = tok
	return out, nil
}

// revoke removes the token id.
func (t *tokens) revoke(id string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	i := slices.IndexFunc(t.recs, func(r tokenRecord) bool { return r.ID == id })
	if i < 0 {
		return api.Errorf(api.ErrNotFound, "no token %q (nbdvault token list shows them)", id)
	}
	recs := slices.Delete(slices.Clone(t.recs), i, i+1)
	if err := t.save(recs); err != nil {
		return err
	}
	t.recs = recs
	delete(t.used, id)
	return nil
}

// revokeVolume removes every token for volume vol and says how many.
func (t *tokens) revokeVolume(vol string) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	recs := slices.DeleteFunc(slices.Clone(t.recs), func(r tokenRecord) bool { return r.Volume == vol })
	n := len(t.recs) - len(recs)
	if n == 0 {
		return 0, nil
	}
	if err := t.save(recs); err != nil {
		return 0, err
	}
	t.recs = recs
	return n, nil
}

func (t *tokens) save(recs []tokenRecord) error {
	b, err := json.MarshalIndent(recs, "", "  ")
	if err != nil {
		return err
	}
	if err := fsync.WriteFile(t.path, append(b, '\n')); err != nil {
		return fmt.Errorf("tokens: %w", err)
	}
	return nil
}

func (t *tokens) info(r tokenRecord) api.Token {
	out := api.Token{ID: r.ID, Scope: r.Scope, Volume: r.Volume, Created: r.Created}
	if u, ok := t.used[r.ID]; ok {
		out.LastUsed = &u
	}
	return out
}

// list describes every token, never its secret.
func (t *tokens) list() []api.Token {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := []api.Token{}
	for _, r := range t.recs {
		out = append(out, t.info(r))
	}
	return out
}

// lookup finds the token tok, comparing hashes in constant time.
func (t *tokens) lookup(tok string) (tokenRecord, bool) {
	rest, ok := strings.CutPrefix(tok, tokenPrefix)
	if !ok {
		return tokenRecord{}, false
	}
	id, _, _ := strings.Cut(rest, "-")
	sum := hashToken(tok)
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, r := range t.recs {
		if r.ID == id && subtle.ConstantTimeCompare([]byte(r.SHA256), []byte(sum)) == 1 {
			t.used[r.ID] = time.Now().UTC().Truncate(time.Second)
			return r, true
		}
	}
	return tokenRecord{}, false
}
