package nbd

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"
)

// maxOptionLen bounds the data of one option: the largest legal one is a
// SET_META_CONTEXT with a few 4 KiB strings. Longer options are read and
// discarded (NBD_REP_ERR_TOO_BIG) up to maxOptionDiscard; beyond that the
// client is not speaking NBD and is disconnected.
const (
	maxOptionLen     = 64 << 10
	maxOptionDiscard = 16 << 20
)

// errAbort ends a negotiation the client ended itself.
var errAbort = errors.New("client aborted the negotiation")

// session is what negotiation settled for the transmission phase.
type session struct {
	export     *Export
	flags      uint16
	structured bool
	contexts   []metaContext // selected for BLOCK_STATUS, IDs 1..n
}

type metaContext struct {
	id   uint32
	name string
	fn   ContextFunc
}

// negotiator holds the state of option haggling on one connection.
type negotiator struct {
	c          *conn
	noZeroes   bool
	tls        bool
	structured bool
	metaExport string   // export the last SET_META_CONTEXT named
	metaNames  []string // contexts it selected, in ID order
}

// negotiate runs the handshake and option haggling, and returns the session
// to serve, or an error after which the connection is closed.
func (c *conn) negotiate() (*session, error) {
	n := &negotiator{c: c}
	if id := c.srv.Identify; id != nil {
		c.setIdentity(id(c.nc, nil))
	}
	var greeting [18]byte
	binary.BigEndian.PutUint64(greeting[0:], MagicInit)
	binary.BigEndian.PutUint64(greeting[8:], MagicOpt)
	binary.BigEndian.PutUint16(greeting[16:], FlagFixedNewstyle|FlagNoZeroes)
	if _, err := c.bw.Write(greeting[:]); err != nil {
		return nil, err
	}
	if err := c.bw.Flush(); err != nil {
		return nil, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.br, cf[:]); err != nil {
		return nil, fmt.Errorf("read client flags: %w", err)
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&^(FlagCFixedNewstyle|FlagCNoZeroes) != 0 {
		return nil, fmt.Errorf("client sent unknown flags %#x", flags)
	}
	n.noZeroes = flags&FlagCNoZeroes != 0

	for {
		var hdr [16]byte
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			return nil, fmt.Errorf("read option: %w", err)
		}
		if magic := binary.BigEndian.Uint64(hdr[0:]); magic != MagicOpt {
			return nil, fmt.Errorf("bad option magic %#x", magic)
		}
		opt := binary.BigEndian.Uint32(hdr[8:])
		length := binary.BigEndian.Uint32(hdr[12:])
		if length > maxOptionLen {
			if length > maxOptionDiscard {
				return nil, fmt.Errorf("option %d with %d bytes of data", opt, length)
			}
			if _, err := io.CopyN(io.Discard, c.br, int64(length)); err != nil {
				return nil, err
			}
			if err := n.replyError(opt, RepErrTooBig, "option data of %d bytes is too long", length); err != nil {
				return nil, err
			}
			if err := c.bw.Flush(); err != nil {
				return nil, err
			}
			continue
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(c.br, data); err != nil {
			return nil, fmt.Errorf("read option %d data: %w", opt, err)
		}
		s, err := n.option(opt, data)
		if err != nil || s != nil {
			return s, err
		}
		if err := c.bw.Flush(); err != nil {
			return nil, err
		}
	}
}

// option handles one option. It returns a session when transmission
// starts, an error when the connection must close, or neither to go on.
func (n *negotiator) option(opt uint32, data []byte) (*session, error) {
	if n.c.requireTLS && !n.tls && opt != OptStartTLS && opt != OptAbort {
		if opt == OptExportName {
			return nil, errors.New("NBD_OPT_EXPORT_NAME before TLS on a server that requires TLS")
		}
		return nil, n.replyError(opt, RepErrTLSReqd, "this server requires TLS: use STARTTLS (nbds:// URIs)")
	}
	switch opt {
	case OptExportName:
		return n.exportName(string(data))
	case OptAbort:
		_ = n.reply(opt, RepAck, nil)
		_ = n.c.bw.Flush()
		return nil, errAbort
	case OptList:
		return nil, n.list(opt, data)
	case OptStartTLS:
		return nil, n.startTLS(opt, data)
	case OptInfo, OptGo:
		return n.infoGo(opt, data)
	case OptStructuredReply:
		if len(data) != 0 {
			return nil, n.replyError(opt, RepErrInvalid, "STRUCTURED_REPLY takes no data")
		}
		n.structured = true
		return nil, n.reply(opt, RepAck, nil)
	case OptListMetaContext, OptSetMetaContext:
		return nil, n.metaContext(opt, data)
	default:
		return nil, n.replyError(opt, RepErrUnsup, "option %d is not supported", opt)
	}
}

func (n *negotiator) reply(opt, typ uint32, data []byte) error {
	var hdr [20]byte
	binary.BigEndian.PutUint64(hdr[0:], MagicOptReply)
	binary.BigEndian.PutUint32(hdr[8:], opt)
	binary.BigEndian.PutUint32(hdr[12:], typ)
	binary.BigEndian.PutUint32(hdr[16:], uint32(len(data)))
	if _, err := n.c.bw.Write(hdr[:]); err != nil {
		return err
	}
	_, err := n.c.bw.Write(data)
	return err
}

func (n *negotiator) replyError(opt, typ uint32, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	n.c.srv.logger().Debug("nbd option refused", "remote", n.c.remote, "option", opt, "reply", typ&^(1<<31), "message", msg)
	return n.reply(opt, typ, []byte(truncate(msg)))
}

func truncate(msg string) string {
	if len(msg) > MaxStringLen {
		return msg[:MaxStringLen]
	}
	return msg
}

func (n *negotiator) lookup(name string) (*Export, bool) {
	if n.c.srv.shuttingDown() {
		return nil, false
	}
	return n.c.srv.Exports.Lookup(name)
}

// allow asks the connection's Identity whether it may use export name
// (e nil: before the lookup). With Server.Identify set, a connection it
// gave no Identity may use nothing.
func (n *negotiator) allow(name string, e *Export) error {
	n.c.mu.Lock()
	id := n.c.id
	n.c.mu.Unlock()
	switch {
	case id != nil:
		return id.Allow(name, e)
	case n.c.srv.Identify != nil:
		return errors.New("this client could not be identified")
	}
	return nil
}

// refused logs a refusal by the Identity and answers opt with
// NBD_REP_ERR_POLICY.
func (n *negotiator) refused(opt uint32, err error) error {
	n.logRefused(err)
	return n.replyError(opt, RepErrPolicy, "%v", err)
}

func (n *negotiator) logRefused(err error) {
	n.c.srv.logger().Info("nbd client refused by the access rules", "remote", n.c.remote, "identity", n.c.identity(), "why", err)
}

func (n *negotiator) exportName(name string) (*session, error) {
	// The option has no error reply: a refusal closes the connection.
	if err := n.allow(name, nil); err != nil {
		n.logRefused(err)
		return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME: %w", err)
	}
	e, ok := n.lookup(name)
	if !ok {
		return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME: no export %q", name)
	}
	n.c.setExport(e) // before the last check: Recheck sees it from here on
	if err := n.allow(name, e); err != nil {
		n.logRefused(err)
		return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME: %w", err)
	}
	s := n.session(e, name)
	var out [10 + 124]byte
	binary.BigEndian.PutUint64(out[0:], uint64(e.Backend.Size()))
	binary.BigEndian.PutUint16(out[8:], s.flags)
	size := len(out)
	if n.noZeroes {
		size = 10
	}
	if _, err := n.c.bw.Write(out[:size]); err != nil {
		return nil, err
	}
	return s, n.c.bw.Flush()
}

// session builds the transmission state for export e, entered under name.
func (n *negotiator) session(e *Export, name string) *session {
	s := &session{export: e, structured: n.structured, flags: transmissionFlags(e, n.structured)}
	if n.structured && n.metaExport == name {
		for i, cname := range n.metaNames {
			s.contexts = append(s.contexts, metaContext{id: uint32(i + 1), name: cname, fn: contextFunc(e, cname)})
		}
	}
	return s
}

func transmissionFlags(e *Export, structured bool) uint16 {
	f := FlagHasFlags | FlagSendFlush | FlagCanMultiConn | FlagSendCache
	if e.ReadOnly {
		f |= FlagReadOnly
	} else {
		f |= FlagSendFUA | FlagSendWriteZeroes | FlagSendFastZero
		if _, ok := e.Backend.(Trimmer); ok {
			f |= FlagSendTrim
		}
	}
	if structured {
		f |= FlagSendDF
	}
	return f
}

func (n *negotiator) list(opt uint32, data []byte) error {
	if len(data) != 0 {
		return n.replyError(opt, RepErrInvalid, "LIST takes no data")
	}
	if n.c.srv.shuttingDown() {
		return n.replyError(opt, RepErrShutdown, "server is shutting down")
	}
	for _, e := range n.c.srv.Exports.List() {
		if n.allow(e.Name, nil) != nil || n.allow(e.Name, e) != nil {
			continue // a client sees only what it may open
		}
		buf := binary.BigEndian.AppendUint32(nil, uint32(len(e.Name)))
		buf = append(buf, e.Name...)
		buf = append(buf, truncate(e.Description)...)
		if err := n.reply(opt, RepServer, buf); err != nil {
			return err
		}
	}
	return n.reply(opt, RepAck, nil)
}

func (n *negotiator) startTLS(opt uint32, data []byte) error {
	switch {
	case len(data) != 0:
		return n.replyError(opt, RepErrInvalid, "STARTTLS takes no data")
	case n.tls:
		return n.replyError(opt, RepErrInvalid, "TLS is already on")
	case n.c.srv.TLSConfig == nil:
		return n.replyError(opt, RepErrPolicy, "TLS is not configured on this server")
	}
	if err := n.reply(opt, RepAck, nil); err != nil {
		return err
	}
	if err := n.c.bw.Flush(); err != nil {
		return err
	}
	if n.c.br.Buffered() != 0 {
		return errors.New("client sent data after STARTTLS before the TLS handshake")
	}
	raw := n.c.nc
	tc := tls.Server(raw, n.c.srv.TLSConfig)
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	n.c.setConn(tc)
	if id := n.c.srv.Identify; id != nil {
		cs := tc.ConnectionState()
		n.c.setIdentity(id(raw, &cs))
	}
	// Nothing negotiated in the clear survives the upgrade.
	n.tls, n.structured, n.metaExport, n.metaNames = true, false, "", nil
	return nil
}

// parseNameAnd reads the "32-bit length, name" that starts INFO, GO and
// the meta context options, and returns the name and the rest.
func parseName(data []byte) (string, []byte, bool) {
	if len(data) < 4 {
		return "", nil, false
	}
	l := binary.BigEndian.Uint32(data)
	if uint64(l) > uint64(len(data)-4) || l > MaxStringLen {
		return "", nil, false
	}
	return string(data[4 : 4+l]), data[4+l:], true
}

func (n *negotiator) infoGo(opt uint32, data []byte) (*session, error) {
	name, rest, ok := parseName(data)
	if !ok || len(rest) < 2 {
		return nil, n.replyError(opt, RepErrInvalid, "malformed INFO/GO request")
	}
	nreq := int(binary.BigEndian.Uint16(rest))
	if len(rest) != 2+2*nreq {
		return nil, n.replyError(opt, RepErrInvalid, "INFO/GO says %d information requests but carries %d bytes", nreq, len(rest)-2)
	}
	var reqs []uint16
	for i := range nreq {
		reqs = append(reqs, binary.BigEndian.Uint16(rest[2+2*i:]))
	}
	if n.c.srv.shuttingDown() {
		return nil, n.replyError(opt, RepErrShutdown, "server is shutting down")
	}
	if err := n.allow(name, nil); err != nil {
		return nil, n.refused(opt, err)
	}
	e, ok := n.lookup(name)
	if !ok {
		return nil, n.replyError(opt, RepErrUnknown, "no export %q on this server", name)
	}
	if opt == OptGo {
		// Before the last check, so that a Recheck from here on sees the
		// connection: the rules cannot change unseen between the check
		// and transmission.
		n.c.setExport(e)
	}
	if err := n.allow(name, e); err != nil {
		n.c.setExport(nil)
		return nil, n.refused(opt, err)
	}
	s := n.session(e, name)

	info := binary.BigEndian.AppendUint16(nil, InfoExport)
	info = binary.BigEndian.AppendUint64(info, uint64(e.Backend.Size()))
	info = binary.BigEndian.AppendUint16(info, s.flags)
	if err := n.reply(opt, RepInfo, info); err != nil {
		return nil, err
	}
	if slices.Contains(reqs, InfoName) {
		if err := n.reply(opt, RepInfo, append(binary.BigEndian.AppendUint16(nil, InfoName), e.Name...)); err != nil {
			return nil, err
		}
	}
	if slices.Contains(reqs, InfoDescription) && e.Description != "" {
		desc := append(binary.BigEndian.AppendUint16(nil, InfoDescription), truncate(e.Description)...)
		if err := n.reply(opt, RepInfo, desc); err != nil {
			return nil, err
		}
	}
	bs := binary.BigEndian.AppendUint16(nil, InfoBlockSize)
	bs = binary.BigEndian.AppendUint32(bs, e.minBlock())
	bs = binary.BigEndian.AppendUint32(bs, e.preferredBlock())
	bs = binary.BigEndian.AppendUint32(bs, e.maxPayload())
	if err := n.reply(opt, RepInfo, bs); err != nil {
		return nil, err
	}
	if err := n.reply(opt, RepAck, nil); err != nil {
		return nil, err
	}
	if opt == OptInfo {
		return nil, nil
	}
	return s, n.c.bw.Flush()
}

func (n *negotiator) metaContext(opt uint32, data []byte) error {
	set := opt == OptSetMetaContext
	if set {
		// The selection is replaced even when the request fails.
		n.metaExport, n.metaNames = "", nil
		if !n.structured {
			return n.replyError(opt, RepErrInvalid, "SET_META_CONTEXT needs structured replies first")
		}
	}
	name, rest, ok := parseName(data)
	if !ok || len(rest) < 4 {
		return n.replyError(opt, RepErrInvalid, "malformed meta context request")
	}
	nq := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	var queries []string
	for range nq {
		q, r, ok := parseName(rest)
		if !ok {
			return n.replyError(opt, RepErrInvalid, "malformed meta context query")
		}
		queries, rest = append(queries, q), r
	}
	if len(rest) != 0 {
		return n.replyError(opt, RepErrInvalid, "%d bytes after the meta context queries", len(rest))
	}
	if err := n.allow(name, nil); err != nil {
		return n.refused(opt, err)
	}
	e, ok := n.lookup(name)
	if !ok {
		return n.replyError(opt, RepErrUnknown, "no export %q on this server", name)
	}
	if err := n.allow(name, e); err != nil {
		return n.refused(opt, err)
	}
	var names []string
	if !set && len(queries) == 0 {
		names = e.contextNames()
	}
	for _, q := range queries {
		if !strings.Contains(q, ":") {
			return n.replyError(opt, RepErrInvalid, "meta context query %q has no namespace", q)
		}
		for _, m := range e.matchContexts(q, !set) {
			if !slices.Contains(names, m) {
				names = append(names, m)
			}
		}
	}
	for i, cname := range names {
		var id uint32
		if set {
			id = uint32(i + 1)
		}
		if err := n.reply(opt, RepMetaContext, append(binary.BigEndian.AppendUint32(nil, id), cname...)); err != nil {
			return err
		}
	}
	if set {
		n.metaExport, n.metaNames = name, names
	}
	return n.reply(opt, RepAck, nil)
}

// contextFunc returns the function that reports context name of e.
func contextFunc(e *Export, name string) ContextFunc {
	if name == ContextBaseAllocation {
		if x, ok := e.Backend.(Extenter); ok {
			return x.Extents
		}
		return nil // all allocated
	}
	return e.Contexts[name]
}

// handshakeDeadline is when negotiation must be done.
func (s *Server) handshakeDeadline() time.Time {
	d := s.HandshakeTimeout
	if d <= 0 {
		d = 30 * time.Second
	}
	return time.Now().Add(d)
}
