package integration

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/client"
	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
	"github.com/nbdvault/nbdvault/internal/testcerts"
)

// libnbdRun runs a libnbd tool with its debug log on, so that the
// server's error messages (which libnbd only logs) show in stderr.
func libnbdRun(t *testing.T, tool string, args ...string) *nbdtest.Result {
	t.Helper()
	return nbdtest.RunEnv(t, cmdTimeout, []string{"LIBNBD_DEBUG=1"}, tool, args...)
}

// exportNames lists what nbdinfo --list shows at uri.
func exportNames(t *testing.T, nbdinfo, uri string) []string {
	t.Helper()
	var names []string
	for _, e := range runNBDInfoJSON(t, nbdinfo, "--list", "--json", uri).Exports {
		names = append(names, e.Name)
	}
	return names
}

// TestNBDAccessTLS runs the real server with TLS and client certificates
// against libnbd's nbdinfo and nbdcopy (nbds:// URIs): a client opens
// what the rules give its certificate and nothing else (NBD_REP_ERR_POLICY
// with a message naming it, for volumes that exist and those that do
// not), --list shows only that; a plaintext client, a certificate of
// another CA and a revoked one are refused; an expired server
// certificate is replaced by SIGHUP and a changed rules file is picked
// up, both without a restart.
func TestNBDAccessTLS(t *testing.T) {
	tools := nbdtest.Tools(t, "nbdinfo", "nbdcopy", "qemu-io")
	nbdinfo, nbdcopy := tools["nbdinfo"], tools["nbdcopy"]
	dir := t.TempDir()
	ca := testcerts.NewCA(t, "nbdvault clients")
	expired := ca.Server(t, time.Now().Add(-48*time.Hour), time.Now().Add(-24*time.Hour))
	serverDir := testcerts.ServerDir(t, filepath.Join(dir, "server"), expired, ca)
	revoked := ca.Client(t, "revoked")
	testcerts.Write(t, filepath.Join(serverDir, "ca-crl.pem"), ca.CRL(t, revoked))
	dbDir := testcerts.ClientDir(t, filepath.Join(dir, "db"), ca, ca.Client(t, "db"))
	restoreDir := testcerts.ClientDir(t, filepath.Join(dir, "restore"), ca, ca.Client(t, "restore"))
	revokedDir := testcerts.ClientDir(t, filepath.Join(dir, "revoked"), ca, revoked)
	other := testcerts.NewCA(t, "another CA")
	wrongDir := testcerts.ClientDir(t, filepath.Join(dir, "wrong"), ca, other.Client(t, "db"))
	rules := filepath.Join(dir, "access")
	require.NoError(t, os.WriteFile(rules, []byte(`# identity  volumes  mode
cert:db       db       rw
cert:restore  *        ro    # snapshots and points in time
cert:revoked  *        rw
`), 0o644))

	s := servertest.Start(t, servertest.Options{Args: []string{"--tls-certificates", serverDir, "--tls-required", "--access", rules}})
	s.MustCLI("volume", "create", "db", "--size", "4M")
	s.MustCLI("volume", "create", "web", "--size", "4M")
	uri := func(export, certs string) string {
		return "nbds://" + s.NBD + "/" + export + "?tls-certificates=" + certs
	}

	// The certificate it started with has expired: clients refuse it.
	r := libnbdRun(t, nbdinfo, "--size", uri("db", dbDir))
	require.NotEqual(t, 0, r.ExitCode, "an expired server certificate is refused:\n%s", r)
	// A renewed one is taken on SIGHUP, without a restart.
	testcerts.ServerDir(t, serverDir, ca.Server(t, time.Time{}, time.Time{}), ca)
	require.NoError(t, syscall.Kill(s.PID(), syscall.SIGHUP))
	require.Eventually(t, func() bool { return nbdtest.Run(t, cmdTimeout, nbdinfo, "--size", uri("db", dbDir)).OK() },
		time.Minute, 200*time.Millisecond, "the renewed certificate is served after SIGHUP:\n%s", s.Log())
	assert.Contains(t, s.Log(), "reloaded the TLS certificates and access rules")

	// Its own volume: data both ways over TLS.
	src := filepath.Join(dir, "src.img")
	want := nbdtest.RandomBytes(41, 4<<20)
	require.NoError(t, os.WriteFile(src, want, 0o600))
	nbdtest.MustRun(t, cmdTimeout, nbdcopy, "--flush", src, uri("db", dbDir))
	back := filepath.Join(dir, "back.img")
	nbdtest.MustRun(t, cmdTimeout, nbdcopy, uri("db", dbDir), back)
	nbdtest.SameBytes(t, want, nbdtest.ReadFile(t, back), "db read back over TLS")
	// qemu's client reads the same folder (tls-creds-x509, endpoint=client).
	host, port, err := net.SplitHostPort(s.NBD)
	require.NoError(t, err)
	qemu := func(export, certs string) *nbdtest.Result {
		return nbdtest.Run(t, cmdTimeout, tools["qemu-io"], "--object", "tls-creds-x509,id=tls0,endpoint=client,dir="+certs,
			"--image-opts", "driver=nbd,server.type=inet,server.host="+host+",server.port="+port+",export="+export+",tls-creds=tls0",
			"-c", "read 3M 64k")
	}
	r = qemu("db", dbDir)
	assert.True(t, r.OK(), "qemu-io over TLS with a client certificate:\n%s", r)
	r = qemu("web", dbDir)
	assert.False(t, r.OK(), "qemu-io on a volume the certificate may not open:\n%s", r)
	assert.Contains(t, r.Stderr, `cert:db may not use volume "web"`, "qemu shows the server's message")
	s.MustCLI("snapshot", "create", "db", "--wait")
	snaps, err := s.API().Snapshots(t.Context(), "db")
	require.NoError(t, err)
	require.Len(t, snaps, 1)
	snap := snaps[0]

	assert.Equal(t, []string{"db", "db@" + snap.ID}, exportNames(t, nbdinfo, uri("", dbDir)), "--list shows what the certificate may open: rw, its head and snapshots")
	assert.Equal(t, []string{"db@" + snap.ID}, exportNames(t, nbdinfo, uri("", restoreDir)), "ro: snapshots, never heads")

	// Anything else is refused by policy, saying who and why, whether the
	// volume exists or not.
	for _, tc := range []struct{ export, certs, msg string }{
		{"web", dbDir, `cert:db may not use volume "web": no access rule gives it that volume`},
		{"nosuch", dbDir, `cert:db may not use volume "nosuch"`},
		{"db", restoreDir, `cert:restore may not use the head of volume "db", only its snapshots`},
	} {
		r := libnbdRun(t, nbdinfo, "--size", uri(tc.export, tc.certs))
		assert.NotEqual(t, 0, r.ExitCode, "%s with %s:\n%s", tc.export, tc.certs, r)
		assert.Contains(t, r.Stderr, tc.msg, "%s with %s", tc.export, tc.certs)
	}
	// A snapshot reads as it was, for the certificate given ro.
	nbdtest.MustRun(t, cmdTimeout, nbdcopy, uri("db@"+snap.ID, restoreDir), back+".snap")
	nbdtest.SameBytes(t, want, nbdtest.ReadFile(t, back+".snap"), "the snapshot over TLS")

	// nbdvault's own restore and push over TLS, with the files given one
	// by one; without them, told what to give.
	restored := filepath.Join(dir, "restored.img")
	r = s.CLI("restore", "db@"+snap.ID, "--to", restored)
	assert.Equal(t, 1, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, "the server requires TLS: give --tls-ca FILE")
	withCert := func(certs string) []string {
		return []string{"--tls-ca", filepath.Join(certs, "ca-cert.pem"), "--tls-cert", filepath.Join(certs, "client-cert.pem"), "--tls-key", filepath.Join(certs, "client-key.pem")}
	}
	s.MustCLI(append([]string{"restore", "db@" + snap.ID, "--to", restored}, withCert(restoreDir)...)...)
	nbdtest.SameBytes(t, want, nbdtest.ReadFile(t, restored), "nbdvault restore over TLS")
	// mount does not speak TLS to NBD yet (nbdfuse takes no local files
	// in a URI): against a listener that requires it, it says so.
	r = s.CLI("mount", "db@"+snap.ID, t.TempDir())
	assert.Equal(t, 1, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, "requires TLS")
	pushed := nbdtest.RandomBytes(43, 4<<20)
	require.NoError(t, os.WriteFile(src, pushed, 0o600))
	r = s.CLI(append([]string{"client", "push", "--from", src, "--to", "web"}, withCert(dbDir)...)...)
	assert.Equal(t, 1, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, `cert:db may not use volume "web"`)
	s.MustCLI(append([]string{"client", "push", "--from", src, "--to", "db"}, withCert(dbDir)...)...)
	nbdtest.MustRun(t, cmdTimeout, nbdcopy, uri("db", dbDir), back)
	nbdtest.SameBytes(t, pushed, nbdtest.ReadFile(t, back), "nbdvault client push over TLS")

	// No TLS, another CA's certificate, a revoked one: no way in.
	r = libnbdRun(t, nbdinfo, "--size", s.URI("db"))
	assert.NotEqual(t, 0, r.ExitCode, "plaintext:\n%s", r)
	assert.Contains(t, r.Stderr, "this server requires TLS")
	// gnutls does not send a certificate the server's CA did not sign, so
	// that client is a local user with no rule; the revoked one fails
	// the handshake.
	r = libnbdRun(t, nbdinfo, "--size", uri("db", wrongDir))
	assert.NotEqual(t, 0, r.ExitCode, "another CA's certificate:\n%s", r)
	assert.Contains(t, r.Stderr, fmt.Sprintf("uid:%d", os.Getuid()))
	assert.Contains(t, r.Stderr, `may not use volume "db"`)
	r = libnbdRun(t, nbdinfo, "--size", uri("db", revokedDir))
	assert.NotEqual(t, 0, r.ExitCode, "a revoked certificate:\n%s", r)
	assert.Contains(t, s.Log(), "is revoked by "+filepath.Join(serverDir, "ca-crl.pem"))

	// A changed rules file is read within the poll interval; a broken one
	// is refused and the rules in force stay.
	require.NoError(t, os.WriteFile(rules, []byte("cert:db web rw\n"), 0o644))
	require.Eventually(t, func() bool {
		return slices.Equal([]string{"web"}, exportNames(t, nbdinfo, uri("", dbDir)))
	}, time.Minute, time.Second, "the new rules are in force:\n%s", s.Log())
	require.NoError(t, os.WriteFile(rules, []byte("cert:db web sometimes\n"), 0o644))
	require.Eventually(t, func() bool {
		return strings.Contains(s.Log(), `line 1: mode \"sometimes\": want rw, ro, snapshots, none or admin`)
	},
		time.Minute, time.Second, "the broken rules file is noticed:\n%s", s.Log())
	assert.Contains(t, s.Metrics(), "nbdvault_tls_reload_failing 1")
	nbdtest.MustRun(t, cmdTimeout, nbdinfo, "--size", uri("web", dbDir))

	// A revocation list that names db's certificate, dropped in and
	// reloaded, closes its open connection and refuses new ones. (The
	// rules file is mended first: a reload is all or nothing.)
	require.NoError(t, os.WriteFile(rules, []byte("cert:db web rw\n"), 0o644))
	pair, err := tls.LoadX509KeyPair(filepath.Join(dbDir, "client-cert.pem"), filepath.Join(dbDir, "client-key.pem"))
	require.NoError(t, err)
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	c, err := client.Dial(t.Context(), s.NBD, client.Options{Export: "web",
		TLS: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}, ServerName: "127.0.0.1"}})
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.ReadAt(t.Context(), make([]byte, 4096), 0))
	dbCert, err := x509.ParseCertificate(pair.Certificate[0])
	require.NoError(t, err)
	testcerts.Write(t, filepath.Join(serverDir, "ca-crl.pem"), ca.CRL(t, revoked, &testcerts.Pair{Cert: dbCert}))
	require.NoError(t, syscall.Kill(s.PID(), syscall.SIGHUP))
	require.Eventually(t, func() bool { return strings.Contains(s.Log(), "its certificate is no longer accepted") },
		time.Minute, 100*time.Millisecond, "%s", s.Log())
	assert.Error(t, c.ReadAt(t.Context(), make([]byte, 4096), 0), "the revoked certificate's connection is closed")
	r = libnbdRun(t, nbdinfo, "--size", uri("web", dbDir))
	assert.NotEqual(t, 0, r.ExitCode, "and it cannot connect again:\n%s", r)
}

