package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"os"
	"strings"
	"time"
)

// Server serves Exports over NBD. Set its fields, then call Serve (once per
// listener) or ServeConn; do not change them afterwards.
type Server struct {
	// Exports to serve. Required.
	Exports Exports
	// TLSConfig enables NBD_OPT_STARTTLS.
	TLSConfig *tls.Config
	// RequireTLS refuses every option but STARTTLS and ABORT until TLS is
	// up (the spec's FORCEDTLS mode). It needs TLSConfig.
	RequireTLS bool
	// MaxInFlight bounds the requests one connection runs at once; the
	// reader stops reading while that many are in flight. Default 64.
	MaxInFlight int
	// HandshakeTimeout bounds the negotiation phase. Default 30s.
	HandshakeTimeout time.Duration
	// Logger gets connection-level events. Default: slog.Default().
	Logger *slog.Logger
}

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("nbd: server closed")

// Serve accepts connections on l and serves each in its own goroutine. It
// returns ErrServerClosed after Shutdown or Close, or the listener's error.
func (s *Server) Serve(l net.Listener) error { panic("not yet") }

// ServeConn serves one connection and returns when it ends.
func (s *Server) ServeConn(c net.Conn) { panic("not yet") }

// Shutdown stops accepting connections, ends those still negotiating, and
// lets attached clients' requests in flight finish (new ones get
// ESHUTDOWN) before closing their connections. If ctx ends first, it
// closes everything at once and returns ctx's error.
func (s *Server) Shutdown(ctx context.Context) error { panic("not yet") }

// Close closes every listener and connection at once.
func (s *Server) Close() error { panic("not yet") }

// Listen opens a listener for an address as users write it: "host:port"
// for TCP, "unix:/path" for a Unix socket (a stale socket file is
// replaced).
func Listen(addr string) (net.Listener, error) {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		return listenUnix(path)
	}
	return net.Listen("tcp", addr)
}

func listenUnix(path string) (net.Listener, error) {
	l, err := net.Listen("unix", path)
	if err == nil {
		return l, nil
	}
	// A socket file left by a server that died: replace it, but only if
	// nothing answers on it.
	if c, derr := net.Dial("unix", path); derr == nil {
		c.Close()
		return nil, err // in use
	}
	if fi, serr := os.Lstat(path); serr == nil && fi.Mode()&os.ModeSocket != 0 {
		if rerr := os.Remove(path); rerr == nil {
			return net.Listen("unix", path)
		}
	}
	return nil, err
}
