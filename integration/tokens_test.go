package integration

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
	"github.com/nbdvault/nbdvault/internal/testcerts"
)

// TestScopedTokens: a token made with `token create --volume db --scope
// snapshot` snapshots db (at most once per --scoped-snapshot-interval)
// and reads its status, and can do nothing else: no other volume, no
// delete, prune, gc, token or metrics; status shows it db alone, without
// space figures. token list never shows a secret, the data folder holds
// none, and a revoked token is refused.
func TestScopedTokens(t *testing.T) {
	s := servertest.Start(t, servertest.Options{Args: []string{"--scoped-snapshot-interval", "1h"}})
	s.MustCLI("volume", "create", "db", "--size", "1M")
	s.MustCLI("volume", "create", "web", "--size", "1M")
	s.MustCLI("snapshot", "create", "web", "--wait")
	tok := strings.TrimSpace(s.MustCLI("token", "create", "--volume", "db", "--scope", "snapshot").Stdout)
	require.True(t, strings.HasPrefix(tok, "nbdvault-"), tok)
	push := strings.TrimSpace(s.MustCLI("token", "create", "--volume", "db", "--scope", "push").Stdout)
	as := func(token string, args ...string) *nbdtest.Result {
		// No data folder: the token is all it has.
		return nbdtest.RunEnv(t, cmdTimeout, []string{"NBDVAULT_SERVER=" + s.Admin, "NBDVAULT_TOKEN=" + token, "NBDVAULT_DATA=/nonexistent"}, servertest.Binary(t), args...)
	}

	r := as(tok, "snapshot", "create", "db", "--label", "from-the-host")
	require.True(t, r.OK(), "%s", r)
	r = as(tok, "snapshot", "create", "db")
	assert.Equal(t, 6, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, `may take a snapshot of "db" once every 1h0m0s (serve --scoped-snapshot-interval): try again in`)
	// Keeping a point in time is a snapshot too: spaced alike.
	r = as(tok, "snapshot", "create", "db", "--from", time.Now().UTC().Format(time.RFC3339))
	assert.Equal(t, 6, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, "once every 1h0m0s")
	snaps, err := s.API().Snapshots(t.Context(), "db")
	require.NoError(t, err)
	assert.Len(t, snaps, 1, "one snapshot taken")
	s.MustCLI("snapshot", "create", "db") // the admin token is not limited

	for _, args := range [][]string{
		{"snapshot", "create", "web"},
		{"snapshot", "list", "web"},
		{"snapshot", "delete", "db@from-the-host"},
		{"prune", "db", "--keep-last", "1"},
		{"volume", "set", "db", "--keep-last", "1"},
		{"volume", "delete", "db"},
		{"volume", "create", "new", "--size", "1M"},
		{"gc"},
		{"verify"},
		{"token", "list"},
		{"token", "create", "--volume", "db"},
	} {
		r := as(tok, args...)
		assert.Equal(t, 4, r.ExitCode, "%v: %s", args, r)
		assert.Contains(t, r.Stderr, "may not", "%v", args)
	}
	assert.Contains(t, as(tok, "snapshot", "list", "db").Stdout, "from-the-host")
	r = as(tok, "status", "--json")
	require.True(t, r.OK(), "%s", r)
	assert.Contains(t, r.Stdout, `"db"`)
	assert.NotContains(t, r.Stdout, `"web"`, "a scoped token sees its volume only")
	assert.NotContains(t, r.Stdout, `"space"`, "and no space figures")
	assert.NotContains(t, as(tok, "volume", "list").Stdout, "web")
	req, err := http.NewRequest(http.MethodGet, s.Admin+"/metrics", nil)
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusForbidden, resp.StatusCode, "/metrics")

	// push reads chunk IDs too; snapshot does not.
	src := filepath.Join(t.TempDir(), "src.img")
	require.NoError(t, os.WriteFile(src, nbdtest.RandomBytes(5, 1<<20), 0o600))
	r = as(tok, "client", "push", "--from", src, "--to", "db")
	assert.Equal(t, 4, r.ExitCode, "%s", r)
	r = as(push, "client", "push", "--from", src, "--to", "db")
	assert.True(t, r.OK(), "%s", r)

	list := s.MustCLI("token", "list").Stdout
	assert.Contains(t, list, "snapshot")
	assert.Contains(t, list, "push")
	secret := tok[strings.LastIndex(tok, "-")+1:]
	assert.NotContains(t, list, secret, "token list never shows a secret")
	data, err := os.ReadFile(filepath.Join(s.Data, "tokens.json"))
	require.NoError(t, err)
	assert.NotContains(t, string(data), secret, "the data folder keeps hashes only")

	id := strings.Split(strings.TrimPrefix(tok, "nbdvault-"), "-")[0]
	s.MustCLI("token", "revoke", id)
	r = as(tok, "status")
	assert.Equal(t, 4, r.ExitCode, "a revoked token:\n%s", r)
	assert.Contains(t, r.Stderr, "refused the token")
	s.Stop()
	s.Restart()
	assert.True(t, as(push, "status").OK(), "tokens outlive a restart")
	assert.Equal(t, 4, as(tok, "status").ExitCode, "and so do revocations")

	// Deleting a volume revokes its tokens: a new volume of that name is
	// not theirs.
	s.MustCLI("volume", "delete", "db", "--force")
	s.MustCLI("volume", "create", "db", "--size", "1M")
	r = as(push, "status")
	assert.Equal(t, 4, r.ExitCode, "%s", r)
	assert.NotContains(t, s.MustCLI("token", "list").Stdout, "push")
}

