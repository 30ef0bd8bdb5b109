package nbdtest

import (
	"crypto/tls"
	"crypto/x509"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/internal/testcerts"
)

// Certs is a test certificate authority and a server certificate it
// signed for 127.0.0.1, ::1 and localhost.
type Certs struct {
	// ClientDir holds ca-cert.pem, all libnbd needs to verify the server
	// (nbd_set_tls_certificates, the tls-certificates URI parameter).
	ClientDir string
	// ServerDir holds ca-cert.pem, server-cert.pem and server-key.pem:
	// the layout nbdkit --tls-certificates and qemu's tls-creds-x509 read.
	ServerDir string
	// Server is a TLS configuration for nbd.Server with the server
	// certificate.
	Server *tls.Config
	// Pool trusts the CA.
	Pool *x509.CertPool
	// CA signed the server certificate; it signs client certificates too.
	CA *testcerts.CA
}

// NewCerts generates a CA and a server certificate in t's temporary
// directory.
func NewCerts(t testing.TB) *Certs {
	t.Helper()
	ca := testcerts.NewCA(t, "nbdvault test CA")
	srv := ca.Server(t, time.Time{}, time.Time{})
	base := t.TempDir()
	c := &Certs{CA: ca,
		ClientDir: testcerts.ClientDir(t, filepath.Join(base, "client"), ca, nil),
		ServerDir: testcerts.ServerDir(t, filepath.Join(base, "server"), srv, ca)}
	pair, err := tls.X509KeyPair(srv.CertPEM, srv.KeyPEM)
	require.NoError(t, err)
	c.Pool = x509.NewCertPool()
	c.Pool.AddCert(ca.Cert)
	c.Server = &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
	return c
}
