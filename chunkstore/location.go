package chunkstore

import (
	"fmt"
	"net/url"
	"strconv"
	"strings"

	"github.com/minio/minio-go/v7/pkg/s3utils"
)

// Location is a parsed repository location, as a user types it:
//
//	/srv/nbdvault/repo                   a local directory (relative paths too)
//	file:///srv/nbdvault/repo            the same, as a URL
//	s3://bucket/prefix?endpoint=127.0.0.1:9000&tls=false&region=us-east-1&path-style=true
//
// S3 parameters: endpoint (host[:port], default s3.amazonaws.com), tls
// (default true), region (default: asked of the server), path-style (true
// or false; default: automatic).
type Location struct {
	Path string    // local directory, when S3 is nil
	S3   *S3Config // when the location is s3://
}

// ParseLocation parses a repository location. Its errors name the part
// that is wrong.
func ParseLocation(s string) (Location, error) {
	if strings.TrimSpace(s) == "" {
		return Location{}, fmt.Errorf("repository location is empty: give a directory or s3://bucket[/prefix]")
	}
	scheme, rest, isURL := strings.Cut(s, "://")
	if !isURL {
		return Location{Path: s}, nil
	}
	switch scheme {
	case "file":
		u, err := url.Parse(s)
		if err != nil {
			return Location{}, fmt.Errorf("repository location %q: %w", s, err)
		}
		if u.Host != "" && u.Host != "localhost" {
			return Location{}, fmt.Errorf("repository location %q: file:// takes no host (got %q): use file:///path", s, u.Host)
		}
		if u.Path == "" {
			return Location{}, fmt.Errorf("repository location %q: no path after file://", s)
		}
		return Location{Path: u.Path}, nil
	case "s3":
		cfg, err := parseS3(rest)
		if err != nil {
			return Location{}, fmt.Errorf("repository location %q: %w", s, err)
		}
		return Location{S3: cfg}, nil
	default:
		return Location{}, fmt.Errorf("repository location %q: unknown scheme %q: use a path, file:// or s3://", s, scheme)
	}
}

func parseS3(rest string) (*S3Config, error) {
	pathPart, query, _ := strings.Cut(rest, "?")
	bucket, prefix, _ := strings.Cut(pathPart, "/")
	if bucket == "" {
		return nil, fmt.Errorf("no bucket: want s3://bucket[/prefix]")
	}
	if err := s3utils.CheckValidBucketNameStrict(bucket); err != nil {
		return nil, fmt.Errorf("bucket %q: %w", bucket, err)
	}
	prefix = strings.Trim(prefix, "/")
	for seg := range strings.SplitSeq(prefix, "/") {
		if prefix != "" && (seg == "" || seg == "." || seg == "..") {
			return nil, fmt.Errorf("prefix %q: empty, \".\" or \"..\" segment", prefix)
		}
	}
	cfg := &S3Config{Bucket: bucket, Prefix: prefix, TLS: true}
	values, err := url.ParseQuery(query)
	if err != nil {
		return nil, fmt.Errorf("parameters %q: %w", query, err)
	}
	for name, vals := range values {
		if len(vals) != 1 {
			return nil, fmt.Errorf("parameter %q given %d times", name, len(vals))
		}
		v := vals[0]
		switch name {
		case "endpoint":
			if v == "" || strings.Contains(v, "/") {
				return nil, fmt.Errorf("endpoint %q: want host or host:port, without scheme or path", v)
			}
			cfg.Endpoint = v
		case "region":
			cfg.Region = v
		case "tls":
			b, err := strconv.ParseBool(v)
			if err != nil {
				return nil, fmt.Errorf("tls=%q: want true or false", v)
			}
			cfg.TLS = b
		case "path-style":
			b, err := strconv.ParseBool(v)
			if err != nil {
				return nil, fmt.Errorf("path-style=%q: want true or false", v)
			}
			cfg.PathStyle = strconv.FormatBool(b)
		default:
			return nil, fmt.Errorf("unknown parameter %q: known are endpoint, region, tls, path-style", name)
		}
	}
	return cfg, nil
}

// String returns the location in the form ParseLocation reads.
func (l Location) String() string {
	if l.S3 == nil {
		return l.Path
	}
	c := l.S3
	s := "s3://" + c.Bucket
	if c.Prefix != "" {
		s += "/" + c.Prefix
	}
	q := url.Values{}
	if c.Endpoint != "" {
		q.Set("endpoint", c.Endpoint)
	}
	if c.Region != "" {
		q.Set("region", c.Region)
	}
	if !c.TLS {
		q.Set("tls", "false")
	}
	if c.PathStyle != "" {
		q.Set("path-style", c.PathStyle)
	}
	if len(q) > 0 {
		s += "?" + q.Encode()
	}
	return s
}

// Open returns the backend at location, wrapped in Retry with the default
// policy. It does not touch the network.
func Open(location string) (Backend, error) {
	loc, err := ParseLocation(location)
	if err != nil {
		return nil, err
	}
	var b Backend
	if loc.S3 != nil {
		b, err = NewS3(*loc.S3)
	} else {
		b, err = NewLocal(loc.Path)
	}
	if err != nil {
		return nil, err
	}
	return NewRetry(b, DefaultRetryPolicy), nil
}
