package client

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"strings"
	"time"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// Options configures a connection.
type Options struct {
	// Export is the name of the export to use; "" is the server's default.
	Export string
	// TLS, when set, makes the client send NBD_OPT_STARTTLS before any
	// other option and fail if the server refuses. Dial fills in an empty
	// ServerName from a TCP address's host.
	TLS *tls.Config
	// MetaContexts are the meta contexts to select for BlockStatus. nil
	// means []string{"base:allocation"}; an empty non-nil slice selects
	// none. Contexts the server does not know are silently not selected
	// (see Conn.MetaContexts).
	MetaContexts []string
	// SimpleReplies, when set, keeps the client from asking for structured
	// replies, as if the server did not offer them.
	SimpleReplies bool
}

// ExportInfo is one export a server lists.
type ExportInfo struct {
	Name        string
	Description string // empty when the server sends none
}

const (
	// maxOptReply bounds the payload of an option reply: names and
	// descriptions are at most 4096 bytes each.
	maxOptReply = 64 << 10
	// cliservMagic follows NBDMAGIC in an oldstyle greeting.
	cliservMagic = 0x00420281861253
)

// aLongTimeAgo is a deadline that makes blocked I/O fail at once.
var aLongTimeAgo = time.Unix(1, 0)

// Dial connects to addr, "host:port" for TCP or "unix:/path" for a Unix
// socket, and negotiates as NewConn does. ctx bounds the dial and the
// negotiation only.
func Dial(ctx context.Context, addr string, opts Options) (*Conn, error) {
	c, err := dial(ctx, addr, &opts)
	if err != nil {
		return nil, err
	}
	return NewConn(ctx, c, opts)
}

// NewConn negotiates on c and returns a Conn in the transmission phase.
// The Conn owns c from then on; c is closed if negotiation fails. ctx
// bounds the negotiation only: when it ends first, NewConn returns
// ctx.Err().
func NewConn(ctx context.Context, c net.Conn, opts Options) (*Conn, error) {
	conn, info, err := negotiateOn(ctx, c, opts)
	if err != nil {
		return nil, err
	}
	return newConn(conn, info), nil
}

// negotiateOn runs the handshake on c, bounded by ctx, and returns the
// connection to transmit on (c, or TLS over it). On failure c is closed.
func negotiateOn(ctx context.Context, c net.Conn, opts Options) (net.Conn, *exportInfo, error) {
	n := &negotiator{raw: c, conn: c, opts: opts}
	restore := interruptOn(ctx, c)
	info, err := n.negotiate(ctx)
	if restore() {
		err = ctx.Err()
	}
	if err != nil {
		n.close(err)
		return nil, nil, err
	}
	return n.conn, info, nil
}

// List returns the exports the server at addr offers (NBD_OPT_LIST), then
// ends the session with NBD_OPT_ABORT. Of opts, only TLS is used.
func List(ctx context.Context, addr string, opts Options) ([]ExportInfo, error) {
	c, err := dial(ctx, addr, &opts)
	if err != nil {
		return nil, err
	}
	n := &negotiator{raw: c, conn: c, opts: opts}
	restore := interruptOn(ctx, c)
	exports, err := n.list(ctx)
	if err == nil {
		n.abort()
	}
	if restore() {
		err = ctx.Err()
	}
	if err != nil {
		n.close(err)
		return nil, err
	}
	_ = n.conn.Close()
	return exports, nil
}

// dial opens the connection to addr and, for TCP with TLS, fills in the
// server name.
func dial(ctx context.Context, addr string, opts *Options) (net.Conn, error) {
	network, address := "tcp", addr
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		network, address = "unix", path
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("nbd: dial %s: %w", addr, err)
	}
	if opts.TLS != nil && opts.TLS.ServerName == "" && network == "tcp" {
		if host, _, err := net.SplitHostPort(address); err == nil {
			cfg := opts.TLS.Clone()
			cfg.ServerName = host
			opts.TLS = cfg
		}
	}
	return c, nil
}

// interruptOn makes blocked I/O on c fail once ctx ends. The returned
// function undoes that and reports whether ctx ended first.
func interruptOn(ctx context.Context, c net.Conn) (restore func() bool) {
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		_ = c.SetDeadline(aLongTimeAgo)
		close(fired)
	})
	return func() bool {
		if stop() {
			return false
		}
		<-fired
		_ = c.SetDeadline(time.Time{})
		return true
	}
}

