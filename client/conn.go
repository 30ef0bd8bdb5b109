package client

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// window is how many requests one call keeps in flight when it is split
// into several.
const window = 16

// Conn is a connection in the transmission phase. All methods are safe
// for concurrent use, and any number of requests may be in flight.
type Conn struct {
	conn net.Conn
	br   *bufio.Reader // the reply stream; only the reader goroutine uses it
	info exportInfo

	wlock chan struct{} // holds a token while a request is being written

	mu         sync.Mutex
	pending    map[uint64]*request // sent (or being sent), reply not complete
	cookie     uint64              // last cookie used
	err        error               // why the connection is unusable; nil while it is usable
	closing    error               // why no new requests are taken; nil until Close
	drained    chan struct{}       // closed once closing and nothing is pending
	drainedSet bool

	readerDone chan struct{}
	discOnce   sync.Once // sends NBD_CMD_DISC
}

// request is one request in flight.
type request struct {
	cookie uint64
	cmd    uint16
	flags  uint16
	off    uint64
	length uint32
	buf    []byte // NBD_CMD_READ: where the data goes, len(buf) == length

	done   chan struct{} // closed once result is set
	result error

	// mu guards buf and detached: the reader holds it while it writes into
	// buf, and the caller sets detached before it returns so that buf is
	// never touched afterwards.
	mu       sync.Mutex
	detached bool

	// Reply state, touched only by the reader goroutine until done.
	err     error // first error chunk
	covered spans // parts of a read the server sent
	extents map[string][]nbd.Extent
}

func newConn(c net.Conn, info *exportInfo) *Conn {
	conn := &Conn{
		conn:       c,
		br:         bufio.NewReaderSize(c, 64<<10),
		info:       *info,
		wlock:      make(chan struct{}, 1),
		pending:    make(map[uint64]*request),
		drained:    make(chan struct{}),
		readerDone: make(chan struct{}),
	}
	go conn.readLoop()
	return conn
}

// Size is the export's size in bytes.
func (c *Conn) Size() int64 { return c.info.size }

// TransmissionFlags are the export's NBD_FLAG_* transmission flags.
func (c *Conn) TransmissionFlags() uint16 { return c.info.flags }

// BlockSizes are the server's size constraints: the minimum block size
// (offsets and lengths must be multiples of it), the preferred block size
// and the maximum payload of one request. Without NBD_INFO_BLOCK_SIZE from
// the server they are the spec's defaults, 1, 4096 and 32 MiB.
func (c *Conn) BlockSizes() (minimum, preferred, maximum uint32) {
	return c.info.minBlock, c.info.prefBlock, c.info.maxPayload
}

// Structured reports whether the server agreed to structured replies.
func (c *Conn) Structured() bool { return c.info.structured }

// MetaContexts are the names of the meta contexts selected for
// BlockStatus, sorted.
func (c *Conn) MetaContexts() []string {
	var names []string
	for _, name := range c.info.contexts {
		names = append(names, name)
	}
	slices.Sort(names)
	return names
}

// ReadAt reads len(p) bytes at off into p. Requests larger than the
// maximum payload are split. p is not touched after ReadAt returns. When
// ctx ends, ReadAt returns ctx.Err() at once or, if reply data for p is
// arriving right then, once the piece being copied (at most 256 KiB) is
// in; the rest of the reply is dropped when it comes.
func (c *Conn) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := c.checkRange(off, int64(len(p))); err != nil {
		return fmt.Errorf("nbd read %d bytes at %d: %w", len(p), off, err)
	}
	err := c.pipeline(ctx, off, int64(len(p)), c.maxIO(), func(o, n int64) (*request, error) {
		return c.send(ctx, nbd.CmdRead, 0, o, uint32(n), nil, p[o-off:o-off+n])
	})
	return opErr(ctx, err, "read %d bytes at %d", len(p), off)
}

// WriteAt writes p at off. Requests larger than the maximum payload are
// split. With fua it returns once the data is on stable storage: it sets
// NBD_CMD_FLAG_FUA, or flushes afterwards if the server offers only flush
// (and ignores fua if the server offers neither). p is not kept after
// WriteAt returns; when ctx ends while a request is being written, the
// write is cut short and the connection closed, as the stream cannot go
// on from the middle of a request.
func (c *Conn) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := c.checkRange(off, int64(len(p))); err != nil {
		return fmt.Errorf("nbd write %d bytes at %d: %w", len(p), off, err)
	}
	flags, flush := c.fua(fua)
	err := c.pipeline(ctx, off, int64(len(p)), c.maxIO(), func(o, n int64) (*request, error) {
		return c.send(ctx, nbd.CmdWrite, flags, o, uint32(n), p[o-off:o-off+n], nil)
	})
	if err == nil && flush {
		err = c.Flush(ctx)
	}
	return opErr(ctx, err, "write %d bytes at %d", len(p), off)
}

