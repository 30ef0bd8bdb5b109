package nbd

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// request is one parsed transmission request.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	off    uint64
	length uint32
}

// reply is what the writer sends for one request: buffers written in
// order, then release (if set) to return pooled buffers.
type reply struct {
	bufs    [][]byte
	release func()
}

// errProtocol marks a stream the server cannot go on reading.
var errProtocol = errors.New("protocol violation")

// transmit runs the transmission phase: this goroutine reads requests, one
// goroutine per request in flight (at most MaxInFlight) runs it, and one
// writer sends the replies in the order they finish. It returns when the
// client disconnects, the stream breaks, or the server shuts down, after
// every request in flight has been answered.
func (c *conn) transmit(s *session) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// waitCtx ends a wait for memory budget: at Shutdown too, which
	// answers the waiting request with ESHUTDOWN.
	waitCtx, stopWaiting := context.WithCancel(ctx)
	defer stopWaiting()
	c.mu.Lock()
	c.cancelRequests = cancel // Close ends requests that would never finish
	c.stopWaiting = stopWaiting
	nc := c.nc
	c.mu.Unlock()
	if c.srv.shuttingDown() { // stop came before stopWaiting was set
		stopWaiting()
	}
	// Negotiation flushed its last reply, so the buffer is empty.
	c.bw.Reset(&replyWriter{nc: nc, timeout: c.srv.replyTimeout()})
	maxInFlight := c.srv.maxInFlight()
	replies := make(chan reply, maxInFlight)
	writerDone := make(chan error, 1)
	go func() { writerDone <- c.writeReplies(replies, cancel) }()

	sem := make(chan struct{}, maxInFlight)
	var workers sync.WaitGroup
	srvMem := c.srv.memory()
	mem := memory{conn: newBudget(min(maxBufferedBytes, srvMem.limit/4)), srv: srvMem}
	readErr := c.readRequests(ctx, waitCtx, s, sem, mem, &workers, replies)
	if errors.Is(readErr, errClientGone) {
		// No reply can reach it: stop requests that wait (a write held
		// back by a full volume log could wait for a long time).
		cancel()
		readErr = nil
	}

	workers.Wait()
	close(replies)
	// A failed write closed the connection under the reader: its error
	// says why the connection ended, not the reader's.
	if writeErr := <-writerDone; writeErr != nil {
		return writeErr
	}
	return readErr
}

// errClientGone: the client closed the connection without DISC.
var errClientGone = errors.New("client gone")

// readRequests reads requests until DISC, EOF, a broken stream or
// shutdown, and starts a worker for each.
func (c *conn) readRequests(ctx, waitCtx context.Context, s *session, sem chan struct{}, mem memory, workers *sync.WaitGroup, replies chan<- reply) error {
	var hdr [RequestHeaderLen]byte
	size := uint64(s.export.Backend.Size())
	maxPayload := s.export.maxPayload()
	for {
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			if c.srv.shuttingDown() {
				return nil // shutdown interrupts the read
			}
			if errors.Is(err, io.EOF) {
				return errClientGone
			}
			return fmt.Errorf("read request: %w", err)
		}
		if magic := binary.BigEndian.Uint32(hdr[0:]); magic != MagicRequest {
			return fmt.Errorf("%w: bad request magic %#x", errProtocol, magic)
		}
		req := request{
			flags:  binary.BigEndian.Uint16(hdr[4:]),
			typ:    binary.BigEndian.Uint16(hdr[6:]),
			cookie: binary.BigEndian.Uint64(hdr[8:]),
			off:    binary.BigEndian.Uint64(hdr[16:]),
			length: binary.BigEndian.Uint32(hdr[24:]),
		}
		if req.typ == CmdDisc {
			return nil
		}
		if c.srv.shuttingDown() {
			if req.typ == CmdWrite {
				if _, err := io.CopyN(io.Discard, c.br, int64(req.length)); err != nil {
					return err
				}
			}
			replies <- c.errorReply(s, req, ESHUTDOWN, "server is shutting down")
			continue
		}

		var payload *[]byte
		if req.typ == CmdWrite {
			// The payload is on the stream whatever the verdict: an
			// invalid write is read and dropped so the next request
			// parses.
			errno, msg := checkWrite(s, req, size, maxPayload)
			if errno != 0 {
				if _, err := io.CopyN(io.Discard, c.br, int64(req.length)); err != nil {
					return fmt.Errorf("read write payload: %w", err)
				}
				replies <- c.errorReply(s, req, errno, msg)
				continue
			}
		}
		sem <- struct{}{}
		// Payload buffers count against the connection's and the
		// server's budget from here until their reply is written. The
		// wait is before a WRITE's payload is read, so a client that
		// sends more than the server can hold meets TCP backpressure.
		cost := payloadCost(req, maxPayload)
		if err := mem.acquire(waitCtx, cost); err != nil {
			<-sem
			if ctx.Err() != nil {
				return nil // the connection is closing: its writer says why
			}
			if req.typ == CmdWrite { // Shutdown began
				if _, err := io.CopyN(io.Discard, c.br, int64(req.length)); err != nil {
					return err
				}
			}
			replies <- c.errorReply(s, req, ESHUTDOWN, "server is shutting down")
			continue
		}
		if req.typ == CmdWrite {
			payload = getBuf(int(req.length))
			if _, err := io.ReadFull(c.br, *payload); err != nil {
				putBuf(payload)
				mem.release(cost)
				<-sem
				return fmt.Errorf("read write payload: %w", err)
			}
		}
		workers.Add(1)
		go func() {
			defer workers.Done()
			r := c.handle(ctx, s, req, payload, size, maxPayload)
			if cost > 0 {
				free := r.release
				r.release = func() {
					if free != nil {
						free()
					}
					mem.release(cost)
				}
			}
			replies <- r
			<-sem
		}()
	}
}

