package nbdserver

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	"fmt"
	"net"
	"os"
	"os/user"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// accessMode is what an access rule grants on the volumes it names.
type accessMode int

const (
	modeNone      accessMode = iota
	modeSnapshots            // snapshots only, read-only
	modeRO                   // snapshots and points in time, read-only
	modeRW                   // the head too
	modeAdmin                // rw, and (later) the whole admin API
)

var modeNames = []string{"none", "snapshots", "ro", "rw", "admin"}

func (m accessMode) String() string { return modeNames[m] }

// selfVolume, as a rule's volume pattern, is the volume named like the
// identity: a certificate's name, a local user's name.
const selfVolume = "{name}"

// accessRule is one line of a rules file.
type accessRule struct {
	line    int
	who     string // as written: "cert:db1", "uid:0", "anonymous", "*"
	kind    string // cert, dn, uid, gid, anonymous, any
	pattern string // a certificate name glob, an exact DN, a number
	volumes string // a glob over volume names, or selfVolume
	mode    accessMode
}

// accessRules is a parsed rules file, or the defaults.
type accessRules struct {
	source string // "FILE" or "the defaults"
	rules  []accessRule
	// anonymousAllowed: some rule grants a client without an identity
	// something, so TLS clients need not present a certificate.
	anonymousAllowed bool
}

// parseAccessRules parses a rules file: one rule per line, "identity
// volumes mode", # comments and blank lines ignored. Every error names
// its line.
func parseAccessRules(source string, data []byte) (*accessRules, error) {
	rs := &accessRules{source: source}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), 64<<10)
	for n := 1; sc.Scan(); n++ {
		line, _, _ := strings.Cut(sc.Text(), "#")
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if len(f) != 3 {
			return nil, fmt.Errorf("%s line %d: want three fields (identity, volumes, mode), got %d: %q", source, n, len(f), strings.TrimSpace(line))
		}
		r, err := parseAccessRule(n, f[0], f[1], f[2])
		if err != nil {
			return nil, fmt.Errorf("%s line %d: %w", source, n, err)
		}
		if r.mode != modeNone && (r.kind == "anonymous" || r.kind == "any") {
			rs.anonymousAllowed = true
		}
		rs.rules = append(rs.rules, r)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", source, err)
	}
	return rs, nil
}

func parseAccessRule(line int, who, volumes, mode string) (accessRule, error) {
	r := accessRule{line: line, who: who, volumes: volumes}
	i := slices.Index(modeNames, mode)
	if i < 0 {
		return r, fmt.Errorf("mode %q: want rw, ro, snapshots, none or admin", mode)
	}
	r.mode = accessMode(i)
	if volumes != selfVolume {
		if _, err := path.Match(volumes, ""); err != nil {
			return r, fmt.Errorf("volume pattern %q: %v", volumes, err)
		}
	}
	kind, pattern, _ := strings.Cut(who, ":")
	switch {
	case who == "*":
		r.kind = "any"
	case who == "anonymous":
		r.kind = "anonymous"
	case kind == "cert" && pattern != "":
		if _, err := path.Match(pattern, ""); err != nil {
			return r, fmt.Errorf("identity %q: %v", who, err)
		}
		r.kind, r.pattern = kind, pattern
	case kind == "dn" && pattern != "":
		r.kind, r.pattern = kind, pattern // matched exactly, never as a glob
	case kind == "uid" && pattern != "":
		r.kind, r.pattern = kind, pattern
		if _, err := strconv.ParseUint(pattern, 10, 32); err != nil {
			u, err := user.Lookup(pattern)
			if err != nil {
				return r, fmt.Errorf("identity %q: no such user", who)
			}
			r.pattern = u.Uid
		}
	case kind == "gid" && pattern != "":
		r.kind, r.pattern = kind, pattern
		if _, err := strconv.ParseUint(pattern, 10, 32); err != nil {
			g, err := user.LookupGroup(pattern)
			if err != nil {
				return r, fmt.Errorf("identity %q: no such group", who)
			}
			r.pattern = g.Gid
		}
	default:
		return r, fmt.Errorf("identity %q: want cert:NAME, dn:DN, uid:USER, gid:GROUP, anonymous or *", who)
	}
	return r, nil
}

