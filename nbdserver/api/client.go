package api

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Client talks to a server's admin API.
type Client struct {
	base  *url.URL
	unix  string // unix:/PATH when the server is reached over a Unix socket
	token string
	http  *http.Client
}

// DefaultAddress is where a server listens for the admin API unless told
// otherwise: loopback, next to NBD's port.
const DefaultAddress = "127.0.0.1:10810"

// NewClient returns a client for the server at base (e.g.
// "http://" + DefaultAddress) that sends token.
func NewClient(base, token string) (*Client, error) {
	if path, ok := strings.CutPrefix(base, "unix:"); ok {
		// HTTP over a Unix socket: a local server, or one reached through
		// a relay (a VM's virtio-serial port).
		var d net.Dialer
		tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", path)
		}}
		return &Client{base: &url.URL{Scheme: "http", Host: "nbdvault"}, unix: base, token: token,
			http: &http.Client{Timeout: 5 * time.Minute, Transport: tr}}, nil
	}
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("server address %q: want http://HOST:PORT, https://HOST:PORT or unix:/PATH", base)
	}
	return &Client{base: u, token: token, http: &http.Client{Timeout: 5 * time.Minute}}, nil
}

// UseTLS makes an https:// client trust cfg.RootCAs (nil: the system's)
// and present cfg.Certificates as its client certificate.
func (c *Client) UseTLS(cfg *tls.Config) {
	if c.unix != "" {
		return
	}
	c.http.Transport = &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true}
}

// Tokens lists the scoped tokens (GET /v1/tokens).
func (c *Client) Tokens(ctx context.Context) ([]Token, error) {
	var out []Token
	return out, c.do(ctx, http.MethodGet, "/v1/tokens", nil, &out)
}

// CreateToken makes a scoped token; the answer holds its secret, once.
func (c *Client) CreateToken(ctx context.Context, req CreateToken) (Token, error) {
	var out Token
	return out, c.do(ctx, http.MethodPost, "/v1/tokens", req, &out)
}

// RevokeToken deletes token id.
func (c *Client) RevokeToken(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodDelete, "/v1/tokens/"+url.PathEscape(id), nil, nil)
}

// CheckAccess asks what the rules file text rules would do to the open
// NBD connections.
func (c *Client) CheckAccess(ctx context.Context, rules string) (AccessCheck, error) {
	var out AccessCheck
	return out, c.do(ctx, http.MethodPost, "/v1/access/check", CheckAccess{Rules: rules}, &out)
}

// Server is the address the client talks to.
func (c *Client) Server() string {
	if c.unix != "" {
		return c.unix
	}
	return c.base.String()
}

// NBDAddress is where a client reaches the server's NBD listener: the
// first address the server listens on, with an unspecified host (0.0.0.0,
// ::) replaced by the host this client reaches the admin API by.
func (c *Client) NBDAddress(ctx context.Context) (string, error) {
	st, err := c.Status(ctx)
	if err != nil {
		return "", err
	}
	if len(st.NBD) == 0 {
		return "", errors.New("the server has no NBD listener")
	}
	addr := st.NBD[0]
	if strings.HasPrefix(addr, "unix:") {
		return addr, nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("the server's NBD address %q: %w", addr, err)
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = c.base.Hostname()
		if c.unix != "" {
			host = "localhost" // the admin socket is on this host, so is the server
		}
	}
	return net.JoinHostPort(host, port), nil
}

// Status returns the server's state and every volume's.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	return st, c.do(ctx, "GET", "/v1/status", nil, &st)
}

// Volumes lists the volumes with their upload state.
func (c *Client) Volumes(ctx context.Context) ([]Volume, error) {
	var vs []Volume
	return vs, c.do(ctx, "GET", "/v1/volumes", nil, &vs)
}

// Volume returns one volume with its upload state.
func (c *Client) Volume(ctx context.Context, name string) (Volume, error) {
	var v Volume
	return v, c.do(ctx, "GET", "/v1/volumes/"+url.PathEscape(name), nil, &v)
}