// payloadCost is the buffer a request holds while it runs: its payload
// for a WRITE (already checked against maxPayload), its data for a READ
// that will be served. Nothing for the rest.
func payloadCost(req request, maxPayload uint32) int64 {
	if req.typ == CmdWrite || (req.typ == CmdRead && req.length <= maxPayload) {
		return int64(req.length)
	}
	return 0
}

// checkWrite validates a WRITE before its payload is read.
func checkWrite(s *session, req request, size uint64, maxPayload uint32) (uint32, string) {
	switch {
	case req.flags&^CmdFlagFUA != 0:
		return EINVAL, fmt.Sprintf("flags %#x are not valid on WRITE", req.flags)
	case s.export.ReadOnly:
		return EPERM, "export is read-only"
	case req.length > maxPayload:
		return EINVAL, fmt.Sprintf("write of %d bytes exceeds the maximum payload %d", req.length, maxPayload)
	case !inRange(req.off, uint64(req.length), size):
		return ENOSPC, fmt.Sprintf("write at %d+%d is beyond the export's end %d", req.off, req.length, size)
	}
	return 0, ""
}

func inRange(off, length, size uint64) bool { return off <= size && length <= size-off }

// allowedFlags are the command flags each command takes; FUA is accepted
// on every command, as the spec asks.
func allowedFlags(s *session, typ uint16) uint16 {
	switch typ {
	case CmdRead:
		if s.structured {
			return CmdFlagFUA | CmdFlagDF
		}
	case CmdWriteZeroes:
		return CmdFlagFUA | CmdFlagNoHole | CmdFlagFastZero
	case CmdBlockStatus:
		return CmdFlagFUA | CmdFlagReqOne
	}
	return CmdFlagFUA
}

