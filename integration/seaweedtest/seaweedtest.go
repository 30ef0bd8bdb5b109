// Package seaweedtest runs a real SeaweedFS S3 gateway for tests, as
// miniotest does MinIO: one `weed server` (master, volume server, filer and
// S3 in one process) on free 127.0.0.1 ports, with a temporary data folder
// and random credentials, stopped when the test ends.
//
// The binary is the pinned SeaweedFS (see Version), found through
// $NBDVAULT_WEED, $PATH, $(go env GOPATH)/bin or ~/.cache/nbdvault/bin;
// `make deps` builds it. When it is missing the test fails if CI or
// NBDVAULT_REQUIRE_TOOLS is set (as `make test` does), and is skipped with a
// message otherwise.
package seaweedtest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/integration/testenv"
)

// Version is the SeaweedFS module version `make deps` builds.
const Version = "v0.0.0-20261109003541-7506e5f91cd6"

// readyTimeout bounds a start: past it the test fails with weed's log.
const readyTimeout = 60 * time.Second

// Server is a running (or killed) SeaweedFS.
type Server struct {
	Endpoint  string // the S3 gateway, 127.0.0.1:port
	AccessKey string
	SecretKey string
	Bucket    string

	t     testing.TB
	bin   string
	dir   string         // the server's files: data, identities, log, sockets
	ports map[string]int // the other listeners: master, volume, filer and gRPCs

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
}

// Binary returns the path of the weed binary, or an error saying how to
// install it.
func Binary() (string, error) {
	return testenv.Binary("weed", "NBDVAULT_WEED", "run `make deps` (builds ./weed of github.com/seaweedfs/seaweedfs@"+Version+")")
}

// Start runs a new SeaweedFS with one empty bucket, stopped and removed at
// the end of t.
func Start(t testing.TB) *Server {
	t.Helper()
	s := newServer(t)
	t.Cleanup(s.remove)
	s.start()
	return s
}

// newServer finds the binary (failing or skipping t when it is missing)
// and prepares a server in a new temporary folder. The folder is not
// t.TempDir(): weed listens on Unix sockets in it, whose paths must stay
// short.
func newServer(t testing.TB) *Server {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		testenv.Unavailable(t, err)
	}
	dir, err := os.MkdirTemp("", "nbdvault-weed-")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{
		AccessKey: "nbdvault-" + testenv.RandomHex(4),
		SecretKey: testenv.RandomHex(16),
		Bucket:    "nbdvault-test",
		t:         t,
		bin:       bin,
		dir:       dir,
		ports:     map[string]int{},
	}
	names := []string{"master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3.grpc", "s3"}
	for i, port := range freePorts(t, len(names)) {
		s.ports[names[i]] = port
	}
	s.Endpoint = net.JoinHostPort("127.0.0.1", strconv.Itoa(s.ports["s3"]))
	if err := s.writeIdentities(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "master.toml"), []byte(masterConfig), 0o600); err != nil {
		t.Fatal(err)
	}
	return s
}

// freePorts returns n distinct free ports of 127.0.0.1: all are held
// open until each is picked, since a port picked and closed one at a time
// may be handed out again (CI once gave the master's and the filer's gRPC
// the same port).
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	ports := make([]int, n)
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		ports[i] = l.Addr().(*net.TCPAddr).Port
	}
	return ports
}

// writeIdentities gives the S3 gateway one admin identity with the random
// keys: with an identities file, SeaweedFS refuses every other request.
func (s *Server) writeIdentities() error {
	type cred struct {
		AccessKey string `json:"accessKey"`
		SecretKey string `json:"secretKey"`
	}
	type identity struct {
		Name        string   `json:"name"`
		Credentials []cred   `json:"credentials"`
		Actions     []string `json:"actions"`
	}
	data, err := json.Marshal(map[string][]identity{"identities": {{
		Name:        "nbdvault",
		Credentials: []cred{{s.AccessKey, s.SecretKey}},
		Actions:     []string{"Admin", "Read", "List", "Tagging", "Write"},
	}}})
	if err != nil {
		return err
	}
	return os.WriteFile(s.identitiesPath(), data, 0o600)
}

// masterConfig starts a fresh cluster writing at once: no hold on the first
// volume (which waits for veteran volume servers of a rebuilt master; there
// are none), and one volume grown at a time instead of seven.
const masterConfig = `[master.volume_growth]
allocation_deferral = "0s"
copy_1 = 1
`

func (s *Server) identitiesPath() string { return filepath.Join(s.dir, "s3.json") }
func (s *Server) logPath() string        { return filepath.Join(s.dir, "weed.log") }

