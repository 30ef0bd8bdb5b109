package mirror

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fake records the commands it is given and answers from answers, keyed
// by the command line; a missing key answers "".
type fake struct {
	ran     []string
	answers map[string][]string // command line → answers in turn
	fail    string              // a command line that fails
}

func (f *fake) Run(_ context.Context, name string, args ...string) (string, error) {
	line := ShellLine(name, args)
	f.ran = append(f.ran, line)
	if line == f.fail {
		return "", errors.New(line + ": exit status 1")
	}
	if a := f.answers[line]; len(a) > 0 {
		f.answers[line] = a[1:]
		return a[0], nil
	}
	return "", nil
}

func TestCreateMD(t *testing.T) {
	f := &fake{}
	require.NoError(t, CreateMD(context.Background(), f, "/dev/vdb", "/dev/nbd0", MDOptions{Array: "/dev/md0", WriteBehind: 256, BitmapChunk: "64M"}))
	assert.Equal(t, []string{
		"mdadm --create /dev/md0 --run --level=1 --raid-devices=2 --metadata=1.2 --bitmap=internal --write-behind=256 --bitmap-chunk=64M /dev/vdb --write-mostly /dev/nbd0",
	}, f.ran)
}

// An LVM leg: the PV, the VG, the conversion, a wait for the copy, then
// write-mostly and write-behind, which LVM takes only once in sync.
func TestCreateLVM(t *testing.T) {
	f := &fake{answers: map[string][]string{
		"lvs --noheadings -o sync_percent vg/data": {"  0.00\n", "  42.50\n", "  100.00\n"},
	}}
	var seen []string
	require.NoError(t, CreateLVM(context.Background(), f, "vg/data", "/dev/nbd0", 128, func(p string) { seen = append(seen, p) }))
	assert.Equal(t, []string{
		"pvcreate /dev/nbd0",
		"vgextend vg /dev/nbd0",
		"lvconvert --yes --type raid1 -m 1 vg/data /dev/nbd0",
		"lvs --noheadings -o sync_percent vg/data",
		"lvs --noheadings -o sync_percent vg/data",
		"lvs --noheadings -o sync_percent vg/data",
		"lvchange --yes --writemostly /dev/nbd0 vg/data",
		"lvchange --yes --writebehind 128 vg/data",
	}, f.ran)
	assert.Equal(t, []string{"0.00", "42.50"}, seen)

	// A failed step stops there.
	f = &fake{fail: "vgextend vg /dev/nbd0"}
	err := CreateLVM(context.Background(), f, "vg/data", "/dev/nbd0", 128, nil)
	require.ErrorContains(t, err, "vgextend vg /dev/nbd0")
	assert.Len(t, f.ran, 2)

	_, err = LVMBitmap("data")
	require.ErrorIs(t, err, ErrInvalid)
	require.ErrorIs(t, CreateLVM(context.Background(), &fake{}, "data", "/dev/nbd0", 1, nil), ErrInvalid)
}

// A dry run prints the commands, and what it would wait for, and runs
// nothing.
func TestDryRun(t *testing.T) {
	var out bytes.Buffer
	require.NoError(t, CreateLVM(context.Background(), DryRun{W: &out}, "vg/my data", "/dev/nbd0", 256, nil))
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	assert.Equal(t, []string{
		"pvcreate /dev/nbd0",
		"vgextend vg /dev/nbd0",
		"lvconvert --yes --type raid1 -m 1 'vg/my data' /dev/nbd0",
		"# wait until `lvs -o sync_percent vg/my data` says 100.00",
		"lvchange --yes --writemostly /dev/nbd0 'vg/my data'",
		"lvchange --yes --writebehind 256 'vg/my data'",
	}, lines)
	assert.Equal(t, `a 'it'\''s' '' '$x'`, ShellLine("a", []string{"it's", "", "$x"}))
}

