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
	s := newServer(t, t.TempDir())
	t.Cleanup(s.Kill)
	s.start()
	s.makeBucket()
	return s
}

// newServer finds the binary (failing or skipping t when it is missing)
// and prepares a server whose files live in dir.
func newServer(t testing.TB, dir string) *Server {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		testenv.Unavailable(t, err)
	}
	return &Server{
		Endpoint:  testenv.FreeAddr(t),
		AccessKey: "nbdvault-" + testenv.RandomHex(4),
		SecretKey: testenv.RandomHex(16),
		Bucket:    "nbdvault-test",
		t:         t,
		bin:       bin,
		dataDir:   filepath.Join(dir, "data"),
		logPath:   filepath.Join(dir, "minio.log"),
	}
}

func (s *Server) start() {
	s.t.Helper()
	_, port, _ := net.SplitHostPort(s.Endpoint)
	logf, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		s.t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(s.bin, "server", "--quiet",
		"--address", s.Endpoint,
		"--console-address", testenv.FreeAddr(s.t),
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
		s.t.Fatalf("start minio: %v", err)
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
				return
			}
		}
		select {
		case <-exited:
			s.t.Fatalf("minio on port %s exited during start-up:\n%s", port, s.log())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("minio not ready after 60s:\n%s", s.log())
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

func (s *Server) makeBucket() {
	s.t.Helper()
	c, err := minio.New(s.Endpoint, &minio.Options{Creds: credentials.NewStaticV4(s.AccessKey, s.SecretKey, "")})
	if err != nil {
		s.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.MakeBucket(ctx, s.Bucket, minio.MakeBucketOptions{}); err != nil {
		s.t.Fatalf("make bucket: %v\n%s", err, s.log())
	}
}

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
	s.start()
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
	s := newServer(t, dir)
	s.start()
	s.makeBucket()
	sharedSrv = s
	return s
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