// TestNBDAccessDefaults is the reproduction: without a rules file
// another user of the backup host (nobody) can neither list, read nor
// write a volume, over loopback TCP or the Unix socket, and is told why;
// the server's own user (root here) can.
func TestNBDAccessDefaults(t *testing.T) {
	nbdtest.RequireRoot(t, "runs clients as user nobody")
	tools := nbdtest.Tools(t, "nbdinfo", "setpriv")
	nbdinfo := tools["nbdinfo"]
	sockDir, err := os.MkdirTemp("", "nbdvault-access-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	require.NoError(t, os.Chmod(sockDir, 0o755))
	sock := filepath.Join(sockDir, "nbd.sock")
	// A mode and group that let nobody connect, so that the rules decide.
	s := servertest.Start(t, servertest.Options{Args: []string{"--listen", "unix:" + sock, "--socket-mode", "0666", "--socket-group", "65534"}})
	s.MustCLI("volume", "create", "db", "--size", "1M")
	fi, err := os.Stat(sock)
	require.NoError(t, err)
	assert.Equal(t, os.ModeSocket|0o666, fi.Mode(), "--socket-mode")
	assert.EqualValues(t, 65534, fi.Sys().(*syscall.Stat_t).Gid, "--socket-group")
	unixURI := "nbd+unix:///db?socket=" + sock

	asNobody := func(args ...string) *nbdtest.Result {
		return nbdtest.RunEnv(t, cmdTimeout, []string{"LIBNBD_DEBUG=1"}, tools["setpriv"],
			append([]string{"--reuid=65534", "--regid=65534", "--clear-groups", nbdinfo}, args...)...)
	}
	for _, uri := range []string{s.URI("db"), unixURI} {
		nbdtest.MustRun(t, cmdTimeout, nbdinfo, "--size", uri)
		r := asNobody("--size", uri)
		assert.NotEqual(t, 0, r.ExitCode, "%s as nobody:\n%s", uri, r)
		assert.Contains(t, r.Stderr, `uid:65534 (nobody) may not use volume "db"`, uri)
		r = asNobody("--list", "--json", strings.Replace(uri, "/db", "/", 1))
		assert.NotContains(t, r.Stdout, `"db"`, "%s: nobody lists nothing", uri)
	}
	assert.Equal(t, []string{"db"}, exportNames(t, nbdinfo, s.URI("")), "root lists it")
}

// TestServeRefusesOpenListener: serve refuses to listen off loopback
// without TLS, or with TLS and neither client certificates nor rules,
// saying what to give; wrong TLS flags are usage errors. It runs in a
// network namespace of its own, so 0.0.0.0 is reachable from nowhere.
func TestServeRefusesOpenListener(t *testing.T) {
	nbdtest.RequireRoot(t, "makes a network namespace")
	unshare := nbdtest.Tool(t, "unshare")
	bin := servertest.Binary(t)
	certs := nbdtest.NewCerts(t)
	noCA := filepath.Join(t.TempDir(), "noca")
	require.NoError(t, os.MkdirAll(noCA, 0o755))
	for _, f := range []string{"server-cert.pem", "server-key.pem"} {
		b, err := os.ReadFile(filepath.Join(certs.ServerDir, f))
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(noCA, f), b, 0o600))
	}
	serve := func(args ...string) *nbdtest.Result {
		a := append([]string{"--net", bin, "serve", "--data", t.TempDir(), "--admin", "127.0.0.1:0"}, args...)
		return nbdtest.Run(t, cmdTimeout, unshare, a...)
	}
	r := serve("--listen", "0.0.0.0:10809")
	assert.Equal(t, 1, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, "NBD listener 0.0.0.0:10809 is not on loopback and has no TLS")
	assert.Contains(t, r.Stderr, "--insecure")
	r = serve("--listen", "0.0.0.0:10809", "--tls-certificates", noCA)
	assert.Equal(t, 1, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, "has TLS but no --tls-client-ca and no --access rules")
	r = nbdtest.Run(t, cmdTimeout, unshare, "--net", bin, "serve", "--data", t.TempDir(), "--listen", "127.0.0.1:0", "--admin", "0.0.0.0:10810")
	assert.Equal(t, 1, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, "admin API 0.0.0.0:10810 is not on loopback and has no TLS")

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--tls-cert", "x.pem"}, "--tls-cert and --tls-key go together"},
		{[]string{"--tls-client-ca", "ca.pem"}, "need TLS"},
		{[]string{"--tls-certificates", "/nonexistent"}, "not a folder"},
		{[]string{"--tls-certificates", t.TempDir()}, "the folder needs server-cert.pem and server-key.pem"},
		{[]string{"--check-access", "/nonexistent"}, "--check-access"},
		{[]string{"--socket-mode", "999"}, "--socket-mode \"999\": want an octal mode"},
		{[]string{"--admin-tls-cert", "x.pem"}, "--admin-tls-cert and --admin-tls-key go together"},
		{[]string{"--scoped-snapshot-interval", "-1s"}, "--scoped-snapshot-interval"},
	} {
		r := nbdtest.Run(t, cmdTimeout, bin, append([]string{"serve", "--data", t.TempDir()}, tc.args...)...)
		assert.Equal(t, 2, r.ExitCode, "%v: %s", tc.args, r)
		assert.Contains(t, r.Stderr, tc.want, tc.args)
	}
	rules := filepath.Join(t.TempDir(), "rules")
	require.NoError(t, os.WriteFile(rules, []byte("cert:db db rw\nanonymous * nothing\n"), 0o644))
	r = nbdtest.Run(t, cmdTimeout, bin, "serve", "--check-access", rules)
	assert.Equal(t, 2, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, "line 2: mode \"nothing\"")
	require.NoError(t, os.WriteFile(rules, []byte("cert:db db rw\n"), 0o644))
	r = nbdtest.MustRun(t, cmdTimeout, bin, "serve", "--check-access", rules)
	assert.Contains(t, r.Stdout, "cert:db")
}

