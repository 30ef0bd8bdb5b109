package client

import (
	"errors"
	"fmt"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

var (
	// ErrProtocol is wrapped by errors reporting that the server broke the
	// protocol (bad magic, unknown cookie or chunk type, data outside the
	// request, ...). The connection is closed when one is seen.
	ErrProtocol = errors.New("nbd: protocol violation")
	// ErrClosed is wrapped by errors of calls on a connection that was
	// closed, or is closing, at the client's request or the server's.
	ErrClosed = errors.New("nbd: connection closed")
)

// protocolf returns an error wrapping ErrProtocol.
func protocolf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}

// Error is a server's error reply to a request.
type Error struct {
	Errno   uint32 // the NBD error value, such as nbd.EINVAL
	Message string // the server's text; empty in simple replies
}

// Error names the errno, e.g. "EINVAL: out of range", and falls back to
// the errno's usual text when the server sent none.
func (e *Error) Error() string {
	name, text := errnoName(e.Errno)
	if e.Message != "" {
		text = e.Message
	}
	return name + ": " + text
}

func errnoName(errno uint32) (name, text string) {
	switch errno {
	case nbd.EPERM:
		return "EPERM", "operation not permitted"
	case nbd.EIO:
		return "EIO", "input/output error"
	case nbd.ENOMEM:
		return "ENOMEM", "cannot allocate memory"
	case nbd.EINVAL:
		return "EINVAL", "invalid argument"
	case nbd.ENOSPC:
		return "ENOSPC", "no space left on device"
	case nbd.EOVERFLOW:
		return "EOVERFLOW", "value too large"
	case nbd.ENOTSUP:
		return "ENOTSUP", "operation not supported"
	case nbd.ESHUTDOWN:
		return "ESHUTDOWN", "server is shutting down"
	}
	return fmt.Sprintf("errno %d", errno), "unknown error"
}

// OptionError is a server's error reply to an option during negotiation.
type OptionError struct {
	Option  uint32 // the option refused, such as nbd.OptGo
	Reply   uint32 // the error reply type, such as nbd.RepErrUnknown
	Message string // the server's text, possibly empty
}

// Error names the option and the reply type, then the server's text.
func (e *OptionError) Error() string {
	s := fmt.Sprintf("nbd: server refused %s: %s", optionName(e.Option), replyName(e.Reply))
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

func optionName(opt uint32) string {
	switch opt {
	case nbd.OptExportName:
		return "NBD_OPT_EXPORT_NAME"
	case nbd.OptAbort:
		return "NBD_OPT_ABORT"
	case nbd.OptList:
		return "NBD_OPT_LIST"
	case nbd.OptStartTLS:
		return "NBD_OPT_STARTTLS"
	case nbd.OptInfo:
		return "NBD_OPT_INFO"
	case nbd.OptGo:
		return "NBD_OPT_GO"
	case nbd.OptStructuredReply:
		return "NBD_OPT_STRUCTURED_REPLY"
	case nbd.OptListMetaContext:
		return "NBD_OPT_LIST_META_CONTEXT"
	case nbd.OptSetMetaContext:
		return "NBD_OPT_SET_META_CONTEXT"
	}
	return fmt.Sprintf("option %d", opt)
}

func replyName(rep uint32) string {
	switch rep {
	case nbd.RepAck:
		return "NBD_REP_ACK"
	case nbd.RepServer:
		return "NBD_REP_SERVER"
	case nbd.RepInfo:
		return "NBD_REP_INFO"
	case nbd.RepMetaContext:
		return "NBD_REP_META_CONTEXT"
	case nbd.RepErrUnsup:
		return "NBD_REP_ERR_UNSUP"
	case nbd.RepErrPolicy:
		return "NBD_REP_ERR_POLICY"
	case nbd.RepErrInvalid:
		return "NBD_REP_ERR_INVALID"
	case nbd.RepErrPlatform:
		return "NBD_REP_ERR_PLATFORM"
	case nbd.RepErrTLSReqd:
		return "NBD_REP_ERR_TLS_REQD"
	case nbd.RepErrUnknown:
		return "NBD_REP_ERR_UNKNOWN"
	case nbd.RepErrShutdown:
		return "NBD_REP_ERR_SHUTDOWN"
	case nbd.RepErrBlockSizeReqd:
		return "NBD_REP_ERR_BLOCK_SIZE_REQD"
	case nbd.RepErrTooBig:
		return "NBD_REP_ERR_TOO_BIG"
	}
	return fmt.Sprintf("reply type %#x", rep)
}
