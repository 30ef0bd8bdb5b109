package client

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// This file is the reader goroutine's: it reads replies and hands them to
// the requests waiting for them.

const (
	// readPiece is how much reply data the reader copies into a caller's
	// buffer at a time; a caller giving up waits for at most one piece.
	readPiece = 256 << 10
	// maxStatusChunk bounds a BLOCK_STATUS chunk: 2^20 extents, the most
	// the spec lets a server send.
	maxStatusChunk = 4 + 8<<20
	// maxErrorChunk bounds an error chunk: a message of at most 4096 bytes
	// plus fixed fields, with room for future error types.
	maxErrorChunk = 64 << 10
)

// readLoop reads replies until the connection fails or closes.
func (c *Conn) readLoop() {
	defer close(c.readerDone)
	for {
		err := c.readReply()
		if err == nil {
			continue
		}
		c.mu.Lock()
		if c.closing != nil && len(c.pending) == 0 {
			err = ErrClosed
		}
		c.mu.Unlock()
		c.fail(err)
		return
	}
}

// readErr wraps an I/O error of the reply stream.
func readErr(err error) error {
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("nbd: connection lost: read reply: %w", err)
}

func (c *Conn) lookup(cookie uint64) *request {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pending[cookie]
}

// readReply reads one simple reply or structured reply chunk and
// dispatches it.
func (c *Conn) readReply() error {
	var h [nbd.StructuredReplyLen]byte
	if _, err := io.ReadFull(c.br, h[:4]); err != nil {
		if errors.Is(err, io.EOF) {
			return errors.New("nbd: connection lost: server closed the connection")
		}
		return readErr(err)
	}
	switch magic := binary.BigEndian.Uint32(h[:]); magic {
	case nbd.MagicSimpleReply:
		if _, err := io.ReadFull(c.br, h[4:nbd.SimpleReplyLen]); err != nil {
			return readErr(err)
		}
		errno, cookie := binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
		r := c.lookup(cookie)
		if r == nil {
			return protocolf("simple reply for unknown cookie %d", cookie)
		}
		return c.simpleReply(r, errno)
	case nbd.MagicStructuredReply:
		if !c.info.structured {
			return protocolf("structured reply without NBD_OPT_STRUCTURED_REPLY")
		}
		if _, err := io.ReadFull(c.br, h[4:]); err != nil {
			return readErr(err)
		}
		flags, typ := binary.BigEndian.Uint16(h[4:]), binary.BigEndian.Uint16(h[6:])
		cookie, length := binary.BigEndian.Uint64(h[8:]), binary.BigEndian.Uint32(h[16:])
		r := c.lookup(cookie)
		if r == nil {
			return protocolf("reply chunk for unknown cookie %d", cookie)
		}
		if err := c.chunk(r, flags, typ, length); err != nil {
			return err
		}
		if flags&nbd.ReplyFlagDone == 0 {
			return nil
		}
		if err := c.complete(r); err != nil {
			return err
		}
		c.finish(r, r.err)
		return nil
	default:
		return protocolf("bad reply magic %#x", magic)
	}
}

// simpleReply handles a simple reply to r.
func (c *Conn) simpleReply(r *request, errno uint32) error {
	if r.err != nil || len(r.covered) > 0 || r.extents != nil {
		// Taking it would drop an error chunk, or the chunks' data.
		return protocolf("simple reply to cookie %d after structured reply chunks for it", r.cookie)
	}
	if errno != 0 {
		c.finish(r, c.errorReply(errno, ""))
		return nil
	}
	switch r.cmd {
	case nbd.CmdRead:
		if err := c.readData(r, r.buf); err != nil {
			return err
		}
	case nbd.CmdBlockStatus:
		return protocolf("simple reply to a successful NBD_CMD_BLOCK_STATUS")
	}
	c.finish(r, nil)
	return nil
}

// errorReply turns an error value into an *Error, starting a soft
// disconnect on ESHUTDOWN.
func (c *Conn) errorReply(errno uint32, msg string) error {
	if errno == 0 {
		errno = nbd.EINVAL // "MUST be nonzero"; the spec says to treat the unexpected as EINVAL
	}
	if errno == nbd.ESHUTDOWN {
		c.serverShutdown()
	}
	return &Error{Errno: errno, Message: msg}
}