// TestNBDAccessReload: a reload that takes a volume from a client closes
// the client's open connection to it (and says so in the log), and new
// connections are refused; the volume it now has opens.
func TestNBDAccessReload(t *testing.T) {
	rules := filepath.Join(t.TempDir(), "access")
	me := fmt.Sprintf("uid:%d", os.Getuid())
	require.NoError(t, os.WriteFile(rules, []byte(me+" db rw\n"), 0o644))
	s := servertest.Start(t, servertest.Options{Args: []string{"--access", rules}})
	s.MustCLI("volume", "create", "db", "--size", "1M")
	s.MustCLI("volume", "create", "web", "--size", "1M")
	c, err := client.Dial(t.Context(), s.NBD, client.Options{Export: "db"})
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.WriteAt(t.Context(), []byte("before"), 0, false))
	require.NoError(t, c.Flush(t.Context()))

	// Checked first: the open connection is the one it would close.
	candidate := filepath.Join(t.TempDir(), "candidate")
	require.NoError(t, os.WriteFile(candidate, []byte(me+" web rw\n"), 0o644))
	r := s.MustCLI("access", "check", candidate)
	assert.Contains(t, r.Stdout, "1 rules")
	assert.Contains(t, r.Stdout, "closes 1 open NBD connection")
	assert.Contains(t, r.Stdout, `may not use volume "db"`)
	require.NoError(t, os.WriteFile(candidate, []byte(me+" * rw\n"), 0o644))
	assert.Contains(t, s.MustCLI("access", "check", candidate).Stdout, "closes no open NBD connection")
	require.NoError(t, os.WriteFile(candidate, []byte(me+" * rwx\n"), 0o644))
	r = s.CLI("access", "check", candidate)
	assert.Equal(t, 2, r.ExitCode, "%s", r)
	assert.Contains(t, r.Stderr, "line 1")

	require.NoError(t, os.WriteFile(rules, []byte(me+" web rw\n"), 0o644))
	require.NoError(t, syscall.Kill(s.PID(), syscall.SIGHUP))
	require.Eventually(t, func() bool {
		return strings.Contains(s.Log(), "nbd connection closed: the access rules no longer allow it")
	},
		time.Minute, 100*time.Millisecond, "%s", s.Log())
	assert.Error(t, c.ReadAt(t.Context(), make([]byte, 512), 0), "the connection is closed")
	_, err = client.Dial(t.Context(), s.NBD, client.Options{Export: "db"})
	if assert.Error(t, err) {
		assert.Contains(t, err.Error(), me)
		assert.Contains(t, err.Error(), `may not use volume "db"`)
	}
	writeNBD(t, s, "web", []byte("after"), 0)
}