// handle runs one request and returns its reply. payload, for a WRITE, is
// returned to the pool here.
func (c *conn) handle(ctx context.Context, s *session, req request, payload *[]byte, size uint64, maxPayload uint32) reply {
	b := s.export.Backend
	if req.flags&^allowedFlags(s, req.typ) != 0 {
		if payload != nil {
			putBuf(payload)
		}
		return c.errorReply(s, req, EINVAL, fmt.Sprintf("flags %#x are not valid on command %d", req.flags, req.typ))
	}
	off, n := int64(req.off), int64(req.length)
	fua := req.flags&CmdFlagFUA != 0
	var err error
	switch req.typ {
	case CmdRead:
		return c.read(ctx, s, req, size, maxPayload)
	case CmdWrite:
		err = b.WriteAt(ctx, *payload, off, fua)
		putBuf(payload)
	case CmdFlush:
		err = b.Flush(ctx)
	case CmdTrim:
		switch {
		case s.export.ReadOnly:
			return c.errorReply(s, req, EPERM, "export is read-only")
		case !inRange(req.off, uint64(req.length), size):
			return c.errorReply(s, req, EINVAL, rangeMsg("trim", req, size))
		}
		if t, ok := b.(Trimmer); ok && n > 0 {
			err = t.Trim(ctx, off, n)
		}
		if err == nil && fua {
			err = b.Flush(ctx)
		}
	case CmdWriteZeroes:
		switch {
		case s.export.ReadOnly:
			return c.errorReply(s, req, EPERM, "export is read-only")
		case !inRange(req.off, uint64(req.length), size):
			return c.errorReply(s, req, ENOSPC, rangeMsg("write zeroes", req, size))
		}
		err = c.writeZeroes(ctx, b, off, n, req.flags)
		if err == nil && fua {
			err = b.Flush(ctx)
		}
	case CmdCache:
		if !inRange(req.off, uint64(req.length), size) {
			return c.errorReply(s, req, EINVAL, rangeMsg("cache", req, size))
		}
	case CmdBlockStatus:
		return c.blockStatus(ctx, s, req, size)
	default:
		return c.errorReply(s, req, EINVAL, fmt.Sprintf("unknown command %d", req.typ))
	}
	if err != nil {
		return c.backendError(s, req, err)
	}
	return simpleReply(req.cookie, 0)
}

func rangeMsg(what string, req request, size uint64) string {
	return fmt.Sprintf("%s at %d+%d is beyond the export's end %d", what, req.off, req.length, size)
}

// zeros is written by WRITE_ZEROES on a backend without a Zeroer. Backends
// do not modify what they are given, so one buffer serves all.
var zeros = make([]byte, 1<<20)

