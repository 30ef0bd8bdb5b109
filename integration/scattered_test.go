package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/nbdtest"
	"github.com/nbdvault/nbdvault/integration/servertest"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// TestScatteredWritesRepositoryGrowth is issue 11 as a test: the load of a
// database or a VM, small writes scattered over the volume, must make the
// repository grow with the bytes written, not with the chunks they touch.
//
// A real server (local repository, checkpoints every 2 s) gets a 512 MiB
// volume filled with random data and sealed; then fio's nbd engine writes
// random 4 KiB blocks at random offsets, 400 a second for 60 s, queue
// depth 16, while the volume's lag is polled every 500 ms. Once all is
// sealed again the repository may have grown by at most 3× the bytes fio
// wrote (+32 MiB for manifests and the like), and the lag must have stayed
// within two checkpoint intervals (+20 s of slack for a shared CI machine).
//
// The volume's content is checked too: a second fio run with the same
// seed and job writes the same blocks (offsets and data) into a copy of
// the fill, its number of I/Os the first run's, and the volume must read
// back (nbdcopy) equal to it.
func TestScatteredWritesRepositoryGrowth(t *testing.T) {
	tools := nbdtest.Tools(t, "fio", "nbdcopy")
	const (
		size     = 512 * mib
		interval = 2 * time.Second
		iops     = 400
		runtime  = 60 * time.Second
		seed     = 11 // fio's --randseed: the same offsets and data in both runs
		// The goal, and the lag the checkpoint interval promises.
		maxRatio  = 3
		overhead  = 32 * mib
		lagBound  = 2*interval + 20*time.Second
		sealLimit = 3 * time.Minute // to wait for the writes to be sealed
	)
	repo := filepath.Join(t.TempDir(), "repo")
	s := servertest.Start(t, servertest.Options{Repo: repo, Args: []string{"--checkpoint-interval", interval.String()}})
	s.MustCLI("volume", "create", "db", "--size", strconv.FormatInt(size, 10))
	admin := s.API()
	uri := s.URI("db")

	// 1. Fill the volume with random data (incompressible) and seal it.
	ref := filepath.Join(t.TempDir(), "ref.img")
	writeRandomFile(t, ref, size, seed)
	start := time.Now()
	r := nbdtest.Run(t, cmdTimeout, tools["nbdcopy"], ref, uri)
	require.True(t, r.OK(), "fill the volume:\n%s\nserver log:\n%s", r, tailString(s.Log(), 4000))
	filled := time.Since(start)
	_, err := waitScatteredSealed(t.Context(), admin, "db", sealLimit, nil)
	require.NoError(t, err, "the fill must be sealed\nserver log:\n%s", tailString(s.Log(), 4000))
	fillSealed := time.Since(start)
	bytesBefore, objsBefore := repoUsage(t, repo)
	t.Logf("fill: %d MiB copied in %s, sealed after %s; repository %.1f MiB in %d objects",
		size/mib, filled.Round(time.Millisecond), fillSealed.Round(time.Millisecond), mibs(bytesBefore), objsBefore)

	// 2. Scattered 4 KiB writes, the lag polled every 500 ms until they
	// are all sealed.
	lag := &lagPoller{}
	pollCtx, stopPoll := context.WithCancel(t.Context())
	var polling sync.WaitGroup
	polling.Go(func() { lag.run(pollCtx, admin, "db", 500*time.Millisecond) })
	defer func() { stopPoll(); polling.Wait() }()

	report := filepath.Join(t.TempDir(), "fio.json")
	job := []string{
		"--name=scattered",
		"--rw=randwrite",
		"--bs=4k",
		"--iodepth=16",
		"--size=" + strconv.FormatInt(size, 10),
		"--randseed=" + strconv.Itoa(seed),
		"--refill_buffers",
	}
	r = nbdtest.Run(t, runtime+2*time.Minute, tools["fio"], append(job,
		"--ioengine=nbd",
		"--uri="+uri,
		"--rate_iops="+strconv.Itoa(iops),
		"--runtime="+strconv.Itoa(int(runtime.Seconds())),
		"--time_based",
		"--output-format=json",
		"--output="+report,
	)...)
	fioDone := time.Now()
	nbdJob := readScatteredFio(t, report, r)
	require.True(t, r.OK(), "fio must exit 0:\n%s", r)
	require.Zero(t, nbdJob.Error, "fio job error (errno)")
	written := nbdJob.Write.IOBytes
	require.Positive(t, written, "fio wrote nothing")
	assert.Equal(t, nbdJob.Write.TotalIOs*4096, written, "fio's writes are all 4 KiB")
	assert.Zero(t, nbdJob.Write.ShortIOs, "short writes")

	// 3. Wait until everything is sealed, then measure.
	sealed, sealErr := waitScatteredSealed(t.Context(), admin, "db", sealLimit, lag.observe)
	drain := time.Since(fioDone)
	stopPoll()
	polling.Wait()
	bytesAfter, objsAfter := repoUsage(t, repo)
	if sealErr == nil {
		// Anything the repository frees after a seal is freed in the
		// background: measure again until two walks agree.
		for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); {
			time.Sleep(time.Second)
			b, o := repoUsage(t, repo)
			if b == bytesAfter && o == objsAfter {
				break
			}
			bytesAfter, objsAfter = b, o
		}
	}

	// 4. The figures, then the bounds.
	growth := bytesAfter - bytesBefore
	ratio := float64(growth) / float64(written)
	maxLag, pollErr := lag.result()
	figures := fmt.Sprintf("fio wrote %.1f MiB (%d × 4 KiB at %.0f IOPS, target %d, for %s); "+
		"repository %.1f MiB → %.1f MiB, growth %.1f MiB = %.1f× the bytes written (bound %d× + %d MiB = %.1f MiB); "+
		"objects %d → %d (+%d); max lag %s (bound %s); sealed %s after fio ended (volume status then: %+v)",
		mibs(written), nbdJob.Write.TotalIOs, nbdJob.Write.IOPS, iops, runtime,
		mibs(bytesBefore), mibs(bytesAfter), mibs(growth), ratio, maxRatio, overhead/mib, mibs(maxRatio*written+overhead),
		objsBefore, objsAfter, objsAfter-objsBefore, maxLag.Round(100*time.Millisecond), lagBound, drain.Round(100*time.Millisecond), sealed)
	t.Log(figures)
	require.NoError(t, sealErr, "the scattered writes must be sealed: %s\nserver log:\n%s", figures, tailString(s.Log(), 4000))
	assert.NoError(t, pollErr, "polling the volume's lag")
	assert.LessOrEqual(t, growth, maxRatio*written+overhead,
		"the repository must grow with the bytes written, at most %d× them + %d MiB: %s", maxRatio, overhead/mib, figures)
	assert.LessOrEqual(t, maxLag, lagBound,
		"the lag must stay within two checkpoint intervals (+20 s slack): %s", figures)

	// 5. The volume holds what fio wrote: the same job with the same seed,
	// as many I/Os, into the reference file.
	r = nbdtest.Run(t, cmdTimeout, tools["fio"], append(job,
		"--ioengine=psync", // iodepth stays 16: fio fills that many buffers first, from the same random state
		"--filename="+ref,
		"--number_ios="+strconv.FormatInt(nbdJob.Write.TotalIOs, 10),
		"--output-format=json",
		"--output="+filepath.Join(t.TempDir(), "ref.json"),
	)...)
	require.True(t, r.OK(), "fio on the reference file:\n%s", r)
	got, r := nbdcopyOut(t, uri)
	require.NotNil(t, got, "read the volume back:\n%s", r)
	want, err := os.ReadFile(ref)
	require.NoError(t, err)
	if !bytes.Equal(want, got) {
		blocks, first := 0, int64(-1)
		for off := 0; off < len(want); off += 4096 {
			if !bytes.Equal(want[off:off+4096], got[off:off+4096]) {
				blocks++
				if first < 0 {
					first = int64(off)
				}
			}
		}
		t.Errorf("the volume differs from the reference in %d of fio's %d 4 KiB blocks (the first at %d)", blocks, nbdJob.Write.TotalIOs, first)
	} else {
		t.Logf("content: the volume reads back equal to the reference (the fill and fio's %d writes replayed into a file)", nbdJob.Write.TotalIOs)
	}
}

