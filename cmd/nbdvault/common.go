package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/client"
	"github.com/nbdvault/nbdvault/nbdserver"
	"github.com/nbdvault/nbdvault/nbdserver/api"
	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// Defaults of the embedded configuration: everything in ./nbdvault-data,
// NBD on the standard port, the admin API next to it, loopback only.
const (
	defaultData   = "nbdvault-data"
	defaultListen = "127.0.0.1:" + nbd.Port
	defaultAdmin  = api.DefaultAddress
	tokenFileName = nbdserver.TokenFile
)

// Flags every command that talks to a server takes.
var (
	serverFlag = &cli.StringFlag{
		Name: "server", Value: "http://" + defaultAdmin, EnvVars: []string{"NBDVAULT_SERVER"},
		Usage: "the server's admin API: `URL` http://HOST:PORT, or unix:/PATH",
	}
	tokenFlag = &cli.StringFlag{
		Name: "token", EnvVars: []string{"NBDVAULT_TOKEN"},
		Usage: "the admin API `token` (default: read from DATA/" + tokenFileName + ", where serve writes it)",
	}
	dataFlag = &cli.StringFlag{
		Name: "data", Value: defaultData, EnvVars: []string{"NBDVAULT_DATA"},
		Usage: "the server's data `folder`, where a CLI on the server's host finds the token",
	}
	tlsCAFlag = &cli.StringFlag{
		Name: "tls-ca", EnvVars: []string{"NBDVAULT_TLS_CA"},
		Usage: "CA certificate `file` (PEM) to trust for an https:// --server (default: the system's)",
	}
	clientCertFlag = &cli.StringFlag{
		Name: "tls-cert", EnvVars: []string{"NBDVAULT_CLIENT_CERT"},
		Usage: "client certificate `file` (PEM) to present to an https:// --server: who you are, instead of a token",
	}
	clientKeyFlag = &cli.StringFlag{
		Name: "tls-key", EnvVars: []string{"NBDVAULT_CLIENT_KEY"},
		Usage: "the private key `file` of --tls-cert",
	}
	clientFlags = []cli.Flag{serverFlag, tokenFlag, dataFlag, tlsCAFlag, clientCertFlag, clientKeyFlag}

	// nbdFlag is for the commands that open exports over NBD (restore,
	// import, mount): where the server's NBD listener is, when the
	// address the server reports is not the one this host reaches it by
	// (NAT, a tunnel, a socket mounted elsewhere).
	nbdFlag = &cli.StringFlag{
		Name: "nbd", EnvVars: []string{"NBDVAULT_NBD"},
		Usage: "the server's NBD `address`, HOST:PORT or unix:/PATH (default: the first one the server reports)",
	}
)

// nbdAddressOf is the --nbd flag if set, else the server's own word.
func nbdAddressOf(c *cli.Context, cl *api.Client) (string, error) {
	if addr := c.String(nbdFlag.Name); addr != "" {
		return addr, nil
	}
	return cl.NBDAddress(c.Context)
}

// adminClient returns a client for the server the flags name.
func adminClient(c *cli.Context) (*api.Client, error) {
	tlsCfg, err := clientTLS(c)
	if err != nil {
		return nil, err
	}
	token := strings.TrimSpace(c.String(tokenFlag.Name))
	if token == "" {
		// A client certificate may say who calls instead (over https).
		withCert := tlsCfg != nil && len(tlsCfg.Certificates) > 0
		path := filepath.Join(c.String(dataFlag.Name), tokenFileName)
		data, err := os.ReadFile(path)
		switch {
		case errors.Is(err, os.ErrNotExist) && withCert:
		case errors.Is(err, os.ErrNotExist):
			return nil, usageErrorf("no admin token: %s does not exist (pass --token or NBDVAULT_TOKEN, or --data with the server's data folder)", path)
		case err != nil && !withCert:
			return nil, fmt.Errorf("reading the admin token: %w", err)
		}
		token = strings.TrimSpace(string(data))
	}
	cl, err := api.NewClient(c.String(serverFlag.Name), token)
	if err != nil {
		return nil, usageErrorf("%v", err)
	}
	if tlsCfg != nil {
		cl.UseTLS(tlsCfg)
	}
	return cl, nil
}

