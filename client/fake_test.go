package client

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"testing/synctest"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// This file tests the client against a scripted server on a net.Pipe,
// for what real servers never do: replies out of order on demand,
// protocol violations, replies after the caller gave up, refusals during
// negotiation. The tests run in synctest bubbles, so synctest.Wait tells
// when every goroutine is blocked.

// fakeConfig is how the fake server negotiates.
type fakeConfig struct {
	size         uint64
	flags        uint16   // transmission flags; 0 means fakeFlags
	noStructured bool     // refuse NBD_OPT_STRUCTURED_REPLY
	noGo         bool     // refuse NBD_OPT_GO as unknown (NBD_REP_ERR_UNSUP)
	goErr        uint32   // refuse NBD_OPT_GO with this error reply
	contexts     []string // meta contexts it knows, IDs 10, 11, ...
	blockSizes   []uint32 // NBD_INFO_BLOCK_SIZE to send, if any
}

const fakeFlags = nbd.FlagHasFlags | nbd.FlagSendFlush | nbd.FlagSendFUA |
	nbd.FlagSendTrim | nbd.FlagSendWriteZeroes | nbd.FlagSendCache

// fakeRequest is a request the fake server received.
type fakeRequest struct {
	flags, cmd uint16
	cookie     uint64
	off        uint64
	length     uint32
	data       []byte // a write's payload
}

// fakeServer is the server end of the pipe.
type fakeServer struct {
	t       *testing.T
	conn    net.Conn
	cfg     fakeConfig
	options []uint32         // options received, in order
	reqs    chan fakeRequest // requests received; closed at EOF
}

// startFake connects a client to a new fake server and returns both.
func startFake(t *testing.T, cfg fakeConfig, opts Options) (*fakeServer, *Conn, error) {
	t.Helper()
	if cfg.flags == 0 {
		cfg.flags = fakeFlags
	}
	cli, srv := net.Pipe()
	f := &fakeServer{t: t, conn: srv, cfg: cfg, reqs: make(chan fakeRequest, 100)}
	go f.serve()
	c, err := NewConn(context.Background(), cli, opts)
	if c != nil {
		t.Cleanup(func() { _ = c.Close() })
	}
	return f, c, err
}

// serve negotiates, then queues requests until the client goes away.
func (f *fakeServer) serve() {
	defer close(f.reqs)
	defer f.conn.Close()
	if f.negotiate() {
		f.readRequests()
	}
}