func (s *Server) start() {
	s.t.Helper()
	began := time.Now()
	data := filepath.Join(s.dir, "data")
	if err := os.MkdirAll(data, 0o700); err != nil {
		s.t.Fatal(err)
	}
	logf, err := os.OpenFile(s.logPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		s.t.Fatal(err)
	}
	defer logf.Close()
	_, s3port, _ := net.SplitHostPort(s.Endpoint)
	p := func(name string) string { return strconv.Itoa(s.ports[name]) }
	cmd := exec.Command(s.bin, "-logtostderr", "server",
		"-ip=127.0.0.1", "-ip.bind=127.0.0.1",
		"-dir="+data,
		"-master.telemetry=false", "-master.peers=none",
		"-master.port="+p("master"), "-master.port.grpc="+p("master.grpc"),
		"-volume.port="+p("volume"), "-volume.port.grpc="+p("volume.grpc"),
		"-volume.preStopSeconds=0",
		"-filer", "-filer.port="+p("filer"), "-filer.port.grpc="+p("filer.grpc"),
		"-filer.localSocket="+filepath.Join(s.dir, "filer.sock"),
		"-s3", "-s3.port="+s3port, "-s3.port.grpc="+p("s3.grpc"),
		"-s3.port.iceberg=0", "-s3.port.lance=0",
		"-s3.localSocket="+filepath.Join(s.dir, "s3.sock"),
		"-s3.config="+s.identitiesPath(),
		"-s3.iam=false",
		"-metricsPort=0",
	)
	// weed reads master.toml and the like from its working directory
	// first, then $HOME/.seaweedfs.
	cmd.Dir = s.dir
	cmd.Env = append(os.Environ(), "HOME="+s.dir)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("start weed: %v", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	s.mu.Lock()
	s.cmd, s.exited = cmd, exited
	s.mu.Unlock()

	// Ready is when the bucket exists and takes a write. The S3 gateway
	// answers a few seconds in, but a write takes a lock held by the filer,
	// which waits a few seconds more for peers before it joins the master
	// (weed's constants; no flag shortens them): about 12s on a fresh
	// cluster, and 15s after a restart, when the master refuses new file
	// IDs until its volume servers have had time to report back.
	c := s.client()
	deadline := time.Now().Add(readyTimeout)
	var last error
	for {
		if last = s.probe(c); last == nil {
			s.t.Logf("seaweedfs ready on %s in %.1fs", s.Endpoint, time.Since(began).Seconds())
			return
		}
		select {
		case <-exited:
			s.t.Fatalf("weed (S3 on %s) exited during start-up:\n%s", s.Endpoint, s.log())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.Kill()
			s.t.Fatalf("seaweedfs not ready after %s (last: %v):\n%s", readyTimeout, last, s.log())
		}
	}
}

// probe creates the bucket (once) and writes and removes an object in it.
func (s *Server) probe(c *minio.Client) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	exists, err := c.BucketExists(ctx, s.Bucket)
	if err != nil {
		return fmt.Errorf("bucket exists: %w", err)
	}
	if !exists {
		if err := c.MakeBucket(ctx, s.Bucket, minio.MakeBucketOptions{}); err != nil {
			return fmt.Errorf("make bucket: %w", err)
		}
	}
	const key = "nbdvault-ready"
	if _, err := c.PutObject(ctx, s.Bucket, key, bytes.NewReader([]byte("ok")), 2, minio.PutObjectOptions{}); err != nil {
		return fmt.Errorf("put: %w", err)
	}
	return c.RemoveObject(ctx, s.Bucket, key, minio.RemoveObjectOptions{})
}

func (s *Server) client() *minio.Client {
	c, err := minio.New(s.Endpoint, &minio.Options{
		Creds:      credentials.NewStaticV4(s.AccessKey, s.SecretKey, ""),
		Region:     "us-east-1",
		MaxRetries: 1,
	})
	if err != nil {
		s.t.Fatal(err)
	}
	return c
}

// log returns the tail of weed's log.
func (s *Server) log() string {
	b, _ := os.ReadFile(s.logPath())
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// Kill stops SeaweedFS with SIGKILL, as a crash would, and waits for it to
// exit. Killing a stopped server does nothing.
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
	// weed puts its in-process gRPC sockets in /tmp whatever it is told.
	for _, name := range []string{"master", "volume", "filer", "s3"} {
		_ = os.Remove(fmt.Sprintf("/tmp/seaweedfs-%s-grpc-%d.sock", name, s.ports[name+".grpc"]))
	}
}

// Restart starts a killed server again on the same addresses and data.
func (s *Server) Restart() {
	s.t.Helper()
	s.Kill()
	s.start()
}

// remove kills the server and deletes its files.
func (s *Server) remove() {
	s.Kill()
	_ = os.RemoveAll(s.dir)
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
	s := newServer(t)
	started := false
	defer func() {
		if !started { // t failed: leave nothing behind
			s.remove()
		}
	}()
	s.start()
	started = true
	sharedSrv = s
	return s
}

// StopShared kills the shared server and removes its data.
func StopShared() {
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if sharedSrv != nil {
		sharedSrv.remove()
		sharedSrv = nil
	}
}