// TestMountOverTLS: nbdvault import and mount against a server that
// requires TLS, with client certificates: the image goes in over TLS
// with the certificate given rw, and the snapshot mounts through nbdfuse
// and the relay (nbdfuse takes no TLS files in a URI) with the one given
// ro, holding the files.
func TestMountOverTLS(t *testing.T) {
	dir := t.TempDir()
	ca := testcerts.NewCA(t, "nbdvault")
	serverDir := testcerts.ServerDir(t, filepath.Join(dir, "server"), ca.Server(t, time.Time{}, time.Time{}), ca)
	rules := filepath.Join(dir, "access")
	require.NoError(t, os.WriteFile(rules, []byte("cert:db db rw\ncert:restore * ro\n"), 0o644))
	m := startMountRigWith(t, servertest.Options{Args: []string{"--tls-certificates", serverDir, "--tls-required", "--access", rules}})
	certFlags := func(name string) []string {
		d := testcerts.ClientDir(t, filepath.Join(dir, name), ca, ca.Client(t, name))
		return []string{"--tls-ca", filepath.Join(d, "ca-cert.pem"), "--tls-cert", filepath.Join(d, "client-cert.pem"), "--tls-key", filepath.Join(d, "client-key.pem")}
	}
	m.s.MustCLI("volume", "create", "db", "--size", "16M")
	files := map[string][]byte{"hello.txt": []byte("over TLS\n"), "data/random.bin": nbdtest.RandomBytes(47, 256<<10)}
	img := m.ext4Image(files, 16<<20)
	m.s.MustCLI(append([]string{"import", "db", "--from", img, "--label", "tls"}, certFlags("db")...)...)

	mnt := m.mountDir()
	r := m.cli("mount", "db@tls", mnt)
	assert.NotEqual(t, 0, r.ExitCode, "without TLS:\n%s", r)
	m.mustCLI(append([]string{"mount", "db@tls", mnt}, certFlags("restore")...)...)
	sameFiles(t, files, mnt, "db@tls mounted over TLS")
	m.mustCLI("umount", mnt)
}

