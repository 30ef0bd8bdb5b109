package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
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
	// up (the spec's FORCEDTLS mode) on connections from Serve and
	// ServeConn; ServeWith chooses per listener. It needs TLSConfig.
	RequireTLS bool
	// Identify, if set, says who a connection's client is: once when it
	// is accepted (cs nil) and again after STARTTLS. The Identity decides
	// what the client may list and open. Without Identify every client
	// may open every export.
	Identify func(nc net.Conn, cs *tls.ConnectionState) Identity
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

// An Identity is who a client is, as Server.Identify found it, and what
// it may open.
type Identity interface {
	// String names the identity in logs and in refusals ("cert:db1").
	String() string
	// Allow says whether the client may use export name: nil if so, else
	// why not (sent with NBD_REP_ERR_POLICY). It is asked first with e nil,
	// before the export is looked up (a refused client learns nothing of
	// what exists), then with the export found; NBD_OPT_LIST asks it of
	// each export, and Recheck of each export in use.
	Allow(name string, e *Export) error
}

// ListenerOptions are what ServeWith does on one listener.
type ListenerOptions struct {
	// RequireTLS is Server.RequireTLS for this listener's connections.
	RequireTLS bool
}

// Serve accepts connections on l and serves each in its own goroutine. It
// returns ErrServerClosed after Shutdown or Close, or the listener's error.
func (s *Server) Serve(l net.Listener) error {
	return s.ServeWith(l, ListenerOptions{RequireTLS: s.RequireTLS})
}

// ServeWith is Serve with options of its own for l.
func (s *Server) ServeWith(l net.Listener, o ListenerOptions) error {
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
		go s.serveConn(nc, o.RequireTLS)
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
func (s *Server) ServeConn(nc net.Conn) { s.serveConn(nc, s.RequireTLS) }

func (s *Server) serveConn(nc net.Conn, requireTLS bool) {
	c := newConn(s, nc)
	c.requireTLS = requireTLS
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

// Attachment is a client in transmission: who, from where, on what.
type Attachment struct {
	Identity Identity
	Remote   string
	Export   *Export
}

// attached are the connections with an Identity and an export (open, or
// in the GO that opens it), with their conn.
func (s *Server) attached() ([]Attachment, []*conn) {
	st := &s.state
	st.mu.Lock()
	conns := make([]*conn, 0, len(st.conns))
	for c := range st.conns {
		conns = append(conns, c)
	}
	st.mu.Unlock()
	var out []Attachment
	var with []*conn
	for _, c := range conns {
		c.mu.Lock()
		if c.id != nil && c.export != nil { // without an export, its last check comes after any new rules
			out, with = append(out, Attachment{Identity: c.id, Remote: c.remote, Export: c.export}), append(with, c)
		}
		c.mu.Unlock()
	}
	return out, with
}

// Attached lists the clients that have an export open (and the one
// opening it), for a caller that asks what new rules would do to them.
func (s *Server) Attached() []Attachment {
	out, _ := s.attached()
	return out
}

// Recheck asks each attached client's Identity again whether it may use
// its export (after the rules behind it changed) and closes the
// connections it no longer allows, at once. It returns what it closed,
// one line each: who, which export, why.
func (s *Server) Recheck() []string {
	as, conns := s.attached()
	var closed []string
	for i, a := range as {
		if err := a.Identity.Allow(a.Export.Name, a.Export); err != nil {
			conns[i].close()
			s.logger().Warn("nbd connection closed: the access rules no longer allow it", "remote", a.Remote, "identity", a.Identity.String(), "export", a.Export.Name, "why", err)
			closed = append(closed, fmt.Sprintf("%s from %s using %s: %v", a.Identity, a.Remote, a.Export.Name, err))
		}
	}
	return closed
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
	srv        *Server
	remote     string
	requireTLS bool

	mu             sync.Mutex // guards nc swaps, id, export, transmitting, cancelRequests and stopWaiting
	nc             net.Conn   // a *tls.Conn after STARTTLS
	id             Identity   // nil without Server.Identify
	export         *Export    // once transmitting
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

func (c *conn) setExport(e *Export) {
	c.mu.Lock()
	c.export = e
	c.mu.Unlock()
}

func (c *conn) setIdentity(id Identity) {
	c.mu.Lock()
	c.id = id
	c.mu.Unlock()
}

// identity names the client for logs: "" without Server.Identify.
func (c *conn) identity() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.id == nil {
		return ""
	}
	return c.id.String()
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
	c.transmitting, c.export = true, s.export
	stopping := c.srv.shuttingDown()
	c.mu.Unlock()
	if stopping {
		return
	}
	if a, ok := s.export.Backend.(Attacher); ok {
		defer a.Attach()()
	}
	log.Debug("nbd client attached", "remote", c.remote, "export", s.export.Name, "structured", s.structured, "identity", c.identity())
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
