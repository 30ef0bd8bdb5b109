//go:build linux

package client

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// This file runs real third-party NBD servers for the tests: nbdkit and
// qemu-nbd, each on a Unix socket in the test's temporary folder, killed
// when the test ends. A missing binary skips the test, or fails it when CI
// or NBDVAULT_REQUIRE_TOOLS is set.

const exportSize = 16 << 20

// requireTool returns the path of a binary, or ends the test when it is
// missing.
func requireTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	msg := fmt.Sprintf("%s not found: apt-get install nbdkit qemu-utils", name)
	if os.Getenv("CI") != "" || os.Getenv("NBDVAULT_REQUIRE_TOOLS") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// startNbdkit runs nbdkit with args (plugin, filters, parameters) on a
// new socket and returns its address for Dial.
func startNbdkit(t *testing.T, args ...string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	startServer(t, sock, "nbdkit", append([]string{"--foreground", "--exit-with-parent", "--unix", sock}, args...)...)
	return "unix:" + sock
}

// startNbdvault serves b with nbdvault's own server, in this process, as
// the default export "" and returns its address for Dial.
func startNbdvault(t *testing.T, b nbd.Backend) string {
	t.Helper()
	return serveNbdvault(t, &nbd.Server{
		Exports: nbd.NewExportMap(&nbd.Export{Name: "", Description: "nbdvault test export", Backend: b}),
		Logger:  slog.New(slog.DiscardHandler),
	})
}

// serveNbdvault runs srv on a Unix socket of its own until the test
// ends, and returns its address for Dial.
func serveNbdvault(t *testing.T, srv *nbd.Server) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := nbd.Listen("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; !errors.Is(err, nbd.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return "unix:" + sock
}

// nbdvaultFile serves a new sparse file of exportSize bytes with
// nbdvault's server.
func nbdvaultFile(t *testing.T) string {
	f, err := nbd.OpenFile(sparseFile(t, t.TempDir(), exportSize), false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return startNbdvault(t, f)
}

// startQemuNBD serves a new sparse raw image of exportSize bytes with
// qemu-nbd and returns its address for Dial. args come before the image.
func startQemuNBD(t *testing.T, args ...string) string {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "nbd.sock")
	img := sparseFile(t, dir, exportSize)
	args = append([]string{"--socket=" + sock, "--format=raw", "--persistent", "--shared=8"}, args...)
	startServer(t, sock, "qemu-nbd", append(args, img)...)
	return "unix:" + sock
}

// sparseFile creates an empty file of size bytes in dir.
func sparseFile(t *testing.T, dir string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, "disk.img")
	f, err := os.Create(p)
	require.NoError(t, err)
	require.NoError(t, f.Truncate(size))
	require.NoError(t, f.Close())
	return p
}

// startServer runs name with args until the test ends and returns once
// sock accepts connections.
func startServer(t *testing.T, sock, name string, args ...string) {
	t.Helper()
	bin := requireTool(t, name)
	logPath := filepath.Join(filepath.Dir(sock), name+".log")
	logf, err := os.Create(logPath)
	require.NoError(t, err)
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Kill the server with the test binary, even if it crashes.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	err = cmd.Start()
	_ = logf.Close()
	require.NoError(t, err, "start %s", name)
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})

	// The servers have no readiness signal but the socket: poll it.
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	timeout := time.After(30 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			_ = c.Close()
			return
		}
		select {
		case <-exited:
			log, _ := os.ReadFile(logPath)
			t.Fatalf("%s %s exited before listening:\n%s", name, strings.Join(args, " "), log)
		case <-timeout:
			t.Fatalf("%s did not listen on %s within 30s", name, sock)
		case <-tick.C:
		}
	}
}

// mustDial connects to addr, closing the connection when the test ends.
func mustDial(t *testing.T, addr string, opts Options) *Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	c, err := Dial(ctx, addr, opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// testCA makes a certificate authority and a server certificate for
// "localhost", writes them where nbdkit --tls-certificates looks, and
// returns a client configuration trusting the authority.
func testCA(t *testing.T, dir string) *tls.Config {
	t.Helper()
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		require.NoError(t, err)
		return k
	}
	writePEM := func(name, typ string, der []byte) {
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600))
	}
	now := time.Now()
	caKey := newKey()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "nbdvault test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	require.NoError(t, err)
	caCert, err := x509.ParseCertificate(caDER)
	require.NoError(t, err)

	srvKey := newKey()
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "localhost"},
		DNSNames:     []string{"localhost"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	require.NoError(t, err)
	srvKeyDER, err := x509.MarshalPKCS8PrivateKey(srvKey)
	require.NoError(t, err)

	writePEM("ca-cert.pem", "CERTIFICATE", caDER)
	writePEM("server-cert.pem", "CERTIFICATE", srvDER)
	writePEM("server-key.pem", "PRIVATE KEY", srvKeyDER)

	pool := x509.NewCertPool()
	pool.AddCert(caCert)
	return &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12}
}
