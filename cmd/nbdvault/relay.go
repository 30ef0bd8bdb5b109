package main

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// relayCommand serves one export of a remote NBD server, opened over TLS,
// as a plain NBD server on stdin (a socket): what nbdfuse --command runs,
// since nbdfuse takes no TLS files in a URI. Read-only; for mount.
func relayCommand() *cli.Command {
	return &cli.Command{
		Name: "relay", Hidden: true,
		Usage: "serve a remote export, opened over TLS, read-only as plain NBD on stdin (for nbdfuse --command)",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "nbd", Usage: "the server's NBD `address`"},
			&cli.StringFlag{Name: "export", Usage: "the `export` to open"},
			tlsCAFlag, clientCertFlag, clientKeyFlag,
		},
		Action: relay,
	}
}

func relay(c *cli.Context) error {
	conn, err := dialExport(c.Context, c, c.String("nbd"), c.String("export"))
	if err != nil {
		return err
	}
	defer closeExport(conn)
	nc, err := net.FileConn(os.Stdin)
	if err != nil {
		return fmt.Errorf("relay: stdin is not a socket (run by nbdfuse --command): %w", err)
	}
	// The client asks for the default export ("").
	srv := &nbd.Server{Exports: nbd.NewExportMap(&nbd.Export{Name: "", Backend: conn, ReadOnly: true}),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	srv.ServeConn(nc)
	return nil
}