// writeRandomFile writes size pseudo-random bytes (ChaCha8 from seed) to a
// new file at path.
func writeRandomFile(t *testing.T, path string, size int64, seed uint64) {
	t.Helper()
	f, err := os.Create(path)
	require.NoError(t, err)
	defer f.Close()
	_, err = io.CopyN(f, rand.NewChaCha8([32]byte{0: byte(seed)}), size)
	require.NoError(t, err)
	require.NoError(t, f.Close())
}

// scatteredFioJob is the part of a job in fio's JSON report this test reads.
type scatteredFioJob struct {
	Error int `json:"error"`
	Write struct {
		IOBytes  int64   `json:"io_bytes"`
		TotalIOs int64   `json:"total_ios"`
		ShortIOs int64   `json:"short_ios"`
		IOPS     float64 `json:"iops"`
	} `json:"write"`
}

// readScatteredFio decodes fio's JSON report, which must hold one job.
func readScatteredFio(t *testing.T, report string, r *nbdtest.Result) scatteredFioJob {
	t.Helper()
	out, err := os.ReadFile(report)
	require.NoError(t, err, "fio wrote no report:\n%s", r)
	var rep struct {
		Jobs []scatteredFioJob `json:"jobs"`
	}
	require.NoError(t, json.NewDecoder(bytes.NewReader(out)).Decode(&rep), "decode fio's report:\n%s\n%s", out, r)
	require.Len(t, rep.Jobs, 1, "fio's report:\n%s", out)
	return rep.Jobs[0]
}