func (f *fakeServer) negotiate() bool {
	b := binary.BigEndian.AppendUint64(nil, nbd.MagicInit)
	b = binary.BigEndian.AppendUint64(b, nbd.MagicOpt)
	b = binary.BigEndian.AppendUint16(b, nbd.FlagFixedNewstyle|nbd.FlagNoZeroes)
	if _, err := f.conn.Write(b); err != nil {
		return false
	}
	var cflags [4]byte
	if _, err := io.ReadFull(f.conn, cflags[:]); err != nil {
		return false
	}
	structured := false
	for {
		var h [16]byte
		if _, err := io.ReadFull(f.conn, h[:]); err != nil {
			return false
		}
		opt := binary.BigEndian.Uint32(h[8:])
		data := make([]byte, binary.BigEndian.Uint32(h[12:]))
		if _, err := io.ReadFull(f.conn, data); err != nil {
			return false
		}
		f.options = append(f.options, opt)
		switch opt {
		case nbd.OptStructuredReply:
			if f.cfg.noStructured {
				f.optReply(opt, nbd.RepErrUnsup, nil)
			} else {
				structured = true
				f.optReply(opt, nbd.RepAck, nil)
			}
		case nbd.OptSetMetaContext:
			if !structured {
				f.optReply(opt, nbd.RepErrInvalid, nil)
				continue
			}
			nameLen := binary.BigEndian.Uint32(data)
			q := data[4+nameLen:]
			count := binary.BigEndian.Uint32(q)
			q = q[4:]
			for range count {
				n := binary.BigEndian.Uint32(q)
				query := string(q[4 : 4+n])
				q = q[4+n:]
				for i, known := range f.cfg.contexts {
					if known == query {
						f.optReply(opt, nbd.RepMetaContext, append(binary.BigEndian.AppendUint32(nil, uint32(10+i)), query...))
					}
				}
			}
			f.optReply(opt, nbd.RepAck, nil)
		case nbd.OptGo:
			switch {
			case f.cfg.noGo:
				f.optReply(opt, nbd.RepErrUnsup, nil)
				continue
			case f.cfg.goErr != 0:
				f.optReply(opt, f.cfg.goErr, []byte("no such export"))
				continue
			}
			info := binary.BigEndian.AppendUint16(nil, nbd.InfoExport)
			info = binary.BigEndian.AppendUint64(info, f.cfg.size)
			info = binary.BigEndian.AppendUint16(info, f.cfg.flags)
			f.optReply(opt, nbd.RepInfo, info)
			if len(f.cfg.blockSizes) == 3 {
				bs := binary.BigEndian.AppendUint16(nil, nbd.InfoBlockSize)
				for _, v := range f.cfg.blockSizes {
					bs = binary.BigEndian.AppendUint32(bs, v)
				}
				f.optReply(opt, nbd.RepInfo, bs)
			}
			f.optReply(opt, nbd.RepAck, nil)
			return true
		case nbd.OptExportName:
			b := binary.BigEndian.AppendUint64(nil, f.cfg.size)
			b = binary.BigEndian.AppendUint16(b, f.cfg.flags)
			_, err := f.conn.Write(b)
			return err == nil
		case nbd.OptAbort:
			f.optReply(opt, nbd.RepAck, nil)
			return false
		default:
			f.optReply(opt, nbd.RepErrUnsup, []byte("not in the script"))
		}
	}
}

func (f *fakeServer) optReply(opt, typ uint32, data []byte) {
	b := binary.BigEndian.AppendUint64(nil, nbd.MagicOptReply)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	_, _ = f.conn.Write(append(b, data...))
}

func (f *fakeServer) readRequests() {
	for {
		var h [nbd.RequestHeaderLen]byte
		if _, err := io.ReadFull(f.conn, h[:]); err != nil {
			return
		}
		if binary.BigEndian.Uint32(h[:]) != nbd.MagicRequest {
			f.t.Errorf("fake server: bad request magic")
			return
		}
		r := fakeRequest{
			flags:  binary.BigEndian.Uint16(h[4:]),
			cmd:    binary.BigEndian.Uint16(h[6:]),
			cookie: binary.BigEndian.Uint64(h[8:]),
			off:    binary.BigEndian.Uint64(h[16:]),
			length: binary.BigEndian.Uint32(h[24:]),
		}
		if r.cmd == nbd.CmdWrite {
			r.data = make([]byte, r.length)
			if _, err := io.ReadFull(f.conn, r.data); err != nil {
				return
			}
		}
		f.reqs <- r
	}
}

// next returns the next request, failing the test if there is none.
func (f *fakeServer) next() fakeRequest {
	f.t.Helper()
	r, ok := <-f.reqs
	require.True(f.t, ok, "fake server: client went away")
	return r
}

// none fails the test if a request is waiting; call it after
// synctest.Wait.
func (f *fakeServer) none() {
	f.t.Helper()
	select {
	case r, ok := <-f.reqs:
		if ok {
			f.t.Fatalf("fake server: unexpected request %+v", r)
		}
	default:
	}
}

// hungUp reports whether the client closed the connection.
func (f *fakeServer) hungUp() bool {
	_, ok := <-f.reqs
	return !ok
}

func (f *fakeServer) write(b []byte) {
	_, err := f.conn.Write(b)
	require.NoError(f.t, err)
}

func (f *fakeServer) simple(cookie uint64, errno uint32, data []byte) {
	b := binary.BigEndian.AppendUint32(nil, nbd.MagicSimpleReply)
	b = binary.BigEndian.AppendUint32(b, errno)
	b = binary.BigEndian.AppendUint64(b, cookie)
	f.write(append(b, data...))
}

