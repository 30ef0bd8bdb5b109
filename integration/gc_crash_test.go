package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/client"
	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// TestGCKill9 kills the real server with SIGKILL, 20 times, while fio
// writes the volume, snapshots are taken and pruned, and garbage
// collections run one after another: at random points of the
// collections, of the seals, of the prunes. After each restart every
// snapshot that was not pruned reads back exactly as it read when it was
// taken, and a collection at rest finishes the work of the one cut
// short and loses nothing either.
func TestGCKill9(t *testing.T) {
	fio := nbdtest.Tool(t, "fio")
	const size, rounds = 8 << 20, 20
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	r := rand.New(rand.NewPCG(seed, 13))
	s := servertest.Start(t, servertest.Options{Args: []string{
		"--checkpoint-interval", "100ms", "--journal-retention", "0", "--lease-ttl", "3s"}})
	s.MustCLI("volume", "create", "vol", "--size", fmt.Sprint(size), "--chunk-size", "64K")

	snaps := map[string][]byte{} // every snapshot not pruned, as it read when taken
	maybe := map[string][]byte{} // snapshots a prune cut short may or may not have removed
	collected, deleted := 0, 0
	var phase atomic.Value       // what the work was doing
	killedIn := map[string]int{} // kills by what the work was doing
	for round := range rounds {
		admin := s.API()
		ctx, cancel := context.WithCancel(t.Context())
		// fio writes the head, 16 requests in flight, until the kill.
		w := exec.CommandContext(ctx, fio, "--name=w", "--ioengine=nbd", "--uri="+s.URI("vol"), "--rw=randwrite",
			"--bsrange=4k-128k", "--iodepth=16", "--size="+fmt.Sprint(size), "--time_based", "--runtime=60",
			fmt.Sprintf("--randseed=%d", seed+uint64(round)))
		require.NoError(t, w.Start())
		fioDone := make(chan error, 1)
		go func() { fioDone <- w.Wait() }()

		work := make(chan error, 1)
		go func() {
			var err error
			defer func() { work <- err }()
			for ctx.Err() == nil {
				phase.Store("snapshot")
				var snap api.Snapshot
				if snap, err = admin.CreateSnapshot(ctx, "vol", ""); err != nil {
					return
				}
				content, rerr := readExport(ctx, s, "vol@"+snap.ID)
				if rerr != nil {
					err = rerr
					return
				}
				snaps[snap.ID] = content
				// Prune to the last two: what a cut-short prune removed
				// is unknown until the restart.
				for id, c := range snaps {
					maybe[id] = c
				}
				phase.Store("prune")
				var res api.Pruned
				if res, err = admin.Prune(ctx, "vol", api.Prune{Policy: api.Policy{Last: 2}}); err != nil {
					return
				}
				for _, d := range res.Snapshots {
					if !d.Keep && d.Error == "" {
						delete(snaps, d.ID)
					}
				}
				clear(maybe)
				phase.Store("gc")
				var rep api.GCReport
				if rep, err = admin.CollectGarbage(ctx, api.GC{}); err != nil {
					return
				}
				collected++
				deleted += rep.Deleted
			}
		}()
		time.Sleep(time.Duration(200+r.IntN(1000)) * time.Millisecond)
		s.Kill()
		killedIn[fmt.Sprint(phase.Load())]++
		cancel()
		<-fioDone
		werr := <-work // fails once the server is gone
		if werr != nil && !errors.Is(werr, context.Canceled) {
			t.Logf("round %d: the work stopped at the kill: %v", round, werr)
		}

		s.Restart()
		check := func(what string) {
			t.Helper()
			list, err := s.API().Snapshots(t.Context(), "vol")
			require.NoError(t, err)
			have := map[string]bool{}
			for _, sn := range list {
				have[sn.ID] = true
			}
			for id, want := range snaps {
				require.True(t, have[id] || maybe[id] != nil, "%s: snapshot %s is gone, and no prune removed it (seed %d)", what, id, seed)
				if !have[id] {
					continue
				}
				got, err := readExport(t.Context(), s, "vol@"+id)
				require.NoError(t, err, "%s: snapshot %s (seed %d)", what, id, seed)
				require.True(t, bytes.Equal(want, got), "%s: snapshot %s differs (seed %d)", what, id, seed)
			}
		}
		check(fmt.Sprintf("round %d, after the restart", round))
		rep, err := s.API().CollectGarbage(t.Context(), api.GC{})
		require.NoError(t, err)
		deleted += rep.Deleted
		check(fmt.Sprintf("round %d, after a collection at rest", round))
		for id := range maybe {
			if _, err := s.API().Snapshot(t.Context(), "vol", id); err != nil {
				delete(snaps, id)
			}
		}
		clear(maybe)
	}
	t.Logf("%d rounds: killed during %v; %d collections completed between kills, %d chunks deleted in all", rounds, killedIn, collected, deleted)
	require.Positive(t, deleted, "the collections deleted something")
	// The last restart's log may still be sealing (a checkpoint sealed
	// then drops the one before it, with --journal-retention 0): at rest
	// means nothing pending, then one more collection.
	require.Eventually(t, func() bool {
		v, err := s.API().Volume(t.Context(), "vol")
		return err == nil && v.Status != nil && v.Status.PendingBytes == 0 && v.Status.PendingSnapshots == 0
	}, 2*time.Minute, 50*time.Millisecond, "the volume is all uploaded")
	_, err := s.API().CollectGarbage(t.Context(), api.GC{})
	require.NoError(t, err)
	dry, err := s.API().CollectGarbage(t.Context(), api.GC{DryRun: true})
	require.NoError(t, err)
	require.Zero(t, dry.Unreferenced, "nothing is left to collect")
}

// readExport reads a whole export, or says why it could not.
func readExport(ctx context.Context, s *servertest.Server, export string) ([]byte, error) {
	c, err := client.Dial(ctx, s.NBD, client.Options{Export: export})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	p := make([]byte, c.Size())
	return p, c.ReadAt(ctx, p, 0)
}