// exportInfo is what negotiation learns about the export.
type exportInfo struct {
	size                int64
	flags               uint16
	minBlock, prefBlock uint32
	maxPayload          uint32
	structured          bool
	contexts            map[uint32]string // meta context ID to name
}

// negotiator runs the handshake phase.
type negotiator struct {
	raw      net.Conn // the connection as given
	conn     net.Conn // raw, or the TLS connection over it
	opts     Options
	fixed    bool // fixed newstyle
	noZeroes bool // NBD_FLAG_C_NO_ZEROES sent
}

// close ends a failed negotiation: with NBD_OPT_ABORT when the session is
// still in step (the failure was the server's answer to an option), by
// just closing otherwise.
func (n *negotiator) close(err error) {
	var oe *OptionError
	if errors.As(err, &oe) {
		n.abort()
	}
	_ = n.conn.Close()
}

// abort sends NBD_OPT_ABORT and reads the reply, which a server may not
// send: errors are ignored.
func (n *negotiator) abort() {
	if n.sendOption(nbd.OptAbort, nil) == nil {
		_, _, _ = n.reply(nbd.OptAbort)
	}
}

func (n *negotiator) negotiate(ctx context.Context) (*exportInfo, error) {
	if err := n.greet(); err != nil {
		return nil, err
	}
	if !n.fixed {
		if n.opts.TLS != nil {
			return nil, errors.New("nbd: server does not support fixed newstyle negotiation, so not TLS")
		}
		return n.exportName()
	}
	if n.opts.TLS != nil {
		if err := n.startTLS(ctx); err != nil {
			return nil, err
		}
	}
	structured := false
	if !n.opts.SimpleReplies {
		var err error
		if structured, err = n.structuredReply(); err != nil {
			return nil, err
		}
	}
	var contexts map[uint32]string
	queries := n.opts.MetaContexts
	if queries == nil {
		queries = []string{nbd.ContextBaseAllocation}
	}
	if structured && len(queries) > 0 {
		var err error
		if contexts, err = n.setMetaContext(queries); err != nil {
			return nil, err
		}
	}
	info, err := n.goExport()
	var oe *OptionError
	if errors.As(err, &oe) && oe.Reply == nbd.RepErrUnsup {
		info, err = n.exportName()
	}
	if err != nil {
		return nil, err
	}
	info.structured = structured
	info.contexts = contexts
	return info, nil
}

// list does the handshake, STARTTLS if asked, and NBD_OPT_LIST.
func (n *negotiator) list(ctx context.Context) ([]ExportInfo, error) {
	if err := n.greet(); err != nil {
		return nil, err
	}
	if !n.fixed {
		return nil, errors.New("nbd: server does not support fixed newstyle negotiation, so not NBD_OPT_LIST")
	}
	if n.opts.TLS != nil {
		if err := n.startTLS(ctx); err != nil {
			return nil, err
		}
	}
	if err := n.sendOption(nbd.OptList, nil); err != nil {
		return nil, err
	}
	var exports []ExportInfo
	for {
		typ, data, err := n.reply(nbd.OptList)
		if err != nil {
			return nil, err
		}
		switch typ {
		case nbd.RepAck:
			return exports, nil
		case nbd.RepServer:
			if len(data) < 4 || uint64(binary.BigEndian.Uint32(data)) > uint64(len(data)-4) {
				return nil, protocolf("NBD_REP_SERVER with a bad name length")
			}
			name := data[4 : 4+binary.BigEndian.Uint32(data)]
			exports = append(exports, ExportInfo{
				Name:        string(name),
				Description: string(data[4+len(name):]),
			})
		default:
			return nil, protocolf("unexpected %s to NBD_OPT_LIST", nbd.RepName(typ))
		}
	}
}

// greet reads the server's greeting and sends the client flags.
func (n *negotiator) greet() error {
	var b [18]byte
	if _, err := io.ReadFull(n.conn, b[:]); err != nil {
		return fmt.Errorf("nbd: read greeting: %w", err)
	}
	if binary.BigEndian.Uint64(b[0:]) != nbd.MagicInit {
		return protocolf("not an NBD server (bad greeting magic)")
	}
	switch binary.BigEndian.Uint64(b[8:]) {
	case nbd.MagicOpt:
	case cliservMagic:
		return errors.New("nbd: server uses oldstyle negotiation, which this client does not support")
	default:
		return protocolf("bad greeting magic %#x", binary.BigEndian.Uint64(b[8:]))
	}
	hflags := binary.BigEndian.Uint16(b[16:])
	var cflags uint32
	if hflags&nbd.FlagFixedNewstyle != 0 {
		cflags |= nbd.FlagCFixedNewstyle
		n.fixed = true
	}
	if hflags&nbd.FlagNoZeroes != 0 {
		cflags |= nbd.FlagCNoZeroes
		n.noZeroes = true
	}
	var out [4]byte
	binary.BigEndian.PutUint32(out[:], cflags)
	if _, err := n.conn.Write(out[:]); err != nil {
		return fmt.Errorf("nbd: send client flags: %w", err)
	}
	return nil
}