// Flush returns once every write the server replied to before the flush
// is on stable storage. It fails with errors.ErrUnsupported when the
// server does not offer NBD_CMD_FLUSH.
func (c *Conn) Flush(ctx context.Context) error {
	if err := c.need(nbd.FlagSendFlush, "NBD_FLAG_SEND_FLUSH"); err != nil {
		return fmt.Errorf("nbd flush: %w", err)
	}
	r, err := c.send(ctx, nbd.CmdFlush, 0, 0, 0, nil, nil)
	if err == nil {
		err = c.wait(ctx, r)
	}
	return opErr(ctx, err, "flush")
}

// Trim tells the server the n bytes at off are no longer needed (NBD_CMD_TRIM);
// fua as for WriteAt. It fails with errors.ErrUnsupported when the server
// does not offer trim.
func (c *Conn) Trim(ctx context.Context, off, n int64, fua bool) error {
	if err := c.need(nbd.FlagSendTrim, "NBD_FLAG_SEND_TRIM"); err != nil {
		return fmt.Errorf("nbd trim %d bytes at %d: %w", n, off, err)
	}
	return c.effect(ctx, nbd.CmdTrim, 0, off, n, fua, "trim")
}

// Zero writes n zero bytes at off without sending them
// (NBD_CMD_WRITE_ZEROES). With noHole the range stays allocated; with
// fastZero the server fails at once with ENOTSUP unless zeroing is faster
// than writing; fua as for WriteAt. It fails with errors.ErrUnsupported
// when the server does not offer write zeroes (or fast zero, if asked).
func (c *Conn) Zero(ctx context.Context, off, n int64, noHole, fastZero, fua bool) error {
	if err := c.need(nbd.FlagSendWriteZeroes, "NBD_FLAG_SEND_WRITE_ZEROES"); err != nil {
		return fmt.Errorf("nbd zero %d bytes at %d: %w", n, off, err)
	}
	var flags uint16
	if noHole {
		flags |= nbd.CmdFlagNoHole
	}
	if fastZero {
		if err := c.need(nbd.FlagSendFastZero, "NBD_FLAG_SEND_FAST_ZERO"); err != nil {
			return fmt.Errorf("nbd zero %d bytes at %d: %w", n, off, err)
		}
		flags |= nbd.CmdFlagFastZero
	}
	return c.effect(ctx, nbd.CmdWriteZeroes, flags, off, n, fua, "zero")
}

// Cache asks the server to prefetch the n bytes at off (NBD_CMD_CACHE).
// It fails with errors.ErrUnsupported when the server does not offer it.
func (c *Conn) Cache(ctx context.Context, off, n int64) error {
	if err := c.need(nbd.FlagSendCache, "NBD_FLAG_SEND_CACHE"); err != nil {
		return fmt.Errorf("nbd cache %d bytes at %d: %w", n, off, err)
	}
	return c.effect(ctx, nbd.CmdCache, 0, off, n, false, "cache")
}

// BlockStatus describes the range at off, for each selected meta context
// (keyed by name). Each context's extents are consecutive from off; they
// may cover less than n bytes (ask again for the rest) but never more
// (the client clips them), and with reqOne there is exactly one. A range
// longer than 4 GiB is asked about in its first 4 GiB only. It fails with
// errors.ErrUnsupported when no meta context was selected.
func (c *Conn) BlockStatus(ctx context.Context, off, n int64, reqOne bool) (map[string][]nbd.Extent, error) {
	if len(c.info.contexts) == 0 {
		return nil, fmt.Errorf("nbd block status: %w: no meta context selected", errors.ErrUnsupported)
	}
	if err := c.checkRange(off, n); err != nil {
		return nil, fmt.Errorf("nbd block status of %d bytes at %d: %w", n, off, err)
	}
	if n == 0 {
		return nil, fmt.Errorf("nbd block status at %d: empty range", off)
	}
	var flags uint16
	if reqOne {
		flags = nbd.CmdFlagReqOne
	}
	r, err := c.send(ctx, nbd.CmdBlockStatus, flags, off, uint32(min(n, c.maxEffect())), nil, nil)
	if err == nil {
		err = c.wait(ctx, r)
	}
	if err != nil {
		return nil, opErr(ctx, err, "block status of %d bytes at %d", n, off)
	}
	return r.extents, nil
}

// Close waits for the requests in flight (including those whose callers
// gave up), sends NBD_CMD_DISC and closes the connection. Calls after the
// first return nil.
func (c *Conn) Close() error {
	return c.Shutdown(context.Background())
}

