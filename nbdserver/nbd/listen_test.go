package nbd

import (
	"net"
	"os"
	"path/filepath"
	"testing"

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
