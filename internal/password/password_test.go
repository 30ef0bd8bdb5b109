package password

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

const what = "the password of repository /srv/repo"

// isolate gives the test an environment with no password in it and a
// stdin that is not a terminal, whatever the environment of go test.
func isolate(t *testing.T) {
	t.Helper()
	for _, name := range []string{DefaultEnv, "CREDENTIALS_DIRECTORY"} {
		t.Setenv(name, "") // restores the old value after the test
		require.NoError(t, os.Unsetenv(name))
	}
	oldIsTerminal, oldRead := stdinIsTerminal, readTerminal
	t.Cleanup(func() { stdinIsTerminal, readTerminal = oldIsTerminal, oldRead })
	stdinIsTerminal = func() bool { return false }
	readTerminal = func(string) ([]byte, error) {
		t.Fatal("prompted on the terminal")
		return nil, nil
	}
}

// fakeTerminal makes stdin a terminal on which the user types answers, in
// turn, and returns the prompts shown.
func fakeTerminal(t *testing.T, answers ...string) *[]string {
	t.Helper()
	var prompts []string
	stdinIsTerminal = func() bool { return true }
	readTerminal = func(prompt string) ([]byte, error) {
		prompts = append(prompts, prompt)
		require.NotEmpty(t, answers, "prompted once too often: %q", prompt)
		a := answers[0]
		answers = answers[1:]
		return []byte(a), nil
	}
	return &prompts
}

func writeFile(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "pw")
	require.NoError(t, os.WriteFile(path, []byte(content), 0o600))
	return path
}

func shortCommandTimeout(t *testing.T) {
	oldTimeout, oldDelay := commandTimeout, commandWaitDelay
	t.Cleanup(func() { commandTimeout, commandWaitDelay = oldTimeout, oldDelay })
	commandTimeout, commandWaitDelay = 100*time.Millisecond, 100*time.Millisecond
}

func TestFile(t *testing.T) {
	isolate(t)
	path := writeFile(t, "s3cret\n")
	pw, from, err := Source{File: path}.Read(what)
	require.NoError(t, err)
	require.Equal(t, "s3cret", string(pw))
	require.Equal(t, "file "+path, from)
}

func TestFileStripsOneNewline(t *testing.T) {
	isolate(t)
	for content, want := range map[string]string{
		"pw":         "pw",
		"pw\n":       "pw",
		"pw\n\n":     "pw\n",
		"pw\r\n":     "pw",
		"pw\r\n\r\n": "pw\r\n",
		"pw\n\r\n":   "pw\n",
		"pw\r":       "pw\r",
		" pw \t\n":   " pw \t",
		"\npw\n":     "\npw",
	} {
		pw, _, err := Source{File: writeFile(t, content)}.Read(what)
		require.NoError(t, err, "%q", content)
		require.Equal(t, want, string(pw), "%q", content)
	}
}

func TestFileEmpty(t *testing.T) {
	isolate(t)
	for _, content := range []string{"", "\n", "\r\n"} {
		path := writeFile(t, content)
		_, _, err := Source{File: path}.Read(what)
		require.EqualError(t, err, what+" from file "+path+" is empty", "%q", content)
	}
}

func TestFileMissing(t *testing.T) {
	isolate(t)
	path := filepath.Join(t.TempDir(), "absent")
	t.Setenv(DefaultEnv, "not this one")
	_, _, err := Source{File: path}.Read(what)
	require.ErrorIs(t, err, fs.ErrNotExist)
	require.ErrorContains(t, err, "cannot read "+what+" from file "+path)
}

func TestTooLong(t *testing.T) {
	isolate(t)
	max := strings.Repeat("x", MaxLen)

	pw, _, err := Source{File: writeFile(t, max+"\r\n")}.Read(what)
	require.NoError(t, err)
	require.Len(t, pw, MaxLen)
	_, _, err = Source{File: writeFile(t, max+"x")}.Read(what)
	require.ErrorContains(t, err, "is longer than 4096 bytes")
	_, _, err = Source{File: writeFile(t, max+"\n\n")}.Read(what)
	require.ErrorContains(t, err, "is longer than 4096 bytes")

	pw, _, err = Source{Command: "head -c 4096 /dev/zero; echo"}.Read(what)
	require.NoError(t, err)
	require.Len(t, pw, MaxLen)
	_, _, err = Source{Command: "head -c 100000 /dev/zero"}.Read(what)
	require.ErrorContains(t, err, "is longer than 4096 bytes")

	t.Setenv(DefaultEnv, max+"x")
	_, _, err = Source{}.Read(what)
	require.EqualError(t, err, what+" from environment "+DefaultEnv+" is longer than 4096 bytes")
}

func TestFileAndCommand(t *testing.T) {
	isolate(t)
	_, _, err := Source{File: writeFile(t, "pw"), Command: "echo pw"}.Read(what)
	require.EqualError(t, err, "--password-file and --password-command were both given for "+what+": give only one")
}