// defaultAccessRules are the rules without a rules file: the server's
// own user and root may use every volume (they could read the state
// folder anyway), a client certificate the volume of its own name; with
// insecure, also every client that is neither a user of this host nor
// a certificate (a remote plaintext client), as before there were
// rules. Other users of this host never get anything by default.
func defaultAccessRules(insecure bool) *accessRules {
	self := strconv.Itoa(os.Getuid())
	rs := &accessRules{source: "the defaults (the server's user and root on this host, a certificate its own volume; --access FILE gives others)"}
	rs.rules = append(rs.rules, accessRule{who: "uid:" + self, kind: "uid", pattern: self, volumes: "*", mode: modeRW})
	if self != "0" {
		rs.rules = append(rs.rules, accessRule{who: "uid:0", kind: "uid", pattern: "0", volumes: "*", mode: modeRW})
	}
	rs.rules = append(rs.rules, accessRule{who: "cert:*", kind: "cert", pattern: "*", volumes: selfVolume, mode: modeRW})
	if insecure {
		rs.source = "the defaults with --insecure (the server's user and root on this host, a certificate its own volume, and any remote client without one every volume)"
		rs.rules = append(rs.rules, accessRule{who: "anonymous", kind: "anonymous", volumes: "*", mode: modeRW})
		rs.anonymousAllowed = true
	}
	return rs
}

// matches says whether r applies to client p on volume vol.
func (r *accessRule) matches(p *peer, vol string) bool {
	switch r.kind {
	case "any":
	case "anonymous":
		if p.cert != "" || p.uid >= 0 {
			return false
		}
	case "cert":
		if ok, _ := path.Match(r.pattern, p.cert); p.cert == "" || !ok {
			return false
		}
	case "dn":
		if p.cert == "" || p.dn != r.pattern {
			return false
		}
	case "uid":
		if p.uid < 0 || strconv.Itoa(p.uid) != r.pattern {
			return false
		}
	case "gid":
		if p.uid < 0 || !slices.Contains(p.gids, r.pattern) {
			return false
		}
	default:
		return false
	}
	if r.volumes == selfVolume {
		// The name of the identity this rule matched.
		switch r.kind {
		case "uid", "gid":
			return p.user != "" && vol == p.user
		case "cert", "dn":
			return vol == p.cert
		}
		return vol == p.name()
	}
	ok, _ := path.Match(r.volumes, vol)
	return ok
}

// mode is what the rules give p on vol, and the rule that decided (nil:
// none matched).
func (rs *accessRules) mode(p *peer, vol string) (accessMode, *accessRule) {
	for i := range rs.rules {
		if r := &rs.rules[i]; r.matches(p, vol) {
			return r.mode, r
		}
	}
	return modeNone, nil
}

// modeEverywhere is what the rules give p on the repository as a whole:
// the first rule for p whose volume pattern is "*" itself (not a
// pattern that happens to match the name "*").
func (rs *accessRules) modeEverywhere(p *peer) accessMode {
	for i := range rs.rules {
		if r := &rs.rules[i]; r.volumes == "*" && r.matches(p, "*") {
			return r.mode
		}
	}
	return modeNone
}

// peer is who an NBD client is: a verified certificate's name and
// subject, a local user, both, or neither (anonymous).
type peer struct {
	cert string // the certificate's first URI SAN, DNS SAN, or CN; "" without one
	dn   string // its subject, RFC 2253
	// chain is the certificate and intermediates it sent, verified at
	// the handshake, kept to verify again after a reload.
	chain []*x509.Certificate
	uid   int      // a local client's user, -1 if not local or not found
	user  string   // that user's name, if known
	gids  []string // its primary and supplementary groups
}

func (p *peer) name() string {
	if p.cert != "" {
		return p.cert
	}
	return p.user
}