func (f *fakeServer) chunk(cookie uint64, flags, typ uint16, payload []byte) {
	b := binary.BigEndian.AppendUint32(nil, nbd.MagicStructuredReply)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	f.write(append(b, payload...))
}

func (f *fakeServer) data(cookie uint64, flags uint16, off uint64, data []byte) {
	f.chunk(cookie, flags, nbd.ReplyTypeOffsetData, append(binary.BigEndian.AppendUint64(nil, off), data...))
}

func (f *fakeServer) hole(cookie uint64, flags uint16, off uint64, n uint32) {
	p := binary.BigEndian.AppendUint64(nil, off)
	f.chunk(cookie, flags, nbd.ReplyTypeOffsetHole, binary.BigEndian.AppendUint32(p, n))
}

func (f *fakeServer) done(cookie uint64) {
	f.chunk(cookie, nbd.ReplyFlagDone, nbd.ReplyTypeNone, nil)
}

func (f *fakeServer) errorChunk(cookie uint64, typ uint16, errno uint32, msg string) {
	p := binary.BigEndian.AppendUint32(nil, errno)
	p = binary.BigEndian.AppendUint16(p, uint16(len(msg)))
	p = append(p, msg...)
	if typ == nbd.ReplyTypeErrorOffset {
		p = binary.BigEndian.AppendUint64(p, 0)
	}
	f.chunk(cookie, nbd.ReplyFlagDone, typ, p)
}

func (f *fakeServer) status(cookie uint64, flags uint16, id uint32, extents ...uint32) {
	p := binary.BigEndian.AppendUint32(nil, id)
	for _, e := range extents {
		p = binary.BigEndian.AppendUint32(p, e)
	}
	f.chunk(cookie, flags, nbd.ReplyTypeBlockStatus, p)
}

// result is what an asynchronous call returned.
type result struct {
	err error
	buf []byte
}

// readAsync starts a ReadAt of n bytes at off into a buffer filled with
// 0xee, and returns where its result will come.
func readAsync(ctx context.Context, c *Conn, off int64, n int) <-chan result {
	ch := make(chan result, 1)
	go func() {
		p := fill(make([]byte, n), 0xee)
		err := c.ReadAt(ctx, p, off)
		ch <- result{err, p}
	}()
	return ch
}

func fill(p []byte, b byte) []byte {
	for i := range p {
		p[i] = b
	}
	return p
}

func TestFakeOutOfOrderChunks(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, c, err := startFake(t, fakeConfig{size: 1 << 20}, Options{})
		require.NoError(t, err)
		require.True(t, c.Structured())

		a := readAsync(t.Context(), c, 0, 16)
		b := readAsync(t.Context(), c, 100, 8)
		reqs := map[uint64]fakeRequest{}
		for range 2 {
			r := f.next()
			reqs[r.off] = r
		}
		ra, rb := reqs[0], reqs[100]
		require.Equal(t, uint16(nbd.CmdRead), ra.cmd)
		require.Equal(t, uint32(16), ra.length)

		// b's reply first, interleaved with a's, each in pieces out of
		// order.
		f.data(ra.cookie, 0, 8, []byte("IJKLMNOP"))
		f.data(rb.cookie, 0, 104, []byte("wxyz"))
		f.hole(ra.cookie, 0, 4, 4)
		f.hole(rb.cookie, nbd.ReplyFlagDone, 100, 4)
		synctest.Wait()
		select {
		case <-a:
			t.Fatal("read a returned before its reply was done")
		default:
		}
		rbRes := <-b
		require.NoError(t, rbRes.err)
		assert.Equal(t, []byte("\x00\x00\x00\x00wxyz"), rbRes.buf)

		f.data(ra.cookie, nbd.ReplyFlagDone, 0, []byte("ABCD"))
		raRes := <-a
		require.NoError(t, raRes.err)
		assert.Equal(t, []byte("ABCD\x00\x00\x00\x00IJKLMNOP"), raRes.buf)
	})
}