// Shutdown is Close with a bound: when ctx ends before the requests in
// flight finish, it closes the connection at once, failing them, and
// returns ctx.Err().
func (c *Conn) Shutdown(ctx context.Context) error {
	c.mu.Lock()
	if c.closing == nil {
		c.closing = ErrClosed
	}
	c.checkDrainedLocked()
	c.mu.Unlock()

	var err error
	select {
	case <-c.drained:
		c.discOnce.Do(func() { err = c.disconnect(ctx) })
	case <-ctx.Done():
		err = ctx.Err()
	}
	c.fail(ErrClosed)
	<-c.readerDone
	return err
}

// disconnect sends NBD_CMD_DISC if the connection still works.
func (c *Conn) disconnect(ctx context.Context) error {
	select {
	case c.wlock <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-c.wlock }()
	if c.failure() != nil {
		return nil
	}
	if err := c.write(ctx, header(0, nbd.CmdDisc, 0, 0, 0), nil); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("nbd: send disconnect: %w", err)
	}
	return nil
}

// fua returns the command flag for a write with fua, and whether a flush
// must follow instead.
func (c *Conn) fua(fua bool) (flags uint16, flush bool) {
	switch {
	case !fua:
		return 0, false
	case c.info.flags&nbd.FlagSendFUA != 0:
		return nbd.CmdFlagFUA, false
	default:
		return 0, c.info.flags&nbd.FlagSendFlush != 0
	}
}

// need fails with errors.ErrUnsupported unless the server set flag.
func (c *Conn) need(flag uint16, name string) error {
	if c.info.flags&flag == 0 {
		return fmt.Errorf("%w: server did not set %s", errors.ErrUnsupported, name)
	}
	return nil
}

// effect runs a request without payload (trim, zero, cache) over a range
// of any size.
func (c *Conn) effect(ctx context.Context, cmd, flags uint16, off, n int64, fua bool, what string) error {
	if err := c.checkRange(off, n); err != nil {
		return fmt.Errorf("nbd %s %d bytes at %d: %w", what, n, off, err)
	}
	fuaFlag, flush := c.fua(fua)
	err := c.pipeline(ctx, off, n, c.maxEffect(), func(o, k int64) (*request, error) {
		return c.send(ctx, cmd, flags|fuaFlag, o, uint32(k), nil, nil)
	})
	if err == nil && flush {
		err = c.Flush(ctx)
	}
	return opErr(ctx, err, "%s %d bytes at %d", what, n, off)
}

// checkRange rejects ranges the client must not send: negative,
// overflowing, or not aligned to the minimum block size. Ranges beyond
// the export's end are left for the server to refuse.
func (c *Conn) checkRange(off, n int64) error {
	if off < 0 || n < 0 || off > math.MaxInt64-n {
		return errors.New("invalid range")
	}
	if mb := int64(c.info.minBlock); off%mb != 0 || n%mb != 0 {
		return fmt.Errorf("offset and length must be multiples of the minimum block size %d", mb)
	}
	return nil
}

// maxIO is the largest READ or WRITE sent: the server's maximum payload,
// but no more than 32 MiB, in whole minimum blocks.
func (c *Conn) maxIO() int64 {
	return alignDown(min(int64(c.info.maxPayload), nbd.DefaultMaxPayload), int64(c.info.minBlock))
}

// maxEffect is the largest length of a request without payload.
func (c *Conn) maxEffect() int64 {
	return alignDown(math.MaxUint32, int64(max(c.info.minBlock, c.info.prefBlock, 1)))
}

func alignDown(n, block int64) int64 {
	return max(n/block*block, block)
}

// opErr returns nil for nil, ctx.Err() as is, and anything else wrapped
// with what failed.
func opErr(ctx context.Context, err error, format string, args ...any) error {
	if err == nil {
		return nil
	}
	if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
		return ctx.Err()
	}
	return fmt.Errorf("nbd %s: %w", fmt.Sprintf(format, args...), err)
}

// pipeline covers [off, off+n) with requests of at most piece bytes made by
// start, keeping up to window of them in flight, and returns the first
// error. It stops sending after an error but waits for what it sent.
func (c *Conn) pipeline(ctx context.Context, off, n, piece int64, start func(off, n int64) (*request, error)) error {
	var (
		inflight []*request
		first    error
	)
	keep := func(err error) {
		if err != nil && first == nil {
			first = err
		}
	}
	for done := int64(0); done < n && first == nil; {
		if len(inflight) == window {
			keep(c.wait(ctx, inflight[0]))
			inflight = inflight[1:]
			if first != nil {
				break
			}
		}
		k := min(n-done, piece)
		r, err := start(off+done, k)
		if err != nil {
			keep(err)
			break
		}
		inflight = append(inflight, r)
		done += k
	}
	for _, r := range inflight {
		keep(c.wait(ctx, r))
	}
	return first
}

