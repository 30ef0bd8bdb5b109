package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// wire is a raw NBD client for tests: it writes exact bytes and reads
// exact replies, so tests can send what no well-behaved client would.
type wire struct {
	t  testing.TB
	c  net.Conn
	br *bufio.Reader
}

// startServer serves exports on a Unix socket and returns its address;
// the server is shut down at the end of the test.
func startServer(t testing.TB, srv *Server) string {
	t.Helper()
	if srv.Logger == nil {
		srv.Logger = slog.New(slog.DiscardHandler)
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := Listen("unix:" + sock)
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		require.NoError(t, srv.Shutdown(ctx))
		require.ErrorIs(t, <-done, ErrServerClosed)
	})
	return sock
}

func dialWire(t testing.TB, sock string) *wire {
	t.Helper()
	c, err := net.Dial("unix", sock)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	return &wire{t: t, c: c, br: bufioReader(c)}
}

func bufioReader(c net.Conn) *bufio.Reader { return bufio.NewReader(c) }

func (w *wire) write(b []byte) {
	w.t.Helper()
	_, err := w.c.Write(b)
	require.NoError(w.t, err)
}

func (w *wire) read(n int) []byte {
	w.t.Helper()
	b := make([]byte, n)
	_, err := io.ReadFull(w.br, b)
	require.NoError(w.t, err)
	return b
}

// closed asserts the server closed the connection.
func (w *wire) closed() {
	w.t.Helper()
	_, err := w.br.ReadByte()
	require.ErrorIs(w.t, err, io.EOF, "the server should have closed the connection")
}

// greet reads the greeting and sends client flags.
func (w *wire) greet(clientFlags uint32) {
	w.t.Helper()
	g := w.read(18)
	require.Equal(w.t, MagicInit, binary.BigEndian.Uint64(g[0:]))
	require.Equal(w.t, MagicOpt, binary.BigEndian.Uint64(g[8:]))
	require.Equal(w.t, FlagFixedNewstyle|FlagNoZeroes, binary.BigEndian.Uint16(g[16:]))
	w.write(binary.BigEndian.AppendUint32(nil, clientFlags))
}

func (w *wire) option(opt uint32, data []byte) {
	b := binary.BigEndian.AppendUint64(nil, MagicOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	w.write(append(b, data...))
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (w *wire) optReply() optReply {
	w.t.Helper()
	h := w.read(20)
	require.Equal(w.t, MagicOptReply, binary.BigEndian.Uint64(h))
	r := optReply{opt: binary.BigEndian.Uint32(h[8:]), typ: binary.BigEndian.Uint32(h[12:])}
	r.data = w.read(int(binary.BigEndian.Uint32(h[16:])))
	return r
}

// nameData encodes "32-bit length, name" followed by rest.
func nameData(name string, rest ...byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	return append(append(b, name...), rest...)
}

func goData(name string, infos ...uint16) []byte {
	b := nameData(name)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

func metaData(name string, queries ...string) []byte {
	b := nameData(name)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = append(b, nameData(q)...)
	}
	return b
}

// goExport completes GO for name and returns size and flags from the
// INFO_EXPORT reply.
func (w *wire) goExport(name string) (uint64, uint16) {
	w.t.Helper()
	w.option(OptGo, goData(name))
	var size uint64
	var flags uint16
	for {
		r := w.optReply()
		require.Equal(w.t, OptGo, r.opt)
		switch r.typ {
		case RepInfo:
			if binary.BigEndian.Uint16(r.data) == InfoExport {
				size, flags = binary.BigEndian.Uint64(r.data[2:]), binary.BigEndian.Uint16(r.data[10:])
			}
		case RepAck:
			return size, flags
		default:
			w.t.Fatalf("GO %q: reply %#x %q", name, r.typ, r.data)
		}
	}
}

// attach negotiates export name, with structured replies and
// base:allocation when structured is set.
func (w *wire) attach(name string, structured bool) (uint64, uint16) {
	w.t.Helper()
	w.greet(FlagCFixedNewstyle | FlagCNoZeroes)
	if structured {
		w.option(OptStructuredReply, nil)
		require.Equal(w.t, RepAck, w.optReply().typ)
		w.option(OptSetMetaContext, metaData(name, ContextBaseAllocation))
		r := w.optReply()
		require.Equal(w.t, RepMetaContext, r.typ)
		require.Equal(w.t, uint32(1), binary.BigEndian.Uint32(r.data))
		require.Equal(w.t, RepAck, w.optReply().typ)
	}
	return w.goExport(name)
}

func (w *wire) request(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	w.write(reqBytes(typ, flags, cookie, off, length, payload))
}

// simple reads a simple reply, and data of n bytes when its error is 0.
func (w *wire) simple(n int) (cookie uint64, errno uint32, data []byte) {
	w.t.Helper()
	h := w.read(SimpleReplyLen)
	require.Equal(w.t, MagicSimpleReply, binary.BigEndian.Uint32(h))
	errno, cookie = binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
	if errno == 0 && n > 0 {
		data = w.read(n)
	}
	return cookie, errno, data
}

type chunk struct {
	flags, typ uint16
	cookie     uint64
	payload    []byte
}

// next reads one reply of either kind; a simple reply comes back as a
// chunk of type 0xffff with the errno as payload.
func (w *wire) next() chunk {
	w.t.Helper()
	m := w.read(4)
	switch binary.BigEndian.Uint32(m) {
	case MagicSimpleReply:
		h := w.read(12)
		return chunk{typ: 0xffff, cookie: binary.BigEndian.Uint64(h[4:]), payload: h[:4]}
	case MagicStructuredReply:
		h := w.read(16)
		c := chunk{flags: binary.BigEndian.Uint16(h), typ: binary.BigEndian.Uint16(h[2:]), cookie: binary.BigEndian.Uint64(h[4:])}
		c.payload = w.read(int(binary.BigEndian.Uint32(h[12:])))
		return c
	default:
		w.t.Fatalf("bad reply magic %x", m)
		return chunk{}
	}
}

// structured reads the chunks of one structured reply, up to DONE.
func (w *wire) structured() []chunk {
	w.t.Helper()
	var out []chunk
	for {
		c := w.next()
		require.NotEqual(w.t, uint16(0xffff), c.typ, "expected a structured reply")
		out = append(out, c)
		if c.flags&ReplyFlagDone != 0 {
			return out
		}
	}
}

// errnoOf returns the error of a one-chunk structured reply or a simple one.
func errnoOf(c chunk) uint32 {
	if c.typ == 0xffff || c.typ&ReplyTypeErrorCategory != 0 {
		return binary.BigEndian.Uint32(c.payload)
	}
	return 0
}

// errMsg returns the message of an error chunk.
func errMsg(c chunk) string {
	if c.typ&ReplyTypeErrorCategory == 0 {
		return ""
	}
	n := binary.BigEndian.Uint16(c.payload[4:])
	return string(c.payload[6 : 6+n])
}

func dialWireErr(sock string) (net.Conn, error) { return net.Dial("unix", sock) }
