package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
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
	// MaxMemory bounds the READ and WRITE payload buffers of all
	// connections together; a request waits (before its WRITE payload is
	// read) until its buffer fits. Each connection may hold at most a
	// quarter of it, and at most 128 MiB. One request may always run
	// alone, so a payload above the limit is served too. Default 1 GiB.
	MaxMemory int64
	// ReplyTimeout is how long a reply write may go without the client
	// taking 1 MiB of it before the connection is closed, releasing the
	// memory its replies hold. Default 30s.
	ReplyTimeout time.Duration
	// Logger gets connection-level events. Default: slog.Default().
	Logger *slog.Logger

	state serverState
}

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("nbd: server closed")

// serverState is the bookkeeping behind a Server's zero value.
type serverState struct {
	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	closing   atomic.Bool
	active    sync.WaitGroup // connections being served
	memOnce   sync.Once
	mem       *budget // MaxMemory, shared by every connection
}

func (s *Server) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.Default()
}

func (s *Server) maxInFlight() int {
	if s.MaxInFlight > 0 {
		return s.MaxInFlight
	}
	return 64
}

// DefaultMaxMemory is MaxMemory's default.
const DefaultMaxMemory = 1 << 30

func (s *Server) memory() *budget {
	s.state.memOnce.Do(func() {
		limit := s.MaxMemory
		if limit <= 0 {
			limit = DefaultMaxMemory
		}
		s.state.mem = newBudget(limit)
	})
	return s.state.mem
}

// MemoryInUse is how much of MaxMemory requests hold now.
func (s *Server) MemoryInUse() int64 { return s.memory().inUse() }

func (s *Server) replyTimeout() time.Duration {
	if s.ReplyTimeout > 0 {
		return s.ReplyTimeout
	}
	return 30 * time.Second
}

func (s *Server) shuttingDown() bool { return s.state.closing.Load() }

// Serve accepts connections on l and serves each in its own goroutine. It
// returns ErrServerClosed after Shutdown or Close, or the listener's error.
func (s *Server) Serve(l net.Listener) error {
	st := &s.state
	st.mu.Lock()
	if st.closing.Load() {
		st.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	if st.listeners == nil {
		st.listeners = make(map[net.Listener]struct{})
	}
	st.listeners[l] = struct{}{}
	st.mu.Unlock()
	defer func() {
		st.mu.Lock()
		delete(st.listeners, l)
		st.mu.Unlock()
	}()

	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if st.closing.Load() {
				return ErrServerClosed
			}
			if temporaryAcceptError(err) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.logger().Warn("nbd accept failed; retrying", "error", err, "in", backoff)
				time.Sleep(backoff)
				continue
			}
			return err
		}
		backoff = 0
		go s.ServeConn(nc)
	}
}

// temporaryAcceptError tells an Accept error that passes (out of file
// descriptors or kernel memory, a connection aborted before it was
// taken, a timeout) from a listener that is gone.
func temporaryAcceptError(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	for _, e := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM,
		syscall.ECONNABORTED, syscall.EINTR, syscall.EAGAIN} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// ServeConn serves one connection and returns when it ends.
func (s *Server) ServeConn(nc net.Conn) {
	c := newConn(s, nc)
	st := &s.state
	st.mu.Lock()
	if st.closing.Load() {
		st.mu.Unlock()
		nc.Close()
		return
	}
	if st.conns == nil {
		st.conns = make(map[*conn]struct{})
	}
	st.conns[c] = struct{}{}
	st.active.Add(1)
	st.mu.Unlock()
	defer func() {
		st.mu.Lock()
		delete(st.conns, c)
		st.mu.Unlock()
		st.active.Done()
	}()
	c.serve()
}

// Shutdown stops accepting connections, ends those still negotiating, and
// lets attached clients' requests in flight finish (new ones get
// ESHUTDOWN) before closing their connections. If ctx ends first, it
// closes everything at once and returns ctx's error.
func (s *Server) Shutdown(ctx context.Context) error {
	st := &s.state
	st.mu.Lock()
	st.stopAccepting()
	for c := range st.conns {
		c.stop()
	}
	st.mu.Unlock()

	done := make(chan struct{})
	go func() { st.active.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.Close()
		<-done
		return ctx.Err()
	}
}

// Close closes every listener and connection at once.
func (s *Server) Close() error {
	st := &s.state
	st.mu.Lock()
	st.stopAccepting()
	for c := range st.conns {
		c.close()
	}
	st.mu.Unlock()
	return nil
}

// stopAccepting marks the server closing and closes its listeners. Called
// with mu held.
func (st *serverState) stopAccepting() {
	st.closing.Store(true)
	for l := range st.listeners {
		l.Close()
	}
}

// conn is one client connection.
type conn struct {
	srv    *Server
	remote string

	mu             sync.Mutex // guards nc swaps, transmitting, cancelRequests and stopWaiting
	nc             net.Conn   // a *tls.Conn after STARTTLS
	transmitting   bool
	cancelRequests context.CancelFunc // of the requests in flight, once transmitting
	stopWaiting    context.CancelFunc // ends the reader's wait for memory, once transmitting
	br             *bufio.Reader
	bw             *bufio.Writer
}

// Buffer sizes: large enough that a burst of small replies or request
// headers costs one syscall, small next to the 1 MiB payloads that pass
// through unbuffered.
const connBufSize = 64 << 10

func newConn(s *Server, nc net.Conn) *conn {
	return &conn{
		srv:    s,
		remote: nc.RemoteAddr().String(),
		nc:     nc,
		br:     bufio.NewReaderSize(nc, connBufSize),
		bw:     bufio.NewWriterSize(nc, connBufSize),
	}
}

func (c *conn) setConn(nc net.Conn) {
	c.mu.Lock()
	c.nc = nc
	c.mu.Unlock()
	c.br.Reset(nc)
	c.bw.Reset(nc)
}

// stop begins a graceful end: a connection still negotiating is closed; one
// in transmission stops reading requests (its read, or its wait for
// memory, is interrupted) and closes once the requests in flight are
// answered.
func (c *conn) stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.transmitting {
		c.nc.Close()
		return
	}
	_ = c.nc.SetReadDeadline(time.Now())
	if c.stopWaiting != nil {
		c.stopWaiting()
	}
}

// close closes the connection at once and cancels its requests in flight.
func (c *conn) close() {
	c.mu.Lock()
	nc, cancel := c.nc, c.cancelRequests
	c.mu.Unlock()
	nc.Close()
	if cancel != nil {
		cancel()
	}
}

func (c *conn) serve() {
	log := c.srv.logger()
	defer c.close()
	_ = c.nc.SetDeadline(c.srv.handshakeDeadline())
	s, err := c.negotiate()
	if err != nil {
		if !errors.Is(err, errAbort) && !errors.Is(err, io.EOF) && !c.srv.shuttingDown() {
			log.Warn("nbd negotiation failed", "remote", c.remote, "error", err)
		}
		return
	}
	c.mu.Lock()
	_ = c.nc.SetDeadline(time.Time{})
	c.transmitting = true
	stopping := c.srv.shuttingDown()
	c.mu.Unlock()
	if stopping {
		return
	}
	if a, ok := s.export.Backend.(Attacher); ok {
		defer a.Attach()()
	}
	log.Debug("nbd client attached", "remote", c.remote, "export", s.export.Name, "structured", s.structured)
	if err := c.transmit(s); err != nil && !c.srv.shuttingDown() {
		log.Warn("nbd connection ended", "remote", c.remote, "export", s.export.Name, "error", err)
		return
	}
	log.Debug("nbd client detached", "remote", c.remote, "export", s.export.Name)
}

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
