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

// TestQuiesceOrder: Snapshot runs the steps in order, takes the snapshot
// only when every step before it succeeded, and runs --post whatever
// failed. (Freezing is not exercised here: it would stop this machine's
// writes; integration/clientsnap_test.go and the VM tests freeze.)
func TestQuiesceOrder(t *testing.T) {
	dir := t.TempDir()
	trace := filepath.Join(dir, "trace")
	hook := func(word string) string { return "echo " + word + " >> " + trace }
	read := func() string {
		b, _ := os.ReadFile(trace)
		os.Remove(trace)
		return strings.Join(strings.Fields(string(b)), " ")
	}
	dev := filepath.Join(dir, "dev")
	require.NoError(t, os.WriteFile(dev, []byte("x"), 0o600))
	take := func(err error) func(context.Context) error {
		return func(context.Context) error {
			f, _ := os.OpenFile(trace, os.O_APPEND|os.O_WRONLY|os.O_CREATE, 0o600)
			f.WriteString("take\n")
			f.Close()
			return err
		}
	}

	var log bytes.Buffer
	q := Quiesce{Pre: hook("pre"), Post: hook("post"), Device: dev, Log: &log}
	require.NoError(t, q.Snapshot(context.Background(), take(nil)))
	assert.Equal(t, "pre take post", read())

	refused := errors.New("the label is taken")
	err := q.Snapshot(context.Background(), take(refused))
	require.ErrorIs(t, err, refused)
	assert.Equal(t, "pre take post", read(), "--post runs after a refused snapshot")

	q.Pre = "exit 3"
	err = q.Snapshot(context.Background(), take(nil))
	assert.ErrorContains(t, err, `--pre "exit 3" failed`)
	assert.Equal(t, "post", read(), "a failed --pre takes nothing, and --post still runs")

	q.Pre, q.Device = "", filepath.Join(dir, "none")
	err = q.Snapshot(context.Background(), take(nil))
	require.ErrorIs(t, err, os.ErrNotExist)
	assert.ErrorContains(t, err, "--nbd-device")
	assert.Equal(t, "post", read(), "a failed flush takes nothing")

	q.Device, q.Post = dev, "exit 4"
	err = q.Snapshot(context.Background(), take(nil))
	assert.ErrorContains(t, err, `--post "exit 4" failed`, "a failed --post is an error, after the snapshot")
	assert.Equal(t, "take", read())

	// A cancelled context (Ctrl-C) still runs --post.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	q = Quiesce{Pre: hook("pre"), Post: hook("post")}
	require.Error(t, q.Snapshot(ctx, take(nil)))
	assert.Equal(t, "post", read())
}

// TestQuiesceWaitsForBitmap: the snapshot waits for a clean bitmap, and
// a bitmap still dirty at the timeout fails it, saying so.
func TestQuiesceWaitsForBitmap(t *testing.T) {
	img := bitmapImage(3*4096, 100*2048, 1<<20)
	img[4096+bitmapSuperSize] = 0x01
	path := filepath.Join(t.TempDir(), "rmeta")
	require.NoError(t, os.WriteFile(path, img, 0o600))
	b := &Bitmap{What: "vg/data", Path: path, Off: 4096}

	taken := false
	var log bytes.Buffer
	q := Quiesce{Bitmap: b, Timeout: 300 * time.Millisecond, Log: &log}
	err := q.Snapshot(context.Background(), func(context.Context) error { taken = true; return nil })
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.ErrorContains(t, err, "at the --timeout 300ms")
	assert.False(t, taken, "a dirty bitmap takes nothing")

	img[4096+bitmapSuperSize] = 0
	require.NoError(t, os.WriteFile(path, img, 0o600))
	q.Timeout = time.Minute
	require.NoError(t, q.Snapshot(context.Background(), func(ctx context.Context) error {
		_, has := ctx.Deadline()
		assert.True(t, has, "take runs under the timeout")
		taken = true
		return nil
	}))
	assert.True(t, taken)
	assert.Contains(t, log.String(), "vg/data wrote every block to every leg")
}
