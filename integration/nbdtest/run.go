package nbdtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Result is what a finished command did.
type Result struct {
	Args     []string // the command line, program first
	Stdout   string
	Stderr   string
	ExitCode int  // -1 if the command did not exit by itself
	TimedOut bool // killed at the timeout
	Elapsed  time.Duration
	Err      error // from exec: nil, *exec.ExitError, a start or kill error
}

// OK reports whether the command exited with status 0.
func (r *Result) OK() bool { return r.Err == nil && r.ExitCode == 0 }

// Output is stdout and stderr together, for checking messages.
func (r *Result) Output() string { return r.Stdout + r.Stderr }

// String describes the run with all it printed (long output keeps its
// start and end), for failure messages.
func (r *Result) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "$ %s\n", shellQuote(r.Args))
	switch {
	case r.TimedOut:
		fmt.Fprintf(&b, "KILLED after the %v timeout\n", r.Elapsed.Round(time.Millisecond))
	case r.Err != nil && r.ExitCode < 0:
		fmt.Fprintf(&b, "error: %v (after %v)\n", r.Err, r.Elapsed.Round(time.Millisecond))
	default:
		fmt.Fprintf(&b, "exit status %d (after %v)\n", r.ExitCode, r.Elapsed.Round(time.Millisecond))
	}
	fmt.Fprintf(&b, "--- stdout:\n%s--- stderr:\n%s---", clip(r.Stdout), clip(r.Stderr))
	return b.String()
}

func clip(s string) string {
	const keep = 6000
	if len(s) > 2*keep {
		s = s[:keep] + fmt.Sprintf("\n[... %d bytes left out ...]\n", len(s)-2*keep) + s[len(s)-keep:]
	}
	if s != "" && !strings.HasSuffix(s, "\n") {
		s += "\n"
	}
	return s
}

func shellQuote(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		if a != "" && strings.IndexFunc(a, func(r rune) bool {
			return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_./:=,+@%", r))
		}) < 0 {
			q[i] = a
		} else {
			q[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
	}
	return strings.Join(q, " ")
}

// Run runs a command to its end or until timeout, whatever its exit
// status; it fails t only if the command cannot be started. Stdin is empty.
// At the timeout the command's whole process group is killed.
func Run(t testing.TB, timeout time.Duration, name string, args ...string) *Result {
	t.Helper()
	return RunEnv(t, timeout, nil, name, args...)
}

// RunEnv is Run with env (KEY=VALUE) added to this process's environment.
func RunEnv(t testing.TB, timeout time.Duration, env []string, name string, args ...string) *Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	err := cmd.Run()
	r := &Result{
		Args:     append([]string{name}, args...),
		Stdout:   stdout.String(),
		Stderr:   stderr.String(),
		ExitCode: -1,
		Elapsed:  time.Since(start),
		Err:      err,
	}
	if cmd.ProcessState == nil {
		t.Fatalf("cannot run %s: %v", shellQuote(r.Args), err)
	}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Exited() {
		r.ExitCode = ws.ExitStatus()
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) && r.ExitCode != 0 {
		r.TimedOut = true
	}
	if r.ExitCode == 0 {
		r.Err = nil // WaitDelay's ErrWaitDelay after a clean exit is no failure
	}
	return r
}

// MustRun is Run that fails t, showing everything the command printed,
// unless it exits with status 0.
func MustRun(t testing.TB, timeout time.Duration, name string, args ...string) *Result {
	t.Helper()
	r := Run(t, timeout, name, args...)
	if !r.OK() {
		t.Fatalf("command failed:\n%s", r)
	}
	return r
}