func TestFakeSimpleReplies(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, c, err := startFake(t, fakeConfig{size: 1 << 20, noStructured: true, contexts: []string{"base:allocation"}}, Options{})
		require.NoError(t, err)
		assert.False(t, c.Structured())
		assert.NotContains(t, f.options, nbd.OptSetMetaContext, "meta contexts need structured replies")
		_, err = c.BlockStatus(t.Context(), 0, 512, false)
		assert.ErrorIs(t, err, errors.ErrUnsupported)

		a := readAsync(t.Context(), c, 0, 4)
		ra := f.next()
		b := readAsync(t.Context(), c, 8, 4)
		rb := f.next()
		f.simple(rb.cookie, 0, []byte("efgh"))
		f.simple(ra.cookie, nbd.EIO, nil)
		res := <-b
		require.NoError(t, res.err)
		assert.Equal(t, []byte("efgh"), res.buf)
		res = <-a
		var e *Error
		require.ErrorAs(t, res.err, &e)
		assert.Equal(t, nbd.EIO, e.Errno)
		assert.Equal(t, "EIO: input/output error", e.Error())
	})
}

func TestFakeErrorChunks(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, c, err := startFake(t, fakeConfig{size: 1 << 20}, Options{})
		require.NoError(t, err)

		a := readAsync(t.Context(), c, 0, 8)
		r := f.next()
		f.data(r.cookie, 0, 0, []byte("1234"))
		f.errorChunk(r.cookie, nbd.ReplyTypeErrorOffset, nbd.EIO, "bad sector")
		res := <-a
		var e *Error
		require.ErrorAs(t, res.err, &e)
		assert.Equal(t, &Error{Errno: nbd.EIO, Message: "bad sector"}, e)
		assert.Contains(t, res.err.Error(), "EIO: bad sector")

		// An error type the client does not know fails the request only.
		errc := make(chan error, 1)
		go func() { errc <- c.Flush(t.Context()) }()
		r = f.next()
		require.Equal(t, uint16(nbd.CmdFlush), r.cmd)
		f.errorChunk(r.cookie, nbd.ReplyTypeErrorCategory|77, nbd.ENOSPC, "")
		require.ErrorAs(t, <-errc, &e)
		assert.Equal(t, nbd.ENOSPC, e.Errno)

		go func() { errc <- c.Flush(t.Context()) }()
		f.done(f.next().cookie)
		assert.NoError(t, <-errc)
	})
}