// waitScatteredSealed polls the volume until the repository holds all of
// it (no lag, no checkpoint or snapshot waiting), for at most limit, and
// calls observe (if not nil) with every state it sees.
func waitScatteredSealed(ctx context.Context, admin *api.Client, vol string, limit time.Duration, observe func(api.VolumeStatus)) (api.VolumeStatus, error) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	var last api.VolumeStatus
	var lastErr error
	for {
		v, err := admin.Volume(ctx, vol)
		switch {
		case err != nil:
			lastErr = err
		case v.Status == nil:
			lastErr = errors.New("the server reports no upload state")
		default:
			last, lastErr = *v.Status, nil
			if observe != nil {
				observe(last)
			}
			if last.LagSeconds == 0 && last.PendingSnapshots == 0 {
				return last, nil
			}
		}
		select {
		case <-ctx.Done():
			return last, fmt.Errorf("not sealed after %s (last state %+v, last error %v)", limit, last, lastErr)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// lagPoller records the largest lag a volume reports.
type lagPoller struct {
	mu     sync.Mutex
	max    time.Duration
	polls  int
	errs   int
	lastEr error
}

func (p *lagPoller) observe(st api.VolumeStatus) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.polls++
	p.max = max(p.max, time.Duration(st.LagSeconds*float64(time.Second)))
}

func (p *lagPoller) run(ctx context.Context, admin *api.Client, vol string, every time.Duration) {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		v, err := admin.Volume(ctx, vol)
		switch {
		case ctx.Err() != nil:
			return
		case err != nil || v.Status == nil:
			p.mu.Lock()
			p.errs++
			p.lastEr = cmpErr(err, errors.New("the server reports no upload state"))
			p.mu.Unlock()
		default:
			p.observe(*v.Status)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// result is the largest lag seen, and an error if no poll succeeded or
// some failed.
func (p *lagPoller) result() (time.Duration, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.errs > 0 || p.polls == 0 {
		return p.max, fmt.Errorf("%d of %d polls failed, the last: %v", p.errs, p.errs+p.polls, p.lastEr)
	}
	return p.max, nil
}

func cmpErr(err, otherwise error) error {
	if err != nil {
		return err
	}
	return otherwise
}

// repoUsage is the bytes and the number of regular files under a local
// repository (files that go while it walks are not counted).
func repoUsage(t *testing.T, dir string) (bytes, objects int64) {
	t.Helper()
	err := filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		fi, err := d.Info()
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		bytes += fi.Size()
		objects++
		return nil
	})
	require.NoError(t, err, "walk the repository")
	return bytes, objects
}

func mibs(b int64) float64 { return float64(b) / float64(mib) }

func tailString(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return strings.TrimSpace(s)
}
