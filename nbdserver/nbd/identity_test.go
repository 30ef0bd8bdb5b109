package nbd

import (
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// allowList is an Identity that may use the exports it lists, and says
// whether it came through TLS.
type allowList struct {
	name  string
	allow *atomic.Pointer[[]string]
}

func (a allowList) String() string { return a.name }
func (a allowList) Allow(name string, e *Export) error {
	for _, n := range *a.allow.Load() {
		if n == name {
			return nil
		}
	}
	return fmt.Errorf("%s may not use %q", a.name, name)
}

// TestIdentityRules: an Identity decides what a client lists and opens.
// A refused export gets POLICY whether it exists or not (no probing);
// one allowed but missing gets UNKNOWN; meta contexts and EXPORT_NAME
// are refused alike; the identity is asked again after STARTTLS; Recheck
// closes a connection the rules no longer allow.
func TestIdentityRules(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	var allow atomic.Pointer[[]string]
	allow.Store(&[]string{"a", "missing"})
	srv := &Server{
		Exports: NewExportMap(&Export{Name: "a", Backend: NewMem(1 << 20)}, &Export{Name: "b", Backend: NewMem(1 << 20)}),
		Identify: func(nc net.Conn, cs *tls.ConnectionState) Identity {
			if cs != nil {
				return allowList{"tls", &allow}
			}
			return allowList{"plain", &allow}
		},
		TLSConfig: serverTLS,
	}
	sock := startServer(t, srv)

	w := dialWire(t, sock)
	w.greet(FlagCFixedNewstyle)
	w.option(OptList, nil)
	r := w.optReply()
	require.Equal(t, RepServer, r.typ)
	assert.Equal(t, "a", string(r.data[4:4+binary.BigEndian.Uint32(r.data)]), "only what it may open")
	assert.Equal(t, RepAck, w.optReply().typ)
	for _, name := range []string{"b", "nothing"} {
		w.option(OptInfo, goData(name))
		r = w.optReply()
		assert.Equal(t, RepErrPolicy, r.typ, name)
		assert.Equal(t, fmt.Sprintf("plain may not use %q", name), string(r.data))
	}
	w.option(OptInfo, goData("missing"))
	assert.Equal(t, RepErrUnknown, w.optReply().typ, "allowed but not there")
	w.option(OptStructuredReply, nil)
	require.Equal(t, RepAck, w.optReply().typ)
	w.option(OptListMetaContext, metaData("b", ContextBaseAllocation))
	assert.Equal(t, RepErrPolicy, w.optReply().typ, "meta contexts of a refused export")
	w.option(OptExportName, []byte("b"))
	w.closed()

	// After STARTTLS the identity is asked again.
	allow.Store(&[]string{"a", "b"})
	w = dialWire(t, sock)
	w.greet(FlagCFixedNewstyle)
	w.option(OptStartTLS, nil)
	require.Equal(t, RepAck, w.optReply().typ)
	tc := tls.Client(w.c, clientTLS)
	require.NoError(t, tc.Handshake())
	w.c, w.br = tc, bufioReader(tc)
	w.option(OptInfo, goData("nothing"))
	r = w.optReply()
	assert.Equal(t, `tls may not use "nothing"`, string(r.data))
	w.goExport("b")
	w.request(CmdRead, 0, 1, 0, 512, nil)
	_, errno, _ := w.simple(512)
	require.Zero(t, errno)

	assert.Empty(t, srv.Recheck(), "still allowed")
	allow.Store(&[]string{"a"})
	closed := srv.Recheck()
	require.Len(t, closed, 1)
	assert.True(t, strings.HasPrefix(closed[0], "tls from "), closed[0])
	assert.Contains(t, closed[0], `using b: tls may not use "b"`)
	w.closed()
}

// TestServeWithRequireTLS: TLS is required per listener.
func TestServeWithRequireTLS(t *testing.T) {
	serverTLS, _ := testTLS(t)
	srv := &Server{Exports: NewExportMap(&Export{Name: "disk", Backend: NewMem(1 << 20)}), TLSConfig: serverTLS}
	plain := startServer(t, srv)
	forced := t.TempDir() + "/forced.sock"
	l, err := Listen("unix:" + forced)
	require.NoError(t, err)
	go srv.ServeWith(l, ListenerOptions{RequireTLS: true}) //nolint:errcheck // ends with the server
	for sock, want := range map[string]uint32{plain: RepServer, forced: RepErrTLSReqd} {
		w := dialWire(t, sock)
		w.greet(FlagCFixedNewstyle)
		w.option(OptList, nil)
		assert.Equal(t, want, w.optReply().typ, sock)
	}
}

// gate is an Identity whose first check of an opened export waits until
// released, and which allows what allow lists at the time of each call.
type gate struct {
	allow   *atomic.Pointer[[]string]
	reached chan struct{}
	release chan struct{}
	waited  atomic.Bool
}

func (g *gate) String() string { return "gate" }
func (g *gate) Allow(name string, e *Export) error {
	ok := false
	for _, n := range *g.allow.Load() {
		ok = ok || n == name
	}
	if e != nil && g.waited.CompareAndSwap(false, true) {
		close(g.reached)
		<-g.release
	}
	if !ok {
		return fmt.Errorf("gate: not %q", name)
	}
	return nil
}

// TestRecheckDuringGo: rules that change while a GO is between its last
// check and transmission still reach the connection (Recheck sees it and
// closes it), so no client slips into transmission under old rules.
func TestRecheckDuringGo(t *testing.T) {
	var allow atomic.Pointer[[]string]
	allow.Store(&[]string{"a"})
	g := &gate{allow: &allow, reached: make(chan struct{}), release: make(chan struct{})}
	srv := &Server{Exports: NewExportMap(&Export{Name: "a", Backend: NewMem(1 << 20)}),
		Identify: func(net.Conn, *tls.ConnectionState) Identity { return g }}
	sock := startServer(t, srv)
	w := dialWire(t, sock)
	w.greet(FlagCFixedNewstyle)
	w.option(OptGo, goData("a"))
	<-g.reached // the GO passed the check before the lookup and waits in the last one
	allow.Store(&[]string{})
	closed := srv.Recheck()
	close(g.release)
	assert.Len(t, closed, 1, "Recheck sees the connection in its GO")
	_, err := w.c.Read(make([]byte, 1<<10))
	for err == nil {
		_, err = w.c.Read(make([]byte, 1<<10))
	}
	assert.Error(t, err, "the connection is closed")
}
