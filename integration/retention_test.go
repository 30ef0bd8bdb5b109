package integration

import (
	"bytes"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/client"
	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// TestRetention drives a stored policy through the real binary, on a
// local repository and on MinIO: volume set stores it (volume show
// shows it, across a restart), the server prunes after each seal of a
// snapshot and collects the chunks only the pruned snapshots held,
// leaving a protected snapshot and one an NBD client has open (until it
// is closed); --no-retention clears it.
func TestRetention(t *testing.T) {
	for _, repo := range []string{"local", "minio"} {
		t.Run(repo, func(t *testing.T) {
			// No points in time (they would keep old chunks); a short
			// lease, so that a delete's hold (a third of it) is short; a
			// collection at most every second after automatic prunes.
			opts := servertest.Options{Args: []string{"--journal-retention", "0", "--lease-ttl", "6s", "--gc-interval", "1s"}}
			s, objects := startOn(t, repo, opts)
			s.MustCLI("volume", "create", "db", "--size", "2M", "--chunk-size", "64K")

			r := s.CLI("volume", "set", "db")
			assert.Equal(t, exitUsage, r.ExitCode, "%s", r)
			assert.Contains(t, r.Stderr, "give at least one --keep-")
			r = s.CLI("volume", "set", "db", "--keep-last", "2", "--no-retention")
			assert.Equal(t, exitUsage, r.ExitCode, "%s", r)
			assert.Contains(t, s.MustCLI("volume", "set", "db", "--keep-last", "2").Stdout, "retention --keep-last 2, applied after each snapshot is sealed")
			show := func() api.Volume {
				var v api.Volume
				require.NoError(t, json.Unmarshal([]byte(s.MustCLI("volume", "show", "db", "--json").Stdout), &v))
				return v
			}
			require.NotNil(t, show().Retention)
			assert.Equal(t, api.Policy{Last: 2}, *show().Retention)
			assert.Contains(t, s.MustCLI("volume", "show", "db").Stdout, "retention: --keep-last 2")

			// Each snapshot holds 1 MiB of its own data: 16 chunks no
			// other snapshot has.
			images := map[string][]byte{}
			chunksOf := map[string][]string{}
			var ids []string
			take := func(i int) string {
				t.Helper()
				data := nbdtest.RandomBytes(uint64(100+i), 1<<20)
				writeNBD(t, s, "db", data, 0)
				id := strings.TrimSpace(s.MustCLI("snapshot", "create", "db", "--wait").Stdout)
				images[id] = readNBD(t, s, "db")
				for off := 0; off < len(data); off += 64 << 10 {
					chunksOf[id] = append(chunksOf[id], chunkstore.Key(chunkstore.BLAKE3{}.Sum(data[off:off+64<<10])))
				}
				ids = append(ids, id)
				return id
			}
			// settled waits until the volume's snapshots are exactly want.
			settled := func(want ...string) {
				t.Helper()
				slices.Sort(want)
				require.Eventually(t, func() bool {
					var got []string
					for _, sn := range listSnapshots(t, s) {
						got = append(got, sn.ID)
					}
					slices.Sort(got)
					return slices.Equal(got, want)
				}, 2*time.Minute, 100*time.Millisecond, "want snapshots %v", want)
			}
			// collected waits until the chunks only snapshot id held are
			// gone from the repository.
			collected := func(id string) {
				t.Helper()
				require.Eventually(t, func() bool {
					for _, k := range chunksOf[id] {
						if has, err := objects.Has(t.Context(), k); err != nil || has {
							return false
						}
					}
					return true
				}, 2*time.Minute, 200*time.Millisecond, "the chunks of pruned snapshot %s are collected", id)
			}

			s0 := take(0)
			s.MustCLI("snapshot", "protect", "db@"+s0)
			s1 := take(1)
			c, err := client.Dial(t.Context(), s.NBD, client.Options{Export: "db@" + s1})
			require.NoError(t, err)
			defer c.Close()
			s2 := take(2)
			s3 := take(3)
			settled(s0, s1, s2, s3)
			s4 := take(4)
			settled(s0, s1, s3, s4) // s1 stays while exported
			collected(s2)
			got := make([]byte, 2<<20)
			require.NoError(t, c.ReadAt(t.Context(), got, 0))
			assert.True(t, bytes.Equal(images[s1], got), "the exported snapshot reads as it was")
			require.NoError(t, c.Close())

			s5 := take(5)
			settled(s0, s4, s5)
			collected(s1)
			collected(s3)
			for _, id := range []string{s0, s4, s5} {
				assert.True(t, bytes.Equal(images[id], readNBD(t, s, "db@"+id)), "db@%s reads as it was", id)
				for _, k := range chunksOf[id] {
					has, err := objects.Has(t.Context(), k)
					require.NoError(t, err)
					assert.True(t, has, "kept snapshot %s keeps its chunk %s", id, k)
				}
			}
			assert.Contains(t, s.Log(), "pruned by the volume's policy")
			v := show()
			require.NotNil(t, v.Status.LastPrune)
			assert.Equal(t, 2, v.Status.LastPrune.Removed)
			assert.Empty(t, v.Status.LastPrune.Error)

			require.Equal(t, 0, s.Stop(), s.Log())
			s.Restart()
			require.NotNil(t, show().Retention, "the policy is in the volume's record")
			assert.Contains(t, s.MustCLI("volume", "set", "db", "--no-retention").Stdout, "no retention policy; every snapshot is kept")
			assert.Nil(t, show().Retention)
			s6 := take(6)
			s7 := take(7)
			settled(s0, s4, s5, s6, s7)
			assert.Len(t, ids, 8)
		})
	}
}
