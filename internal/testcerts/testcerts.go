// Package testcerts makes the X.509 certificates TLS tests need: a CA,
// server certificates for loopback, client certificates by name, and
// revocation lists, written where libnbd, nbdkit and qemu look for them.
package testcerts

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

var serial atomic.Int64

// CA is a certificate authority.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
	PEM  []byte
}

// Pair is a certificate and its key, PEM-encoded.
type Pair struct {
	Cert            *x509.Certificate
	CertPEM, KeyPEM []byte
}

// NewCA makes a CA named name.
func NewCA(t testing.TB, name string) *CA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial.Add(1)), Subject: pkix.Name{CommonName: name, Organization: []string{"nbdvault tests"}},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		IsCA:     true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return &CA{Cert: cert, Key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// Server makes a server certificate for localhost, 127.0.0.1 and ::1,
// valid from notBefore to notAfter (zero: an hour ago to a day from now).
func (ca *CA) Server(t testing.TB, notBefore, notAfter time.Time) *Pair {
	if notBefore.IsZero() {
		notBefore, notAfter = time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour)
	}
	return ca.issue(t, &x509.Certificate{
		Subject: pkix.Name{CommonName: "localhost"}, DNSNames: []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		NotBefore:   notBefore, NotAfter: notAfter,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
}

// Client makes a client certificate whose DNS SAN (and CN) is name, with
// the clientAuth extended key usage clients need.
func (ca *CA) Client(t testing.TB, name string) *Pair {
	return ca.issue(t, &x509.Certificate{
		Subject: pkix.Name{CommonName: name, Organization: []string{"nbdvault tests"}}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
}

func (ca *CA) issue(t testing.TB, tmpl *x509.Certificate) *Pair {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl.SerialNumber = big.NewInt(serial.Add(1))
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	kder, err := x509.MarshalECPrivateKey(key)
	require.NoError(t, err)
	return &Pair{Cert: cert, CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM: pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})}
}

// CRL is a revocation list of ca revoking the given certificates.
func (ca *CA) CRL(t testing.TB, revoked ...*Pair) []byte {
	t.Helper()
	var entries []x509.RevocationListEntry
	for _, p := range revoked {
		entries = append(entries, x509.RevocationListEntry{SerialNumber: p.Cert.SerialNumber, RevocationTime: time.Now().Add(-time.Minute)})
	}
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
		Number: big.NewInt(serial.Add(1)), ThisUpdate: time.Now().Add(-time.Minute), NextUpdate: time.Now().Add(24 * time.Hour),
		RevokedCertificateEntries: entries,
	}, ca.Cert, ca.Key)
	require.NoError(t, err)
	return pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der})
}

// ServerDir writes a folder as nbdkit, qemu and serve --tls-certificates
// read it: server-cert.pem, server-key.pem, and ca-cert.pem (the CA that
// signs clients) unless clientCA is nil.
func ServerDir(t testing.TB, dir string, server *Pair, clientCA *CA) string {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o755))
	write(t, filepath.Join(dir, "server-cert.pem"), server.CertPEM)
	write(t, filepath.Join(dir, "server-key.pem"), server.KeyPEM)
	if clientCA != nil {
		write(t, filepath.Join(dir, "ca-cert.pem"), clientCA.PEM)
	}
	return dir
}

// ClientDir writes a folder as libnbd's tls-certificates and qemu read it
// on the client side: ca-cert.pem (the CA that signed the server), and
// client-cert.pem and client-key.pem unless client is nil.
func ClientDir(t testing.TB, dir string, serverCA *CA, client *Pair) string {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o755))
	write(t, filepath.Join(dir, "ca-cert.pem"), serverCA.PEM)
	if client != nil {
		write(t, filepath.Join(dir, "client-cert.pem"), client.CertPEM)
		write(t, filepath.Join(dir, "client-key.pem"), client.KeyPEM)
	}
	return dir
}

// write replaces a file atomically (a reload never sees half of it).
func write(t testing.TB, path string, b []byte) {
	t.Helper()
	tmp := path + ".tmp"
	require.NoError(t, os.WriteFile(tmp, b, 0o644))
	require.NoError(t, os.Rename(tmp, path))
}

// Write is write for tests that change a file in place.
func Write(t testing.TB, path string, b []byte) { write(t, path, b) }
