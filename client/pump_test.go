//go:build linux

package client

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// countingMem is a memory export that counts the flushes and trims that
// reach it.
type countingMem struct {
	*nbd.Mem
	flushes, trims atomic.Int32
}

func (m *countingMem) Flush(ctx context.Context) error {
	m.flushes.Add(1)
	return m.Mem.Flush(ctx)
}

func (m *countingMem) Trim(ctx context.Context, off, n int64) error {
	m.trims.Add(1)
	return m.Mem.Trim(ctx, off, n)
}

// startTLSNbdvault serves b with nbdvault's server as export "vol", TLS
// required (FORCEDTLS), and returns its address and a client TLS config
// that trusts it.
func startTLSNbdvault(t *testing.T, b nbd.Backend) (string, *tls.Config) {
	t.Helper()
	dir := t.TempDir()
	cfg := testCA(t, dir)
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, "server-cert.pem"), filepath.Join(dir, "server-key.pem"))
	require.NoError(t, err)
	return serveNbdvault(t, &nbd.Server{
		Exports:    nbd.NewExportMap(&nbd.Export{Name: "vol", Backend: b}),
		TLSConfig:  &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12},
		RequireTLS: true,
		Logger:     slog.New(slog.DiscardHandler),
	}), cfg
}

// pumpedConn does what AttachKernel does before NBD_SET_SOCK: the
// handshake over TLS, a socket pair, the pump between one end and the
// TLS connection. It returns an NBD client on the other end in the
// transmission phase with simple replies, as the kernel's driver is, and
// the pump's result.
func pumpedConn(t *testing.T, addr string, cfg *tls.Config) (*Conn, <-chan error) {
	t.Helper()
	opts := Options{TLS: cfg}
	raw, err := dial(t.Context(), addr, &opts)
	require.NoError(t, err)
	tc, info, err := Handshake(t.Context(), raw, "vol", opts.TLS)
	require.NoError(t, err)
	require.IsType(t, &tls.Conn{}, tc, "transmission goes over TLS")
	kernelEnd, ours, err := socketPair()
	require.NoError(t, err)
	kernel, err := net.FileConn(kernelEnd)
	require.NoError(t, err)
	require.NoError(t, kernelEnd.Close())
	pumped := make(chan error, 1)
	go func() { pumped <- pump(ours, tc) }()
	c := newConn(kernel, &exportInfo{size: info.Size, flags: info.Flags, minBlock: 1, prefBlock: 4096, maxPayload: nbd.DefaultMaxPayload})
	return c, pumped
}

// TestPumpTLS: an NBD client on the kernel's end of the socket pair
// reaches a TLS-only server through the pump: what it writes (requests
// larger than 1 MiB among them) reads back and is on the server, a
// flush and a trim arrive, and the client's disconnect ends the pump
// cleanly.
func TestPumpTLS(t *testing.T) {
	mem := &countingMem{Mem: nbd.NewMem(8 << 20)}
	addr, cfg := startTLSNbdvault(t, mem)
	c, pumped := pumpedConn(t, addr, cfg)
	assert.NotZero(t, c.TransmissionFlags()&nbd.FlagSendFlush, "the server offers FLUSH")

	r := rand.New(rand.NewPCG(1, 2))
	p := make([]byte, 3<<20+512)
	for i := range p {
		p[i] = byte(r.Uint32())
	}
	require.NoError(t, c.WriteAt(t.Context(), p, 4096, false))
	require.NoError(t, c.WriteAt(t.Context(), p[:64<<10], 6<<20, true))
	require.NoError(t, c.Flush(t.Context()))
	assert.EqualValues(t, 1, mem.flushes.Load(), "the flush reached the server")
	require.NoError(t, c.Trim(t.Context(), 6<<20, 4096, false))
	assert.EqualValues(t, 1, mem.trims.Load(), "the trim reached the server")

	got := make([]byte, len(p))
	require.NoError(t, c.ReadAt(t.Context(), got, 4096))
	assert.True(t, bytes.Equal(p, got), "what was written reads back through the pump")
	onServer := make([]byte, len(p))
	require.NoError(t, mem.ReadAt(t.Context(), onServer, 4096))
	assert.True(t, bytes.Equal(p, onServer), "and is on the server")

	require.NoError(t, c.Close())
	select {
	case err := <-pumped:
		assert.NoError(t, err, "a disconnect ends the pump cleanly")
	case <-time.After(10 * time.Second):
		t.Fatal("the pump did not end after the client disconnected")
	}
}

// TestPumpServerGone: when the server's side ends, the pump closes the
// kernel's end too, so the kernel sees its connection gone (and
// NBD_DO_IT returns) instead of waiting for replies forever.
func TestPumpServerGone(t *testing.T) {
	server, serverPeer := net.Pipe()
	kernelEnd, ours, err := socketPair()
	require.NoError(t, err)
	kernel, err := net.FileConn(kernelEnd)
	require.NoError(t, err)
	require.NoError(t, kernelEnd.Close())
	defer kernel.Close()
	pumped := make(chan error, 1)
	go func() { pumped <- pump(ours, server) }()

	_, err = kernel.Write([]byte("request"))
	require.NoError(t, err)
	b := make([]byte, 7)
	_, err = io.ReadFull(serverPeer, b)
	require.NoError(t, err)
	assert.Equal(t, "request", string(b))
	_, err = serverPeer.Write([]byte("reply"))
	require.NoError(t, err)
	_, err = io.ReadFull(kernel, b[:5])
	require.NoError(t, err)
	assert.Equal(t, "reply", string(b[:5]))

	require.NoError(t, serverPeer.Close())
	require.NoError(t, kernel.SetReadDeadline(time.Now().Add(10*time.Second)))
	_, err = kernel.Read(b)
	assert.True(t, errors.Is(err, io.EOF), "the kernel's end reads the end, not %v", err)
	assert.NoError(t, <-pumped)
}