func (c *conn) writeZeroes(ctx context.Context, b Backend, off, n int64, flags uint16) error {
	if z, ok := b.(Zeroer); ok {
		return z.Zero(ctx, off, n, flags&CmdFlagNoHole != 0)
	}
	if flags&CmdFlagFastZero != 0 {
		return fmt.Errorf("%w: this export zeroes by writing", ErrNotSupported)
	}
	for n > 0 {
		k := min(n, int64(len(zeros)))
		if err := b.WriteAt(ctx, zeros[:k], off, false); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// sparseReadMin is the smallest READ worth asking the backend for extents:
// below it, reading is cheaper than finding holes.
const sparseReadMin = 64 << 10

func (c *conn) read(ctx context.Context, s *session, req request, size uint64, maxPayload uint32) reply {
	switch {
	case req.length > maxPayload:
		return c.errorReply(s, req, EINVAL, fmt.Sprintf("read of %d bytes exceeds the maximum payload %d", req.length, maxPayload))
	case !inRange(req.off, uint64(req.length), size):
		return c.errorReply(s, req, EINVAL, rangeMsg("read", req, size))
	}
	b := s.export.Backend
	buf := getBuf(int(req.length))
	release := func() { putBuf(buf) }
	p := *buf

	var extents []Extent
	if x, ok := b.(Extenter); ok && s.structured && req.flags&CmdFlagDF == 0 && req.length >= sparseReadMin {
		var err error
		if extents, err = x.Extents(ctx, int64(req.off), int64(req.length)); err != nil {
			if errors.Is(err, context.DeadlineExceeded) {
				// The backend ran out of time: reading it all would only
				// take as long again.
				return c.backendError(s, req, err)
			}
			extents = nil // read it all instead
		}
	}
	if !hasZeroHole(extents) {
		if err := b.ReadAt(ctx, p, int64(req.off)); err != nil {
			release()
			return c.backendError(s, req, err)
		}
		if !s.structured {
			return reply{bufs: [][]byte{simpleHeader(req.cookie, 0), p}, release: release}
		}
		hdr := chunkHeader(nil, ReplyFlagDone, ReplyTypeOffsetData, req.cookie, 8+len(p))
		hdr = binary.BigEndian.AppendUint64(hdr, req.off)
		return reply{bufs: [][]byte{hdr, p}, release: release}
	}

	// Read only the data; send holes as OFFSET_HOLE chunks.
	var bufs [][]byte
	pos := int64(0)
	for _, e := range extents {
		length := min(e.Length, int64(len(p))-pos)
		if length <= 0 {
			break
		}
		off := req.off + uint64(pos)
		if e.Flags&StateZero != 0 {
			hdr := chunkHeader(nil, 0, ReplyTypeOffsetHole, req.cookie, 12)
			hdr = binary.BigEndian.AppendUint64(hdr, off)
			hdr = binary.BigEndian.AppendUint32(hdr, uint32(length))
			bufs = append(bufs, hdr)
		} else {
			data := p[pos : pos+length]
			if err := b.ReadAt(ctx, data, int64(off)); err != nil {
				release()
				return c.backendError(s, req, err)
			}
			hdr := chunkHeader(nil, 0, ReplyTypeOffsetData, req.cookie, 8+len(data))
			hdr = binary.BigEndian.AppendUint64(hdr, off)
			bufs = append(bufs, hdr, data)
		}
		pos += length
	}
	if rest := int64(len(p)) - pos; rest > 0 { // extents fell short: read the rest
		data := p[pos:]
		if err := b.ReadAt(ctx, data, int64(req.off)+pos); err != nil {
			release()
			return c.backendError(s, req, err)
		}
		hdr := chunkHeader(nil, 0, ReplyTypeOffsetData, req.cookie, 8+len(data))
		hdr = binary.BigEndian.AppendUint64(hdr, req.off+uint64(pos))
		bufs = append(bufs, hdr, data)
	}
	bufs = append(bufs, chunkHeader(nil, ReplyFlagDone, ReplyTypeNone, req.cookie, 0))
	return reply{bufs: bufs, release: release}
}

func hasZeroHole(extents []Extent) bool {
	for _, e := range extents {
		if e.Flags&StateZero != 0 {
			return true
		}
	}
	return false
}

// maxDescriptors bounds one BLOCK_STATUS chunk, as the spec advises.
const maxDescriptors = 1 << 20

func (c *conn) blockStatus(ctx context.Context, s *session, req request, size uint64) reply {
	switch {
	case !s.structured || len(s.contexts) == 0:
		return c.errorReply(s, req, EINVAL, "BLOCK_STATUS needs a meta context selected with SET_META_CONTEXT for this export")
	case req.length == 0 || !inRange(req.off, uint64(req.length), size):
		return c.errorReply(s, req, EINVAL, rangeMsg("block status", req, size))
	}
	var bufs [][]byte
	for i, mc := range s.contexts {
		extents := []Extent{{Length: int64(req.length)}}
		if mc.fn != nil {
			var err error
			if extents, err = mc.fn(ctx, int64(req.off), int64(req.length)); err != nil {
				return c.backendError(s, req, err)
			}
		}
		desc := binary.BigEndian.AppendUint32(nil, mc.id)
		left := int64(req.length)
		count := 0
		var lastFlags uint32
		for _, e := range extents {
			length := min(e.Length, left)
			if length <= 0 {
				break
			}
			if count > 0 && e.Flags == lastFlags { // merge equal neighbours
				prev := binary.BigEndian.Uint32(desc[len(desc)-8:])
				binary.BigEndian.PutUint32(desc[len(desc)-8:], prev+uint32(length))
			} else {
				if count == maxDescriptors {
					break
				}
				desc = binary.BigEndian.AppendUint32(desc, uint32(length))
				desc = binary.BigEndian.AppendUint32(desc, e.Flags)
				count++
			}
			lastFlags = e.Flags
			left -= length
			if req.flags&CmdFlagReqOne != 0 {
				break
			}
		}
		if count == 0 {
			return c.errorReply(s, req, EIO, "backend reported no extents")
		}
		if req.flags&CmdFlagReqOne != 0 && len(desc) > 12 {
			desc = desc[:12]
		}
		var flags uint16
		if i == len(s.contexts)-1 {
			flags = ReplyFlagDone
		}
		bufs = append(bufs, chunkHeader(nil, flags, ReplyTypeBlockStatus, req.cookie, len(desc)), desc)
	}
	return reply{bufs: bufs}
}

func simpleHeader(cookie uint64, errno uint32) []byte {
	b := make([]byte, SimpleReplyLen)
	binary.BigEndian.PutUint32(b[0:], MagicSimpleReply)
	binary.BigEndian.PutUint32(b[4:], errno)
	binary.BigEndian.PutUint64(b[8:], cookie)
	return b
}

func simpleReply(cookie uint64, errno uint32) reply {
	return reply{bufs: [][]byte{simpleHeader(cookie, errno)}}
}

func chunkHeader(dst []byte, flags, typ uint16, cookie uint64, length int) []byte {
	dst = binary.BigEndian.AppendUint32(dst, MagicStructuredReply)
	dst = binary.BigEndian.AppendUint16(dst, flags)
	dst = binary.BigEndian.AppendUint16(dst, typ)
	dst = binary.BigEndian.AppendUint64(dst, cookie)
	return binary.BigEndian.AppendUint32(dst, uint32(length))
}

// errorReply answers req with errno: an error chunk with msg when
// structured replies are on, else a simple reply.
func (c *conn) errorReply(s *session, req request, errno uint32, msg string) reply {
	if !s.structured {
		return simpleReply(req.cookie, errno)
	}
	msg = truncate(msg)
	b := chunkHeader(nil, ReplyFlagDone, ReplyTypeError, req.cookie, 6+len(msg))
	b = binary.BigEndian.AppendUint32(b, errno)
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	return reply{bufs: [][]byte{append(b, msg...)}}
}

func (c *conn) backendError(s *session, req request, err error) reply {
	errno := Errno(err)
	c.srv.logger().Warn("nbd request failed", "remote", c.remote, "export", s.export.Name,
		"command", req.typ, "offset", req.off, "length", req.length, "errno", errno, "error", err)
	return c.errorReply(s, req, errno, err.Error())
}

// writeReplies sends replies until the channel closes, flushing whenever no
// other reply is waiting, so replies that finish together share a write.
// After a write error it closes the connection (which stops the reader),
// cancels the requests' context and keeps draining so no worker blocks.
func (c *conn) writeReplies(replies <-chan reply, cancel context.CancelFunc) error {
	var werr error
	for r := range replies {
		if werr == nil {
			for _, b := range r.bufs {
				if _, werr = c.bw.Write(b); werr != nil {
					break
				}
			}
			if werr == nil && len(replies) == 0 {
				werr = c.bw.Flush()
			}
			if werr != nil {
				cancel()
				c.close()
			}
		}
		if r.release != nil {
			r.release()
		}
	}
	if werr == nil {
		werr = c.bw.Flush()
	}
	return werr
}

// maxBufferedBytes bounds the READ and WRITE payloads one connection holds
// at once (a quarter of the server's MaxMemory if that is less), so one
// client cannot take the whole server's budget.
const maxBufferedBytes = 128 << 20

// memory is the pair of budgets a request's buffers count against.
type memory struct{ conn, srv *budget }

// acquire takes n bytes of the connection's budget, then of the server's;
// on error it holds neither.
func (m memory) acquire(ctx context.Context, n int64) error {
	if err := m.conn.acquire(ctx, n); err != nil {
		return err
	}
	if err := m.srv.acquire(ctx, n); err != nil {
		m.conn.release(n)
		return err
	}
	return nil
}

func (m memory) release(n int64) {
	m.srv.release(n)
	m.conn.release(n)
}

// replyPiece is how much of a reply is written under one deadline: a
// client must take a piece every ReplyTimeout, however long the reply.
const replyPiece = 1 << 20

// replyWriter writes replies to the connection in pieces, each with a
// fresh write deadline, so a client that stops reading its replies
// fails the write after ReplyTimeout and the connection (with the memory
// its replies hold) is let go, while a slow reader that keeps reading is
// not cut off.
type replyWriter struct {
	nc      net.Conn
	timeout time.Duration
}

func (w *replyWriter) Write(p []byte) (int, error) {
	done := 0
	for done < len(p) {
		k := min(len(p)-done, replyPiece)
		if err := w.nc.SetWriteDeadline(time.Now().Add(w.timeout)); err != nil {
			return done, err
		}
		n, err := w.nc.Write(p[done : done+k])
		done += n
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				err = fmt.Errorf("client did not read its replies for %v: %w", w.timeout, err)
			}
			return done, err
		}
	}
	return done, nil
}