// TestAttachTLSRefusals: client attach takes the TLS flags, and each
// mistake is told what to do before any device is touched (the handshake comes first; this host has no nbd module, so
// the VM's TestClientAttachOverTLS attaches for real). A handshake that
// works goes on to the device.
func TestAttachTLSRefusals(t *testing.T) {
	dir := t.TempDir()
	ca := testcerts.NewCA(t, "nbdvault")
	serverDir := testcerts.ServerDir(t, filepath.Join(dir, "server"), ca.Server(t, time.Time{}, time.Time{}), ca)
	revoked := ca.Client(t, "revoked")
	testcerts.Write(t, filepath.Join(serverDir, "ca-crl.pem"), ca.CRL(t, revoked))
	dbDir := testcerts.ClientDir(t, filepath.Join(dir, "db"), ca, ca.Client(t, "db"))
	revokedDir := testcerts.ClientDir(t, filepath.Join(dir, "revoked"), ca, revoked)
	other := testcerts.NewCA(t, "another CA")
	otherDir := testcerts.ClientDir(t, filepath.Join(dir, "other"), other, other.Client(t, "db"))
	rules := filepath.Join(dir, "access")
	require.NoError(t, os.WriteFile(rules, []byte("cert:db db rw\ncert:revoked * rw\n"), 0o644))
	s := servertest.Start(t, servertest.Options{Args: []string{"--tls-certificates", serverDir, "--tls-required", "--access", rules}})
	s.MustCLI("volume", "create", "db", "--size", "4M")

	dev := filepath.Join(dir, "nbd0") // no such device: a handshake that works ends there
	attach := func(certs string, flags ...string) *nbdtest.Result {
		args := []string{"client", "attach", "--server", s.NBD, "--export", "db"}
		if certs != "" {
			args = append(args, "--tls-ca", filepath.Join(certs, "ca-cert.pem"))
		}
		return s.CLI(append(append(args, flags...), dev)...)
	}
	cert := func(certs string) []string {
		return []string{"--tls-cert", filepath.Join(certs, "client-cert.pem"), "--tls-key", filepath.Join(certs, "client-key.pem")}
	}
	for _, tc := range []struct {
		what string
		r    *nbdtest.Result
		msg  string
	}{
		{"plaintext", attach(""), "the server requires TLS: give --tls-ca FILE"},
		{"another CA", attach(otherDir, cert(dbDir)...),
			"the server's certificate is not signed by the CA in --tls-ca " + filepath.Join(otherDir, "ca-cert.pem") + ": give --tls-ca with the CA that signed the server's certificate"},
		{"no certificate", attach(dbDir), `may not use volume "db"`},
		{"a revoked certificate", attach(dbDir, cert(revokedDir)...),
			"the server does not accept the client certificate in --tls-cert " + filepath.Join(revokedDir, "client-cert.pem")},
		{"a certificate the rules let in", attach(dbDir, cert(dbDir)...), "open " + dev + ": no such file or directory (is the nbd module loaded? modprobe nbd)"},
	} {
		assert.Equal(t, 1, tc.r.ExitCode, "%s:\n%s", tc.what, tc.r)
		assert.Contains(t, tc.r.Stderr, "attach db to "+dev+": ", tc.what)
		assert.Contains(t, tc.r.Stderr, tc.msg, tc.what)
	}
}