func TestCommand(t *testing.T) {
	isolate(t)
	pw, from, err := Source{Command: "printf 'from command\\n'"}.Read(what)
	require.NoError(t, err)
	require.Equal(t, "from command", string(pw))
	require.Equal(t, "command", from)

	pw, _, err = Source{Command: "printf 'pw\\n\\n'"}.Read(what)
	require.NoError(t, err)
	require.Equal(t, "pw\n", string(pw))
	pw, _, err = Source{Command: "printf 'pw\\r\\n'"}.Read(what)
	require.NoError(t, err)
	require.Equal(t, "pw", string(pw))
}

func TestCommandFails(t *testing.T) {
	isolate(t)
	_, _, err := Source{Command: "echo pw; exit 3"}.Read(what)
	require.EqualError(t, err, `--password-command "echo pw; exit 3" for `+what+
		` failed (exit status 3): it must print the password on stdout and exit 0; run it in a shell to see why not`)
}

func TestCommandPrintsNothing(t *testing.T) {
	isolate(t)
	// Its stdin is empty: a command that reads it gets nothing and ends.
	_, _, err := Source{Command: "cat"}.Read(what)
	require.EqualError(t, err, `--password-command "cat" for `+what+
		` exited 0 but printed nothing: it must print the password on stdout`)
	_, _, err = Source{Command: "echo"}.Read(what)
	require.EqualError(t, err, what+` from --password-command "echo" is empty`)
}

func TestCommandTimeout(t *testing.T) {
	isolate(t)
	shortCommandTimeout(t)
	start := time.Now()
	// The shell forks sleep, which keeps stdout open after the shell is
	// killed: commandWaitDelay must end the wait. (Its stderr would hold
	// go test's pipe open until it ends.)
	_, _, err := Source{Command: "sleep 2 2>/dev/null; echo pw"}.Read(what)
	require.Less(t, time.Since(start), time.Second)
	require.ErrorContains(t, err, `--password-command "sleep 2 2>/dev/null; echo pw" for `+what+" did not finish within 100ms and was stopped (signal: killed)")
	require.ErrorContains(t, err, "exit by itself, without reading stdin")
}

func TestCommandLeavesChild(t *testing.T) {
	isolate(t)
	shortCommandTimeout(t)
	start := time.Now()
	pw, _, err := Source{Command: "sleep 1 2>/dev/null & echo pw"}.Read(what)
	require.Less(t, time.Since(start), time.Second)
	require.NoError(t, err)
	require.Equal(t, "pw", string(pw))
}

func TestEnv(t *testing.T) {
	isolate(t)
	t.Setenv(DefaultEnv, "from env\n")
	pw, from, err := Source{}.Read(what)
	require.NoError(t, err)
	require.Equal(t, "from env\n", string(pw), "a variable is taken as it is")
	require.Equal(t, "environment NBDVAULT_PASSWORD", from)
	_, set := os.LookupEnv(DefaultEnv)
	require.False(t, set, "left in the environment")

	_, _, err = Source{}.Read(what)
	require.ErrorIs(t, err, ErrNoPassword, "a second Read found it again")
}

func TestEnvNamed(t *testing.T) {
	isolate(t)
	t.Setenv("MY_PW", "mine")
	t.Setenv(DefaultEnv, "not this one")
	pw, from, err := Source{Env: "MY_PW"}.Read(what)
	require.NoError(t, err)
	require.Equal(t, "mine", string(pw))
	require.Equal(t, "environment MY_PW", from)
	_, set := os.LookupEnv("MY_PW")
	require.False(t, set)
	require.Equal(t, "not this one", os.Getenv(DefaultEnv))
}

func TestEnvEmpty(t *testing.T) {
	isolate(t)
	t.Setenv(DefaultEnv, "")
	_, _, err := Source{}.Read(what)
	require.EqualError(t, err, what+": environment variable NBDVAULT_PASSWORD is set but empty: unset it, or set it to the password")
	_, set := os.LookupEnv(DefaultEnv)
	require.False(t, set)
}

func credentials(t *testing.T, content string) string {
	t.Helper()
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, Credential), []byte(content), 0o400))
	t.Setenv("CREDENTIALS_DIRECTORY", dir)
	return dir
}

func TestCredential(t *testing.T) {
	isolate(t)
	credentials(t, "from systemd\n")
	pw, from, err := Source{}.Read(what)
	require.NoError(t, err)
	require.Equal(t, "from systemd", string(pw))
	require.Equal(t, "systemd credential nbdvault-password", from)
}

func TestCredentialAbsent(t *testing.T) {
	isolate(t)
	t.Setenv("CREDENTIALS_DIRECTORY", t.TempDir()) // other credentials only
	_, _, err := Source{}.Read(what)
	require.ErrorIs(t, err, ErrNoPassword)
}

