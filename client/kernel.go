package client

import (
	"context"
	"crypto/tls"
	"net"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// KernelExport is what the kernel's NBD driver is told of an export.
type KernelExport struct {
	Size  int64
	Flags uint16 // NBD_FLAG_* transmission flags
	// PreferredBlock is the server's preferred block size (0 if it said
	// none).
	PreferredBlock uint32
}

// Handshake negotiates on c for the kernel's NBD client, which speaks
// only simple replies and no meta contexts: fixed newstyle, NBD_OPT_STARTTLS
// first when tlsConfig is set, then NBD_OPT_GO (or EXPORT_NAME). It
// returns the connection transmission goes on, at its start: c itself,
// or with tlsConfig the TLS connection over c, which the kernel cannot
// take (AttachKernel pumps its bytes). Nothing is read past the
// handshake. On failure c is closed.
//
// tlsConfig MUST name the server (ServerName) unless it skips
// verification; Dial's filling in of a TCP host does not happen here.
func Handshake(ctx context.Context, c net.Conn, export string, tlsConfig *tls.Config) (net.Conn, KernelExport, error) {
	conn, info, err := negotiateOn(ctx, c, Options{Export: export, TLS: tlsConfig, SimpleReplies: true, MetaContexts: []string{}})
	if err != nil {
		return nil, KernelExport{}, err
	}
	return conn, KernelExport{Size: info.size, Flags: info.flags | nbd.FlagHasFlags, PreferredBlock: info.prefBlock}, nil
}