func (p *peer) String() string {
	switch {
	case p.cert != "":
		return "cert:" + p.cert
	case p.uid >= 0 && p.user != "":
		return fmt.Sprintf("uid:%d (%s)", p.uid, p.user)
	case p.uid >= 0:
		return fmt.Sprintf("uid:%d", p.uid)
	}
	return "anonymous"
}

var oidCommonName = asn1.ObjectIdentifier{2, 5, 4, 3}

// certName is what a verified client certificate is called: its first URI
// SAN, else its first DNS SAN, else its common name.
func certName(cs *tls.ConnectionState) (name, dn string) {
	if cs == nil || len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return "", ""
	}
	leaf := cs.VerifiedChains[0][0]
	cns := 0
	for _, n := range leaf.Subject.Names {
		if n.Type.Equal(oidCommonName) {
			cns++
		}
	}
	if cns > 1 {
		return "", "" // which one names it is for the CA to say, not us
	}
	switch {
	case len(leaf.URIs) > 0:
		name = leaf.URIs[0].String()
	case len(leaf.DNSNames) > 0:
		name = leaf.DNSNames[0]
	default:
		name = leaf.Subject.CommonName
	}
	return name, leaf.Subject.String()
}

// identify finds who the client on nc is (cs: its TLS state after
// STARTTLS, or nil).
func identify(nc net.Conn, cs *tls.ConnectionState) *peer {
	p := &peer{uid: -1}
	p.cert, p.dn = certName(cs)
	if p.cert != "" {
		p.chain = cs.PeerCertificates
	}
	if uid, ok := peerUID(nc); ok {
		p.uid = uid
		if u, err := user.LookupId(strconv.Itoa(uid)); err == nil {
			p.user = u.Username
			p.gids, _ = u.GroupIds()
			if !slices.Contains(p.gids, u.Gid) {
				p.gids = append(p.gids, u.Gid)
			}
		}
	}
	return p
}

// access decides for one NBD client by the server's current rules.
type access struct {
	p     *peer
	rules *atomic.Pointer[accessRules]
	// check, if set, verifies the client's certificate again once a
	// reload replaced it (new CAs, a new revocation list); verified is
	// the check it last passed.
	check    *atomic.Pointer[certCheck]
	verified atomic.Pointer[certCheck]
}

func (a *access) String() string { return a.p.String() }

// Allow implements nbd.Identity: a volume's head needs rw; a snapshot or
// point in time ro; a snapshot alone, snapshots. A certificate that the
// CAs or revocation list in force no longer accept allows nothing.
func (a *access) Allow(name string, e *nbd.Export) error {
	if a.p.cert != "" && a.check != nil {
		if c := a.check.Load(); c != nil && a.verified.Load() != c {
			if err := c.verify(a.p.chain); err != nil {
				return fmt.Errorf("%s: its certificate is no longer accepted: %v", a.p, err)
			}
			a.verified.Store(c)
		}
	}
	rs := a.rules.Load()
	vol, _, at := strings.Cut(name, "@")
	mode, r := rs.mode(a.p, vol)
	// The client is told which rule, not where the rules live.
	why := "no access rule gives it that volume"
	if r != nil {
		why = fmt.Sprintf("the default rule %q gives it %s", r.who+" "+r.volumes+" "+r.mode.String(), r.mode)
		if r.line > 0 {
			why = fmt.Sprintf("line %d of the access rules gives it %s", r.line, r.mode)
		}
	}
	switch {
	case mode == modeNone:
		return fmt.Errorf("%s may not use volume %q: %s", a.p, vol, why)
	case !at && mode < modeRW:
		return fmt.Errorf("%s may not use the head of volume %q, only its snapshots (%s): open %s@SNAPSHOT", a.p, vol, why, vol)
	case e != nil && mode == modeSnapshots && isPointInTime(e):
		return fmt.Errorf("%s may not use points in time of volume %q, only its snapshots (%s)", a.p, vol, why)
	}
	return nil
}

// isPointInTime says whether e is a checkpoint served as VOL@TIME.
func isPointInTime(e *nbd.Export) bool {
	s, ok := e.Backend.(snapshot)
	return ok && s.checkpoint
}
