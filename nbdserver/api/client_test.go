package api

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestNBDAddress: a client reaches the NBD listener the server reports,
// by the admin API's host when the server listens on every address.
func TestNBDAddress(t *testing.T) {
	var nbd []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		assert.Equal(t, "Bearer secret", r.Header.Get("Authorization"))
		_ = json.NewEncoder(w).Encode(Status{NBD: nbd})
	}))
	defer srv.Close()
	u, _ := url.Parse(srv.URL)
	c, err := NewClient(srv.URL, "secret")
	require.NoError(t, err)
	for _, tc := range []struct{ reported, want string }{
		{"192.0.2.7:10809", "192.0.2.7:10809"},
		{"0.0.0.0:10809", u.Hostname() + ":10809"},
		{"[::]:10900", u.Hostname() + ":10900"},
		{":10809", u.Hostname() + ":10809"},
		{"unix:/run/nbdvault.sock", "unix:/run/nbdvault.sock"},
	} {
		nbd = []string{tc.reported, "127.0.0.2:1"}
		got, err := c.NBDAddress(t.Context())
		require.NoError(t, err, tc.reported)
		assert.Equal(t, tc.want, got, tc.reported)
	}
	nbd = nil
	_, err = c.NBDAddress(t.Context())
	assert.ErrorContains(t, err, "no NBD listener")
	nbd = []string{"nohost"}
	_, err = c.NBDAddress(t.Context())
	assert.ErrorContains(t, err, `the server's NBD address "nohost"`)
}
