package nbdserver

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// A body past the cap gets 413 in the API's error shape, whether it says
// its length (refused unread) or not (refused once 1 MiB is read).
func TestAdminBodyTooLarge(t *testing.T) {
	_, s := testAPI(t)

	post := func(body io.Reader) (*http.Response, api.Error) {
		req, err := http.NewRequest("POST", "http://"+s.AdminAddr()+"/v1/volumes", body)
		require.NoError(t, err)
		req.Header.Set("Authorization", "Bearer "+s.token)
		cl := &http.Client{Timeout: time.Minute}
		resp, err := cl.Do(req)
		require.NoError(t, err, "the server answers instead of resetting the connection")
		defer resp.Body.Close()
		var e api.Error
		require.NoError(t, json.NewDecoder(resp.Body).Decode(&e))
		return resp, e
	}
	big := bytes.Repeat([]byte(" "), 64<<20) // valid JSON whitespace, then nothing
	resp, e := post(bytes.NewReader(big))
	assert.Equal(t, http.StatusRequestEntityTooLarge, resp.StatusCode)
	assert.Equal(t, "invalid", e.Code)
	assert.Contains(t, e.Message, "larger than the API takes")

	// No length (a body of unknown size goes chunked).
	resp, e = post(io.MultiReader(bytes.NewReader(big[:2<<20]), bytes.NewReader([]byte(`{"name":"x"}`))))
	assert.Equal(t, http.StatusRequestEntityTooLarge, resp.StatusCode)
	assert.Equal(t, "invalid", e.Code)

	// A body within the cap still works.
	resp, _ = post(bytes.NewReader([]byte(`{"name":"web","size":1048576}`)))
	assert.Equal(t, http.StatusCreated, resp.StatusCode)
}

// The admin token counts only as a bearer token: the same token under
// another scheme (Basic, Token) is 401, as if it were wrong.
func TestAdminTokenOnlyAsBearer(t *testing.T) {
	_, s := testAPI(t)
	get := func(auth string) int {
		req, err := http.NewRequest("GET", "http://"+s.AdminAddr()+"/v1/tokens", nil)
		require.NoError(t, err)
		req.Header.Set("Authorization", auth)
		resp, err := (&http.Client{Timeout: time.Minute}).Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		return resp.StatusCode
	}
	assert.Equal(t, http.StatusOK, get("Bearer "+s.token))
	assert.Equal(t, http.StatusOK, get("bearer "+s.token), "the scheme's case does not matter")
	for _, scheme := range []string{"Basic", "Token", "Digest"} {
		assert.Equal(t, http.StatusUnauthorized, get(scheme+" "+s.token), "the admin token as %s", scheme)
	}
}
