package nbdserver

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/internal/testcerts"
)

// writeTLSFiles writes a server certificate of ca for loopback, ca as
// the client CA, and crl (if any) into a folder, and names them.
func writeTLSFiles(t *testing.T, ca *testcerts.CA, crl []byte) TLSFiles {
	t.Helper()
	dir := t.TempDir()
	srv := ca.Server(t, time.Time{}, time.Time{})
	f := TLSFiles{Cert: filepath.Join(dir, "cert.pem"), Key: filepath.Join(dir, "key.pem"), ClientCA: filepath.Join(dir, "ca.pem")}
	require.NoError(t, os.WriteFile(f.Cert, srv.CertPEM, 0o600))
	require.NoError(t, os.WriteFile(f.Key, srv.KeyPEM, 0o600))
	require.NoError(t, os.WriteFile(f.ClientCA, ca.PEM, 0o600))
	if crl != nil {
		f.CRL = filepath.Join(dir, "crl.pem")
		require.NoError(t, os.WriteFile(f.CRL, crl, 0o600))
	}
	return f
}

// localConn is a connection that says it was accepted on local.
type localConn struct {
	net.Conn
	local net.Addr
}

func (c localConn) LocalAddr() net.Addr { return c.local }

// handshake runs a TLS handshake between a client (with cert, or none)
// and the server config on a connection accepted at listener, and
// returns the server's error.
func handshake(t *testing.T, server *tls.Config, ca *testcerts.CA, cert *testcerts.Pair, listener net.Addr) error {
	t.Helper()
	sc, cc := net.Pipe()
	defer sc.Close()
	defer cc.Close()
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	ccfg := &tls.Config{RootCAs: roots, ServerName: "localhost"}
	if cert != nil {
		pair, err := tls.X509KeyPair(cert.CertPEM, cert.KeyPEM)
		require.NoError(t, err)
		ccfg.Certificates = []tls.Certificate{pair}
	}
	client := make(chan struct{})
	go func() {
		defer close(client)
		c := tls.Client(cc, ccfg)
		if c.Handshake() == nil {
			// TLS 1.3: the server checks the client's certificate after
			// the client is done; read until the server answers or closes.
			_, _ = c.Read(make([]byte, 1))
		}
		cc.Close()
	}()
	s := tls.Server(localConn{sc, listener}, server)
	err := s.Handshake()
	if err == nil {
		_, err = s.Write([]byte{0}) // let the client's read return
	}
	sc.Close()
	<-client
	return err
}

// TestClientCertPerListener: with a client CA and no rule for clients
// without a certificate, a listener off loopback requires a client
// certificate; one on loopback or a Unix socket takes a client without
// one (its user is known otherwise), and with one.
func TestClientCertPerListener(t *testing.T) {
	ca := testcerts.NewCA(t, "clients")
	sec, err := newSecurity(slog.New(slog.DiscardHandler), writeTLSFiles(t, ca, nil), TLSFiles{}, "", false)
	require.NoError(t, err)
	require.Equal(t, tls.RequireAndVerifyClientCert, sec.cfg.Load().ClientAuth)
	server := sec.serverTLS()
	client := ca.Client(t, "db")

	remote := &net.TCPAddr{IP: net.ParseIP("192.0.2.7"), Port: 10809}
	any6 := &net.TCPAddr{IP: net.IPv6unspecified, Port: 10809}
	loop4 := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 10809}
	loop6 := &net.TCPAddr{IP: net.IPv6loopback, Port: 10809}
	sock := &net.UnixAddr{Name: "/run/nbdvault.sock", Net: "unix"}

	for _, l := range []net.Addr{remote, any6} {
		err := handshake(t, server, ca, nil, l)
		if assert.Error(t, err, "a client without a certificate on a listener at %s", l) {
			assert.Contains(t, err.Error(), "client didn't provide a certificate")
		}
		assert.NoError(t, handshake(t, server, ca, client, l), "a client with a certificate on %s", l)
	}
	for _, l := range []net.Addr{loop4, loop6, sock} {
		assert.NoError(t, handshake(t, server, ca, nil, l), "a client without a certificate on a listener at %s", l)
		assert.NoError(t, handshake(t, server, ca, client, l), "a client with a certificate on %s", l)
	}
}

// TestAbstractSocketWithMode: --socket-mode gives a Unix socket file its
// mode, and an abstract socket (unix:@NAME), which has no file, is
// served all the same: the server starts and greets a client on it.
func TestAbstractSocketWithMode(t *testing.T) {
	file := filepath.Join(t.TempDir(), "nbd.sock")
	abstract := fmt.Sprintf("@nbdvault-test-%d-%d", os.Getpid(), time.Now().UnixNano())
	s, err := Open(context.Background(), Options{Data: filepath.Join(t.TempDir(), "data"),
		Listen: []string{"unix:" + file, "unix:" + abstract}, SocketMode: 0o600, Logger: slog.New(slog.DiscardHandler)})
	require.NoError(t, err, "a socket mode with an abstract socket")
	ctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- s.Serve(ctx) }()
	t.Cleanup(func() { stop(); require.NoError(t, <-served) })

	fi, err := os.Stat(file)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "the socket file has the mode")

	for _, path := range []string{file, abstract} {
		c, err := net.Dial("unix", path)
		require.NoError(t, err, path)
		require.NoError(t, c.SetDeadline(time.Now().Add(time.Minute)))
		var hello [16]byte
		_, err = io.ReadFull(c, hello[:])
		require.NoError(t, err, path)
		assert.Equal(t, "NBDMAGICIHAVEOPT", string(hello[:]), "the NBD greeting on %s", path)
		c.Close()
	}
}

// TestStaleCRLWarns: a revocation list past its next update is still
// used, with a warning naming it and its issuer; a fresh one loads
// without.
func TestStaleCRLWarns(t *testing.T) {
	ca := testcerts.NewCA(t, "clients")
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
		Number: big.NewInt(1), ThisUpdate: time.Now().Add(-48 * time.Hour), NextUpdate: time.Now().Add(-24 * time.Hour),
	}, ca.Cert, ca.Key)
	require.NoError(t, err)
	stale := pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der})

	load := func(crl []byte) (TLSFiles, string) {
		var logged bytes.Buffer
		files := writeTLSFiles(t, ca, crl)
		_, err := newSecurity(slog.New(slog.NewTextHandler(&logged, nil)), files, TLSFiles{}, "", false)
		require.NoError(t, err)
		return files, logged.String()
	}
	files, logged := load(stale)
	assert.Contains(t, logged, "level=WARN")
	assert.Contains(t, logged, "a TLS revocation list is past its next update")
	assert.Contains(t, logged, files.CRL)
	assert.Contains(t, logged, "CN=clients")

	_, logged = load(ca.CRL(t))
	assert.NotContains(t, logged, "past its next update")
}
