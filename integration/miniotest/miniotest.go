// Package miniotest runs a real MinIO server for tests: on a free
// 127.0.0.1 port, with a temporary data folder and random credentials, and
// stops it when the test ends.
//
// The binary is the pinned MinIO (see Version), found through $NBDVAULT_MINIO,
// $PATH, $(go env GOPATH)/bin or ~/.cache/nbdvault/bin; `make deps` installs
// it. When it is missing the test fails if CI or NBDVAULT_REQUIRE_TOOLS is
// set (as `make test` does), and is skipped with a message otherwise.
package miniotest

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/integration/testenv"
)

// Version is the MinIO module version `make deps` installs.
const Version = "v0.0.0-20260212201848-7aac2a2c5b7c"

// Server is a running (or killed) MinIO.
type Server struct {
	Endpoint  string // 127.0.0.1:port
	AccessKey string
	SecretKey string
	Bucket    string

	t       testing.TB
	bin     string
	dataDir string
	logPath string

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
}

// Required reports whether a missing tool must fail the test run.
func Required() bool { return testenv.Required() }

// Binary returns the path of the minio binary, or an error saying how to
// install it.
func Binary() (string, error) {
	return testenv.Binary("minio", "NBDVAULT_MINIO", "run `make deps` (go install github.com/minio/minio@"+Version+")")
}

// Start runs a new MinIO with one empty bucket, stopped at the end of t.
func Start(t testing.TB) *Server {
	t.Helper()
	s := launch(t, t.TempDir())
	t.Cleanup(s.Kill)
	return s
}

// launch is Launch for a test: a missing binary fails or skips t.
func launch(t testing.TB, dir string) *Server {
	t.Helper()
	if _, err := Binary(); err != nil {
		testenv.Unavailable(t, err)
	}
	s, err := Launch(dir)
	if err != nil {
		t.Fatal(err)
	}
	s.t = t
	return s
}

// Launch runs a new MinIO with one empty bucket, its files in dir, outside
// a test (a benchmark): the caller stops it with Kill.
func Launch(dir string) (*Server, error) {
	bin, err := Binary()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	endpoint, err := testenv.PickAddr()
	if err != nil {
		return nil, err
	}
	s := &Server{
		Endpoint:  endpoint,
		AccessKey: "nbdvault-" + testenv.RandomHex(4),
		SecretKey: testenv.RandomHex(16),
		Bucket:    "nbdvault-test",
		bin:       bin,
		dataDir:   filepath.Join(dir, "data"),
		logPath:   filepath.Join(dir, "minio.log"),
	}
	if err := s.start(); err != nil {
		return nil, err
	}
	if err := s.makeBucket(); err != nil {
		s.Kill()
		return nil, err
	}
	return s, nil
}

func (s *Server) start() error {
	_, port, _ := net.SplitHostPort(s.Endpoint)
	// Picked and closed, a port may be handed out again: never the S3
	// port, or MinIO fails to start (as SeaweedFS's gRPC ports once did).
	var console string
	for console == "" || console == s.Endpoint {
		var err error
		if console, err = testenv.PickAddr(); err != nil {
			return err
		}
	}
	logf, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(s.bin, "server", "--quiet",
		"--address", s.Endpoint,
		"--console-address", console,
		"--certs-dir", filepath.Join(filepath.Dir(s.dataDir), "certs"),
		s.dataDir)
	cmd.Env = append(os.Environ(),
		"MINIO_ROOT_USER="+s.AccessKey,
		"MINIO_ROOT_PASSWORD="+s.SecretKey,
		"MINIO_BROWSER=off",
		"MINIO_UPDATE=off",
	)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start minio: %w", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	s.mu.Lock()
	s.cmd, s.exited = cmd, exited
	s.mu.Unlock()

	// MinIO has no readiness signal but its health endpoint: poll it.
	url := "http://" + s.Endpoint + "/minio/health/ready"
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-exited:
			return fmt.Errorf("minio on port %s exited during start-up:\n%s", port, s.log())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.Kill()
			return fmt.Errorf("minio not ready after 60s:\n%s", s.log())
		}
	}
}