// clientTLS reads --tls-ca, --tls-cert and --tls-key; nil when none is
// given.
func clientTLS(c *cli.Context) (*tls.Config, error) {
	ca, cert, key := c.String(tlsCAFlag.Name), c.String(clientCertFlag.Name), c.String(clientKeyFlag.Name)
	if ca == "" && cert == "" && key == "" {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if ca != "" {
		b, err := os.ReadFile(ca)
		if err != nil {
			return nil, usageErrorf("--tls-ca: %v", err)
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(b) {
			return nil, usageErrorf("--tls-ca %s: no PEM certificate in it", ca)
		}
	}
	if (cert == "") != (key == "") {
		return nil, usageErrorf("--tls-cert and --tls-key go together")
	}
	if cert != "" {
		pair, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			return nil, usageErrorf("--tls-cert %s, --tls-key %s: %v", cert, key, err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

// nbdTLS is the TLS configuration for an export at addr, nil without
// --tls-ca, --tls-cert and --tls-key: clientTLS, checking the server's
// certificate against the host name of addr (localhost for a Unix socket).
func nbdTLS(c *cli.Context, addr string) (*tls.Config, error) {
	cfg, err := clientTLS(c)
	if err != nil || cfg == nil {
		return nil, err
	}
	cfg = cfg.Clone()
	cfg.ServerName = "localhost"
	if host, _, err := net.SplitHostPort(addr); err == nil && !strings.HasPrefix(addr, "unix:") {
		cfg.ServerName = host
	}
	return cfg, nil
}

// tlsFileArgs are the --tls-ca, --tls-cert and --tls-key flags given, with
// absolute paths, for a process this one starts: it may run in another
// folder, or later.
func tlsFileArgs(c *cli.Context) ([]string, error) {
	var args []string
	for _, f := range []string{tlsCAFlag.Name, clientCertFlag.Name, clientKeyFlag.Name} {
		if v := c.String(f); v != "" {
			abs, err := filepath.Abs(v)
			if err != nil {
				return nil, err
			}
			args = append(args, "--"+f, abs)
		}
	}
	return args, nil
}

// dialExport opens export on the NBD server at addr, for restore, import
// and push: over TLS when --tls-ca or --tls-cert is given (nbdTLS).
func dialExport(ctx context.Context, c *cli.Context, addr, export string) (*client.Conn, error) {
	opts := client.Options{Export: export}
	cfg, err := nbdTLS(c, addr)
	if err != nil {
		return nil, err
	}
	opts.TLS = cfg
	conn, err := client.Dial(ctx, addr, opts)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if refused, ok := nbdOpenError(c, export, addr, err); ok {
			return nil, refused
		}
		return nil, fmt.Errorf("cannot open %s over NBD at %s: %w (is that the server's NBD address from this host? --nbd HOST:PORT sets it)", export, addr, err)
	}
	return conn, nil
}

// nbdOpenError says why opening export at addr over NBD failed and what
// to do, when err is something the flags can fix: TLS required, a
// certificate one side does not accept, the access rules. ok is false
// for any other error.
func nbdOpenError(c *cli.Context, export, addr string, err error) (_ error, ok bool) {
	var oe *client.OptionError
	var unknownCA x509.UnknownAuthorityError
	var wrongName x509.HostnameError
	var invalid x509.CertificateInvalidError
	what := fmt.Sprintf("cannot open %s over NBD at %s", export, addr)
	switch {
	case errors.As(err, &oe) && oe.Reply == nbd.RepErrTLSReqd:
		return fmt.Errorf("%s: the server requires TLS: give --tls-ca FILE (the CA of its certificate) and, for access by certificate, --tls-cert and --tls-key", what), true
	case errors.As(err, &oe) && oe.Reply == nbd.RepErrPolicy: // the message says who and why
		return fmt.Errorf("%s: %w", what, err), true
	case errors.As(err, &unknownCA):
		signer := "a CA this system trusts (no --tls-ca was given)"
		if ca := c.String(tlsCAFlag.Name); ca != "" {
			signer = "the CA in --tls-ca " + ca
		}
		return fmt.Errorf("%s: the server's certificate is not signed by %s: give --tls-ca with the CA that signed the server's certificate (%w)", what, signer, err), true
	case errors.As(err, &wrongName):
		return fmt.Errorf("%s: the server's certificate is not for %q, the name it was reached by (a Unix socket is checked as localhost): reach it by a name its certificate holds (%w)", what, wrongName.Host, err), true
	case errors.As(err, &invalid):
		return fmt.Errorf("%s: the server's certificate is not valid: %w (renew it on the server: serve reads new files without a restart)", what, err), true
	case isCertificateAlert(err):
		mine := "a connection without a client certificate"
		if cert := c.String(clientCertFlag.Name); cert != "" {
			mine = "the client certificate in --tls-cert " + cert
		}
		return fmt.Errorf("%s: the server does not accept %s (%w): give --tls-cert and --tls-key with a certificate signed by a CA the server trusts (its --tls-client-ca)", what, mine, err), true
	}
	return err, false
}

// isCertificateAlert reports whether err is a TLS alert from the server
// refusing the client's certificate (or its absence). crypto/tls returns
// a remote alert as a *net.OpError "remote error" around an unexported
// type, so the alert is known by its text.
func isCertificateAlert(err error) bool {
	var oe *net.OpError
	if !errors.As(err, &oe) || oe.Op != "remote error" || oe.Err == nil {
		return false
	}
	switch oe.Err.Error() {
	case "tls: bad certificate", "tls: unsupported certificate", "tls: revoked certificate", "tls: expired certificate",
		"tls: unknown certificate", "tls: unknown certificate authority", "tls: certificate required":
		return true
	}
	return false
}

// closeExport ends an NBD connection; a server that does not answer
// within a few seconds is cut off, since what was needed is done or failed.
func closeExport(conn *client.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = conn.Shutdown(ctx)
}

// stopProgress ends p's display after a failure: a bar stays as it
// stood, and the error printed next starts on a line of its own.
func stopProgress(p *progress) {
	if p.bar != nil {
		_ = p.bar.Exit()
	}
}

// splitSnapshot splits VOL@SNAP.
func splitSnapshot(arg string) (vol, snap string, err error) {
	vol, snap, ok := strings.Cut(arg, "@")
	if !ok || vol == "" || snap == "" {
		return "", "", usageErrorf("%q: want VOLUME@SNAPSHOT, where SNAPSHOT is an ID, a label or an RFC 3339 time (2026-11-30T17:55:03Z)", arg)
	}
	return vol, snap, nil
}

// describePoint is what to print after VOL@ID to say what s is: its
// label, or the time a point in time shows the volume at.
func describePoint(s api.Snapshot) string {
	switch {
	case s.Kind == "checkpoint":
		return " (the volume at " + s.Time.UTC().Format(time.RFC3339Nano) + ")"
	case s.Label != "":
		return " (" + s.Label + ")"
	}
	return ""
}

// parseSize reads a size in bytes: a number with an optional binary unit
// K, M, G, T or P (powers of 1024; KiB, MB… are read the same).
func parseSize(s string) (int64, error) {
	t := strings.ToUpper(strings.TrimSpace(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "I")
	shift := 0
	if n := len(t); n > 0 {
		if i := strings.IndexByte("KMGTP", t[n-1]); i >= 0 {
			shift = 10 * (i + 1)
			t = t[:n-1]
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n <= 0 || n > (1<<62)>>shift {
		return 0, usageErrorf("size %q: want a positive number with an optional unit K, M, G, T (powers of 1024), e.g. 20G", s)
	}
	return n << shift, nil
}

// formatSize prints n bytes with a binary unit.
func formatSize(n int64) string {
	const units = "KMGTP"
	if n < 1024 {
		return fmt.Sprintf("%d B", n)
	}
	f, i := float64(n)/1024, 0
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	return fmt.Sprintf("%.1f %ciB", f, units[i])
}

// usageErrorf is a wrong flag or argument: exit code 2.
func usageErrorf(format string, args ...any) error {
	return cli.Exit(fmt.Sprintf(format, args...), exitUsage)
}

// needArgs checks the number of positional arguments.
func needArgs(c *cli.Context, n int, names string) error {
	if c.NArg() != n {
		return usageErrorf("%s: want %s, got %d argument(s) (see nbdvault %s --help)", commandPath(c), names, c.NArg(), commandPath(c))
	}
	return nil
}

// sizeFlag reads a required size flag.
func sizeFlag(c *cli.Context, name string) (int64, error) {
	if !c.IsSet(name) {
		return 0, usageErrorf("%s: --%s is required, e.g. --%s 20G", commandPath(c), name, name)
	}
	return parseSize(c.String(name))
}

// commandPath is the command being run as typed, e.g. "volume create".
func commandPath(c *cli.Context) string {
	var names []string
	for _, ctx := range c.Lineage() {
		if ctx.Command != nil && ctx.Command.Name != "" && ctx.Command.Name != c.App.Name {
			names = append([]string{ctx.Command.Name}, names...)
		}
	}
	return strings.Join(names, " ")
}
