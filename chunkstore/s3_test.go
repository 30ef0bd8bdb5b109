package chunkstore_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/chunkstore/storetest"
	"github.com/nbdvault/nbdvault/integration/miniotest"
	"github.com/nbdvault/nbdvault/integration/seaweedtest"
)

// One MinIO serves the conformance suites; every subtest gets its own
// prefix. Tests that kill MinIO start their own.
func shared(t testing.TB) *miniotest.Server { return miniotest.StartShared(t) }

func TestMain(m *testing.M) {
	code := m.Run()
	miniotest.StopShared()
	seaweedtest.StopShared()
	os.Exit(code)
}

func TestS3Backend(t *testing.T) {
	m := shared(t)
	storetest.Backend(t, func(t *testing.T) chunkstore.Backend { return m.Backend(t) })
}

func TestS3Store(t *testing.T) {
	m := shared(t)
	storetest.Store(t, func(t *testing.T) chunkstore.Backend { return m.Backend(t) })
}

// The same suites on SeaweedFS, a second S3 implementation.
func TestS3BackendSeaweedFS(t *testing.T) {
	w := seaweedtest.StartShared(t)
	storetest.Backend(t, func(t *testing.T) chunkstore.Backend { return w.Backend(t) })
}

func TestS3StoreSeaweedFS(t *testing.T) {
	w := seaweedtest.StartShared(t)
	storetest.Store(t, func(t *testing.T) chunkstore.Backend { return w.Backend(t) })
}

func TestS3OpenByLocation(t *testing.T) {
	m := shared(t)
	for _, kv := range m.Env() {
		k, v, _ := bytes.Cut([]byte(kv), []byte("="))
		t.Setenv(string(k), string(v))
	}
	b, err := chunkstore.Open(m.Location("by-location"))
	require.NoError(t, err)
	s, err := chunkstore.NewStore(b, chunkstore.Options{})
	require.NoError(t, err)
	data := storetest.RandomBytes(1 << 20)
	id, err := s.Put(t.Context(), data)
	require.NoError(t, err)
	// The object is where the location says: under the prefix, sharded.
	raw, err := chunkstore.NewS3(m.Config(""))
	require.NoError(t, err)
	has, err := raw.Has(t.Context(), "by-location/"+chunkstore.Key(id))
	require.NoError(t, err)
	assert.True(t, has)
}

func TestS3WrongCredentials(t *testing.T) {
	m := shared(t)
	cfg := m.Config("creds")
	cfg.SecretKey = "not-the-secret"
	b, err := chunkstore.NewS3(cfg)
	require.NoError(t, err)
	r := chunkstore.NewRetry(b, chunkstore.RetryPolicy{Attempts: 5, Initial: time.Second})
	start := time.Now()
	err = r.Put(t.Context(), "k", []byte("x"))
	require.ErrorIs(t, err, chunkstore.ErrPermission)
	assert.Contains(t, err.Error(), "AWS_SECRET_ACCESS_KEY", "the error says what to check")
	assert.Less(t, time.Since(start), time.Second, "a refused credential is not retried")
}

func TestS3MissingBucket(t *testing.T) {
	m := shared(t)
	cfg := m.Config("")
	cfg.Bucket = "no-such-bucket"
	b, err := chunkstore.NewS3(cfg)
	require.NoError(t, err)
	err = b.Put(t.Context(), "k", []byte("x"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), `bucket "no-such-bucket" does not exist`)
	assert.NotErrorIs(t, err, chunkstore.ErrUnavailable)
	_, err = b.Get(t.Context(), "k")
	assert.NotErrorIs(t, err, chunkstore.ErrNotFound, "a missing bucket is not a missing chunk")
}

// TestS3Outage kills MinIO mid-test: calls fail within their deadline, and
// succeed again once MinIO is back on the same data.
func TestS3Outage(t *testing.T) {
	m := miniotest.Start(t)
	b := chunkstore.NewRetry(m.Backend(t), chunkstore.RetryPolicy{Initial: 50 * time.Millisecond, Max: 500 * time.Millisecond, Attempts: 100})
	s, err := chunkstore.NewStore(b, chunkstore.Options{CacheBytes: -1})
	require.NoError(t, err)
	ctx := t.Context()
	before := storetest.CompressibleBytes(1<<20, 7)
	id, err := s.Put(ctx, before)
	require.NoError(t, err)

	m.Kill()

	const deadline = 2 * time.Second
	for name, call := range map[string]func(context.Context) error{
		"get": func(ctx context.Context) error { _, err := s.Get(ctx, id); return err },
		"put": func(ctx context.Context) error { _, err := s.Put(ctx, storetest.RandomBytes(1<<20)); return err },
		"has": func(ctx context.Context) error { _, err := s.Has(ctx, id); return err },
		"list": func(ctx context.Context) error {
			return b.List(ctx, "chunks/", func(string) error { return nil })
		},
	} {
		cctx, cancel := context.WithTimeout(ctx, deadline)
		start := time.Now()
		err := call(cctx)
		elapsed := time.Since(start)
		cancel()
		require.Error(t, err, "%s with MinIO down", name)
		assert.ErrorIs(t, err, chunkstore.ErrUnavailable, "%s: %v", name, err)
		assert.Less(t, elapsed, deadline+500*time.Millisecond, "%s must fail within its deadline, not hang", name)
	}

	// A call made while MinIO is down, with time to spare, rides out the
	// restart.
	during := storetest.RandomBytes(1 << 20)
	type result struct {
		id  chunkstore.ID
		err error
	}
	done := make(chan result, 1)
	go func() {
		cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
		id, err := s.Put(cctx, during)
		done <- result{id, err}
	}()
	time.Sleep(300 * time.Millisecond) // let it fail at least once
	m.Restart()
	r := <-done
	require.NoError(t, r.err, "a put retried across the restart")

	got, err := s.Get(ctx, id)
	require.NoError(t, err, "data written before the outage survives it")
	assert.True(t, bytes.Equal(before, got))
	got, err = s.Get(ctx, r.id)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(during, got))
}

// TestS3KeepsVersions: a bucket with versioning enabled is told apart
// (deletes free nothing there), on MinIO.
func TestS3KeepsVersions(t *testing.T) {
	m := shared(t)
	plain, err := chunkstore.NewS3(m.Config("v"))
	require.NoError(t, err)
	keeps, err := plain.KeepsVersions(t.Context())
	require.NoError(t, err)
	assert.False(t, keeps, "the test bucket keeps no versions")

	mc, err := minio.New(m.Endpoint, &minio.Options{Creds: credentials.NewStaticV4(m.AccessKey, m.SecretKey, "")})
	require.NoError(t, err)
	bucket := "versioned-" + fmt.Sprint(time.Now().UnixNano())
	require.NoError(t, mc.MakeBucket(t.Context(), bucket, minio.MakeBucketOptions{}))
	require.NoError(t, mc.EnableVersioning(t.Context(), bucket))
	cfg := m.Config("v")
	cfg.Bucket = bucket
	versioned, err := chunkstore.NewS3(cfg)
	require.NoError(t, err)
	keeps, err = versioned.KeepsVersions(t.Context())
	require.NoError(t, err)
	assert.True(t, keeps, "versioning enabled")
}
