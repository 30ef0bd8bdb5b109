package nbd

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestListenTCPAndUnix(t *testing.T) {
	l, err := Listen("127.0.0.1:0")
	require.NoError(t, err)
	assert.Equal(t, "tcp", l.Addr().Network())
	srv := &Server{Exports: NewExportMap(&Export{Name: "disk", Backend: NewMem(4096)})}
	go func() { _ = srv.Serve(l) }()
	defer srv.Close()
	c, err := net.Dial("tcp", l.Addr().String())
	require.NoError(t, err)
	w := &wire{t: t, c: c, br: bufioReader(c)}
	size, _ := w.attach("disk", true)
	assert.EqualValues(t, 4096, size)
	c.Close()

	sock := filepath.Join(t.TempDir(), "s")
	u, err := Listen("unix:" + sock)
	require.NoError(t, err)
	_, err = Listen("unix:" + sock)
	assert.Error(t, err, "a socket in use is not taken over")
	// A socket file left by a server that died is replaced.
	u.(*net.UnixListener).SetUnlinkOnClose(false)
	u.Close()
	_, err = os.Stat(sock)
	require.NoError(t, err, "the stale socket file is still there")
	u, err = Listen("unix:" + sock)
	require.NoError(t, err)
	u.Close()

	_, err = Listen("unix:" + filepath.Join(t.TempDir(), "no", "such", "dir", "s"))
	assert.Error(t, err)
}

// flakyListener fails its first Accepts with err, then accepts.
type flakyListener struct {
	net.Listener
	mu    sync.Mutex
	fails int
	err   error
}

func (l *flakyListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	if l.fails > 0 {
		l.fails--
		l.mu.Unlock()
		return nil, l.err
	}
	l.mu.Unlock()
	return l.Listener.Accept()
}

// lockedBuffer is a log destination goroutines may share.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// Out of file descriptors, Serve waits and tries again, as net/http does,
// instead of giving up on the listener for good.
func TestServeRetriesTemporaryAcceptErrors(t *testing.T) {
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE} {
		t.Run(errno.Error(), func(t *testing.T) {
			var log lockedBuffer
			srv := &Server{Exports: NewExportMap(&Export{Name: "disk", Backend: NewMem(1 << 20)}),
				Logger: slog.New(slog.NewTextHandler(&log, nil))}
			sock := filepath.Join(t.TempDir(), "nbd.sock")
			inner, err := Listen("unix:" + sock)
			require.NoError(t, err)
			accept := &net.OpError{Op: "accept", Net: "unix", Err: os.NewSyscallError("accept4", errno)}
			served := make(chan error, 1)
			go func() { served <- srv.Serve(&flakyListener{Listener: inner, fails: 3, err: accept}) }()

			w := dialWire(t, sock)
			size, _ := w.attach("disk", false)
			assert.EqualValues(t, 1<<20, size, "served once the errors passed")
			assert.Equal(t, 3, strings.Count(log.String(), "nbd accept failed; retrying"), "one line per failed accept:\n%s", log.String())
			assert.Contains(t, log.String(), errno.Error())

			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			require.NoError(t, srv.Shutdown(ctx))
			require.ErrorIs(t, <-served, ErrServerClosed)
		})
	}
}

// Any other Accept error ends Serve with it.
func TestServeReturnsOtherAcceptErrors(t *testing.T) {
	srv := &Server{Exports: NewExportMap(), Logger: slog.New(slog.DiscardHandler)}
	inner, err := Listen("unix:" + filepath.Join(t.TempDir(), "nbd.sock"))
	require.NoError(t, err)
	defer inner.Close()
	broken := &net.OpError{Op: "accept", Net: "unix", Err: os.NewSyscallError("accept4", syscall.EINVAL)}
	require.ErrorIs(t, srv.Serve(&flakyListener{Listener: inner, fails: 1, err: broken}), syscall.EINVAL)
}
