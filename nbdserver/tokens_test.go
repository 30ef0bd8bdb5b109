package nbdserver

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// TestTokens: a token is found by its secret only (not by its ID, not by
// a near miss), survives a reload of the file, and is gone once revoked;
// the file holds hashes; a damaged file stops the start, saying what to
// do.
func TestTokens(t *testing.T) {
	path := filepath.Join(t.TempDir(), TokensFile)
	ts, err := loadTokens(path)
	require.NoError(t, err)
	_, err = ts.create("delete", "db")
	assert.ErrorContains(t, err, `scope "delete": want one of status, snapshot, push`)
	_, err = ts.create(api.ScopeSnapshot, "")
	assert.ErrorContains(t, err, "for one volume")

	tok, err := ts.create(api.ScopeSnapshot, "db")
	require.NoError(t, err)
	rec, ok := ts.lookup(tok.Token)
	require.True(t, ok)
	assert.Equal(t, "db", rec.Volume)
	for _, bad := range []string{"", tok.ID, tokenPrefix + tok.ID, tok.Token[:len(tok.Token)-1] + "0", strings.ToUpper(tok.Token)} {
		if bad == tok.Token {
			continue
		}
		_, ok := ts.lookup(bad)
		assert.False(t, ok, bad)
	}
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.NotContains(t, string(b), tok.Token[len(tokenPrefix)+len(tok.ID)+1:], "only hashes on disk")
	assert.Empty(t, ts.list()[0].Token, "list never carries the secret")

	again, err := loadTokens(path)
	require.NoError(t, err)
	_, ok = again.lookup(tok.Token)
	assert.True(t, ok, "after a restart")
	require.NoError(t, again.revoke(tok.ID))
	assert.ErrorIs(t, again.revoke(tok.ID), api.ErrNotFound)
	_, ok = again.lookup(tok.Token)
	assert.False(t, ok, "revoked")
	third, err := loadTokens(path)
	require.NoError(t, err)
	assert.Empty(t, third.list(), "revocation is on disk")

	require.NoError(t, os.WriteFile(path, []byte("{not json"), 0o600))
	_, err = loadTokens(path)
	assert.ErrorContains(t, err, "delete it to revoke every scoped token")
}