// TestAdminTLS: the admin API over HTTPS. The CLI trusts the server with
// --tls-ca; a client certificate is an identity as on NBD (by default,
// rw on the volume of its name: status, snapshots and push of it); plain
// HTTP and an untrusted server are refused.
func TestAdminTLS(t *testing.T) {
	dir := t.TempDir()
	ca := testcerts.NewCA(t, "nbdvault")
	serverDir := testcerts.ServerDir(t, filepath.Join(dir, "server"), ca.Server(t, time.Time{}, time.Time{}), ca)
	dbDir := testcerts.ClientDir(t, filepath.Join(dir, "db"), ca, ca.Client(t, "db"))
	s := servertest.Start(t, servertest.Options{Args: []string{"--tls-certificates", serverDir,
		"--admin-tls-cert", filepath.Join(serverDir, "server-cert.pem"), "--admin-tls-key", filepath.Join(serverDir, "server-key.pem"),
		"--scoped-snapshot-interval", "0"}})
	https := strings.Replace(s.Admin, "http://", "https://", 1)
	caFile := filepath.Join(dbDir, "ca-cert.pem")
	cli := func(env []string, args ...string) *nbdtest.Result {
		return nbdtest.RunEnv(t, cmdTimeout, append(s.Env(), append([]string{"NBDVAULT_SERVER=" + https}, env...)...), servertest.Binary(t), args...)
	}
	withCA := []string{"NBDVAULT_TLS_CA=" + caFile}
	for _, name := range []string{"db", "web"} {
		r := cli(withCA, "volume", "create", name, "--size", "1M")
		require.True(t, r.OK(), "the admin token over HTTPS:\n%s", r)
	}
	r := cli(nil, "status")
	assert.Equal(t, 5, r.ExitCode, "a server the system does not trust:\n%s", r)
	assert.Contains(t, r.Stderr, "certificate")
	r = nbdtest.RunEnv(t, cmdTimeout, s.Env(), servertest.Binary(t), "status")
	assert.NotEqual(t, 0, r.ExitCode, "plain HTTP to the HTTPS port:\n%s", r)

	// A client certificate and no token: db, and only db.
	cert := []string{"NBDVAULT_TLS_CA=" + caFile, "NBDVAULT_CLIENT_CERT=" + filepath.Join(dbDir, "client-cert.pem"),
		"NBDVAULT_CLIENT_KEY=" + filepath.Join(dbDir, "client-key.pem"), "NBDVAULT_DATA=/nonexistent"}
	r = cli(cert, "snapshot", "create", "db", "--label", "by-cert")
	require.True(t, r.OK(), "%s", r)
	r = cli(cert, "volume", "list")
	require.True(t, r.OK(), "%s", r)
	assert.Contains(t, r.Stdout, "db")
	assert.NotContains(t, r.Stdout, "web")
	for _, args := range [][]string{{"snapshot", "create", "web"}, {"volume", "delete", "db"}, {"gc"}} {
		r := cli(cert, args...)
		assert.Equal(t, 4, r.ExitCode, "%v: %s", args, r)
		assert.Contains(t, r.Stderr, "cert:db may not", "%v", args)
	}
	assert.Contains(t, s.Log(), `by=cert:db`)

	// A kept-alive connection whose certificate a new revocation list
	// names is closed on the reload: the next request redials and is
	// refused.
	pair, err := tls.LoadX509KeyPair(filepath.Join(dbDir, "client-cert.pem"), filepath.Join(dbDir, "client-key.pem"))
	require.NoError(t, err)
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}}}}
	get := func() error {
		resp, err := hc.Get(https + "/v1/volumes/db")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("status %s", resp.Status)
		}
		return nil
	}
	require.NoError(t, get())
	dbCert, err := x509.ParseCertificate(pair.Certificate[0])
	require.NoError(t, err)
	testcerts.Write(t, filepath.Join(serverDir, "ca-crl.pem"), ca.CRL(t, &testcerts.Pair{Cert: dbCert}))
	require.NoError(t, syscall.Kill(s.PID(), syscall.SIGHUP))
	require.Eventually(t, func() bool { return strings.Contains(s.Log(), "admin API connection closed") },
		time.Minute, 100*time.Millisecond, "%s", s.Log())
	assert.Error(t, get(), "the revoked certificate gets no answer")

	// A certificate whose volume does not exist learns nothing of the
	// others from the not-found.
	ghostDir := testcerts.ClientDir(t, filepath.Join(dir, "ghost"), ca, ca.Client(t, "ghost"))
	ghost := []string{"NBDVAULT_TLS_CA=" + caFile, "NBDVAULT_CLIENT_CERT=" + filepath.Join(ghostDir, "client-cert.pem"),
		"NBDVAULT_CLIENT_KEY=" + filepath.Join(ghostDir, "client-key.pem"), "NBDVAULT_DATA=/nonexistent"}
	r = cli(ghost, "volume", "show", "ghost")
	assert.Equal(t, 3, r.ExitCode, "%s", r)
	assert.NotContains(t, r.Stderr, "web", "%s", r)
	assert.NotContains(t, r.Stderr, "db", "%s", r)
}