// startTLS upgrades the connection; any refusal is an error.
func (n *negotiator) startTLS(ctx context.Context) error {
	if err := n.sendOption(nbd.OptStartTLS, nil); err != nil {
		return err
	}
	typ, _, err := n.reply(nbd.OptStartTLS)
	if err != nil {
		return err
	}
	if typ != nbd.RepAck {
		return protocolf("unexpected %s to NBD_OPT_STARTTLS", nbd.RepName(typ))
	}
	tc := tls.Client(n.raw, n.opts.TLS)
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("nbd: TLS handshake: %w", err)
	}
	n.conn = tc
	return nil
}

// refusable reports whether err is an option error the client may work
// around by doing without the option.
func refusable(err error) bool {
	var oe *OptionError
	return errors.As(err, &oe) && oe.Reply != nbd.RepErrTLSReqd && oe.Reply != nbd.RepErrShutdown
}

// structuredReply asks for structured replies and reports whether the
// server agreed.
func (n *negotiator) structuredReply() (bool, error) {
	if err := n.sendOption(nbd.OptStructuredReply, nil); err != nil {
		return false, err
	}
	typ, _, err := n.reply(nbd.OptStructuredReply)
	if refusable(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if typ != nbd.RepAck {
		return false, protocolf("unexpected %s to NBD_OPT_STRUCTURED_REPLY", nbd.RepName(typ))
	}
	return true, nil
}

// setMetaContext selects the meta contexts matching queries and returns
// them by ID. A server that refuses the option selects none.
func (n *negotiator) setMetaContext(queries []string) (map[uint32]string, error) {
	data := binary.BigEndian.AppendUint32(nil, uint32(len(n.opts.Export)))
	data = append(data, n.opts.Export...)
	data = binary.BigEndian.AppendUint32(data, uint32(len(queries)))
	for _, q := range queries {
		data = binary.BigEndian.AppendUint32(data, uint32(len(q)))
		data = append(data, q...)
	}
	if err := n.sendOption(nbd.OptSetMetaContext, data); err != nil {
		return nil, err
	}
	contexts := make(map[uint32]string)
	for {
		typ, data, err := n.reply(nbd.OptSetMetaContext)
		if refusable(err) {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		switch typ {
		case nbd.RepAck:
			return contexts, nil
		case nbd.RepMetaContext:
			if len(data) <= 4 {
				return nil, protocolf("NBD_REP_META_CONTEXT without a name")
			}
			contexts[binary.BigEndian.Uint32(data)] = string(data[4:])
		default:
			return nil, protocolf("unexpected %s to NBD_OPT_SET_META_CONTEXT", nbd.RepName(typ))
		}
	}
}

// goExport sends NBD_OPT_GO with an NBD_INFO_BLOCK_SIZE request and reads
// the export's details.
func (n *negotiator) goExport() (*exportInfo, error) {
	data := binary.BigEndian.AppendUint32(nil, uint32(len(n.opts.Export)))
	data = append(data, n.opts.Export...)
	data = binary.BigEndian.AppendUint16(data, 1)
	data = binary.BigEndian.AppendUint16(data, nbd.InfoBlockSize)
	if err := n.sendOption(nbd.OptGo, data); err != nil {
		return nil, err
	}
	info := defaultInfo()
	haveExport := false
	for {
		typ, data, err := n.reply(nbd.OptGo)
		if err != nil {
			return nil, err
		}
		switch typ {
		case nbd.RepAck:
			if !haveExport {
				return nil, protocolf("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
			}
			return info, nil
		case nbd.RepInfo:
			if len(data) < 2 {
				return nil, protocolf("short NBD_REP_INFO")
			}
			switch binary.BigEndian.Uint16(data) {
			case nbd.InfoExport:
				if len(data) != 12 {
					return nil, protocolf("NBD_INFO_EXPORT of %d bytes", len(data))
				}
				if err := info.setExport(binary.BigEndian.Uint64(data[2:]), binary.BigEndian.Uint16(data[10:])); err != nil {
					return nil, err
				}
				haveExport = true
			case nbd.InfoBlockSize:
				if len(data) != 14 {
					return nil, protocolf("NBD_INFO_BLOCK_SIZE of %d bytes", len(data))
				}
				if err := info.setBlockSizes(binary.BigEndian.Uint32(data[2:]),
					binary.BigEndian.Uint32(data[6:]), binary.BigEndian.Uint32(data[10:])); err != nil {
					return nil, err
				}
			}
		default:
			return nil, protocolf("unexpected %s to NBD_OPT_GO", nbd.RepName(typ))
		}
	}
}

// exportName ends negotiation the old way, NBD_OPT_EXPORT_NAME, for
// servers without NBD_OPT_GO.
func (n *negotiator) exportName() (*exportInfo, error) {
	if err := n.sendOption(nbd.OptExportName, []byte(n.opts.Export)); err != nil {
		return nil, err
	}
	b := make([]byte, 10, 10+124)
	if !n.noZeroes {
		b = b[:10+124]
	}
	if _, err := io.ReadFull(n.conn, b); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("nbd: server refused export %q (closed the connection)", n.opts.Export)
		}
		return nil, fmt.Errorf("nbd: read NBD_OPT_EXPORT_NAME reply: %w", err)
	}
	info := defaultInfo()
	if err := info.setExport(binary.BigEndian.Uint64(b), binary.BigEndian.Uint16(b[8:])); err != nil {
		return nil, err
	}
	return info, nil
}

// defaultInfo has the block sizes the spec assumes when a server
// advertises none.
func defaultInfo() *exportInfo {
	return &exportInfo{minBlock: 1, prefBlock: 4096, maxPayload: nbd.DefaultMaxPayload}
}

func (i *exportInfo) setExport(size uint64, flags uint16) error {
	if size > math.MaxInt64 {
		return protocolf("export size %d too large", size)
	}
	i.size, i.flags = int64(size), flags
	return nil
}

func (i *exportInfo) setBlockSizes(minBlock, prefBlock, maxPayload uint32) error {
	if minBlock == 0 || minBlock&(minBlock-1) != 0 || minBlock > 64<<10 || maxPayload < minBlock {
		return protocolf("bad block sizes: minimum %d, preferred %d, maximum %d", minBlock, prefBlock, maxPayload)
	}
	i.minBlock, i.prefBlock, i.maxPayload = minBlock, prefBlock, maxPayload
	return nil
}

// sendOption sends one option request.
func (n *negotiator) sendOption(opt uint32, data []byte) error {
	b := make([]byte, 16, 16+len(data))
	binary.BigEndian.PutUint64(b, nbd.MagicOpt)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], uint32(len(data)))
	b = append(b, data...)
	if _, err := n.conn.Write(b); err != nil {
		return fmt.Errorf("nbd: send %s: %w", nbd.OptName(opt), err)
	}
	return nil
}

