// Package servertest runs the real nbdvault binary for integration tests:
// it builds cmd/nbdvault once, starts `nbdvault serve` on free loopback
// ports with a data folder of the test's, and runs CLI commands against
// it as a user would.
package servertest

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/testenv"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// Binary builds cmd/nbdvault (once per test process) and returns its path.
func Binary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "nbdvault-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "nbdvault")
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..", "..")
		cmd := exec.Command("go", "build", "-race", "-o", binPath, "./cmd/nbdvault")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/nbdvault: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// Cleanup removes the binary Binary built; TestMain calls it at the end.
func Cleanup() {
	if binPath != "" {
		os.RemoveAll(filepath.Dir(binPath))
	}
}

// Options say how to start a server. All are optional.
type Options struct {
	Data string   // data folder; a new temporary one if empty
	Repo string   // --repo
	Env  []string // added to the server's environment (e.g. S3 credentials)
	Args []string // more serve flags
}

// Server is a running `nbdvault serve`.
type Server struct {
	t     testing.TB
	bin   string
	opts  Options
	Data  string
	Admin string // http://127.0.0.1:PORT
	NBD   string // 127.0.0.1:PORT
	cmd   *exec.Cmd
	done  chan struct{}
	log   string // the server's stderr file
	// ExitCode of the last server process that ended, -1 if killed.
	ExitCode int
}

// Start starts a server and waits until its admin API answers. It is
// stopped (SIGTERM, then SIGKILL) when the test ends.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	if opts.Data == "" {
		opts.Data = filepath.Join(t.TempDir(), "data")
	}
	s := &Server{t: t, bin: Binary(t), opts: opts, Data: opts.Data,
		Admin: "http://" + testenv.FreeAddr(t), NBD: testenv.FreeAddr(t), log: filepath.Join(t.TempDir(), "serve.log")}
	t.Cleanup(func() {
		if s.running() {
			s.Stop()
		}
	})
	s.start()
	return s
}

func (s *Server) args() []string {
	a := []string{"serve", "--data", s.Data, "--listen", s.NBD, "--admin", strings.TrimPrefix(s.Admin, "http://")}
	if s.opts.Repo != "" {
		a = append(a, "--repo", s.opts.Repo)
	}
	return append(a, s.opts.Args...)
}

func (s *Server) start() {
	s.t.Helper()
	logf, err := os.OpenFile(s.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		s.t.Fatal(err)
	}
	defer logf.Close()
	fmt.Fprintf(logf, "=== %s %s\n", s.bin, strings.Join(s.args(), " "))
	cmd := exec.Command(s.bin, s.args()...)
	cmd.Env = append(os.Environ(), s.opts.Env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("start nbdvault serve: %v", err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		s.ExitCode = cmd.ProcessState.ExitCode()
		close(done)
	}()
	s.cmd, s.done = cmd, done
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get(s.Admin + "/v1/status")
		if err == nil {
			resp.Body.Close()
			return // any answer, 401 included: it is up
		}
		select {
		case <-done:
			s.t.Fatalf("nbdvault serve exited during start-up (status %d):\n%s", s.ExitCode, s.Log())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("nbdvault serve not answering after 60s:\n%s", s.Log())
		}
	}
}

func (s *Server) running() bool {
	select {
	case <-s.done:
		return false
	default:
		return true
	}
}

// Token is the server's admin token.
func (s *Server) Token() string {
	s.t.Helper()
	b, err := os.ReadFile(filepath.Join(s.Data, "admin-token"))
	if err != nil {
		s.t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// Metrics is what the server's /metrics says now.
func (s *Server) Metrics() string {
	s.t.Helper()
	req, err := http.NewRequest("GET", s.Admin+"/metrics", nil)
	if err != nil {
		s.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+s.Token())
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		s.t.Fatalf("GET /metrics: %s %v: %s", resp.Status, err, body)
	}
	return string(body)
}

// BytesWritten is the server's count (nbdvault_nbd_bytes_total) of bytes
// written over NBD to export since it started; 0 before the first write.
func (s *Server) BytesWritten(export string) float64 {
	s.t.Helper()
	re := regexp.MustCompile(`nbdvault_nbd_bytes_total\{export="` + regexp.QuoteMeta(export) + `",op="write"\} (\S+)`)
	m := re.FindStringSubmatch(s.Metrics())
	if m == nil {
		return 0
	}
	f, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		s.t.Fatalf("metrics: %v", err)
	}
	return f
}

// API is a client of the server's admin API.
func (s *Server) API() *api.Client {
	s.t.Helper()
	cl, err := api.NewClient(s.Admin, s.Token())
	if err != nil {
		s.t.Fatal(err)
	}
	return cl
}

// PID is the server process's.
func (s *Server) PID() int { return s.cmd.Process.Pid }

// Log is what the server printed.
func (s *Server) Log() string {
	b, _ := os.ReadFile(s.log)
	return string(b)
}

// Stop sends SIGTERM and waits for the server to exit (SIGKILL after 60 s)
// and returns its exit code.
func (s *Server) Stop() int {
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(60 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.done
		s.t.Errorf("nbdvault serve did not stop within 60s of SIGTERM:\n%s", s.Log())
	}
	return s.ExitCode
}

// Kill kills the server with SIGKILL, as a crash would.
func (s *Server) Kill() {
	_ = s.cmd.Process.Kill()
	<-s.done
}

// Restart starts the server again on the same data, ports and flags.
func (s *Server) Restart() {
	s.t.Helper()
	if s.running() {
		s.t.Fatal("Restart: the server is still running")
	}
	s.start()
}

// URI is the NBD URI of an export.
func (s *Server) URI(export string) string {
	return "nbd://" + s.NBD + "/" + export
}

// ServeArgs and ServeEnv are how this server is started: `nbdvault
// ServeArgs…` with ServeEnv added to the environment.
func (s *Server) ServeArgs() []string { return s.args() }
func (s *Server) ServeEnv() []string  { return s.opts.Env }

// Env is what a CLI command needs to reach this server.
func (s *Server) Env() []string {
	return []string{"NBDVAULT_SERVER=" + s.Admin, "NBDVAULT_DATA=" + s.Data}
}

// CLI runs `nbdvault ARGS…` against the server and returns what it did.
func (s *Server) CLI(args ...string) *nbdtest.Result {
	s.t.Helper()
	return nbdtest.RunEnv(s.t, 10*time.Minute, s.Env(), s.bin, args...)
}

// MustCLI is CLI that fails the test unless the command succeeds.
func (s *Server) MustCLI(args ...string) *nbdtest.Result {
	s.t.Helper()
	r := s.CLI(args...)
	if !r.OK() {
		s.t.Fatalf("command failed:\n%s\nserver log:\n%s", r, tail(s.Log(), 4000))
	}
	return r
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}
