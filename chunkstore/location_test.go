package chunkstore_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
)

func TestParseLocation(t *testing.T) {
	good := []struct {
		in   string
		want chunkstore.Location
	}{
		{"/srv/repo", chunkstore.Location{Path: "/srv/repo"}},
		{"repo", chunkstore.Location{Path: "repo"}},
		{"./a:b", chunkstore.Location{Path: "./a:b"}},
		{"file:///srv/repo", chunkstore.Location{Path: "/srv/repo"}},
		{"file://localhost/srv/repo", chunkstore.Location{Path: "/srv/repo"}},
		{"s3://bucket", chunkstore.Location{S3: &chunkstore.S3Config{Bucket: "bucket", TLS: true}}},
		{"s3://bucket/a/b/", chunkstore.Location{S3: &chunkstore.S3Config{Bucket: "bucket", Prefix: "a/b", TLS: true}}},
		{"s3://bucket/p?endpoint=127.0.0.1:9000&tls=false&region=eu-west-1&path-style=true",
			chunkstore.Location{S3: &chunkstore.S3Config{Bucket: "bucket", Prefix: "p", Endpoint: "127.0.0.1:9000",
				Region: "eu-west-1", PathStyle: "true"}}},
	}
	for _, tc := range good {
		got, err := chunkstore.ParseLocation(tc.in)
		require.NoError(t, err, tc.in)
		assert.Equal(t, tc.want, got, tc.in)
		again, err := chunkstore.ParseLocation(got.String())
		require.NoError(t, err, "String() of %q", tc.in)
		assert.Equal(t, got, again, "String() round trip of %q", tc.in)
	}

	bad := []struct{ in, names string }{
		{"", "empty"},
		{"  ", "empty"},
		{"gs://bucket", `unknown scheme "gs"`},
		{"file://host/path", `takes no host (got "host")`},
		{"file://", "no path"},
		{"s3://", "no bucket"},
		{"s3:///prefix", "no bucket"},
		{"s3://Bad_Bucket", `bucket "Bad_Bucket"`},
		{"s3://ab", `bucket "ab"`},
		{"s3://bucket/a//b", `prefix "a//b"`},
		{"s3://bucket/../x", `prefix "../x"`},
		{"s3://bucket?tls=maybe", `tls="maybe"`},
		{"s3://bucket?path-style=yes", `path-style="yes"`},
		{"s3://bucket?endpoint=http://host:9000", `endpoint "http://host:9000"`},
		{"s3://bucket?endpoint=", `endpoint ""`},
		{"s3://bucket?color=red", `unknown parameter "color"`},
		{"s3://bucket?tls=true&tls=false", `parameter "tls" given 2 times`},
		{"s3://bucket?%zz", "parameters"},
	}
	for _, tc := range bad {
		_, err := chunkstore.ParseLocation(tc.in)
		require.Error(t, err, tc.in)
		assert.Contains(t, err.Error(), tc.names, "the error for %q names the bad part", tc.in)
	}
}

func TestOpenLocalLocation(t *testing.T) {
	dir := t.TempDir()
	b, err := chunkstore.Open("file://" + dir + "/repo")
	require.NoError(t, err)
	assert.Equal(t, dir+"/repo", b.Location())
	_, err = chunkstore.Open("s3://bucket?tls=perhaps")
	assert.ErrorContains(t, err, `tls="perhaps"`)
}

func TestCheckKey(t *testing.T) {
	for _, k := range []string{"config", "chunks/ab/abcdef", "volumes/db-1/snapshots/0001"} {
		assert.NoError(t, chunkstore.CheckKey(k), k)
	}
	for _, k := range []string{"", "/a", "a/", "a//b", ".", "..", "a/../b", ".tmp-1", "a/.x", "a\x00b"} {
		assert.ErrorIs(t, chunkstore.CheckKey(k), chunkstore.ErrInvalidKey, "%q", k)
	}
}