func TestReconnectSteps(t *testing.T) {
	local, nbd := Legs([]string{"/dev/nbd1", "/dev/vdb", "/dev/nbd0"})
	assert.Equal(t, "/dev/vdb", local)
	assert.Equal(t, []string{"/dev/nbd1", "/dev/nbd0"}, nbd)
	f := &fake{answers: map[string][]string{"mdadm --detail /dev/md0": {"State : clean\n"}}}
	require.NoError(t, RemoveLeg(context.Background(), f, "/dev/md0", "/dev/nbd1"))
	require.NoError(t, ReAdd(context.Background(), f, "/dev/md0", "/dev/nbd0"))
	out, err := Status(context.Background(), f, "/dev/md0", "")
	require.NoError(t, err)
	assert.Equal(t, "State : clean\n", out)
	_, err = Status(context.Background(), f, "", "vg/data")
	require.NoError(t, err)
	assert.Equal(t, []string{
		"mdadm /dev/md0 --fail /dev/nbd1 --remove /dev/nbd1",
		"mdadm /dev/md0 --re-add /dev/nbd0",
		"mdadm --detail /dev/md0",
		"lvs -a -o name,attr,devices,sync_percent,raid_sync_action,raid_write_behind vg",
	}, f.ran)
}

func TestExec(t *testing.T) {
	out, err := Exec{}.Run(context.Background(), "sh", "-c", "echo hi")
	require.NoError(t, err)
	assert.Equal(t, "hi\n", out)
	_, err = Exec{}.Run(context.Background(), "sh", "-c", "echo oops; exit 3")
	require.ErrorContains(t, err, "sh -c 'echo oops; exit 3': exit status 3: oops")
}

// TestReconnect: the faulty NBD leg is removed and detached, the volume
// attached again once the server answers, and the new leg re-added; a
// dry run removes and detaches nothing; a server that stays away is an
// error after the wait.
func TestReconnect(t *testing.T) {
	ctx := context.Background()
	members := []string{"/dev/vdb", "/dev/nbd0"}
	var detached, warned []string
	detach := func(dev string) error {
		detached = append(detached, dev)
		return errors.New("not attached")
	}
	warn := func(err error) { warned = append(warned, err.Error()) }
	down := errors.New("connection refused")
	tries := 0
	attach := func(local string) (string, error) {
		assert.Equal(t, "/dev/vdb", local, "attached with the local leg's block size")
		if tries++; tries < 3 {
			return "", down
		}
		return "/dev/nbd1", nil
	}

	f := &fake{}
	leg, err := Reconnect(ctx, f, "/dev/md0", members, detach, attach, time.Minute, warn)
	require.NoError(t, err)
	assert.Equal(t, "/dev/nbd1", leg)
	assert.Equal(t, 3, tries, "retried until the server answered")
	assert.Equal(t, []string{"/dev/nbd0"}, detached)
	assert.Equal(t, []string{"not attached"}, warned, "a failed detach is a warning")
	assert.Equal(t, []string{
		"mdadm /dev/md0 --fail /dev/nbd0 --remove /dev/nbd0",
		"mdadm /dev/md0 --re-add /dev/nbd1",
	}, f.ran)

	f, tries, detached = &fake{}, 0, nil
	_, err = Reconnect(ctx, f, "/dev/md0", members, nil, attach, time.Minute, warn)
	require.NoError(t, err)
	assert.Empty(t, detached, "a dry run detaches nothing")
	assert.Equal(t, []string{"mdadm /dev/md0 --re-add /dev/nbd1"}, f.ran)

	f = &fake{}
	_, err = Reconnect(ctx, f, "/dev/md0", members, nil, func(string) (string, error) { return "", down }, 0, warn)
	require.ErrorIs(t, err, down)
	assert.Empty(t, f.ran, "nothing re-added")

	f = &fake{fail: "mdadm /dev/md0 --re-add /dev/nbd1"}
	tries = 3
	_, err = Reconnect(ctx, f, "/dev/md0", members, nil, attach, 0, warn)
	assert.ErrorContains(t, err, "mdadm /dev/md0 --add /dev/nbd1` copies it whole")

	_, err = Reconnect(ctx, f, "/dev/md0", []string{"/dev/nbd0"}, nil, attach, 0, warn)
	assert.ErrorContains(t, err, "no member but NBD devices")

	_, err = LogicalBlockSize(filepath.Join(t.TempDir(), "none"))
	require.ErrorIs(t, err, os.ErrNotExist)
}