// header encodes a request header.
func header(cookie uint64, cmd, flags uint16, off uint64, length uint32) []byte {
	b := make([]byte, nbd.RequestHeaderLen)
	binary.BigEndian.PutUint32(b[0:], nbd.MagicRequest)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], cmd)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], length)
	return b
}

// send registers a request and writes it. The caller must wait for it.
// payload is the data of a WRITE; buf where a READ's data goes.
func (c *Conn) send(ctx context.Context, cmd, flags uint16, off int64, length uint32, payload, buf []byte) (*request, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	r := &request{cmd: cmd, flags: flags, off: uint64(off), length: length, buf: buf, done: make(chan struct{})}
	c.mu.Lock()
	if err := c.unusableLocked(); err != nil {
		c.mu.Unlock()
		return nil, err
	}
	c.cookie++
	r.cookie = c.cookie
	c.pending[r.cookie] = r
	c.mu.Unlock()

	select {
	case c.wlock <- struct{}{}:
	case <-ctx.Done():
		c.finish(r, ctx.Err())
		return nil, ctx.Err()
	}
	defer func() { <-c.wlock }()
	if err := c.failure(); err != nil {
		return nil, err
	}
	if err := c.write(ctx, header(r.cookie, cmd, flags, r.off, length), payload); err != nil {
		if ctx.Err() != nil {
			// Part of the request may be out: the stream cannot go on.
			c.fail(fmt.Errorf("nbd: connection closed: a request was interrupted while being sent: %w", ctx.Err()))
			return nil, ctx.Err()
		}
		c.fail(fmt.Errorf("nbd: send request: %w", err))
		return nil, c.failure()
	}
	return r, nil
}

// unusableLocked says why no new request may be sent, or nil.
func (c *Conn) unusableLocked() error {
	if c.err != nil {
		return c.err
	}
	return c.closing
}

// failure is why the connection failed.
func (c *Conn) failure() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// write sends a request header and payload; the caller holds wlock. When
// ctx ends during the write, the write is interrupted (and the stream is
// then broken).
func (c *Conn) write(ctx context.Context, hdr, payload []byte) error {
	bufs := net.Buffers{hdr}
	if len(payload) > 0 {
		bufs = append(bufs, payload)
	}
	if ctx.Done() == nil {
		_, err := bufs.WriteTo(c.conn)
		return err
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		_ = c.conn.SetWriteDeadline(aLongTimeAgo)
		close(fired)
	})
	_, err := bufs.WriteTo(c.conn)
	if !stop() {
		<-fired
		if rerr := c.conn.SetWriteDeadline(time.Time{}); err == nil {
			err = rerr
		}
	}
	return err
}

// wait returns the request's result, or ctx.Err() as soon as ctx ends;
// the reply is then read and dropped when it comes.
func (c *Conn) wait(ctx context.Context, r *request) error {
	select {
	case <-r.done:
	case <-ctx.Done():
		select {
		case <-r.done:
		default:
			r.detach()
			return ctx.Err()
		}
	}
	r.detach()
	return r.result
}

// detach makes sure the reader no longer touches r.buf.
func (r *request) detach() {
	r.mu.Lock()
	r.detached = true
	r.mu.Unlock()
}

// finish completes r with result unless it already is.
func (c *Conn) finish(r *request, result error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pending[r.cookie] != r {
		return
	}
	delete(c.pending, r.cookie)
	r.result = result
	close(r.done)
	c.checkDrainedLocked()
}

// fail makes the connection unusable for err, fails every request in
// flight with it and closes the connection. Only the first call counts.
func (c *Conn) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = err
	for cookie, r := range c.pending {
		delete(c.pending, cookie)
		r.result = err
		close(r.done)
	}
	c.checkDrainedLocked()
	c.mu.Unlock()
	_ = c.conn.Close()
}

func (c *Conn) checkDrainedLocked() {
	if c.closing != nil && len(c.pending) == 0 && !c.drainedSet {
		c.drainedSet = true
		close(c.drained)
	}
}

// serverShutdown starts a soft disconnect, which the spec asks of a client
// that receives ESHUTDOWN.
func (c *Conn) serverShutdown() {
	c.mu.Lock()
	if c.closing == nil {
		c.closing = fmt.Errorf("%w: server is shutting down", ErrClosed)
	}
	c.mu.Unlock()
	go c.Close()
}