// reply reads one reply to opt. An error reply is returned as an
// *OptionError along with its type and data.
func (n *negotiator) reply(opt uint32) (typ uint32, data []byte, err error) {
	var h [20]byte
	if _, err := io.ReadFull(n.conn, h[:]); err != nil {
		return 0, nil, fmt.Errorf("nbd: read reply to %s: %w", nbd.OptName(opt), err)
	}
	if m := binary.BigEndian.Uint64(h[:]); m != nbd.MagicOptReply {
		return 0, nil, protocolf("bad option reply magic %#x", m)
	}
	if o := binary.BigEndian.Uint32(h[8:]); o != opt {
		return 0, nil, protocolf("reply to %s while waiting for one to %s", nbd.OptName(o), nbd.OptName(opt))
	}
	typ = binary.BigEndian.Uint32(h[12:])
	length := binary.BigEndian.Uint32(h[16:])
	if length > maxOptReply {
		return 0, nil, protocolf("%s of %d bytes to %s", nbd.RepName(typ), length, nbd.OptName(opt))
	}
	data = make([]byte, length)
	if _, err := io.ReadFull(n.conn, data); err != nil {
		return 0, nil, fmt.Errorf("nbd: read reply to %s: %w", nbd.OptName(opt), err)
	}
	if typ&(1<<31) != 0 {
		return typ, data, &OptionError{Option: opt, Reply: typ, Message: string(data)}
	}
	return typ, data, nil
}
