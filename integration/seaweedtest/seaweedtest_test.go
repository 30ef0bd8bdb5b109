package seaweedtest

import (
	"context"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// The rig itself: the credentials work, data survives a kill and restart,
// and nothing is left behind.
func TestStartKillRestart(t *testing.T) {
	var dir string
	t.Run("server", func(t *testing.T) {
		s := Start(t)
		dir = s.dir
		ctx := context.Background()
		b := s.Backend(t)
		require.NoError(t, b.Put(ctx, "k", []byte("before")))

		s.Kill()
		_, err := b.Get(ctx, "k")
		require.Error(t, err, "a killed server answers nothing")

		s.Restart()
		got, err := b.Get(ctx, "k")
		require.NoError(t, err, "data survives a restart:\n%s", s.log())
		assert.Equal(t, "before", string(got))

		for _, keys := range [][2]string{{s.AccessKey, "not-the-secret"}, {"nobody", s.SecretKey}} {
			cfg := s.Config("")
			cfg.AccessKey, cfg.SecretKey = keys[0], keys[1]
			bad, err := chunkstore.NewS3(cfg)
			require.NoError(t, err)
			_, err = bad.Get(ctx, "k")
			assert.ErrorIs(t, err, chunkstore.ErrPermission, "the gateway takes only the random keys")
		}
	})
	_, err := os.Stat(dir)
	assert.True(t, os.IsNotExist(err), "the server's folder is removed: %v", err)
}
