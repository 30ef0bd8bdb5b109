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
	name, text := nbd.ErrnoName(e.Errno)
	if e.Message != "" {
		text = e.Message
	}
	return name + ": " + text
}

// OptionError is a server's error reply to an option during negotiation.
type OptionError struct {
	Option  uint32 // the option refused, such as nbd.OptGo
	Reply   uint32 // the error reply type, such as nbd.RepErrUnknown
	Message string // the server's text, possibly empty
}

// Error names the option and the reply type, then the server's text.
func (e *OptionError) Error() string {
	s := fmt.Sprintf("nbd: server refused %s: %s", nbd.OptName(e.Option), nbd.RepName(e.Reply))
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}