func (s *Server) log() string {
	b, _ := os.ReadFile(s.logPath)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

func (s *Server) makeBucket() error {
	c, err := minio.New(s.Endpoint, &minio.Options{Creds: credentials.NewStaticV4(s.AccessKey, s.SecretKey, "")})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.MakeBucket(ctx, s.Bucket, minio.MakeBucketOptions{}); err != nil {
		return fmt.Errorf("make bucket: %w\n%s", err, s.log())
	}
	return nil
}

// PID is MinIO's process ID (0 once killed).
func (s *Server) PID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// DataDir is the folder MinIO keeps its drive in.
func (s *Server) DataDir() string { return s.dataDir }

// Kill stops MinIO with SIGKILL, as a crash would, and waits for it to exit.
// Killing a stopped server does nothing.
func (s *Server) Kill() {
	s.mu.Lock()
	cmd, exited := s.cmd, s.exited
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	<-exited
}

// Pause stops MinIO with SIGSTOP: it keeps its port, and the kernel
// accepts connections for it, but nothing answers (a hung store).
func (s *Server) Pause() { s.signal(syscall.SIGSTOP) }

// Continue resumes a paused MinIO.
func (s *Server) Continue() { s.signal(syscall.SIGCONT) }

func (s *Server) signal(sig syscall.Signal) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		_ = s.cmd.Process.Signal(sig)
	}
}

// Restart starts a killed server again on the same address and data.
func (s *Server) Restart() {
	s.t.Helper()
	s.Kill()
	if err := s.start(); err != nil {
		s.t.Fatal(err)
	}
}

// Config returns an S3Config for the server's bucket under prefix.
func (s *Server) Config(prefix string) chunkstore.S3Config {
	return chunkstore.S3Config{
		Endpoint:  s.Endpoint,
		Bucket:    s.Bucket,
		Prefix:    prefix,
		Region:    "us-east-1",
		PathStyle: "true",
		AccessKey: s.AccessKey,
		SecretKey: s.SecretKey,
	}
}

// Location returns the repository location of the bucket under prefix, as
// a user would type it; credentials go in the environment (Env).
func (s *Server) Location(prefix string) string {
	return "s3://" + s.Bucket + "/" + prefix + "?endpoint=" + s.Endpoint + "&tls=false&path-style=true&region=us-east-1"
}

// Env returns the environment variables that carry the credentials.
func (s *Server) Env() []string {
	return []string{"AWS_ACCESS_KEY_ID=" + s.AccessKey, "AWS_SECRET_ACCESS_KEY=" + s.SecretKey}
}

// Backend returns a new backend under a fresh random prefix of the bucket,
// so every caller starts empty.
func (s *Server) Backend(t testing.TB) *chunkstore.S3 {
	b, err := chunkstore.NewS3(s.Config("t-" + testenv.RandomHex(6)))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// A shared server lives for a whole test binary: TestMain calls StopShared.
var (
	sharedMu  sync.Mutex
	sharedSrv *Server
)

// StartShared starts a server that outlives t, for the package's tests to
// share (each under its own prefix). TestMain must call StopShared.
func StartShared(t testing.TB) *Server {
	t.Helper()
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if sharedSrv != nil {
		return sharedSrv
	}
	dir, err := os.MkdirTemp("", "nbdvault-minio-")
	if err != nil {
		t.Fatal(err)
	}
	sharedSrv = launch(t, dir)
	return sharedSrv
}

// StopShared kills the shared server and removes its data.
func StopShared() {
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if sharedSrv != nil {
		sharedSrv.Kill()
		_ = os.RemoveAll(filepath.Dir(sharedSrv.dataDir))
		sharedSrv = nil
	}
}