// CreateVolume creates a volume.
func (c *Client) CreateVolume(ctx context.Context, req CreateVolume) (Volume, error) {
	var v Volume
	return v, c.do(ctx, "POST", "/v1/volumes", req, &v)
}

// ResizeVolume grows a volume to size bytes.
func (c *Client) ResizeVolume(ctx context.Context, name string, size int64) (Volume, error) {
	var v Volume
	return v, c.do(ctx, "PATCH", "/v1/volumes/"+url.PathEscape(name), UpdateVolume{Size: size}, &v)
}

// SetRetention stores p as volume name's retention policy, applied by
// the server after each snapshot is sealed; the zero Policy clears it.
func (c *Client) SetRetention(ctx context.Context, name string, p Policy) (Volume, error) {
	var v Volume
	return v, c.do(ctx, "PATCH", "/v1/volumes/"+url.PathEscape(name), UpdateVolume{Retention: &p}, &v)
}

// DeleteVolume deletes a volume and its snapshots.
func (c *Client) DeleteVolume(ctx context.Context, name string) error {
	return c.do(ctx, "DELETE", "/v1/volumes/"+url.PathEscape(name), nil, nil)
}

// DeleteVolumeForce deletes volume name even if it has protected
// snapshots.
func (c *Client) DeleteVolumeForce(ctx context.Context, name string) error {
	return c.do(ctx, "DELETE", "/v1/volumes/"+url.PathEscape(name)+"?force=true", nil, nil)
}

// Snapshots lists a volume's snapshots, oldest first.
func (c *Client) Snapshots(ctx context.Context, vol string) ([]Snapshot, error) {
	var ss []Snapshot
	return ss, c.do(ctx, "GET", "/v1/volumes/"+url.PathEscape(vol)+"/snapshots", nil, &ss)
}

// Snapshot returns snapshot snap (an ID or a label) of volume vol.
func (c *Client) Snapshot(ctx context.Context, vol, snap string) (Snapshot, error) {
	var s Snapshot
	return s, c.do(ctx, "GET", snapshotPath(vol, snap), nil, &s)
}

// CreateSnapshot takes a snapshot of volume vol's head.
func (c *Client) CreateSnapshot(ctx context.Context, vol, label string) (Snapshot, error) {
	return c.KeepPoint(ctx, vol, "", label)
}

// KeepPoint makes the point in time from (an RFC 3339 time or a
// checkpoint's ID) of volume vol a snapshot, so it stays after the
// retention window; with from empty, it takes a snapshot of the head.
func (c *Client) KeepPoint(ctx context.Context, vol, from, label string) (Snapshot, error) {
	var s Snapshot
	return s, c.do(ctx, "POST", "/v1/volumes/"+url.PathEscape(vol)+"/snapshots", CreateSnapshot{Label: label, From: from}, &s)
}

// DeleteSnapshot deletes a sealed snapshot.
func (c *Client) DeleteSnapshot(ctx context.Context, vol, snap string) error {
	return c.do(ctx, "DELETE", snapshotPath(vol, snap), nil, nil)
}

// ProtectSnapshot protects snapshot snap of vol from delete and prune,
// or with on false lets them remove it again.
func (c *Client) ProtectSnapshot(ctx context.Context, vol, snap string, on bool) (Snapshot, error) {
	var s Snapshot
	return s, c.do(ctx, "PATCH", snapshotPath(vol, snap), UpdateSnapshot{Protected: &on}, &s)
}

// Prune applies a retention policy to vol's snapshots (DryRun: says
// what it would remove).
func (c *Client) Prune(ctx context.Context, vol string, req Prune) (Pruned, error) {
	var p Pruned
	return p, c.do(ctx, "POST", "/v1/volumes/"+url.PathEscape(vol)+"/prune", req, &p)
}

// CollectGarbage runs a garbage collection now and waits for it.
func (c *Client) CollectGarbage(ctx context.Context, req GC) (GCReport, error) {
	var r GCReport
	return r, c.do(ctx, "POST", "/v1/gc", req, &r)
}