func TestCredentialUnreadable(t *testing.T) {
	isolate(t)
	dir := t.TempDir()
	require.NoError(t, os.Mkdir(filepath.Join(dir, Credential), 0o700))
	t.Setenv("CREDENTIALS_DIRECTORY", dir)
	_, _, err := Source{}.Read(what)
	require.ErrorContains(t, err, "cannot read "+what+" from systemd credential nbdvault-password")
	require.NotErrorIs(t, err, ErrNoPassword)
}

func TestOrder(t *testing.T) {
	isolate(t)
	fakeTerminal(t, "from terminal")
	credentials(t, "from systemd")
	t.Setenv(DefaultEnv, "from env")
	file := writeFile(t, "from file")

	pw, _, err := Source{File: file}.Read(what)
	require.NoError(t, err)
	require.Equal(t, "from file", string(pw))
	_, set := os.LookupEnv(DefaultEnv)
	require.False(t, set, "an unused variable is removed too: nothing inherits it")

	t.Setenv(DefaultEnv, "from env")
	pw, _, err = Source{Command: "echo from command"}.Read(what)
	require.NoError(t, err)
	require.Equal(t, "from command", string(pw))
	t.Setenv(DefaultEnv, "from env")

	for _, want := range []string{"from env", "from systemd", "from terminal"} {
		pw, _, err = Source{}.Read(what)
		require.NoError(t, err)
		require.Equal(t, want, string(pw))
		if want == "from systemd" {
			require.NoError(t, os.Unsetenv("CREDENTIALS_DIRECTORY"))
		}
	}
}

func TestNothingFound(t *testing.T) {
	isolate(t)
	_, _, err := Source{}.Read(what)
	require.ErrorIs(t, err, ErrNoPassword)
	require.EqualError(t, err, what+" was not given: set NBDVAULT_PASSWORD, or give --password-file or --password-command, or a systemd credential named nbdvault-password")

	_, _, err = Source{Env: "MY_PW"}.ReadNew(what)
	require.ErrorIs(t, err, ErrNoPassword)
	require.ErrorContains(t, err, "set MY_PW, or give")
}

func TestNoPrompt(t *testing.T) {
	isolate(t)
	stdinIsTerminal = func() bool { return true } // readTerminal still fails the test
	_, _, err := Source{NoPrompt: true}.Read(what)
	require.ErrorIs(t, err, ErrNoPassword)
	_, _, err = Source{NoPrompt: true}.ReadNew(what)
	require.ErrorIs(t, err, ErrNoPassword)
}

func TestPrompt(t *testing.T) {
	isolate(t)
	prompts := fakeTerminal(t, "typed", "")
	pw, from, err := Source{}.Read(what)
	require.NoError(t, err)
	require.Equal(t, "typed", string(pw))
	require.Equal(t, "terminal", from)
	require.Equal(t, []string{"Enter " + what + ": "}, *prompts)

	_, _, err = Source{}.Read(what)
	require.EqualError(t, err, what+" from the terminal is empty")
}

func TestReadNew(t *testing.T) {
	isolate(t)
	prompts := fakeTerminal(t, "new", "new", "new", "other")
	pw, from, err := Source{}.ReadNew(what)
	require.NoError(t, err)
	require.Equal(t, "new", string(pw))
	require.Equal(t, "terminal", from)
	require.Equal(t, []string{"Choose " + what + ": ", "Repeat " + what + ": "}, *prompts)

	_, _, err = Source{}.ReadNew(what)
	require.EqualError(t, err, "the two entries of "+what+" differ: type the same password twice")

	// Other sources are read once, as by Read.
	t.Setenv(DefaultEnv, "from env")
	pw, from, err = Source{}.ReadNew(what)
	require.NoError(t, err)
	require.Equal(t, "from env", string(pw))
	require.Equal(t, "environment NBDVAULT_PASSWORD", from)
}

func TestFileWarning(t *testing.T) {
	path := writeFile(t, "pw")
	require.Empty(t, FileWarning(path))
	require.Empty(t, FileWarning(filepath.Join(t.TempDir(), "absent")))
	require.Empty(t, FileWarning(os.DevNull), "not a regular file")

	require.NoError(t, os.Chmod(path, 0o644))
	require.Equal(t, "password file "+path+" is open to its group or others (mode 0644): chmod 600 "+path, FileWarning(path))
	require.NoError(t, os.Chmod(path, 0o640))
	require.Contains(t, FileWarning(path), "(mode 0640)")
}

func TestErrorsAreNotNoPassword(t *testing.T) {
	isolate(t)
	_, _, err := Source{Command: "exit 1"}.Read(what)
	require.Error(t, err)
	require.False(t, errors.Is(err, ErrNoPassword))
}
