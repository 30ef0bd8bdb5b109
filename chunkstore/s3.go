package chunkstore

import (
	"bytes"
	"cmp"
	"context"
	"crypto/md5"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// S3Config locates a bucket (and a prefix in it) on an S3-compatible store.
type S3Config struct {
	Endpoint string // host[:port]; default s3.amazonaws.com
	Bucket   string
	Prefix   string // keys live under Prefix + "/"; may be empty
	Region   string // empty: asked of the server
	// PathStyle: "" (auto: virtual-host style for AWS, path style
	// elsewhere), "true" (bucket in the path, e.g. MinIO), "false".
	PathStyle string
	TLS       bool // https; default true in a location
	// AccessKey and SecretKey, when set, are used instead of the
	// environment (tests set them; users use the environment).
	AccessKey, SecretKey, SessionToken string
}

// S3 is a Backend in an S3 bucket, through minio-go. minio-go's own retries
// are off: Retry does that, once, for every backend. Errors are translated
// to this package's sentinels here and nowhere else.
type S3 struct {
	core     minio.Core
	bucket   string
	prefix   string // "" or "some/prefix/"
	location string
}

// S3 transport limits: a dead or stuck endpoint fails a call instead of
// hanging it, even when the caller's context has no deadline.
const (
	s3DialTimeout   = 10 * time.Second
	s3HeaderTimeout = 60 * time.Second
)

// NewS3 returns a backend for cfg. It does not touch the network; the first
// call that does reports an unreachable endpoint or a missing bucket.
//
// Credentials, unless cfg sets them, come from the environment:
// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), then
// MINIO_ROOT_USER / MINIO_ROOT_PASSWORD, then the shared credentials file
// (AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE). Instance metadata is never
// queried.
func NewS3(cfg S3Config) (*S3, error) {
	cfg.Endpoint = cmp.Or(cfg.Endpoint, "s3.amazonaws.com")
	var creds *credentials.Credentials
	if cfg.AccessKey != "" {
		creds = credentials.NewStaticV4(cfg.AccessKey, cfg.SecretKey, cfg.SessionToken)
	} else {
		creds = credentials.NewChainCredentials([]credentials.Provider{
			&credentials.EnvAWS{},
			&credentials.EnvMinio{},
			&credentials.FileAWSCredentials{},
		})
	}
	lookup := minio.BucketLookupAuto
	switch cfg.PathStyle {
	case "":
	case "true":
		lookup = minio.BucketLookupPath
	case "false":
		lookup = minio.BucketLookupDNS
	default:
		return nil, fmt.Errorf("s3 path-style %q: want true or false", cfg.PathStyle)
	}
	tr, err := minio.DefaultTransport(cfg.TLS)
	if err != nil {
		return nil, err
	}
	tr.DialContext = (&net.Dialer{Timeout: s3DialTimeout, KeepAlive: 30 * time.Second}).DialContext
	tr.ResponseHeaderTimeout = s3HeaderTimeout
	tr.MaxIdleConnsPerHost = 64 // the uploader puts many chunks at once
	core, err := minio.NewCore(cfg.Endpoint, &minio.Options{
		Creds:        creds,
		Secure:       cfg.TLS,
		Region:       cfg.Region,
		BucketLookup: lookup,
		Transport:    tr,
		MaxRetries:   1,
	})
	if err != nil {
		return nil, fmt.Errorf("s3 endpoint %q: %w", cfg.Endpoint, err)
	}
	prefix := strings.Trim(cfg.Prefix, "/")
	loc := "s3://" + cfg.Bucket
	if prefix != "" {
		loc += "/" + prefix
		prefix += "/"
	}
	return &S3{core: *core, bucket: cfg.Bucket, prefix: prefix, location: loc}, nil
}

func (s *S3) Location() string { return s.location }

func (s *S3) Put(ctx context.Context, key string, data []byte) error {
	if err := opCheck(ctx, key); err != nil {
		return err
	}
	// Content-MD5 has the store check what it received: a pack's
	// journal is the only copy once the write log is freed.
	_, err := s.core.PutObject(ctx, s.bucket, s.prefix+key, bytes.NewReader(data), int64(len(data)), contentMD5(data), "",
		minio.PutObjectOptions{ContentType: "application/octet-stream"})
	return s.translate("put", key, err)
}

// GetVersion returns the object and its ETag.
func (s *S3) GetVersion(ctx context.Context, key string) ([]byte, string, error) {
	if err := opCheck(ctx, key); err != nil {
		return nil, "", err
	}
	body, info, _, err := s.core.GetObject(ctx, s.bucket, s.prefix+key, minio.GetObjectOptions{})
	if err != nil {
		return nil, "", s.translate("get", key, err)
	}
	defer body.Close()
	data, err := io.ReadAll(body)
	if err != nil {
		return nil, "", s.translate("get", key, err)
	}
	return data, info.ETag, nil
}

// PutIf is a conditional PUT: If-None-Match: * to create, If-Match: ETag
// to replace. S3 and MinIO answer 412 when the condition fails.
func (s *S3) PutIf(ctx context.Context, key string, data []byte, match string) (string, error) {
	if err := opCheck(ctx, key); err != nil {
		return "", err
	}
	opts := minio.PutObjectOptions{ContentType: "application/octet-stream"}
	if match == "" {
		opts.SetMatchETagExcept("*")
	} else {
		opts.SetMatchETag(match)
	}
	info, err := s.core.PutObject(ctx, s.bucket, s.prefix+key, bytes.NewReader(data), int64(len(data)), contentMD5(data), "", opts)
	if err != nil {
		err = s.translate("put-if", key, err)
		if errors.Is(err, ErrNotFound) { // If-Match on a missing key
			err = &KeyError{Op: "put-if", Key: key, Err: ErrPrecondition}
		}
		return "", err
	}
	return info.ETag, nil
}

func (s *S3) Get(ctx context.Context, key string) ([]byte, error) {
	if err := opCheck(ctx, key); err != nil {
		return nil, err
	}
	// Core.GetObject, unlike Client.GetObject, sends the request now, so a
	// missing key is an error here and not on the first read.
	body, info, _, err := s.core.GetObject(ctx, s.bucket, s.prefix+key, minio.GetObjectOptions{})
	if err != nil {
		return nil, s.translate("get", key, err)
	}
	defer body.Close()
	if info.Size < 0 || info.Size > 2*MaxChunkSize+headerLen {
		// Nothing nbdvault writes is this large; do not trust the size.
		data, err := io.ReadAll(body)
		return data, s.translate("get", key, err)
	}
	data := make([]byte, info.Size)
	if _, err := io.ReadFull(body, data); err != nil {
		return nil, s.translate("get", key, err)
	}
	return data, nil
}

func (s *S3) GetRange(ctx context.Context, key string, off, n int64) ([]byte, error) {
	if err := opCheck(ctx, key); err != nil {
		return nil, err
	}
	if err := checkRange(key, off, n); err != nil {
		return nil, err
	}
	if n == 0 { // an empty range has no Range header: ask for the size
		info, err := s.core.StatObject(ctx, s.bucket, s.prefix+key, minio.StatObjectOptions{})
		if err != nil {
			return nil, s.translate("get", key, err)
		}
		if off > info.Size {
			return nil, shortObject(key, info.Size, off, n)
		}
		return []byte{}, nil
	}
	var opts minio.GetObjectOptions
	if err := opts.SetRange(off, off+n-1); err != nil {
		return nil, &KeyError{Op: "get", Key: key, Err: fmt.Errorf("%w: %v", ErrInvalidKey, err)}
	}
	body, info, _, err := s.core.GetObject(ctx, s.bucket, s.prefix+key, opts)
	if err != nil {
		if minio.ToErrorResponse(err).Code == "InvalidRange" {
			return nil, shortObject(key, -1, off, n)
		}
		return nil, s.translate("get", key, err)
	}
	defer body.Close()
	if info.Size != n { // the object ends inside the range
		return nil, shortObject(key, off+info.Size, off, n)
	}
	data := make([]byte, n)
	if _, err := io.ReadFull(body, data); err != nil {
		return nil, s.translate("get", key, err)
	}
	return data, nil
}

func (s *S3) Has(ctx context.Context, key string) (bool, error) {
	if err := opCheck(ctx, key); err != nil {
		return false, err
	}
	_, err := s.core.StatObject(ctx, s.bucket, s.prefix+key, minio.StatObjectOptions{})
	if err == nil {
		return true, nil
	}
	err = s.translate("has", key, err)
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	return false, err
}

func (s *S3) Delete(ctx context.Context, key string) error {
	if err := opCheck(ctx, key); err != nil {
		return err
	}
	err := s.core.RemoveObject(ctx, s.bucket, s.prefix+key, minio.RemoveObjectOptions{})
	err = s.translate("delete", key, err)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	return err
}

// DeleteMany deletes with S3's multi-object delete: one request per
// 1,000 keys.
func (s *S3) DeleteMany(ctx context.Context, keys []string) error {
	for _, k := range keys {
		if err := opCheck(ctx, k); err != nil {
			return err
		}
	}
	objects := make(chan minio.ObjectInfo, len(keys))
	for _, k := range keys {
		objects <- minio.ObjectInfo{Key: s.prefix + k}
	}
	close(objects)
	var errs []error
	for e := range s.core.Client.RemoveObjects(ctx, s.bucket, objects, minio.RemoveObjectsOptions{}) {
		err := s.translate("delete", strings.TrimPrefix(e.ObjectName, s.prefix), e.Err)
		if !errors.Is(err, ErrNotFound) {
			errs = append(errs, err)
		}
	}
	if len(errs) > 3 {
		errs = append(errs[:3], fmt.Errorf("and %d more keys", len(errs)-3))
	}
	return errors.Join(errs...)
}

func (s *S3) List(ctx context.Context, prefix string, fn func(key string) error) error {
	return s.ListSizes(ctx, prefix, func(key string, _ int64) error { return fn(key) })
}

// ListSizes takes each object's size from the listing: no request more
// than List's.
func (s *S3) ListSizes(ctx context.Context, prefix string, fn func(key string, size int64) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	// Cancelling ctx is what stops minio-go's listing goroutine.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for obj := range s.core.Client.ListObjects(ctx, s.bucket, minio.ListObjectsOptions{Prefix: s.prefix + prefix, Recursive: true}) {
		if obj.Err != nil {
			return s.translate("list", prefix, obj.Err)
		}
		if err := fn(strings.TrimPrefix(obj.Key, s.prefix), obj.Size); err != nil {
			return err
		}
	}
	return ctx.Err()
}

