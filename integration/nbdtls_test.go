package integration

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// TestTLS connects libnbd's tools over TLS (NBD_OPT_STARTTLS) to a server
// with a certificate from a test CA: they see the export and move data
// when they trust the CA, fail the handshake when they trust another CA,
// and a server that requires TLS refuses plaintext clients.
func TestTLS(t *testing.T) {
	tools := nbdtest.Tools(t, "nbdinfo", "nbdcopy", "qemu-io", "qemu-img")
	nbdinfo, nbdcopy := tools["nbdinfo"], tools["nbdcopy"]
	certs := nbdtest.NewCerts(t)

	t.Run("required", func(t *testing.T) {
		const size = 16 * mib
		mem := nbd.NewMem(size)
		srv := nbdtest.StartTCP(t, &nbd.Server{
			Exports:    nbd.NewExportMap(&nbd.Export{Name: "secure", Description: "over TLS only", Backend: mem}),
			TLSConfig:  certs.Server,
			RequireTLS: true,
		})
		uri := srv.TLSURI("secure", certs.ClientDir)

		out := runNBDInfoJSON(t, nbdinfo, "--json", uri)
		assert.True(t, out.TLS, "nbdinfo --json says TLS")
		require.Len(t, out.Exports, 1)
		assert.Equal(t, "secure", out.Exports[0].Name)
		assert.Equal(t, size, out.Exports[0].Size, "export-size over TLS")
		r := nbdtest.Run(t, cmdTimeout, nbdinfo, "--is", "tls", uri)
		assert.Equal(t, 0, r.ExitCode, "nbdinfo --is tls (exit 0):\n%s", r)

		list := runNBDInfoJSON(t, nbdinfo, "--list", "--json", uri)
		if assert.Len(t, list.Exports, 1, "nbdinfo --list over TLS") {
			assert.Equal(t, "secure", list.Exports[0].Name)
			assert.Equal(t, "over TLS only", list.Exports[0].Description)
		}

		// Data both ways over TLS, several requests in flight.
		dir := t.TempDir()
		src := filepath.Join(dir, "src.img")
		want := nbdtest.RandomBytes(3, int(8*mib))
		require.NoError(t, os.WriteFile(src, want, 0o600))
		nbdtest.MustRun(t, cmdTimeout, nbdcopy, "--requests", "16", "--flush", src, uri)
		got := make([]byte, len(want))
		require.NoError(t, mem.ReadAt(t.Context(), got, 0))
		nbdtest.SameBytes(t, want, got, "the export after nbdcopy over TLS")
		dst := filepath.Join(dir, "dst.img")
		nbdtest.MustRun(t, cmdTimeout, nbdcopy, "--requests", "16", uri, dst)
		nbdtest.SameBytes(t, append(want, make([]byte, size-int64(len(want)))...), nbdtest.ReadFile(t, dst), "nbdcopy out over TLS")

		// qemu's NBD client over TLS (tls-creds-x509 reads ca-cert.pem from
		// the same directory) at 12 MiB.
		host, port, err := net.SplitHostPort(srv.Addr)
		require.NoError(t, err)
		nbdtest.MustRun(t, cmdTimeout, tools["qemu-io"],
			"--object", "tls-creds-x509,id=tls0,endpoint=client,dir="+certs.ClientDir,
			"--image-opts", "driver=nbd,server.type=inet,server.host="+host+",server.port="+port+",export=secure,tls-creds=tls0",
			"-c", "write -P 0x42 12M 64k", "-c", "read -P 0x42 12M 64k")
		require.NoError(t, mem.ReadAt(t.Context(), got[:64*kib], 12*mib))
		nbdtest.SameBytes(t, bytes.Repeat([]byte{0x42}, int(64*kib)), got[:64*kib], "the export after qemu-io over TLS")

		// A client that trusts another CA must refuse this server's
		// certificate: the successes above were verified connections.
		other := nbdtest.NewCerts(t)
		r = nbdtest.Run(t, cmdTimeout, nbdinfo, "--size", srv.TLSURI("secure", other.ClientDir))
		assert.NotEqual(t, 0, r.ExitCode, "a client trusting another CA must fail:\n%s", r)
		assert.Contains(t, r.Stderr, "certificate", "the failure names the certificate:\n%s", r)

		// Plaintext. The server answers every option but STARTTLS with
		// NBD_REP_ERR_TLS_REQD. nbdinfo 1.14 (option mode) prints only the
		// errno libnbd maps that to (ENOTSUP); nbdcopy (nbd_connect_uri)
		// decodes it as "server requires TLS encryption first".
		plain := srv.URI("secure")
		r = nbdtest.Run(t, cmdTimeout, nbdinfo, plain)
		assert.NotEqual(t, 0, r.ExitCode, "plaintext nbdinfo must be refused:\n%s", r)
		assert.NotContains(t, r.Stdout, "export-size", "plaintext nbdinfo must not see the export:\n%s", r)
		assert.Contains(t, r.Stderr, "Operation not supported", "plaintext nbdinfo:\n%s", r)
		r = nbdtest.Run(t, cmdTimeout, nbdinfo, "--list", plain)
		assert.NotEqual(t, 0, r.ExitCode, "plaintext nbdinfo --list must be refused:\n%s", r)
		assert.NotContains(t, r.Stdout, "secure", "plaintext nbdinfo --list must not list the export:\n%s", r)
		r = nbdtest.Run(t, cmdTimeout, nbdcopy, plain, "null:")
		assert.NotEqual(t, 0, r.ExitCode, "plaintext nbdcopy must be refused:\n%s", r)
		assert.Contains(t, r.Stderr, "requires TLS", "plaintext nbdcopy must be told TLS is required:\n%s", r)
		r = nbdtest.Run(t, cmdTimeout, tools["qemu-img"], "info", plain)
		assert.NotEqual(t, 0, r.ExitCode, "plaintext qemu-img info must be refused:\n%s", r)
		assert.Contains(t, r.Stderr, "TLS negotiation required", "plaintext qemu-img must be told TLS is required:\n%s", r)
	})

	t.Run("optional", func(t *testing.T) {
		// TLSConfig without RequireTLS: clients choose.
		srv := nbdtest.StartUnix(t, &nbd.Server{
			Exports:   nbd.NewExportMap(&nbd.Export{Name: "either", Backend: nbd.NewMem(4 * mib)}),
			TLSConfig: certs.Server,
		})
		r := nbdtest.Run(t, cmdTimeout, nbdinfo, "--is", "tls", srv.TLSURI("either", certs.ClientDir))
		assert.Equal(t, 0, r.ExitCode, "nbds+unix:// uses TLS (exit 0):\n%s", r)
		r = nbdtest.Run(t, cmdTimeout, nbdinfo, "--is", "tls", srv.URI("either"))
		assert.Equal(t, 2, r.ExitCode, "nbd+unix:// does not use TLS (exit 2):\n%s", r)
		size := nbdtest.MustRun(t, cmdTimeout, nbdinfo, "--size", srv.URI("either"))
		assert.Equal(t, fmt.Sprintln(4*mib), size.Stdout, "plaintext nbdinfo --size")
	})
}