// chunk handles one structured reply chunk for r, payload included.
func (c *Conn) chunk(r *request, flags, typ uint16, length uint32) error {
	name := nbd.ReplyTypeName(typ)
	switch {
	case typ == nbd.ReplyTypeNone:
		if length != 0 || flags&nbd.ReplyFlagDone == 0 {
			return protocolf("%s chunk with length %d and flags %#x", name, length, flags)
		}
		return nil

	case typ == nbd.ReplyTypeOffsetData || typ == nbd.ReplyTypeOffsetHole:
		if r.cmd != nbd.CmdRead {
			return protocolf("%s chunk in reply to command %d", name, r.cmd)
		}
		if typ == nbd.ReplyTypeOffsetData && length <= 8 || typ == nbd.ReplyTypeOffsetHole && length != 12 {
			return protocolf("%s chunk of length %d", name, length)
		}
		var b [12]byte // offset, and a hole's size
		fixed := 8
		if typ == nbd.ReplyTypeOffsetHole {
			fixed = 12
		}
		if _, err := io.ReadFull(c.br, b[:fixed]); err != nil {
			return readErr(err)
		}
		off, n := binary.BigEndian.Uint64(b[:]), uint64(length-8)
		if typ == nbd.ReplyTypeOffsetHole {
			n = uint64(binary.BigEndian.Uint32(b[8:]))
		}
		if n == 0 || off < r.off || n > uint64(r.length) || off-r.off > uint64(r.length)-n {
			return protocolf("%s chunk [%d, +%d) outside request [%d, +%d)", name, off, n, r.off, r.length)
		}
		start := off - r.off
		if !r.covered.add(start, start+n) {
			return protocolf("%s chunk [%d, +%d) overlaps an earlier chunk", name, off, n)
		}
		dst := r.buf[start : start+n]
		if typ == nbd.ReplyTypeOffsetData {
			return c.readData(r, dst)
		}
		r.mu.Lock()
		if !r.detached {
			clear(dst)
		}
		r.mu.Unlock()
		return nil

	case typ == nbd.ReplyTypeBlockStatus:
		if r.cmd != nbd.CmdBlockStatus {
			return protocolf("%s chunk in reply to command %d", name, r.cmd)
		}
		if length < 12 || (length-4)%8 != 0 || length > maxStatusChunk {
			return protocolf("%s chunk of length %d", name, length)
		}
		b := make([]byte, length)
		if _, err := io.ReadFull(c.br, b); err != nil {
			return readErr(err)
		}
		return c.blockStatus(r, b)

	case typ&nbd.ReplyTypeErrorCategory != 0:
		if length < 6 || length > maxErrorChunk {
			return protocolf("%s chunk of length %d", name, length)
		}
		b := make([]byte, length)
		if _, err := io.ReadFull(c.br, b); err != nil {
			return readErr(err)
		}
		errno, mlen := binary.BigEndian.Uint32(b), uint32(binary.BigEndian.Uint16(b[4:]))
		fixed := uint32(6)
		if typ == nbd.ReplyTypeErrorOffset {
			fixed = 14
		}
		if length < fixed || mlen > length-fixed {
			return protocolf("%s chunk of length %d with a message of %d bytes", name, length, mlen)
		}
		if r.err == nil {
			r.err = c.errorReply(errno, string(b[6:6+mlen]))
		}
		return nil

	default:
		return protocolf("unknown chunk type %d", typ)
	}
}

// blockStatus parses a BLOCK_STATUS chunk payload b for r.
func (c *Conn) blockStatus(r *request, b []byte) error {
	id := binary.BigEndian.Uint32(b)
	name, ok := c.info.contexts[id]
	if !ok {
		return protocolf("block status for unknown meta context ID %d", id)
	}
	if _, dup := r.extents[name]; dup {
		return protocolf("second block status chunk for %s", name)
	}
	count := (len(b) - 4) / 8
	if r.flags&nbd.CmdFlagReqOne != 0 && count != 1 {
		return protocolf("%d extents for %s in reply to NBD_CMD_FLAG_REQ_ONE", count, name)
	}
	extents := make([]nbd.Extent, 0, count)
	var sum uint64
	for i := range count {
		length := uint64(binary.BigEndian.Uint32(b[4+8*i:]))
		flags := binary.BigEndian.Uint32(b[8+8*i:])
		if length == 0 {
			return protocolf("empty extent for %s", name)
		}
		if sum >= uint64(r.length) {
			return protocolf("extents for %s past the end of the requested range", name)
		}
		if r.flags&nbd.CmdFlagReqOne != 0 && length > uint64(r.length) {
			return protocolf("extent of %d bytes for %s in reply to NBD_CMD_FLAG_REQ_ONE of %d", length, name, r.length)
		}
		extents = append(extents, nbd.Extent{Length: int64(min(length, uint64(r.length)-sum)), Flags: flags})
		sum += length
	}
	if r.extents == nil {
		r.extents = make(map[string][]nbd.Extent)
	}
	r.extents[name] = extents
	return nil
}

// complete checks a structured reply that the server marked done.
func (c *Conn) complete(r *request) error {
	if r.err != nil {
		return nil
	}
	switch r.cmd {
	case nbd.CmdRead:
		if !r.covered.full(uint64(r.length)) {
			return protocolf("read of [%d, +%d) succeeded without all its data", r.off, r.length)
		}
	case nbd.CmdBlockStatus:
		if len(r.extents) != len(c.info.contexts) {
			return protocolf("block status succeeded with %d of %d meta contexts", len(r.extents), len(c.info.contexts))
		}
	}
	return nil
}

// readData reads len(dst) bytes of reply data into dst, or drops them
// once r is detached.
func (c *Conn) readData(r *request, dst []byte) error {
	for len(dst) > 0 {
		r.mu.Lock()
		if r.detached {
			r.mu.Unlock()
			if _, err := c.br.Discard(len(dst)); err != nil {
				return readErr(err)
			}
			return nil
		}
		k := min(len(dst), readPiece)
		_, err := io.ReadFull(c.br, dst[:k])
		r.mu.Unlock()
		if err != nil {
			return readErr(err)
		}
		dst = dst[k:]
	}
	return nil
}

// spans is a sorted list of disjoint, non-adjacent [start, end) ranges.
type spans []span

type span struct{ start, end uint64 }

// add inserts [start, end) and reports false, changing nothing, if it
// overlaps a range already there.
func (s *spans) add(start, end uint64) bool {
	l := *s
	i := sort.Search(len(l), func(i int) bool { return l[i].end > start })
	if i < len(l) && l[i].start < end {
		return false
	}
	left := i > 0 && l[i-1].end == start
	right := i < len(l) && l[i].start == end
	switch {
	case left && right:
		l[i-1].end = l[i].end
		l = slices.Delete(l, i, i+1)
	case left:
		l[i-1].end = end
	case right:
		l[i].start = start
	default:
		l = slices.Insert(l, i, span{start, end})
	}
	*s = l
	return true
}

// full reports whether the spans are exactly [0, n).
func (s spans) full(n uint64) bool {
	return n == 0 || len(s) == 1 && s[0].start == 0 && s[0].end == n
}
