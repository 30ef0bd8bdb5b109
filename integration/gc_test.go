package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/integration/miniotest"
	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// TestGC drives garbage collection through the real binary, on a local
// repository and on MinIO: a dry run deletes nothing; a collection
// deletes exactly the chunks nothing references, and what is kept reads
// back as written; deleting every volume leaves no chunk at all.
func TestGC(t *testing.T) {
	for _, repo := range []string{"local", "minio"} {
		t.Run(repo, func(t *testing.T) {
			// No points in time (they would keep old chunks); a short lease, so
			// that a delete's hold (a third of it) is short.
			opts := servertest.Options{Args: []string{"--journal-retention", "0", "--lease-ttl", "6s"}}
			s, objects := startOn(t, repo, opts)
			chunks := func() int {
				n := 0
				require.NoError(t, objects.List(t.Context(), "chunks/", func(string) error { n++; return nil }))
				return n
			}
			gc := func(args ...string) api.GCReport {
				var rep api.GCReport
				require.NoError(t, json.Unmarshal([]byte(s.MustCLI(append([]string{"gc", "--json"}, args...)...).Stdout), &rep))
				return rep
			}

			images := map[string][]byte{}
			for i, vol := range []string{"a", "b"} {
				s.MustCLI("volume", "create", vol, "--size", "2M", "--chunk-size", "64K")
				writeNBD(t, s, vol, nbdtest.RandomBytes(uint64(i+1), 1<<20), 0)
				s.MustCLI("snapshot", "create", vol, "--label", "one", "--wait")
				images[vol+"@one"] = readNBD(t, s, vol)
			}
			// a is rewritten whole, and its first snapshot deleted: its
			// old chunks are garbage.
			writeNBD(t, s, "a", nbdtest.RandomBytes(3, 1<<20), 0)
			s.MustCLI("snapshot", "create", "a", "--label", "two", "--wait")
			images["a@two"] = readNBD(t, s, "a")
			// What a@one alone uses, counted by a dry run, is what
			// deleting it frees.
			gc("--dry-run")
			snaps := func(vol string) map[string]api.Snapshot {
				var ss []api.Snapshot
				require.NoError(t, json.Unmarshal([]byte(s.MustCLI("snapshot", "list", vol, "--json").Stdout), &ss))
				by := map[string]api.Snapshot{}
				for _, sn := range ss {
					by[sn.Label] = sn
				}
				return by
			}
			one := snaps("a")["one"]
			require.NotNil(t, one.Used, "a dry run counted a@one")
			require.NotNil(t, one.LogicalReferenced)
			assert.Equal(t, int64(1<<20), *one.LogicalReferenced, "a@one reads 1 MiB of data")
			assert.Greater(t, *one.Used, int64(1<<20), "a@one alone holds its 1 MiB of random data, and index pages")
			stored := func(prefix string) (n int64) {
				require.NoError(t, objects.ListSizes(t.Context(), prefix, func(_ string, size int64) error { n += size; return nil }))
				return n
			}
			s.MustCLI("snapshot", "delete", "a@one")
			delete(images, "a@one")

			before, beforeBytes := chunks(), stored("chunks/")
			dry := gc("--dry-run")
			assert.True(t, dry.DryRun)
			assert.Equal(t, before, dry.Listed)
			assert.GreaterOrEqual(t, dry.Unreferenced, 16, "a's first 1 MiB, 16 chunks of 64 KiB, is garbage")
			assert.Zero(t, dry.Deleted)
			assert.Equal(t, before, chunks(), "a dry run deletes nothing")

			rep := gc()
			assert.Equal(t, dry.Unreferenced, rep.Deleted)
			assert.Equal(t, before-rep.Deleted, chunks())
			assert.Equal(t, *one.Used, beforeBytes-stored("chunks/"), "deleting a@one freed its USED")
			assert.Zero(t, gc("--dry-run").Unreferenced, "nothing left to collect")
			out := s.MustCLI("gc", "--dry-run").Stdout
			assert.Contains(t, out, "referenced by nothing: would delete 0", out)

			// Nothing is unreferenced now: the repository's stored bytes
			// are every chunk and page, and every journal pack.
			var st api.Status
			require.NoError(t, json.Unmarshal([]byte(s.MustCLI("status", "--json").Stdout), &st))
			require.NotNil(t, st.Space, "status --json has the space the dry run counted")
			assert.Equal(t, stored("chunks/"), st.Space.DataStored+st.Space.PageStored)
			assert.Equal(t, stored("chunks/")+stored("volumes/a/journal/")+stored("volumes/b/journal/"), st.Space.Stored)
			assert.Equal(t, int64(2<<20), st.Space.Logical, "a and b each read 1 MiB of data")
			assert.Equal(t, *snaps("b")["one"].LogicalReferenced, int64(1<<20))

			check := func(what string) {
				t.Helper()
				for export, want := range images {
					assert.True(t, bytes.Equal(want, readNBD(t, s, export)), "%s: %s reads as written", what, export)
				}
			}
			check("after gc")
			require.Equal(t, 0, s.Stop(), s.Log())
			s.Restart()
			check("after gc and a restart")
			assert.False(t, gc().Listing, "after a clean restart the inventory is trusted: no listing")

			// An object put into the repository by hand: the inventory
			// does not know it, a listing does.
			var stray chunkstore.ID
			stray[0], stray[31] = 0xab, 1
			require.NoError(t, objects.Put(t.Context(), chunkstore.Key(stray), []byte("by hand")))
			assert.Zero(t, gc().Unreferenced, "the inventory does not know it")
			listed := gc("--list")
			assert.True(t, listed.Listing)
			assert.Equal(t, 1, listed.Deleted, "a listing finds it")

			// A crash: the next collection lists; in a local repository,
			// the temporary files a crash left are removed at the start.
			var tmp string
			if repo == "local" {
				tmp = filepath.Join(s.Data, "repo", "chunks", "ab", ".tmp-crash")
				require.NoError(t, os.MkdirAll(filepath.Dir(tmp), 0o700))
				require.NoError(t, os.WriteFile(tmp, make([]byte, 4096), 0o600))
				old := time.Now().Add(-time.Hour)
				require.NoError(t, os.Chtimes(tmp, old, old))
			}
			s.Kill()
			s.Restart()
			assert.True(t, gc().Listing, "after a crash the collection lists")
			if tmp != "" {
				assert.Eventually(t, func() bool { _, err := os.Stat(tmp); return os.IsNotExist(err) }, time.Minute, 100*time.Millisecond,
					"the temporary file a crash left is removed")
				assert.Contains(t, s.Log(), "removed the temporary files a crash left")
			}
			check("after a crash")

			// Deleting every volume leaves nothing: the server collects
			// after a delete; a collection by hand finishes it.
			s.MustCLI("volume", "delete", "a")
			s.MustCLI("volume", "delete", "b")
			gc()
			assert.Zero(t, chunks(), "no chunk is left once no volume is")
			assert.Contains(t, s.Log(), "garbage collection", "the server collected after the deletes")
		})
	}
}

// startOn starts a server on repo, "local" (a folder in its data folder)
// or "minio" (a new prefix of the shared MinIO), and returns it with a
// backend that reads that repository directly, around the server.
func startOn(t *testing.T, repo string, opts servertest.Options) (*servertest.Server, chunkstore.Backend) {
	t.Helper()
	var objects chunkstore.Backend
	if repo == "minio" {
		m := miniotest.StartShared(t)
		prefix := strings.ToLower(strings.NewReplacer("/", "-", "_", "-").Replace(t.Name())) + "-" + fmt.Sprint(time.Now().UnixNano())
		opts.Repo, opts.Env = m.Location(prefix), append(opts.Env, m.Env()...)
		b, err := chunkstore.NewS3(m.Config(prefix))
		require.NoError(t, err)
		objects = b
	}
	s := servertest.Start(t, opts)
	if objects == nil {
		b, err := chunkstore.NewLocal(filepath.Join(s.Data, "repo"))
		require.NoError(t, err)
		objects = b
	}
	return s, objects
}
