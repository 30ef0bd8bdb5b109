package nbdserver

import (
	"context"
	"log/slog"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/client"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// A volume's stored policy is applied after each seal of a snapshot:
// what it does not keep goes, but a protected snapshot stays, and so
// does one an NBD client has open, until it is closed.
func TestRetentionAfterSeal(t *testing.T) {
	ctx := context.Background()
	s, _, cl := serveForPrune(t)

	_, err := cl.CreateVolume(ctx, api.CreateVolume{Name: "db", Size: 8 << 20})
	require.NoError(t, err)
	_, err = cl.SetRetention(ctx, "db", api.Policy{Last: -3})
	require.ErrorIs(t, err, api.ErrInvalid)
	v, err := cl.SetRetention(ctx, "db", api.Policy{Last: 2})
	require.NoError(t, err)
	assert.Equal(t, &api.Policy{Last: 2}, v.Retention)

	ids := func() []string {
		ss, err := cl.Snapshots(ctx, "db")
		require.NoError(t, err)
		var out []string
		for _, s := range ss {
			if s.Kind == "" {
				out = append(out, s.ID)
			}
		}
		return out
	}
	// snap takes a snapshot and waits until it is sealed and the prune
	// after its seal has left exactly want (and it) in place.
	snap := func(want ...string) string {
		t.Helper()
		si, err := cl.CreateSnapshot(ctx, "db", "")
		require.NoError(t, err)
		want = append(want, si.ID)
		require.Eventually(t, func() bool {
			got := ids()
			slices.Sort(got)
			slices.Sort(want)
			return slices.Equal(got, want)
		}, time.Minute, 20*time.Millisecond, "want %v", want)
		return si.ID
	}
	s1 := snap()
	_, err = cl.ProtectSnapshot(ctx, "db", s1, true)
	require.NoError(t, err)
	s2 := snap(s1)
	c, err := client.Dial(ctx, s.NBDAddrs()[0], client.Options{Export: "db@" + s2})
	require.NoError(t, err)
	// The server counts it once negotiation is over on its side, which
	// may be just after the client's Dial returns.
	require.Eventually(t, func() bool { return s.exports.Attached("db", s2) == 1 }, time.Minute, 10*time.Millisecond)
	s3 := snap(s1, s2)
	s4 := snap(s1, s2, s3) // s3 goes; s2 stays while exported
	s5 := snap(s1, s2, s4) // s4 goes
	got := make([]byte, 4096)
	require.NoError(t, c.ReadAt(ctx, got, 0), "the exported snapshot still reads")
	require.NoError(t, c.Close())
	require.Eventually(t, func() bool { return s.exports.Attached("db", s2) == 0 }, time.Minute, 10*time.Millisecond)
	s6 := snap(s1, s5) // s2 and s4 go now
	v, err = cl.Volume(ctx, "db")
	require.NoError(t, err)
	require.NotNil(t, v.Status.LastPrune)
	assert.Empty(t, v.Status.LastPrune.Error)
	assert.Equal(t, 2, v.Status.LastPrune.Removed)

	// Cleared: nothing goes any more.
	v, err = cl.SetRetention(ctx, "db", api.Policy{})
	require.NoError(t, err)
	assert.Nil(t, v.Retention)
	snap(s1, s5, s6)
}

// The automatic prune leaves the snapshots a scoped token took until
// they are --auto-prune-min-age old, whatever the policy: a source host
// broken into cannot push the volume's history out by taking snapshots.
// The admin's snapshots go by the policy as ever, and a prune by hand
// (the admin's) decides alone.
func TestAutoPruneLeavesYoungScopedSnapshots(t *testing.T) {
	ctx := context.Background()
	s, hs, admin := serveForPrune(t)
	_, err := admin.CreateVolume(ctx, api.CreateVolume{Name: "db", Size: 8 << 20})
	require.NoError(t, err)
	_, err = admin.SetRetention(ctx, "db", api.Policy{Last: 1})
	require.NoError(t, err)
	tok, err := s.tokens.create(api.ScopeSnapshot, "db")
	require.NoError(t, err)
	host, err := api.NewClient(hs.URL, tok.Token)
	require.NoError(t, err)

	ids := func() []string {
		ss, err := admin.Snapshots(ctx, "db")
		require.NoError(t, err)
		var out []string
		for _, s := range ss {
			if s.Kind == "" {
				out = append(out, s.ID)
			}
		}
		slices.Sort(out)
		return out
	}
	// snap takes a snapshot and waits for the prune after its seal: the
	// one whose count of kept and removed snapshots covers it, which then
	// must have left exactly want and it.
	snap := func(cl *api.Client, want ...string) string {
		t.Helper()
		si, err := cl.CreateSnapshot(ctx, "db", "")
		require.NoError(t, err)
		want = append(want, si.ID)
		slices.Sort(want)
		require.Eventually(t, func() bool {
			v, err := admin.Volume(ctx, "db")
			require.NoError(t, err)
			p := v.Status.LastPrune
			ss, err := admin.Snapshot(ctx, "db", si.ID)
			return err == nil && ss.Sealed && p != nil && p.Time.After(ss.Time) && p.Kept == len(want)
		}, time.Minute, 20*time.Millisecond, "the prune after %s's seal", si.ID)
		assert.Equal(t, want, ids())
		return si.ID
	}
	a := snap(admin)
	h1 := snap(host)     // a goes: keep-last 1
	h2 := snap(host, h1) // h1 stays: taken by the host, young
	h3 := snap(host, h1, h2)
	b := snap(admin, h1, h2, h3)
	// The prune counted may have run before b's seal (b then counted as
	// kept, unsealed): the one after it must not change anything either.
	want := []string{h1, h2, h3, b}
	slices.Sort(want)
	assert.Never(t, func() bool { return !slices.Equal(ids(), want) }, 2*time.Second, 50*time.Millisecond)
	si, err := admin.Snapshot(ctx, "db", h1)
	require.NoError(t, err)
	assert.Equal(t, "token:"+tok.ID, si.TakenBy)
	assert.NotContains(t, ids(), a)
}

// serveForPrune runs a server for the retention tests, with its admin
// API on a test HTTP server and a client of it with the admin token.
func serveForPrune(t *testing.T) (*Server, *httptest.Server, *api.Client) {
	t.Helper()
	s, err := Open(context.Background(), Options{Data: filepath.Join(t.TempDir(), "data"), Listen: []string{"127.0.0.1:0"},
		Admin: "127.0.0.1:0", Logger: slog.New(slog.DiscardHandler), GCInterval: time.Hour})
	require.NoError(t, err)
	runCtx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- s.Serve(runCtx) }()
	t.Cleanup(func() { stop(); require.NoError(t, <-served) })
	hs := httptest.NewServer(s.adminHandler())
	t.Cleanup(hs.Close)
	cl, err := api.NewClient(hs.URL, s.token)
	require.NoError(t, err)
	return s, hs, cl
}
