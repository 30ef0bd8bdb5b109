// Package password is where nbdvault's server and CLI get the password of
// an encrypted repository: a file, a command, an environment variable, a
// systemd credential or, last, the terminal.
package password

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"golang.org/x/term"
)

// MaxLen is the longest password accepted from any source, in bytes.
const MaxLen = 4096

const (
	// DefaultEnv is the environment variable read when Source.Env is "".
	DefaultEnv = "NBDVAULT_PASSWORD"
	// Credential is the name of the systemd credential read from
	// $CREDENTIALS_DIRECTORY (LoadCredential= or LoadCredentialEncrypted=).
	Credential = "nbdvault-password"
)

// ErrNoPassword is matched (errors.Is) by the error of Read and ReadNew
// when no source gave a password.
var ErrNoPassword = errors.New("no password given")

// Test hooks.
var (
	commandTimeout = time.Minute
	// commandWaitDelay bounds how long a command's stdout may stay open
	// after the command exited or was killed (a child it left behind).
	commandWaitDelay = 2 * time.Second
	stdinIsTerminal  = func() bool { return term.IsTerminal(int(os.Stdin.Fd())) }
	readTerminal     = func(prompt string) ([]byte, error) {
		fmt.Fprint(os.Stderr, prompt)
		pw, err := term.ReadPassword(int(os.Stdin.Fd()))
		fmt.Fprintln(os.Stderr) // the user's Enter was not echoed
		return pw, err
	}
)

// Source says where a password may come from. The zero value reads the
// environment and systemd credentials, and prompts on a terminal.
//
// Sources are tried in this order, and the first one present is the only
// one used (an error from it is returned, not passed over):
//  1. File, whose content is the password;
//  2. Command, run with sh -c, whose stdout is the password (File and
//     Command both set is an error);
//  3. the environment variable Env, which is then removed from the
//     environment so that commands started later do not inherit it (the
//     kernel's copy in /proc/PID/environ, readable by the same user and
//     root, still holds it: prefer a file or a credential on shared hosts);
//     a second Read no longer finds it;
//  4. the systemd credential nbdvault-password, if $CREDENTIALS_DIRECTORY
//     is set and holds it;
//  5. a prompt on stderr, read without echo from stdin, if stdin is a
//     terminal and NoPrompt is false.
//
// From a file, a command or a credential, exactly one trailing "\n" or
// "\r\n" is removed and nothing else. An empty password, or one longer than
// MaxLen bytes, is an error from every source.
type Source struct {
	File     string // --password-file: the file's content
	Command  string // --password-command: run with sh -c, its stdout
	Env      string // environment variable; "" means "NBDVAULT_PASSWORD"
	NoPrompt bool   // never prompt, even on a terminal
}

// Read returns the password and says where it came from, for logs: "file
// /x", "command", "environment NBDVAULT_PASSWORD", "systemd credential
// nbdvault-password" or "terminal". what names the password in the prompt
// and in errors, for example "the password of repository /srv/repo".
//
// Read may block for up to a minute on a command, and without limit on a
// prompt. The caller owns pw and may zero it when done.
func (s Source) Read(what string) (pw []byte, from string, err error) {
	return s.read(what, false)
}

// ReadNew asks for a new password: the same sources as Read, but on a
// terminal it asks twice and refuses a mismatch.
func (s Source) ReadNew(what string) (pw []byte, from string, err error) {
	return s.read(what, true)
}

func (s Source) read(what string, isNew bool) ([]byte, string, error) {
	env := s.Env
	if env == "" {
		env = DefaultEnv
	}
	switch {
	case s.File != "" && s.Command != "":
		return nil, "", fmt.Errorf("--password-file and --password-command were both given for %s: give only one", what)
	case s.File != "":
		os.Unsetenv(env) // not used, and not to be inherited by anything either
		return fromFile(what, s.File, "file "+s.File)
	case s.Command != "":
		os.Unsetenv(env)
		return fromCommand(what, s.Command)
	}
	if v, ok := os.LookupEnv(env); ok {
		os.Unsetenv(env)
		from := "environment " + env
		if v == "" {
			return nil, "", fmt.Errorf("%s: environment variable %s is set but empty: unset it, or set it to the password", what, env)
		}
		pw, err := check(what, []byte(v), from)
		return pw, from, err
	}
	if dir := os.Getenv("CREDENTIALS_DIRECTORY"); dir != "" {
		path := filepath.Join(dir, Credential)
		pw, from, err := fromFile(what, path, "systemd credential "+Credential)
		if !errors.Is(err, fs.ErrNotExist) {
			return pw, from, err
		}
	}
	if !s.NoPrompt && stdinIsTerminal() {
		if isNew {
			return promptNew(what)
		}
		return prompt(what, "Enter "+what+": ")
	}
	return nil, "", &noPasswordError{what: what, env: env}
}

type noPasswordError struct{ what, env string }

func (e *noPasswordError) Error() string {
	return fmt.Sprintf("%s was not given: set %s, or give --password-file or --password-command, or a systemd credential named %s",
		e.what, e.env, Credential)
}

func (e *noPasswordError) Is(target error) bool { return target == ErrNoPassword }

// CredentialGiven reports whether systemd gave the process the credential
// nbdvault-password.
func CredentialGiven() bool {
	dir := os.Getenv("CREDENTIALS_DIRECTORY")
	if dir == "" {
		return false
	}
	_, err := os.Stat(filepath.Join(dir, Credential))
	return err == nil
}

