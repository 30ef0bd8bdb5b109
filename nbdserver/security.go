package nbdserver

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// TLSFiles are the PEM files of NBD's TLS: the server's certificate and
// key, and optionally the CA that signs client certificates and its
// revocation list. Dir, if set, is a --tls-certificates folder: its
// ca-cert.pem and ca-crl.pem are used when ClientCA and CRL are empty,
// looked for again at every reload (a CRL dropped in later counts).
type TLSFiles struct {
	Cert, Key, ClientCA, CRL string
	Dir                      string
}

// resolved are f with the folder's optional files that exist now.
func (f TLSFiles) resolved() TLSFiles {
	if f.Dir == "" {
		return f
	}
	for _, o := range []struct {
		to   *string
		name string
	}{{&f.ClientCA, "ca-cert.pem"}, {&f.CRL, "ca-crl.pem"}} {
		if p := filepath.Join(f.Dir, o.name); *o.to == "" {
			if _, err := os.Stat(p); err == nil {
				*o.to = p
			}
		}
	}
	return f
}

// stamp is what tells a file changed: its mtime and size (zero: missing).
type stamp struct {
	mtime time.Time
	size  int64
}

func stampOf(p string) stamp {
	fi, err := os.Stat(p)
	if err != nil {
		return stamp{}
	}
	return stamp{fi.ModTime(), fi.Size()}
}

// security holds what decides who may use the NBD listeners: the TLS
// config and the access rules, both reloaded whole (SIGHUP, or a file
// changed) or not at all.
type security struct {
	log   *slog.Logger
	files TLSFiles // Cert empty: no TLS
	// admin are the admin API's certificate and key (Cert empty: plain
	// HTTP); its client certificates are verified against files.ClientCA.
	admin    TLSFiles
	access   string // the rules file, "" for the defaults
	insecure bool
	// current are files as the last good reload resolved them.
	current TLSFiles

	cfg      atomic.Pointer[tls.Config]
	adminCfg atomic.Pointer[tls.Config]
	rules    atomic.Pointer[accessRules]
	// check verifies client certificates again after a reload (nil
	// without a client CA).
	check atomic.Pointer[certCheck]

	mu      sync.Mutex       // one reload at a time; guards stamps and current
	stamps  map[string]stamp // the files at the last reload
	failing atomic.Pointer[error]
	expires atomic.Int64 // the server certificate's NotAfter, Unix seconds
}

func newSecurity(log *slog.Logger, files, admin TLSFiles, access string, insecure bool) (*security, error) {
	s := &security{log: log, files: files, admin: admin, access: access, insecure: insecure}
	if err := s.reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// tlsOn says whether TLS is configured.
func (s *security) tlsOn() bool { return s.files.Cert != "" }

// paths are the files a reload reads, and the folder's optional ones
// whether they exist or not.
func (s *security) paths() []string {
	var out []string
	for _, p := range []string{s.files.Cert, s.files.Key, s.files.ClientCA, s.files.CRL, s.access, s.admin.Cert, s.admin.Key} {
		if p != "" {
			out = append(out, p)
		}
	}
	if d := s.files.Dir; d != "" {
		out = append(out, filepath.Join(d, "ca-cert.pem"), filepath.Join(d, "ca-crl.pem"))
	}
	return out
}

// reload reads every file again and swaps the TLS config and the rules
// in together; on an error it keeps what runs and returns why.
func (s *security) reload() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	stamps := map[string]stamp{}
	for _, p := range s.paths() {
		stamps[p] = stampOf(p)
	}
	files := s.files.resolved()
	rules := defaultAccessRules(s.insecure)
	if s.access != "" {
		b, err := os.ReadFile(s.access)
		if err != nil {
			return s.fail(fmt.Errorf("access rules: %w", err))
		}
		if rules, err = parseAccessRules(s.access, b); err != nil {
			return s.fail(fmt.Errorf("access rules: %w", err))
		}
	}
	var cfg, adminCfg *tls.Config
	var check *certCheck
	var expires time.Time
	if s.tlsOn() {
		var err error
		if cfg, check, expires, err = s.loadTLS(files, rules); err != nil {
			return s.fail(err)
		}
	}
	if s.admin.Cert != "" {
		cert, err := tls.LoadX509KeyPair(s.admin.Cert, s.admin.Key)
		if err != nil {
			return s.fail(fmt.Errorf("admin TLS certificate %s with key %s: %w", s.admin.Cert, s.admin.Key, err))
		}
		// Tokens or client certificates: a certificate is verified if
		// given, against the same CA and revocation list as NBD's.
		adminCfg = &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}, SessionTicketsDisabled: true}
		if cfg != nil && cfg.ClientCAs != nil {
			adminCfg.ClientCAs, adminCfg.ClientAuth, adminCfg.VerifyConnection = cfg.ClientCAs, tls.VerifyClientCertIfGiven, cfg.VerifyConnection
		}
	}
	s.stamps, s.current = stamps, files
	s.failing.Store(nil)
	if !expires.IsZero() {
		s.expires.Store(expires.Unix())
	}
	s.rules.Store(rules)
	if cfg != nil {
		s.cfg.Store(cfg)
		s.check.Store(check)
	}
	if adminCfg != nil {
		s.adminCfg.Store(adminCfg)
	}
	return nil
}

