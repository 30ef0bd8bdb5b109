// Package client is the source-host side of nbdvault: a userspace NBD
// client (NetworkBlockDevice/nbd doc/proto.md) and the attach of an export
// to the kernel's NBD driver (kernel_linux.go, our own handshake, then
// NBD_SET_SOCK). The packages below it build on it: client/transfer
// (restore, import, push), client/mirror (a volume as a mirror leg, its
// write-intent bitmap, freeze and flush), client/mount (restore by mount)
// and client/leg (the data inside a mirror leg).
//
// Dial (or NewConn on an existing connection) negotiates fixed newstyle,
// optionally STARTTLS, structured replies and meta contexts, and enters
// the transmission phase with NBD_OPT_GO, falling back to
// NBD_OPT_EXPORT_NAME on servers without it. The resulting Conn is safe
// for concurrent use: any number of goroutines may have requests in
// flight; requests are written one at a time and a single reader goroutine
// hands each reply, in whatever order the server sends them, to the caller
// waiting for it.
//
// Errors: a server's error reply to a request is an *Error, to an option
// an *OptionError. A reply that breaks the protocol wraps ErrProtocol; it
// closes the connection and fails every waiting call with the same error.
// Calls on a closed connection wrap ErrClosed.
package client