// Verify checks the repository (or the targets) and waits for the
// result.
func (c *Client) Verify(ctx context.Context, req Verify) (VerifyReport, error) {
	var r VerifyReport
	return r, c.do(ctx, "POST", "/v1/verify", req, &r)
}

// RecoverVolume opens a volume whose write log is damaged at its newest
// good state, and says what was cut.
func (c *Client) RecoverVolume(ctx context.Context, name string) (Recovery, error) {
	var out Recovery
	err := c.do(ctx, "POST", "/v1/volumes/"+url.PathEscape(name)+"/recover", nil, &out)
	return out, err
}

// ChunkIDs returns the content IDs of count chunks of vol's head from
// chunk first (at most MaxChunkIDs).
func (c *Client) ChunkIDs(ctx context.Context, vol string, first uint64, count int) (ChunkIDs, error) {
	var ids ChunkIDs
	path := fmt.Sprintf("/v1/volumes/%s/chunks?first=%d&count=%d", url.PathEscape(vol), first, count)
	return ids, c.do(ctx, "GET", path, nil, &ids)
}

// Keys lists an encrypted repository's keys.
func (c *Client) Keys(ctx context.Context) ([]Key, error) {
	var out []Key
	return out, c.do(ctx, "GET", "/v1/keys", nil, &out)
}

// AddKey adds a password to an encrypted repository.
func (c *Client) AddKey(ctx context.Context, req AddKey) (Key, error) {
	var out Key
	return out, c.do(ctx, "POST", "/v1/keys", req, &out)
}

// ChangePassword replaces the key that req.Password opens by one for
// req.NewPassword: the new key is written, then the old one deleted.
func (c *Client) ChangePassword(ctx context.Context, req AddKey) (Key, error) {
	var out Key
	return out, c.do(ctx, "POST", "/v1/keys/passwd", req, &out)
}

// RemoveKey deletes a key; the last one is refused.
func (c *Client) RemoveKey(ctx context.Context, id string) error {
	return c.do(ctx, "DELETE", "/v1/keys/"+url.PathEscape(id), nil, nil)
}

// CompareChunks tells which of vol's chunks from chunk first differ from
// chunks whose hashes are sums (api.ChunkCompare).
func (c *Client) CompareChunks(ctx context.Context, vol string, cmp ChunkCompare) (ChunkDiff, error) {
	var d ChunkDiff
	return d, c.do(ctx, "POST", "/v1/volumes/"+url.PathEscape(vol)+"/chunks/compare", cmp, &d)
}

// WaitSealed polls until snapshot snap of vol is sealed, calling progress
// (if not nil) with the volume's state after every poll.
func (c *Client) WaitSealed(ctx context.Context, vol, snap string, progress func(Volume)) (Snapshot, error) {
	for {
		s, err := c.Snapshot(ctx, vol, snap)
		if err != nil || s.Sealed {
			return s, err
		}
		if progress != nil {
			if v, err := c.Volume(ctx, vol); err == nil {
				progress(v)
			}
		}
		select {
		case <-ctx.Done():
			return s, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func snapshotPath(vol, snap string) string {
	return "/v1/volumes/" + url.PathEscape(vol) + "/snapshots/" + url.PathEscape(snap)
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		data, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimSuffix(c.base.String(), "/")+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" { // without one, a client certificate says who calls
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var ue *url.Error
		if errors.As(err, &ue) && ue.Timeout() {
			return fmt.Errorf("%s %s: the server at %s did not answer in time: %v", method, path, c.Server(), ue.Err)
		}
		return fmt.Errorf("%w at %s: %v (is `nbdvault serve` running there? set --server or NBDVAULT_SERVER)", ErrUnreachable, c.Server(), unwrapURLError(err))
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("%s %s: reading the answer: %w", method, path, err)
	}
	if resp.StatusCode >= 300 {
		e := &Error{Status: resp.StatusCode}
		if json.Unmarshal(data, e) != nil || e.Code == "" {
			return fmt.Errorf("%s %s: server answered %s: %.200s", method, path, resp.Status, data)
		}
		return e
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("%s %s: the server's answer is not what this client understands: %w", method, path, err)
	}
	return nil
}

func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}