// adminTLS is the admin listener's TLS config (nil: plain HTTP): each
// handshake takes the config of the moment.
func (s *security) adminTLS() *tls.Config {
	if s.admin.Cert == "" {
		return nil
	}
	return &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) { return s.adminCfg.Load(), nil }}
}

// checkAdmin refuses an admin API listener l (given as addr) off
// loopback without TLS, unless --insecure: its token would cross the
// network in the clear.
func (s *security) checkAdmin(l net.Listener, addr string) error {
	if s.insecure || s.admin.Cert != "" || localListener(l) {
		return nil
	}
	return fmt.Errorf("admin API %s is not on loopback and has no TLS: its token would cross the network in the clear. "+
		"Give --admin-tls-cert and --admin-tls-key, listen on 127.0.0.1, or add --insecure", addr)
}

func (s *security) fail(err error) error {
	s.failing.Store(&err)
	return err
}

// loadTLS builds the TLS config from the files: TLS 1.2 at least, no
// session tickets (every connection's identity comes from a full
// handshake), client certificates verified against the client CA and
// its revocation list.
func (s *security) loadTLS(files TLSFiles, rules *accessRules) (*tls.Config, *certCheck, time.Time, error) {
	var expires time.Time
	cert, err := tls.LoadX509KeyPair(files.Cert, files.Key)
	if err != nil {
		return nil, nil, expires, fmt.Errorf("TLS certificate %s with key %s: %w", files.Cert, files.Key, err)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}, SessionTicketsDisabled: true}
	if leaf := cert.Leaf; leaf != nil {
		expires = leaf.NotAfter
	}
	if files.ClientCA == "" {
		return cfg, nil, expires, nil
	}
	cas, err := readCerts(files.ClientCA)
	if err != nil {
		return nil, nil, expires, fmt.Errorf("TLS client CA %s: %w", files.ClientCA, err)
	}
	cfg.ClientCAs = x509.NewCertPool()
	for _, ca := range cas {
		cfg.ClientCAs.AddCert(ca)
	}
	// Clients must present a certificate unless a rule gives clients
	// without one something; on loopback and Unix sockets the user is
	// known without one (serverTLS picks per listener).
	cfg.ClientAuth = tls.RequireAndVerifyClientCert
	if rules.anonymousAllowed {
		cfg.ClientAuth = tls.VerifyClientCertIfGiven
	}
	check := &certCheck{pool: cfg.ClientCAs, crl: files.CRL}
	if files.CRL != "" {
		var stale []string
		if check.revoked, stale, err = readCRL(files.CRL, cas); err != nil {
			return nil, nil, expires, fmt.Errorf("TLS revocation list %s: %w", files.CRL, err)
		}
		for _, iss := range stale {
			s.log.Warn("a TLS revocation list is past its next update: publish a new one", "file", files.CRL, "issuer", iss)
		}
		cfg.VerifyConnection = func(cs tls.ConnectionState) error { return check.revokedIn(cs.VerifiedChains) }
	}
	return cfg, check, expires, nil
}

// certCheck verifies client certificates against the client CAs and
// their revocation list: at the handshake (the CRL part), and again for
// each open connection once a reload changes either.
type certCheck struct {
	pool    *x509.CertPool
	revoked map[string]bool // "issuer/serial"
	crl     string
}

// revokedIn fails if a certificate of any chain is revoked.
func (c *certCheck) revokedIn(chains [][]*x509.Certificate) error {
	for _, chain := range chains {
		for _, cert := range chain {
			if c.revoked[string(cert.RawIssuer)+"/"+cert.SerialNumber.String()] {
				return fmt.Errorf("certificate %q (serial %s) is revoked by %s", cert.Subject, cert.SerialNumber, c.crl)
			}
		}
	}
	return nil
}

// verify checks a client's chain (leaf first, as it sent it) as the
// handshake did, now.
func (c *certCheck) verify(chain []*x509.Certificate) error {
	if len(chain) == 0 {
		return errors.New("no certificate")
	}
	opts := x509.VerifyOptions{Roots: c.pool, Intermediates: x509.NewCertPool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	for _, ic := range chain[1:] {
		opts.Intermediates.AddCert(ic)
	}
	chains, err := chain[0].Verify(opts)
	if err != nil {
		return err
	}
	return c.revokedIn(chains)
}

func readCerts(file string) ([]*x509.Certificate, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		if blk, b = pem.Decode(b); blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no PEM certificate in it")
	}
	return out, nil
}

