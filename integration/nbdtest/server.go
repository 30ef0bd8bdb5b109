package nbdtest

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// ShutdownTimeout bounds Server.Shutdown at the end of a test.
const ShutdownTimeout = 20 * time.Second

// Endpoint is where a server listens.
type Endpoint struct {
	Network string // "unix" or "tcp"
	// Addr is the socket's path for "unix", host:port for "tcp".
	Addr string
}

// URI is the NBD URI of an export, as libnbd, qemu and fio take it:
// nbd+unix:///NAME?socket=PATH or nbd://127.0.0.1:PORT/NAME.
func (e Endpoint) URI(export string) string {
	if e.Network == "unix" {
		return "nbd+unix:///" + url.PathEscape(export) + "?socket=" + e.Addr
	}
	return "nbd://" + e.Addr + "/" + url.PathEscape(export)
}

// TLSURI is the URI of an export over TLS (nbds:// or nbds+unix://) for
// libnbd, trusting the CA in certDir (libnbd's layout: see
// Certs.ClientDir). libnbd 1.14 checks the server's certificate only over
// TCP, where it has a host name to check it against.
func (e Endpoint) TLSURI(export, certDir string) string {
	if e.Network == "unix" {
		return "nbds+unix:///" + url.PathEscape(export) + "?socket=" + e.Addr + "&tls-certificates=" + certDir
	}
	return "nbds://" + e.Addr + "/" + url.PathEscape(export) + "?tls-certificates=" + certDir
}

// Server is an nbd.Server serving one or more listeners for one test.
type Server struct {
	Endpoint // the first listener
	NBD      *nbd.Server

	accepted atomic.Int64
	log      *syncBuffer
	served   []chan error
	dirs     []string
}

// StartUnix serves srv on a new Unix socket until the end of t, when it
// shuts srv down and checks that it stopped cleanly. If srv.Logger is nil
// the server's log is kept and shown when t fails.
func StartUnix(t testing.TB, srv *nbd.Server) *Server {
	t.Helper()
	s := newServer(t, srv)
	s.Endpoint = s.ListenUnix(t)
	return s
}

// StartTCP serves srv on a free 127.0.0.1 port until the end of t (see
// StartUnix).
func StartTCP(t testing.TB, srv *nbd.Server) *Server {
	t.Helper()
	s := newServer(t, srv)
	s.Endpoint = s.ListenTCP(t)
	return s
}

func newServer(t testing.TB, srv *nbd.Server) *Server {
	s := &Server{NBD: srv, log: &syncBuffer{}}
	if srv.Logger == nil {
		srv.Logger = slog.New(slog.NewTextHandler(s.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	t.Cleanup(func() { s.stop(t) })
	return s
}

// ListenUnix makes the server serve a new Unix socket too.
func (s *Server) ListenUnix(t testing.TB) Endpoint {
	t.Helper()
	// Not t.TempDir(): its path can pass the 108 bytes a socket path may
	// have.
	dir, err := os.MkdirTemp("", "nbdtest-")
	if err != nil {
		t.Fatal(err)
	}
	s.dirs = append(s.dirs, dir) // removed once the server has stopped
	path := filepath.Join(dir, "nbd.sock")
	s.serve(t, "unix:"+path)
	return Endpoint{Network: "unix", Addr: path}
}

// ListenTCP makes the server serve a free 127.0.0.1 port too.
func (s *Server) ListenTCP(t testing.TB) Endpoint {
	t.Helper()
	l := s.serve(t, "127.0.0.1:0")
	return Endpoint{Network: "tcp", Addr: l.Addr().String()}
}

func (s *Server) serve(t testing.TB, addr string) net.Listener {
	t.Helper()
	l, err := nbd.Listen(addr)
	if err != nil {
		t.Fatalf("nbd.Listen(%q): %v", addr, err)
	}
	served := make(chan error, 1)
	s.served = append(s.served, served)
	go func() { served <- s.NBD.Serve(&countingListener{Listener: l, n: &s.accepted}) }()
	return l
}

func (s *Server) stop(t testing.TB) {
	defer func() {
		for _, dir := range s.dirs {
			os.RemoveAll(dir)
		}
	}()
	if len(s.served) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), ShutdownTimeout)
	defer cancel()
	if err := s.NBD.Shutdown(ctx); err != nil {
		t.Errorf("nbd server: Shutdown: %v", err)
	}
	timeout := time.After(ShutdownTimeout)
	for _, served := range s.served {
		select {
		case err := <-served:
			if !errors.Is(err, nbd.ErrServerClosed) {
				t.Errorf("nbd server: Serve returned %v after Shutdown, want nbd.ErrServerClosed", err)
			}
		case <-timeout:
			t.Errorf("nbd server: Serve has not returned %v after Shutdown", ShutdownTimeout)
		}
	}
	if t.Failed() {
		t.Logf("nbd server log:\n%s", clip(s.log.String()))
	}
}

// Accepted is the number of connections the server has accepted so far,
// on all its listeners.
func (s *Server) Accepted() int64 { return s.accepted.Load() }

// Log is what the server logged so far (when the rig set its Logger).
func (s *Server) Log() string { return s.log.String() }

type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// syncBuffer keeps the first 4 MiB written to it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.b.Len() < 4<<20 {
		b.b.Write(p)
	}
	return len(p), nil
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