func TestFakeProtocolViolations(t *testing.T) {
	cases := []struct {
		name  string
		want  string // in the error
		reply func(f *fakeServer, read fakeRequest)
	}{
		{"bad magic", "bad reply magic", func(f *fakeServer, read fakeRequest) {
			f.write([]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16})
		}},
		{"unknown cookie", "unknown cookie", func(f *fakeServer, read fakeRequest) {
			f.done(read.cookie + 1000)
		}},
		{"unknown chunk type", "unknown chunk type 77", func(f *fakeServer, read fakeRequest) {
			f.chunk(read.cookie, nbd.ReplyFlagDone, 77, []byte("??"))
		}},
		{"data past the request", "outside request", func(f *fakeServer, read fakeRequest) {
			f.data(read.cookie, nbd.ReplyFlagDone, read.off+4, make([]byte, 8))
		}},
		{"data before the request", "outside request", func(f *fakeServer, read fakeRequest) {
			f.data(read.cookie, nbd.ReplyFlagDone, read.off-1, make([]byte, 2))
		}},
		{"hole past the request", "outside request", func(f *fakeServer, read fakeRequest) {
			f.hole(read.cookie, nbd.ReplyFlagDone, read.off, 9)
		}},
		{"empty hole", "outside request", func(f *fakeServer, read fakeRequest) {
			f.hole(read.cookie, nbd.ReplyFlagDone, read.off, 0)
		}},
		{"overlapping chunks", "overlaps", func(f *fakeServer, read fakeRequest) {
			f.data(read.cookie, 0, read.off, make([]byte, 6))
			f.hole(read.cookie, nbd.ReplyFlagDone, read.off+4, 4)
		}},
		{"done without all the data", "without all its data", func(f *fakeServer, read fakeRequest) {
			f.data(read.cookie, 0, read.off, make([]byte, 4))
			f.done(read.cookie)
		}},
		{"none without done", "NBD_REPLY_TYPE_NONE chunk", func(f *fakeServer, read fakeRequest) {
			f.chunk(read.cookie, 0, nbd.ReplyTypeNone, nil)
		}},
		{"block status for a read", "NBD_REPLY_TYPE_BLOCK_STATUS chunk in reply to command 0", func(f *fakeServer, read fakeRequest) {
			f.status(read.cookie, nbd.ReplyFlagDone, 10, 8, 0)
		}},
		{"error message longer than the chunk", "with a message of", func(f *fakeServer, read fakeRequest) {
			f.chunk(read.cookie, nbd.ReplyFlagDone, nbd.ReplyTypeError, []byte{0, 0, 0, 5, 0, 9, 'x'})
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				f, c, err := startFake(t, fakeConfig{size: 1 << 20, contexts: []string{"base:allocation"}}, Options{})
				require.NoError(t, err)
				a := readAsync(t.Context(), c, 4096, 8)
				read := f.next()
				flushed := make(chan error, 1)
				go func() { flushed <- c.Flush(t.Context()) }()
				f.next()

				tc.reply(f, read)
				err = (<-a).err
				assert.ErrorIs(t, err, ErrProtocol, "the request the bad reply was for")
				assert.ErrorContains(t, err, tc.want)
				assert.ErrorIs(t, <-flushed, ErrProtocol, "another request waiting")
				assert.ErrorIs(t, c.Flush(t.Context()), ErrProtocol, "a later request")
				assert.True(t, f.hungUp(), "the client closes the connection")
				assert.NoError(t, c.Close())
			})
		})
	}
}

func TestFakeBlockStatus(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := fakeConfig{size: 1 << 20, contexts: []string{"base:allocation", "x-test:dirty"}}
		f, c, err := startFake(t, cfg, Options{MetaContexts: []string{"x-test:dirty", "x-test:unknown", "base:allocation"}})
		require.NoError(t, err)
		assert.Equal(t, []string{"base:allocation", "x-test:dirty"}, c.MetaContexts())

		type status struct {
			m   map[string][]nbd.Extent
			err error
		}
		ch := make(chan status, 1)
		go func() {
			m, err := c.BlockStatus(t.Context(), 4096, 8192, false)
			ch <- status{m, err}
		}()
		r := f.next()
		require.Equal(t, uint16(nbd.CmdBlockStatus), r.cmd)
		require.Equal(t, uint32(8192), r.length)
		f.status(r.cookie, 0, 11, 1024, 1, 65536, 0) // last extent runs past the range
		f.status(r.cookie, nbd.ReplyFlagDone, 10, 512, 3)
		s := <-ch
		require.NoError(t, s.err)
		assert.Equal(t, map[string][]nbd.Extent{
			"x-test:dirty":    {{Length: 1024, Flags: 1}, {Length: 7168, Flags: 0}},
			"base:allocation": {{Length: 512, Flags: 3}},
		}, s.m)

		// One context missing from a successful reply breaks the protocol.
		go func() {
			m, err := c.BlockStatus(t.Context(), 0, 512, true)
			ch <- status{m, err}
		}()
		r = f.next()
		assert.Equal(t, nbd.CmdFlagReqOne, r.flags)
		f.status(r.cookie, nbd.ReplyFlagDone, 10, 512, 0)
		assert.ErrorIs(t, (<-ch).err, ErrProtocol)
	})
}

