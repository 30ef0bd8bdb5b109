package nbdserver

import (
	"crypto/subtle"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// action is what an admin endpoint needs; each allows the ones before it.
type action int

const (
	actStatus   action = iota // read a volume's status and snapshots
	actSnapshot               // take a snapshot of it
	actPush                   // read its chunk IDs (client push)
	actAdmin                  // everything else: create, delete, prune, gc, tokens, metrics
)

var actionNames = []string{"read the status of", "take snapshots of", "push to", "administer"}

// scopeAction is what a token scope allows.
func scopeAction(scope string) action {
	switch scope {
	case api.ScopeSnapshot:
		return actSnapshot
	case api.ScopePush:
		return actPush
	}
	return actStatus
}

// modeAction is what an access rule's mode allows on the admin API.
func modeAction(m accessMode) (action, bool) {
	switch m {
	case modeAdmin:
		return actAdmin, true
	case modeRW:
		return actPush, true
	case modeRO, modeSnapshots:
		return actStatus, true
	}
	return 0, false
}

// caller is who an admin request comes from: the admin token, a scoped
// token (for one volume), or a verified client certificate (the access
// rules decide, as on NBD).
type caller struct {
	admin bool
	token *tokenRecord
	cert  *peer
}

type callerKey struct{}

func (c *caller) String() string {
	switch {
	case c.admin && c.cert != nil:
		return c.cert.String() + " (admin)"
	case c.admin:
		return "the admin token"
	case c.token != nil:
		return fmt.Sprintf("token %s (scope %s on volume %q)", c.token.ID, c.token.Scope, c.token.Volume)
	}
	return c.cert.String()
}

// scoped says whether the caller is anything less than admin.
func (c *caller) scoped() bool { return !c.admin }

// callerOf finds who sent r, or nil. A certificate speaks for a request
// without an Authorization header only: a header that is there and
// wrong (or not a bearer token) is refused, certificate or not.
func (s *Server) callerOf(r *http.Request) *caller {
	if h := r.Header.Get("Authorization"); h != "" {
		scheme, tok, _ := strings.Cut(h, " ")
		if !strings.EqualFold(scheme, "Bearer") {
			return nil
		}
		if subtle.ConstantTimeCompare([]byte(tok), []byte(s.token)) == 1 {
			return &caller{admin: true}
		}
		if rec, ok := s.tokens.lookup(tok); ok {
			return &caller{token: &rec}
		}
		return nil
	}
	if r.TLS != nil {
		if name, dn := certName(r.TLS); name != "" {
			p := &peer{cert: name, dn: dn, uid: -1}
			// A certificate the rules make admin of everything is the
			// admin token's equal.
			return &caller{cert: p, admin: s.sec.rules.Load().modeEverywhere(p) == modeAdmin}
		}
	}
	return nil
}

// may says whether c may do a on volume vol ("" for an endpoint of no
// volume: the status and list endpoints show a scoped caller only its
// volumes; others need admin).
func (s *Server) may(c *caller, a action, vol string) error {
	if c.admin {
		return nil
	}
	if vol == "" && a == actStatus {
		return nil // filtered by visible
	}
	var allowed action
	var ok bool
	switch {
	case c.token != nil:
		allowed, ok = scopeAction(c.token.Scope), vol != "" && vol == c.token.Volume
	case vol == "":
		// Endpoints of no volume: the rules for every volume.
		allowed, ok = modeAction(s.sec.rules.Load().modeEverywhere(c.cert))
	default:
		mode, _ := s.sec.rules.Load().mode(c.cert, vol)
		allowed, ok = modeAction(mode)
	}
	if !ok || a > allowed {
		what := "the repository"
		if vol != "" {
			what = fmt.Sprintf("volume %q", vol)
		}
		return api.Errorf(api.ErrForbidden, "%s may not %s %s", c, actionNames[a], what)
	}
	return nil
}

// permit checks the caller of r against what an endpoint needs.
func (s *Server) permit(r *http.Request, a action) error {
	c := callerOfRequest(r)
	if c == nil {
		return api.Errorf(api.ErrUnauthorized, "no caller")
	}
	return s.may(c, a, r.PathValue("vol"))
}

// visible says whether the caller of r may see volume vol in listings.
func (s *Server) visible(r *http.Request, vol string) bool {
	c := callerOfRequest(r)
	return c != nil && s.may(c, actStatus, vol) == nil
}

// callerOfRequest is the caller authorize found.
func callerOfRequest(r *http.Request) *caller {
	c, _ := r.Context().Value(callerKey{}).(*caller)
	return c
}

// snapshotLimit spaces the snapshots scoped callers take of each volume:
// a source host that is broken into cannot flood a volume with snapshots
// that push the older ones out of a keep-last policy.
type snapshotLimit struct {
	mu   sync.Mutex
	last map[string]time.Time
}

// take says whether a scoped snapshot of vol may be taken now (and
// counts it), or how long until one may.
func (l *snapshotLimit) take(vol string, every time.Duration) (time.Duration, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.last == nil {
		l.last = map[string]time.Time{}
	}
	if wait := every - time.Since(l.last[vol]); wait > 0 {
		return wait, false
	}
	l.last[vol] = time.Now()
	return 0, true
}

func (s *Server) listTokens(r *http.Request) (int, any, error) {
	return http.StatusOK, s.tokens.list(), nil
}

func (s *Server) createToken(r *http.Request) (int, any, error) {
	var req api.CreateToken
	if err := decode(r, &req); err != nil {
		return 0, nil, err
	}
	if _, err := s.volumeOf(req.Volume); err != nil && req.Volume != "" {
		return 0, nil, err
	}
	t, err := s.tokens.create(req.Scope, req.Volume)
	if err != nil {
		return 0, nil, err
	}
	s.log.Info("token created", "id", t.ID, "scope", t.Scope, "volume", t.Volume)
	return http.StatusCreated, t, nil
}

func (s *Server) revokeToken(r *http.Request) (int, any, error) {
	id := r.PathValue("id")
	if err := s.tokens.revoke(id); err != nil {
		return 0, nil, err
	}
	s.log.Info("token revoked", "id", id)
	return http.StatusNoContent, nil, nil
}

// checkAccess parses rules as a reload would and lists the open NBD
// connections they would close: check before you reload, since closing a
// mirror leg's connection fails the leg.
func (s *Server) checkAccess(r *http.Request) (int, any, error) {
	var req api.CheckAccess
	if err := decode(r, &req); err != nil {
		return 0, nil, err
	}
	rs, err := parseAccessRules("the rules", []byte(req.Rules))
	if err != nil {
		return 0, nil, fmt.Errorf("%w: %v", errInvalid, err)
	}
	var next atomic.Pointer[accessRules]
	next.Store(rs)
	out := api.AccessCheck{Rules: len(rs.rules), Closes: []api.RefusedAttached{}}
	for _, a := range s.nbd.Attached() {
		cur, ok := a.Identity.(*access)
		if !ok {
			continue
		}
		if err := (&access{p: cur.p, rules: &next}).Allow(a.Export.Name, a.Export); err != nil {
			out.Closes = append(out.Closes, api.RefusedAttached{Identity: cur.p.String(), Remote: a.Remote, Export: a.Export.Name, Why: err.Error()})
		}
	}
	return http.StatusOK, out, nil
}