// readCRL reads PEM revocation lists, each checked against the client
// CA that signed it (and names it as issuer), into a set of
// "CA subject/serial"; stale names the issuers of lists past their next
// update.
func readCRL(file string, cas []*x509.Certificate) (revoked map[string]bool, stale []string, err error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, nil, err
	}
	revoked = map[string]bool{}
	n := 0
	for {
		var blk *pem.Block
		if blk, b = pem.Decode(b); blk == nil {
			break
		}
		if blk.Type != "X509 CRL" {
			continue
		}
		rl, err := x509.ParseRevocationList(blk.Bytes)
		if err != nil {
			return nil, nil, err
		}
		var signer *x509.Certificate
		for _, ca := range cas {
			if bytes.Equal(rl.RawIssuer, ca.RawSubject) && rl.CheckSignatureFrom(ca) == nil {
				signer = ca
				break
			}
		}
		if signer == nil {
			return nil, nil, fmt.Errorf("revocation list of %q is not signed by a client CA", rl.Issuer)
		}
		for _, e := range rl.RevokedCertificateEntries {
			revoked[string(signer.RawSubject)+"/"+e.SerialNumber.String()] = true
		}
		if !rl.NextUpdate.IsZero() && time.Now().After(rl.NextUpdate) {
			stale = append(stale, rl.Issuer.String())
		}
		n++
	}
	if n == 0 {
		return nil, nil, errors.New("no PEM revocation list (X509 CRL) in it")
	}
	return revoked, stale, nil
}

// changed says whether a file differs from the last reload, or the last
// reload failed (it is retried every poll).
func (s *security) changed() bool {
	if s.failing.Load() != nil {
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.paths() {
		if st, was := stampOf(p), s.stamps[p]; !st.mtime.Equal(was.mtime) || st.size != was.size {
			return true
		}
	}
	return false
}

// identify implements nbd.Server.Identify.
func (s *security) identify(nc net.Conn, cs *tls.ConnectionState) nbd.Identity {
	return &access{p: identify(nc, cs), rules: &s.rules, check: &s.check}
}

// serverTLS is the nbd.Server's TLS config: each handshake takes the
// config of the moment. On loopback and Unix sockets a certificate is
// optional (the user is known without one); elsewhere required unless a
// rule gives clients without one something.
func (s *security) serverTLS() *tls.Config {
	if !s.tlsOn() {
		return nil
	}
	return &tls.Config{GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		cfg := s.cfg.Load()
		if cfg.ClientAuth == tls.RequireAndVerifyClientCert && hello.Conn != nil && localAddr(hello.Conn.LocalAddr()) {
			cfg = cfg.Clone()
			cfg.ClientAuth = tls.VerifyClientCertIfGiven
		}
		return cfg, nil
	}}
}

// localListener says whether a listener only takes clients of this host.
func localListener(l net.Listener) bool { return localAddr(l.Addr()) }

// localAddr says whether a listening address is a Unix socket or on
// loopback.
func localAddr(a net.Addr) bool {
	switch a := a.(type) {
	case *net.UnixAddr:
		return true
	case *net.TCPAddr:
		return a.IP.IsLoopback()
	}
	return false
}

// checkListeners refuses a listener that would let anyone on the network
// in: one off loopback without TLS, or with TLS but neither client
// certificates nor rules; --insecure allows both. names are the
// addresses as given (":10809" rather than "[::]:10809").
func (s *security) checkListeners(ls []net.Listener, names []string) error {
	if s.insecure {
		return nil
	}
	for i, l := range ls {
		name := l.Addr().String()
		if i < len(names) {
			name = names[i]
		}
		switch {
		case localListener(l):
		case !s.tlsOn():
			return fmt.Errorf("NBD listener %s is not on loopback and has no TLS: anyone who reaches it could read and overwrite every volume. "+
				"Give --tls-cert and --tls-key (or --tls-certificates DIR) with --tls-client-ca for client certificates, "+
				"listen on 127.0.0.1 or unix:PATH, or add --insecure to serve it in the clear anyway", name)
		case s.current.ClientCA == "" && s.access == "":
			return fmt.Errorf("NBD listener %s has TLS but no --tls-client-ca and no --access rules: any client could open every volume. "+
				"Give --tls-client-ca (each certificate opens the volume of its name) or --access FILE, or add --insecure", name)
		}
	}
	return nil
}