func TestFakeCancelDropsLateReply(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, c, err := startFake(t, fakeConfig{size: 1 << 20}, Options{})
		require.NoError(t, err)

		ctx, cancel := context.WithCancel(t.Context())
		a := readAsync(ctx, c, 0, 8)
		r := f.next()
		cancel()
		res := <-a
		assert.Equal(t, context.Canceled, res.err)

		// The late reply must not land in the abandoned buffer, and the
		// stream must stay in step.
		f.data(r.cookie, nbd.ReplyFlagDone, 0, []byte("too late"))
		b := readAsync(t.Context(), c, 8, 4)
		f.data(f.next().cookie, nbd.ReplyFlagDone, 8, []byte("ok!!"))
		resB := <-b
		require.NoError(t, resB.err)
		assert.Equal(t, []byte("ok!!"), resB.buf)
		assert.Equal(t, fill(make([]byte, 8), 0xee), res.buf)

		// A context that has already ended sends nothing.
		assert.Equal(t, context.Canceled, c.ReadAt(ctx, make([]byte, 8), 0))
		synctest.Wait()
		f.none()
	})
}

func TestFakeCloseWaitsForRequests(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, c, err := startFake(t, fakeConfig{size: 1 << 20}, Options{})
		require.NoError(t, err)

		flushed := make(chan error, 1)
		go func() { flushed <- c.Flush(t.Context()) }()
		r := f.next()
		closed := make(chan error, 1)
		go func() { closed <- c.Close() }()
		synctest.Wait()
		f.none() // no NBD_CMD_DISC while the flush is in flight
		select {
		case err := <-closed:
			t.Fatalf("Close returned %v with a request in flight", err)
		default:
		}
		assert.ErrorIs(t, c.Flush(t.Context()), ErrClosed, "no new requests once closing")

		f.done(r.cookie)
		assert.NoError(t, <-flushed)
		disc := f.next()
		assert.Equal(t, uint16(nbd.CmdDisc), disc.cmd)
		assert.True(t, f.hungUp())
		assert.NoError(t, <-closed)
		assert.NoError(t, c.Close(), "a second Close")
		assert.ErrorIs(t, c.ReadAt(t.Context(), make([]byte, 1), 0), ErrClosed)
	})
}

func TestFakeShutdownCancelled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, c, err := startFake(t, fakeConfig{size: 1 << 20}, Options{})
		require.NoError(t, err)
		flushed := make(chan error, 1)
		go func() { flushed <- c.Flush(t.Context()) }()
		f.next()
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		assert.Equal(t, context.Canceled, c.Shutdown(ctx))
		assert.ErrorIs(t, <-flushed, ErrClosed)
		assert.True(t, f.hungUp(), "hard disconnect, without NBD_CMD_DISC")
	})
}

func TestFakeServerShutdown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, c, err := startFake(t, fakeConfig{size: 1 << 20}, Options{})
		require.NoError(t, err)
		errc := make(chan error, 2)
		go func() { errc <- c.Flush(t.Context()) }()
		r1 := f.next()
		go func() { errc <- c.Trim(t.Context(), 0, 512, false) }()
		r2 := f.next()

		f.errorChunk(r1.cookie, nbd.ReplyTypeError, nbd.ESHUTDOWN, "going down")
		var e *Error
		require.ErrorAs(t, <-errc, &e)
		assert.Equal(t, nbd.ESHUTDOWN, e.Errno)
		synctest.Wait()
		assert.ErrorIs(t, c.Flush(t.Context()), ErrClosed, "no new requests after ESHUTDOWN")
		f.none() // the trim is still in flight

		f.done(r2.cookie)
		assert.NoError(t, <-errc)
		assert.Equal(t, uint16(nbd.CmdDisc), f.next().cmd, "soft disconnect")
		assert.True(t, f.hungUp())
	})
}