// translate maps a minio-go error onto this package's sentinels.
func (s *S3) translate(op, key string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return &KeyError{Op: op, Key: key, Err: err}
	}
	var sentinel error
	var resp minio.ErrorResponse
	if errors.As(err, &resp) && (resp.StatusCode != 0 || resp.Code != "") {
		switch {
		case resp.Code == "NoSuchBucket":
			return &KeyError{Op: op, Key: key, Err: fmt.Errorf(
				"bucket %q does not exist on %s: create it (for example `mc mb`) or fix the location: %w",
				s.bucket, s.core.EndpointURL().Host, err)}
		case resp.Code == "NoSuchKey" || resp.StatusCode == http.StatusNotFound:
			sentinel = ErrNotFound
		case resp.Code == "AccessDenied" || resp.Code == "InvalidAccessKeyId" ||
			resp.Code == "SignatureDoesNotMatch" || resp.Code == "ExpiredToken" ||
			resp.StatusCode == http.StatusForbidden || resp.StatusCode == http.StatusUnauthorized:
			sentinel = ErrPermission
			err = fmt.Errorf("%w (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)", err)
		case resp.Code == "PreconditionFailed" || resp.StatusCode == http.StatusPreconditionFailed:
			sentinel = ErrPrecondition
		case resp.Code == "XMinioStorageFull":
			sentinel = ErrNoSpace
		case resp.Code == "SlowDown" || resp.Code == "RequestTimeout" || resp.Code == "InternalError" ||
			resp.Code == "ConditionalRequestConflict" || // 409: a concurrent conditional write; try again
			resp.Code == "ServiceUnavailable" || resp.Code == "XMinioServerNotInitialized" ||
			resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests ||
			resp.StatusCode == http.StatusRequestTimeout:
			sentinel = ErrUnavailable
		default:
			return &KeyError{Op: op, Key: key, Err: err} // a 4xx: permanent
		}
	} else if isTransportError(err) {
		sentinel = ErrUnavailable
	} else {
		return &KeyError{Op: op, Key: key, Err: err}
	}
	return &KeyError{Op: op, Key: key, Err: fmt.Errorf("%w: %w", sentinel, err)}
}

// isTransportError reports whether err is the network failing rather than
// the server answering: refused or reset connections, timeouts, a body cut
// short.
func isTransportError(err error) bool {
	var netErr net.Error
	return errors.As(err, &netErr) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EPIPE)
}

// contentMD5 is data's Content-MD5 header value.
func contentMD5(data []byte) string {
	sum := md5.Sum(data)
	return base64.StdEncoding.EncodeToString(sum[:])
}

// KeepsVersions reports whether the bucket has versioning enabled: a
// delete then only adds a delete marker, and frees no space until a
// lifecycle rule expires noncurrent versions. Stores that do not
// implement the question answer with an error.
func (s *S3) KeepsVersions(ctx context.Context) (bool, error) {
	cfg, err := s.core.Client.GetBucketVersioning(ctx, s.bucket)
	if err != nil {
		return false, fmt.Errorf("bucket %s: versioning: %w", s.bucket, err)
	}
	return cfg.Enabled(), nil
}
