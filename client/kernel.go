package client

import (
	"context"
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
// only simple replies and no meta contexts: fixed newstyle, NBD_OPT_GO
// (or EXPORT_NAME). It leaves c at the start of transmission for the
// kernel to take over; nothing reads from c afterwards.
func Handshake(ctx context.Context, c net.Conn, export string) (KernelExport, error) {
	_, info, err := negotiateOn(ctx, c, Options{Export: export, SimpleReplies: true, MetaContexts: []string{}})
	if err != nil {
		return KernelExport{}, err
	}
	return KernelExport{Size: info.size, Flags: info.flags | nbd.FlagHasFlags, PreferredBlock: info.prefBlock}, nil
}