func TestFakeSplitsLargeRequests(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, c, err := startFake(t, fakeConfig{size: 1 << 20, blockSizes: []uint32{512, 4096, 4096}}, Options{})
		require.NoError(t, err)
		minimum, preferred, maximum := c.BlockSizes()
		assert.Equal(t, []uint32{512, 4096, 4096}, []uint32{minimum, preferred, maximum})

		p := make([]byte, 9216)
		for i := range p {
			p[i] = byte(i * 7)
		}
		errc := make(chan error, 1)
		go func() { errc <- c.WriteAt(t.Context(), p, 1024, true) }()
		var got []byte
		for _, want := range []struct{ off, n int }{{1024, 4096}, {5120, 4096}, {9216, 1024}} {
			r := f.next()
			assert.Equal(t, uint16(nbd.CmdWrite), r.cmd)
			assert.Equal(t, nbd.CmdFlagFUA, r.flags)
			assert.Equal(t, uint64(want.off), r.off)
			assert.Equal(t, uint32(want.n), r.length)
			got = append(got, r.data...)
			f.simple(r.cookie, 0, nil)
		}
		require.NoError(t, <-errc)
		assert.Equal(t, p, got)

		err = c.WriteAt(t.Context(), p[:100], 0, false)
		assert.ErrorContains(t, err, "minimum block size 512")
		synctest.Wait()
		f.none()
	})
}

func TestFakeNegotiation(t *testing.T) {
	t.Run("no NBD_OPT_GO", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			f, c, err := startFake(t, fakeConfig{size: 12345, noGo: true}, Options{Export: "x"})
			require.NoError(t, err)
			assert.Equal(t, int64(12345), c.Size())
			assert.Equal(t, []uint32{nbd.OptStructuredReply, nbd.OptSetMetaContext, nbd.OptGo, nbd.OptExportName}, f.options)
			minimum, preferred, maximum := c.BlockSizes()
			assert.Equal(t, []uint32{1, 4096, 32 << 20}, []uint32{minimum, preferred, maximum})
		})
	})
	t.Run("no meta contexts", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			f, c, err := startFake(t, fakeConfig{size: 1, contexts: []string{"base:allocation"}}, Options{MetaContexts: []string{}})
			require.NoError(t, err)
			assert.Equal(t, []uint32{nbd.OptStructuredReply, nbd.OptGo}, f.options)
			assert.Empty(t, c.MetaContexts())
		})
	})
	t.Run("unknown export", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			f, _, err := startFake(t, fakeConfig{goErr: nbd.RepErrUnknown}, Options{Export: "nope"})
			var oe *OptionError
			require.ErrorAs(t, err, &oe)
			assert.Equal(t, &OptionError{Option: nbd.OptGo, Reply: nbd.RepErrUnknown, Message: "no such export"}, oe)
			assert.Equal(t, "nbd: server refused NBD_OPT_GO: NBD_REP_ERR_UNKNOWN: no such export", err.Error())
			assert.True(t, f.hungUp())
			assert.Equal(t, nbd.OptAbort, f.options[len(f.options)-1], "soft disconnect")
		})
	})
	t.Run("TLS refused", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			f, _, err := startFake(t, fakeConfig{}, Options{TLS: &tls.Config{ServerName: "fake"}})
			var oe *OptionError
			require.ErrorAs(t, err, &oe)
			assert.Equal(t, nbd.OptStartTLS, oe.Option)
			assert.True(t, f.hungUp())
			assert.Equal(t, []uint32{nbd.OptStartTLS, nbd.OptAbort}, f.options)
		})
	})
}

func TestSpans(t *testing.T) {
	var s spans
	require.True(t, s.add(10, 20))
	require.True(t, s.add(30, 40))
	require.True(t, s.add(0, 5))
	assert.Equal(t, spans{{0, 5}, {10, 20}, {30, 40}}, s)
	for _, bad := range []span{{4, 6}, {19, 21}, {9, 41}, {15, 16}, {0, 1}, {39, 50}} {
		assert.False(t, s.add(bad.start, bad.end), "%v overlaps", bad)
	}
	assert.Equal(t, spans{{0, 5}, {10, 20}, {30, 40}}, s)
	require.True(t, s.add(20, 30))
	assert.Equal(t, spans{{0, 5}, {10, 40}}, s)
	require.True(t, s.add(5, 10))
	assert.Equal(t, spans{{0, 40}}, s)
	assert.True(t, s.full(40))
	assert.False(t, s.full(41))
	assert.True(t, spans(nil).full(0))
}
