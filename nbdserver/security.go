package nbdserver

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/user"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// TLSFiles are the PEM files of NBD's TLS: the server's certificate and
// key, and optionally the CA that signs client certificates and its
// revocation list.
type TLSFiles struct {
	Cert, Key, ClientCA, CRL string
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
	// local: some listener is on loopback or a Unix socket, where users
	// are known without certificates.
	local bool

	cfg      atomic.Pointer[tls.Config]
	adminCfg atomic.Pointer[tls.Config]
	rules    atomic.Pointer[accessRules]

	mu      sync.Mutex           // one reload at a time; guards stamps
	stamps  map[string]time.Time // the files' mtimes at the last reload
	failing atomic.Pointer[error]
	expires atomic.Int64 // the server certificate's NotAfter, Unix seconds
}

func newSecurity(log *slog.Logger, files, admin TLSFiles, access string, insecure, local bool) (*security, error) {
	s := &security{log: log, files: files, admin: admin, access: access, insecure: insecure, local: local}
	if err := s.reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// tlsOn says whether TLS is configured.
func (s *security) tlsOn() bool { return s.files.Cert != "" }

// paths are the files a reload reads.
func (s *security) paths() []string {
	var out []string
	for _, p := range []string{s.files.Cert, s.files.Key, s.files.ClientCA, s.files.CRL, s.access, s.admin.Cert, s.admin.Key} {
		if p != "" {
			out = append(out, p)
		}
	}
	return out
}

// reload reads every file again and swaps the TLS config and the rules
// in together; on an error it keeps what runs and returns why.
func (s *security) reload() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	stamps := map[string]time.Time{}
	for _, p := range s.paths() {
		if fi, err := os.Stat(p); err == nil {
			stamps[p] = fi.ModTime()
		}
	}
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
	if s.tlsOn() {
		var err error
		if cfg, err = s.loadTLS(rules); err != nil {
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
	s.stamps = stamps
	s.failing.Store(nil)
	s.rules.Store(rules)
	if cfg != nil {
		s.cfg.Store(cfg)
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

// checkAdmin refuses an admin API off loopback without TLS, unless
// --insecure: its token would cross the network in the clear.
func (s *security) checkAdmin(addr string) error {
	if addr == "" || s.insecure || s.admin.Cert != "" || localAddress(addr) {
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
func (s *security) loadTLS(rules *accessRules) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(s.files.Cert, s.files.Key)
	if err != nil {
		return nil, fmt.Errorf("TLS certificate %s with key %s: %w", s.files.Cert, s.files.Key, err)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}, SessionTicketsDisabled: true}
	if leaf := cert.Leaf; leaf != nil {
		s.expires.Store(leaf.NotAfter.Unix())
	}
	if s.files.ClientCA == "" {
		return cfg, nil
	}
	cas, err := readCerts(s.files.ClientCA)
	if err != nil {
		return nil, fmt.Errorf("TLS client CA %s: %w", s.files.ClientCA, err)
	}
	cfg.ClientCAs = x509.NewCertPool()
	for _, ca := range cas {
		cfg.ClientCAs.AddCert(ca)
	}
	// Clients must present a certificate unless something is given to
	// clients without one (a rule for anonymous, users on this host).
	cfg.ClientAuth = tls.RequireAndVerifyClientCert
	if rules.anonymousAllowed || s.local {
		cfg.ClientAuth = tls.VerifyClientCertIfGiven
	}
	if s.files.CRL != "" {
		revoked, err := readCRL(s.files.CRL, cas)
		if err != nil {
			return nil, fmt.Errorf("TLS revocation list %s: %w", s.files.CRL, err)
		}
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			for _, chain := range cs.VerifiedChains {
				for _, c := range chain {
					if revoked[string(c.RawIssuer)+"/"+c.SerialNumber.String()] {
						return fmt.Errorf("certificate %q (serial %s) is revoked by %s", c.Subject, c.SerialNumber, s.files.CRL)
					}
				}
			}
			return nil
		}
	}
	return cfg, nil
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

// readCRL reads PEM revocation lists, each checked against the CA that
// signed it, into a set of "issuer/serial".
func readCRL(file string, cas []*x509.Certificate) (map[string]bool, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	revoked := map[string]bool{}
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
			return nil, err
		}
		var signed bool
		for _, ca := range cas {
			if rl.CheckSignatureFrom(ca) == nil {
				signed = true
				break
			}
		}
		if !signed {
			return nil, fmt.Errorf("revocation list of %q is not signed by a client CA", rl.Issuer)
		}
		for _, e := range rl.RevokedCertificateEntries {
			revoked[string(rl.RawIssuer)+"/"+e.SerialNumber.String()] = true
		}
		n++
	}
	if n == 0 {
		return nil, errors.New("no PEM revocation list (X509 CRL) in it")
	}
	return revoked, nil
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
		fi, err := os.Stat(p)
		if err != nil || !fi.ModTime().Equal(s.stamps[p]) {
			return true
		}
	}
	return false
}

// identify implements nbd.Server.Identify.
func (s *security) identify(nc net.Conn, cs *tls.ConnectionState) nbd.Identity {
	return access{p: identify(nc, cs), rules: &s.rules}
}

// serverTLS is the nbd.Server's TLS config: each handshake takes the
// config of the moment.
func (s *security) serverTLS() *tls.Config {
	if !s.tlsOn() {
		return nil
	}
	return &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) { return s.cfg.Load(), nil }}
}

// localListener says whether a listener only takes clients of this host.
func localListener(l net.Listener) bool {
	switch a := l.Addr().(type) {
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
		case s.files.ClientCA == "" && s.access == "":
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

// localAddress says whether a listen address as users write it takes
// clients of this host only: unix:PATH, localhost or a loopback IP.
func localAddress(addr string) bool {
	if strings.HasPrefix(addr, "unix:") {
		return true
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
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
	s.log.Info("reloaded the TLS certificates and access rules", "rules", s.sec.rules.Load().source, "connections_closed", len(closed))
	return closed, nil
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
