package mount

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The state of a mount survives the process that made it: saved after
// each step, claimed once per directory, loaded back as it was.
func TestStateRecord(t *testing.T) {
	run := t.TempDir()
	dir := "/mnt/my snapshot"
	st := New(run, dir, "db@20261201T120000.000Z-0000000000ab", "unix:/run/x.sock", false)
	assert.Equal(t, "nbd+unix:///db@20261201T120000.000Z-0000000000ab?socket=/run/x.sock", st.URI)
	loaded, err := Load(run, dir)
	require.NoError(t, err)
	assert.Nil(t, loaded, "nothing recorded yet")

	require.NoError(t, st.Claim())
	st.Loop, st.FSType = "/dev/loop7", "ext4"
	require.NoError(t, st.save())
	require.ErrorIs(t, New(run, dir, "db@other", "h:1", false).Claim(), ErrClaimed, "one mount per directory")

	loaded, err = Load(run, dir)
	require.NoError(t, err)
	require.NotNil(t, loaded)
	assert.Equal(t, st.Export, loaded.Export)
	assert.Equal(t, "/dev/loop7", loaded.Loop)
	assert.Equal(t, filepath.Join(loaded.FuseDir, "nbd"), loaded.source())
	assert.NotEqual(t, Folder(run, "/mnt/a"), Folder(run, "/mnt/b"))

	// A damaged record says how to clean up by hand.
	require.NoError(t, os.WriteFile(st.statePath(), []byte("{"), 0o600))
	_, err = Load(run, dir)
	assert.ErrorContains(t, err, "undo the mount by hand")
}

func TestURI(t *testing.T) {
	assert.Equal(t, "nbd://127.0.0.1:10809/db@s%2F1", URI("127.0.0.1:10809", "db@s/1"))
	assert.Equal(t, "nbd+unix:///v@x?socket=/tmp/s", URI("unix:/tmp/s", "v@x"))
}

func TestCheckDir(t *testing.T) {
	d := t.TempDir()
	got, err := CheckDir(d)
	require.NoError(t, err)
	real, _ := filepath.EvalSymlinks(d)
	assert.Equal(t, real, got)

	_, err = CheckDir(filepath.Join(d, "missing"))
	require.ErrorIs(t, err, ErrNoDir)
	require.ErrorIs(t, err, os.ErrNotExist)
	f := filepath.Join(d, "file")
	require.NoError(t, os.WriteFile(f, nil, 0o600))
	_, err = CheckDir(f)
	require.ErrorIs(t, err, ErrNoDir)
	_, err = CheckDir("/proc")
	require.ErrorIs(t, err, ErrMountPoint, "/proc is a mount point")
}

func TestMountinfo(t *testing.T) {
	assert.Equal(t, "/mnt/a b\\x", unescapeMountinfo(`/mnt/a\040b\134x`))
	assert.Equal(t, `/bad\9`, unescapeMountinfo(`/bad\9`))
	e, ok, err := At("/proc")
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, "proc", e.FSType)
	_, ok, err = At("/no/such/dir")
	require.NoError(t, err)
	assert.False(t, ok)
}

func TestFindTools(t *testing.T) {
	tools, err := FindTools(true)
	require.NoError(t, err, "losetup, blkid, mount and umount are on every test machine")
	for _, name := range []string{"losetup", "blkid", "mount", "umount"} {
		assert.NotEmpty(t, tools[name], name)
	}
	p, err := lookSbin("sh")
	require.NoError(t, err)
	assert.NotEmpty(t, p)
	_, err = lookSbin("no-such-tool-here")
	require.ErrorIs(t, err, exec.ErrNotFound)
}

// A process followed by its mark: alive while it runs, gone once it ends,
// even if its PID is taken again.
func TestProcessMark(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	cmd.SysProcAttr = newSessionAttr()
	require.NoError(t, cmd.Start())
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	m, err := markProcess(cmd.Process.Pid)
	require.NoError(t, err)
	assert.True(t, m.alive())
	assert.False(t, m.waitGone(50*time.Millisecond))
	m.signal(15) // SIGTERM
	<-done
	assert.True(t, m.waitGone(5*time.Second))
	assert.False(t, m.alive())
}