// FileWarning returns "" or a sentence for the caller to log when password
// file path is a regular file open to its group or to others.
func FileWarning(path string) string {
	fi, err := os.Stat(path)
	if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o077 == 0 {
		return "" // an unreadable file is Read's error to report
	}
	return fmt.Sprintf("password file %s is open to its group or others (mode %04o): chmod 600 %s",
		path, fi.Mode().Perm(), path)
}

// fromFile reads the password in file path; an error wraps the open
// error, so fs.ErrNotExist can be told apart.
func fromFile(what, path, from string) ([]byte, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, "", fmt.Errorf("cannot read %s from %s: %w", what, from, err)
	}
	defer f.Close()
	// Room for MaxLen bytes and a "\r\n", and one more to see it is
	// longer; allocated once, so no copy of the password is left behind.
	b := make([]byte, MaxLen+3)
	n, err := io.ReadFull(f, b)
	if err != nil && err != io.EOF && err != io.ErrUnexpectedEOF {
		clear(b)
		return nil, "", fmt.Errorf("cannot read %s from %s: %w", what, from, err)
	}
	pw, err := check(what, trimNewline(b[:n]), from)
	return pw, from, err
}

func fromCommand(what, command string) ([]byte, string, error) {
	const from = "command"
	ctx, cancel := context.WithTimeout(context.Background(), commandTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "sh", "-c", command)
	var out limitedBuffer
	out.buf.Grow(MaxLen + 2) // once: no copy of the password is left behind
	// Stdin stays nil, /dev/null: a command that reads it gets nothing.
	cmd.Stdout = &out
	cmd.Stderr = os.Stderr
	cmd.WaitDelay = commandWaitDelay
	err := cmd.Run()
	if errors.Is(err, exec.ErrWaitDelay) && cmd.ProcessState.Success() {
		err = nil // it exited 0 but left a child holding its stdout
	}
	if err != nil {
		clear(out.buf.Bytes())
		if ctx.Err() != nil {
			return nil, "", fmt.Errorf("--password-command %q for %s did not finish within %v and was stopped (%v): it must print the password on stdout and exit by itself, without reading stdin",
				command, what, commandTimeout, err)
		}
		var exitErr *exec.ExitError
		if errors.As(err, &exitErr) {
			return nil, "", fmt.Errorf("--password-command %q for %s failed (%v): it must print the password on stdout and exit 0; run it in a shell to see why not",
				command, what, exitErr)
		}
		return nil, "", fmt.Errorf("cannot run --password-command %q for %s: %w", command, what, err)
	}
	if out.over {
		clear(out.buf.Bytes())
		return nil, "", fmt.Errorf("%s printed by --password-command %q is longer than %d bytes", what, command, MaxLen)
	}
	if out.buf.Len() == 0 {
		return nil, "", fmt.Errorf("--password-command %q for %s exited 0 but printed nothing: it must print the password on stdout", command, what)
	}
	pw, err := check(what, trimNewline(out.buf.Bytes()), fmt.Sprintf("--password-command %q", command))
	return pw, from, err
}

// limitedBuffer keeps the first MaxLen+2 bytes written to it (a password
// and a "\r\n") and notes whether more came. It never fails a write, so
// the command is not killed by a broken pipe before it exits.
type limitedBuffer struct {
	buf  bytes.Buffer
	over bool
}

func (l *limitedBuffer) Write(p []byte) (int, error) {
	n := len(p)
	if room := MaxLen + 2 - l.buf.Len(); len(p) > room {
		l.over = true
		p = p[:room]
	}
	l.buf.Write(p)
	return n, nil
}

// trimNewline removes exactly one trailing "\n" or "\r\n".
func trimNewline(b []byte) []byte {
	if b, ok := bytes.CutSuffix(b, []byte("\r\n")); ok {
		return b
	}
	b, _ = bytes.CutSuffix(b, []byte("\n"))
	return b
}

// check refuses an empty password or one longer than MaxLen, zeroing it.
func check(what string, pw []byte, from string) ([]byte, error) {
	switch {
	case len(pw) == 0:
		return nil, fmt.Errorf("%s from %s is empty", what, from)
	case len(pw) > MaxLen:
		clear(pw)
		return nil, fmt.Errorf("%s from %s is longer than %d bytes", what, from, MaxLen)
	}
	return pw, nil
}

func prompt(what, text string) ([]byte, string, error) {
	const from = "terminal"
	pw, err := readTerminal(text)
	if err != nil {
		clear(pw)
		return nil, "", fmt.Errorf("cannot read %s from the terminal: %w", what, err)
	}
	pw, err = check(what, pw, "the terminal")
	return pw, from, err
}

func promptNew(what string) ([]byte, string, error) {
	pw, from, err := prompt(what, "Choose "+what+": ")
	if err != nil {
		return nil, "", err
	}
	again, _, err := prompt(what, "Repeat "+what+": ")
	defer clear(again)
	if err != nil {
		clear(pw)
		return nil, "", err
	}
	if !bytes.Equal(pw, again) {
		clear(pw)
		return nil, "", fmt.Errorf("the two entries of %s differ: type the same password twice", what)
	}
	return pw, from, nil
}