// describe is the rules in force, for the log at start and --check-access.
func (rs *accessRules) describe() string {
	var b strings.Builder
	fmt.Fprintf(&b, "access rules from %s, first match decides:\n", rs.source)
	for _, r := range rs.rules {
		fmt.Fprintf(&b, "  %-24s %-12s %s\n", r.who, r.volumes, r.mode)
	}
	b.WriteString("  (anything else)            none\n")
	return b.String()
}

// securityPoll is how often the TLS files and the rules file are checked
// for changes (and a failed reload retried).
const securityPoll = 10 * time.Second

// Reload reads the TLS files and the access rules again (SIGHUP does
// this) and closes the NBD connections the new rules refuse, returning
// what it closed. If anything fails to load, nothing changes and the
// error says what.
func (s *Server) Reload() ([]string, error) {
	if err := s.sec.reload(); err != nil {
		s.log.Error("reload failed: the server goes on with the TLS certificates and access rules it had; fix the file and reload again (SIGHUP), it is also retried every "+securityPoll.String(), "error", err)
		return nil, err
	}
	closed := s.nbd.Recheck()
	closed = append(closed, s.adminConns.recheck(s.sec.check.Load(), s.log)...)
	s.log.Info("reloaded the TLS certificates and access rules", "rules", s.sec.rules.Load().source, "connections_closed", len(closed))
	return closed, nil
}

// adminConns tracks the admin API's TLS connections (http.Server's
// ConnState), so that a reload can close those whose client certificate
// the new CAs or revocation list refuse: a kept-alive connection would
// otherwise go on for as long as it is used.
type adminConns struct {
	mu    sync.Mutex
	conns map[*tls.Conn]struct{}
}

func (a *adminConns) track(c net.Conn, st http.ConnState) {
	tc, ok := c.(*tls.Conn)
	if !ok {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	switch st {
	case http.StateActive, http.StateIdle:
		// From the first request on, the handshake is done:
		// ConnectionState will not wait for one.
		if a.conns == nil {
			a.conns = map[*tls.Conn]struct{}{}
		}
		a.conns[tc] = struct{}{}
	case http.StateClosed, http.StateHijacked:
		delete(a.conns, tc)
	}
}

// recheck closes the connections whose client certificate check refuses
// now, and says which.
func (a *adminConns) recheck(check *certCheck, log *slog.Logger) []string {
	if check == nil {
		return nil
	}
	a.mu.Lock()
	conns := make([]*tls.Conn, 0, len(a.conns))
	for c := range a.conns {
		conns = append(conns, c)
	}
	a.mu.Unlock()
	var closed []string
	for _, c := range conns {
		cs := c.ConnectionState()
		if !cs.HandshakeComplete || len(cs.PeerCertificates) == 0 {
			continue
		}
		if err := check.verify(cs.PeerCertificates); err != nil {
			c.Close()
			name, _ := certName(&cs)
			log.Warn("admin API connection closed: its certificate is no longer accepted", "remote", c.RemoteAddr().String(), "identity", "cert:"+name, "why", err)
			closed = append(closed, fmt.Sprintf("admin API cert:%s from %s: %v", name, c.RemoteAddr(), err))
		}
	}
	return closed
}

// pollSecurity reloads when a TLS or rules file changes, until ctx ends.
func (s *Server) pollSecurity(ctx context.Context) {
	t := time.NewTicker(securityPoll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if s.sec.changed() {
				_, _ = s.Reload()
			}
		}
	}
}

// CheckAccess parses a rules file and says what it gives, for serve
// --check-access.
func CheckAccess(file string) (string, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return "", err
	}
	rs, err := parseAccessRules(file, b)
	if err != nil {
		return "", err
	}
	return rs.describe(), nil
}

// DefaultSocketMode is a Unix socket listener's mode unless
// Options.SocketMode says otherwise: its owner and group may connect.
const DefaultSocketMode os.FileMode = 0o660

// socketAccess gives a Unix socket its mode and group (a name or a
// number; "" leaves it). It runs right after the socket is made, and
// the access rules apply to whoever connects meanwhile.
func socketAccess(path string, mode os.FileMode, group string) error {
	if mode == 0 {
		mode = DefaultSocketMode
	}
	if group != "" {
		gid, err := strconv.Atoi(group)
		if err != nil {
			g, lerr := user.LookupGroup(group)
			if lerr != nil {
				return fmt.Errorf("--socket-group %q: no such group", group)
			}
			gid, _ = strconv.Atoi(g.Gid)
		}
		if err := os.Chown(path, -1, gid); err != nil {
			return fmt.Errorf("--socket-group %s: %w", group, err)
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		return fmt.Errorf("--socket-mode %#o: %w", mode, err)
	}
	return nil
}
